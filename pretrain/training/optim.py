"""Parameter groups, the optimizers (AdamW; Muon + AdamW), the learning-rate and batch-size
schedules and gradient clipping.

The schedules are pure functions of the optimizer step (``lr_at``, ``batch_tokens_at``), so a
resumed run needs no scheduler state: the step alone sets the learning rate and the batch.

``optim.name``:

- ``adamw``: one ``torch.optim.AdamW`` over every parameter (weight decay on >=2-D tensors only).
- ``muon``: ``torch.optim.Muon`` for the 2-D weight matrices inside the transformer blocks
  (attention ``c_attn`` / ``c_proj``, MLP ``c_fc`` / ``c_proj``), AdamW for everything else: the
  token and position embeddings, the LM head (tied or not), biases and LayerNorm gains. Muon
  orthogonalises each update matrix (Newton-Schulz), which only makes sense for a whole hidden
  matrix; embeddings are lookups and the head is an output layer, so they stay on AdamW (Keller
  Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024). The two optimizers
  step together behind ``Optimizers`` (one ``state_dict`` holding both).

Every group follows one schedule: ``set_lr`` gives a group ``lr * lr_ratio``, where Muon's
groups carry ``lr_ratio = optim.muon_lr / optim.lr``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# The names the config accepts (pretrain/config.py reads them from here).
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
COOLDOWNS = ("linear", "1-sqrt")
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # Muon's Newton-Schulz dtype


def cooldown_start(max_steps: int, cooldown_frac: float) -> int:
    """First step of the wsd cool-down: the last ``round(cooldown_frac * max_steps)`` steps decay."""
    return max_steps - round(cooldown_frac * max_steps)


def lr_at(step: int, max_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float,
          name: str = "cosine", cooldown_frac: float = 0.2, cooldown: str = "linear") -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup_steps``
    (step 0 gets max_lr / warmup_steps, never 0), then down to ``min_lr_ratio * max_lr`` at
    ``max_steps``; constant at the minimum afterwards. The way down is ``name``:

    - ``cosine``: a half cosine over all the steps after the warmup;
    - ``wsd`` (warmup-stable-decay, a.k.a. trapezoidal): ``max_lr`` until the last
      ``cooldown_frac`` of ``max_steps``, then a ``linear`` or ``1-sqrt`` cool-down
      (1 - sqrt(progress): Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
      Beyond Fixed Training Durations", found it beats linear at equal length)::

          lr |   ________________
             |  /                \\__         1-sqrt drops fast, then flattens
             | /                    \\__
             +----------------------------- step
              warmup   stable      cool-down
    """
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    if name == "wsd":
        start = max(cooldown_start(max_steps, cooldown_frac), warmup_steps)
        if step < start:
            return max_lr
        progress = (step - start) / (max_steps - start)  # in [0, 1)
        coeff = 1.0 - progress if cooldown == "linear" else 1.0 - math.sqrt(progress)  # 1 -> 0
        return min_lr + coeff * (max_lr - min_lr)
    if name != "cosine":
        raise ValueError(f"schedule.name={name!r} must be one of {', '.join(SCHEDULES)}")
    decay_steps = max_steps - warmup_steps
    progress = (step - warmup_steps) / decay_steps  # in [0, 1)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


def batch_tokens_at(step: int, global_batch_tokens: int, start_tokens: int, warmup_steps: int) -> int:
    """Global batch (tokens) of optimizer step ``step``: with a batch-size warmup
    (``warmup_steps > 0``) it starts at ``start_tokens`` and grows in whole multiples of it,
    linearly in the step, reaching ``global_batch_tokens`` at ``warmup_steps``::

        batch(s) = start * (1 + floor((G / start - 1) * s / warmup_steps))   for s < warmup_steps

    Every batch is a multiple of ``start_tokens``, so each is a whole number of micro-steps and
    the loader's stream (which only counts sequences) stays the same on any world size."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return global_batch_tokens
    units = global_batch_tokens // start_tokens
    return start_tokens * (1 + (units - 1) * step // warmup_steps)


def tokens_before(step: int, global_batch_tokens: int, start_tokens: int, warmup_steps: int) -> int:
    """Tokens consumed by steps ``0 .. step-1`` (closed form after the warmup)."""
    n = min(step, max(warmup_steps, 0))
    warm = sum(batch_tokens_at(s, global_batch_tokens, start_tokens, warmup_steps) for s in range(n))
    return warm + (step - n) * global_batch_tokens


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block (attention / MLP projections): Muon's parameters.
    Embeddings and the LM head live outside ``transformer.h`` and stay on AdamW."""
    return p.dim() == 2 and ".h." in f".{name}"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on >=2-D tensors (matmul weights, embeddings), none on
    biases and LayerNorm gains. ``named_parameters`` yields a tied weight once."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with the dtype of its Newton-Schulz iteration as a setting.

    torch runs the iteration in bf16 (fast on GPUs, what modded-nanogpt does); ``ns_dtype=
    torch.float32`` runs the same algorithm in fp32. Measured reason: bf16 rounding of the
    orthogonalised update turns the ~1e-8 reduction-order differences between a DDP run and a
    single process into ~2e-5 loss differences within 8 steps of the tiny test model, so the
    DDP == single-process check (1e-5) holds only in fp32. The fp32 path is torch's
    ``_single_tensor_muon`` step for step (``test_optim`` checks it equals torch's in bf16), with
    the same state (``momentum_buffer``), so checkpoints move between the two."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16 and closure is None:
            return super().step()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype, group.get("use_addmm", True))
                rows, cols = p.shape
                ratio = (math.sqrt(max(1, rows / cols)) if group["adjust_lr_fn"] in (None, "original")
                         else 0.2 * math.sqrt(max(rows, cols)))
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * ratio)
        return loss


def newton_schulz(g: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype,
                  use_addmm: bool = True) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz orthogonalisation of ``g`` (rows, cols), in ``dtype``.
    ``use_addmm``: the fused form (torch 2.13 always; some versions make it the group's
    ``use_addmm`` option, whose unfused form is the other branch)."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T  # (cols, rows): iterate on the wide orientation, the smaller Gram matrix
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        if use_addmm:
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        else:
            x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Optimizers:
    """Several torch optimizers over disjoint parameters, stepped as one: ``step``, ``zero_grad``,
    ``param_groups`` (all of them, in order) and one ``state_dict`` ``{name: state}`` for the
    checkpoint (plain data, so ``weights_only`` loads work)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = dict(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != set(self.optimizers):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"optimizer state holds {found}, this run's optimizers are {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def build_optimizer(model: nn.Module, o, device: torch.device) -> torch.optim.Optimizer | Optimizers:
    """The optimizer of ``o`` (the config's ``optim`` section, ``pretrain.config.OptimSection``) over
    ``model``'s parameters. ``adamw``: AdamW over ``param_groups``. ``muon``: ``Muon``
    (torch.optim.Muon) over the hidden matrices and AdamW over the rest, behind ``Optimizers``."""
    fused = o.fused
    if fused is None:  # the fused kernel (one pass over each tensor) exists for CUDA and CPU
        fused = device.type in ("cuda", "cpu")
    if o.name == "adamw":
        return torch.optim.AdamW(
            param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused
        )
    if o.name != "muon":
        raise ValueError(f"optim.name={o.name!r} must be one of {', '.join(OPTIMIZERS)}")
    hidden, decay, no_decay = [], [], []
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_hidden_matrix(pname, p):
            hidden.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    muon_opt = Muon(
        [{"params": hidden, "lr_ratio": o.muon_lr / o.lr}], ns_dtype=NS_DTYPES[o.muon_ns_dtype],
        lr=o.muon_lr, weight_decay=o.muon_weight_decay, momentum=o.muon_momentum, nesterov=o.muon_nesterov,
        ns_steps=o.muon_ns_steps, adjust_lr_fn=o.muon_adjust_lr,
    )
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused,
    )
    return Optimizers({"muon": muon_opt, "adamw": adamw})


def set_lr(optimizer: torch.optim.Optimizer | Optimizers, lr: float) -> None:
    """Every group gets ``lr`` (the schedule's value for optim.lr) times its ``lr_ratio`` (1 if unset)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_ratio"] if "lr_ratio" in group else lr


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all ranks for FSDP's sharded DTensor gradients), and clip
    to ``max_norm`` when it is > 0. Returns the norm before clipping as a plain tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
    if hasattr(total, "full_tensor"):  # a DTensor: the partial norms of each shard, reduced here
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total

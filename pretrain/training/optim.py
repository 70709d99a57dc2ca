"""Parameter groups, the optimizers (AdamW; Muon + AdamW) and gradient clipping. The names the
config accepts and the learning-rate and batch-size schedules are ``pretrain/schedule.py``'s.

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

from pretrain.schedule import NS_DTYPE_NAMES, OPTIMIZERS

NS_DTYPES = dict(zip(NS_DTYPE_NAMES, (torch.bfloat16, torch.float32)))  # Muon's Newton-Schulz dtype by name


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

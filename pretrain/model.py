"""GPT-2, written from scratch in plain PyTorch: architecture only.

This file imports torch and the standard library and nothing else: no distribution,
no compile, no precision policy, no I/O. Those wrap the model from outside
(``pretrain/parallel.py``). Parameter names follow Hugging Face's ``GPT2LMHeadModel``
so that conversion (``pretrain/hf.py``) is a table.

::

    idx (B, T) ──► wte (B, T, C) + wpe (T, C) ──► drop
                     │
                     ▼   × n_layer
              ┌──────────────────────────────┐
              │ x = x + attn(ln_1(x))        │   pre-LayerNorm blocks with
              │ x = x + mlp(ln_2(x))         │   residual connections
              └──────────────────────────────┘
                     │
                     ▼
                   ln_f ──► lm_head (weight tied to wte) ──► logits (B, T, V)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    """Architecture facts of a GPT-2-family model. Everything the weights' shapes depend on,
    and nothing about how the model is trained."""

    block_size: int = 1024
    """Context length: the number of learned positions."""
    vocab_size: int = 50257
    """The tokenizer's vocabulary (GPT-2 BPE: 50,257)."""
    padded_vocab_size: int | None = None
    """Rows of the embedding / LM head. None = vocab_size. 50304 (a multiple of 128) makes the
    largest matmul markedly faster on GPUs; rows >= vocab_size are never given probability
    mass (their logits are -inf) and are dropped on export."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; n_embd must be divisible by it."""
    n_embd: int = 768
    """Width of the residual stream (C)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 for pretraining)."""
    bias: bool = True
    """Biases in Linear layers and LayerNorms (GPT-2 has them)."""
    activation: str = "gelu_tanh"
    """MLP nonlinearity: 'gelu_tanh' (GPT-2's 'gelu_new'), 'relu', or the research option 'relu2'
    (ReLU squared, So et al. 2021 "Primer"; modded-nanogpt): not GPT-2, so not exported."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm epsilon (GPT-2: 1e-5)."""
    tie_embeddings: bool = True
    """The LM head shares its weight with the token embedding (GPT-2 does). False = an untied
    head, its own (vocab_rows, n_embd) matrix; Hugging Face's GPT2LMHeadModel runs that too
    (tie_word_embeddings=false), so it still exports."""
    rotary: bool = False
    """Research option: rotary position embeddings (RoPE, Su et al. 2021) rotate each head's q and
    k by their absolute position, instead of adding learned positions (no wpe is built). Not
    GPT-2: gpt2-export refuses it."""
    rotary_base: float = 10000.0
    """RoPE base: pair i of a head turns by position * rotary_base**(-2i/head_size)."""
    qk_norm: bool = False
    """Research option: RMS-normalise each head's q and k (no gain) before the dot product
    (QK-norm, Henry et al. 2020; modded-nanogpt). Not GPT-2: gpt2-export refuses it."""

    def __post_init__(self) -> None:
        errors = []
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                errors.append(f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not errors and self.n_embd % self.n_head != 0:
            errors.append(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            errors.append(
                f"model.padded_vocab_size ({self.padded_vocab_size}) must be >= "
                f"model.vocab_size ({self.vocab_size})"
            )
        if self.activation not in ACTIVATIONS:
            errors.append(f"model.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def vocab_rows(self) -> int:
        """Rows of the embedding matrix (the padded vocabulary when padding is on)."""
        return self.padded_vocab_size or self.vocab_size

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


ACTIVATIONS = {
    # GPT-2 uses the tanh approximation of GELU ("gelu_new" in Hugging Face).
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # research option (not GPT-2)
}

PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Tiny sizes for tests and CPU smoke runs.
    "tiny": GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=4, n_embd=64),
    "tiny-vocab": GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=4, n_embd=32),
}


@dataclass
class KVCache:
    """Keys and values of past positions for incremental decoding, one pair per layer.

    ``k[i]``, ``v[i]``: (B, nh, T_max, hs), filled up to ``pos``. Preallocated so decoding
    never reallocates; ``pos`` is the number of positions already written."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    pos: int = 0

    @classmethod
    def empty(cls, config: GPTConfig, batch_size: int, max_len: int, device, dtype) -> KVCache:
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, max_len, hs)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
        )

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused qkv projection.

    ``c_attn`` maps C -> 3C (q, k, v for all heads at once); ``c_proj`` maps the concatenated
    heads back to C and writes into the residual stream, so it carries the scaled init
    (``is_residual_proj``). The default path is ``F.scaled_dot_product_attention`` (flash /
    memory-efficient kernels on GPU); ``reference_attention`` is the textbook formula, kept
    for tests."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_proj = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_reference = False  # tests flip this to compare against the explicit path
        self.qk_norm = config.qk_norm
        self.rotary_base = config.rotary_base if config.rotary else None

    def forward(self, x: torch.Tensor, layer_cache: tuple[torch.Tensor, torch.Tensor, int] | None = None):
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 × (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:  # research option: unit-RMS queries and keys per head
            q, k = F.rms_norm(q, (hs,)), F.rms_norm(k, (hs,))
        if self.rotary_base is not None:  # research option: rotate q, k by absolute position
            start = layer_cache[2] if layer_cache is not None else 0
            q, k = apply_rotary(q, start, self.rotary_base), apply_rotary(k, start, self.rotary_base)

        if layer_cache is not None:
            # Incremental decoding: write this chunk's k, v at [pos, pos+T) and attend over
            # everything written so far. A query at absolute position pos+i may see keys
            # 0..pos+i, so the mask is causal with an offset of pos. One new token (T == 1, every
            # step of sampling) sees every key: no mask at all (none to build per layer and
            # token, and unmasked SDPA is the fastest kernel on every device).
            k_all, v_all, pos = layer_cache
            k_all[:, :, pos : pos + T] = k
            v_all[:, :, pos : pos + T] = v
            k = k_all[:, :, : pos + T]  # (B, nh, pos+T, hs)
            v = v_all[:, :, : pos + T]  # (B, nh, pos+T, hs)
            mask = None if T == 1 else torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        elif self.use_reference:
            y = reference_attention(q, k, v)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


def apply_rotary(x: torch.Tensor, start: int, base: float) -> torch.Tensor:
    """Rotary position embedding of x (B, nh, T, hs) at positions start .. start+T-1, in the
    "rotate half" layout: channel i pairs with channel i + hs/2 and the pair turns by angle
    position * base**(-2i/hs). Scores q·k then depend on positions only through their difference."""
    T, hs = x.size(-2), x.size(-1)
    inv_freq = base ** (-torch.arange(0, hs, 2, device=x.device, dtype=torch.float32) / hs)  # (hs/2,)
    pos = torch.arange(start, start + T, device=x.device, dtype=torch.float32)  # (T,)
    angle = torch.outer(pos, inv_freq)  # (T, hs/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]  # (B, nh, T, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, nh, T, hs)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hs) + causal mask) v, spelled out. q, k, v: (B, nh, T, hs)."""
    T, hs = q.size(-2), q.size(-1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal, float("-inf"))
    att = F.softmax(att, dim=-1)
    return att @ v  # (B, nh, T, hs)


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C, nonlinearity, 4C -> C (``c_proj`` is a residual
    output projection, so it carries the scaled init)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_proj = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """One transformer block, pre-LayerNorm: normalise, transform, add back to the residual."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, layer_cache=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """The GPT-2 language model. ``forward(idx, targets)`` -> ``(logits, loss)``."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_rows, config.n_embd),  # token embedding
                # learned positions (none with rotary: positions enter through q and k)
                **({} if config.rotary else {"wpe": nn.Embedding(config.block_size, config.n_embd)}),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_rows, bias=False)
        if config.tie_embeddings:
            # One Parameter, two uses: the input embedding and the output projection.
            self.lm_head.weight = self.transformer.wte.weight
        # Rows of (B*T) per chunk of the fused LM head + cross-entropy (see ``forward``);
        # 0 = the full-logits path (for A/B comparisons), None = automatic. Not a GPTConfig field:
        # it changes how the loss is computed, not the architecture.
        self.loss_chunk_size: int | None = None
        self.init_weights()

    def init_buffers(self) -> None:
        """Fill the non-persistent buffers. ``init_weights`` calls it; call it yourself after
        ``to_empty()`` when loading weights into a meta-device model. (GPT-2 has none: padded
        vocabulary rows are sliced off or filled with -inf in ``forward``, no mask buffer.)"""

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation: every Linear and Embedding weight ~ N(0, 0.02), biases 0,
        LayerNorms (1, 0); residual output projections (marked ``is_residual_proj``) use
        std 0.02 / sqrt(2 · n_layer) so the residual stream's variance does not grow with
        depth (two residual additions per block). Buffers are rebuilt too, so a model built on
        the meta device and materialised with ``to_empty()`` is complete after this call."""
        self.init_buffers()
        std = 0.02
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if module is self.lm_head and self.config.tie_embeddings:
                    continue  # shares wte's weight, initialised below
                s = resid_std if getattr(module, "is_residual_proj", False) else std
                nn.init.normal_(module.weight, mean=0.0, std=s, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, each counted once (the tied head is the embedding). With
        ``exclude_embeddings``, position embeddings are left out (as in the Kaplan
        FLOPs count); the token embedding stays in because the head uses it."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.config.rotary:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The trunk without the LM head: idx (B, T) -> the final hidden states (B, T, C), after
        ``ln_f``. ``forward`` applies the head to them; samplers that need one position's logits
        apply it to that position only. With ``kv_cache``: as in :meth:`forward`."""
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's context "
                f"(block_size={self.config.block_size}); shorten the input"
            )
        x = self.transformer.wte(idx)  # (B, T, C)
        if not self.config.rotary:
            # Positions start..start+T-1 are rows of wpe: a slice (a view) is the lookup, with no
            # per-step arange. (B, T, C) + (T, C)
            x = x + self.transformer.wpe.weight[start : start + T]
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            layer_cache = (kv_cache.k[i], kv_cache.v[i], start) if kv_cache is not None else None
            x = block(x, layer_cache)
        if kv_cache is not None:
            kv_cache.pos = start + T
        x = self.transformer.ln_f(x)
        return x  # (B, T, C)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        reduction: str = "mean",
        return_logits: bool | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) token ids. targets: (B, T) ids, -100 = ignored.

        Returns ``(logits, loss)``. Without targets: logits (B, T, padded V) (padded columns
        -inf) and None. With targets: the cross-entropy loss (``reduction``: 'mean' over
        non-ignored tokens, 'sum', or 'none' -> (B, T)) and, by default, **no logits** (None):
        the LM head and the loss run fused over chunks of ``loss_chunk_size`` rows of B*T
        (:func:`linear_cross_entropy`), so the (B, T, V) logits and their gradient never exist.
        ``return_logits=True`` asks for both (the full-logits path). Setting the attribute
        ``model.loss_chunk_size = 0`` selects the full-logits path for every call (A/B
        benchmarks); None (default) = automatic: the full path inside ``torch.compile``, where
        inductor fuses the logits' log-softmax and its backward itself (faster than the chunked
        loop: 521.8k vs 495.2k tokens/s, 31.1 vs 30.0 GB peak, 124M at micro-batch 64 on an H200;
        on a CPU 1.12x vs 1.01x a compiled bare loop, W1), and in eager mode chunks of 8192 rows
        on CUDA, 512 on CPU (where the full path would hold the fp32 logits: 70.6 GB eager peak).
        With ``kv_cache``, idx holds positions [kv_cache.pos, kv_cache.pos + T) and the
        cache is advanced by T."""
        B, T = idx.size()
        x = self.hidden_states(idx, kv_cache)  # (B, T, C)
        V = self.config.vocab_size
        if return_logits is None:
            return_logits = targets is None
        chunk = self.loss_chunk_size
        if chunk is None:  # automatic: see the docstring for the measurements behind it
            if torch.compiler.is_compiling():
                chunk = 0
            else:
                chunk = 8192 if x.device.type == "cuda" else 512
        grad_none = reduction == "none" and torch.is_grad_enabled() and x.requires_grad
        if targets is not None and not return_logits and chunk > 0 and not grad_none:
            # The fused head: the padded rows of the weight are sliced off, not masked.
            loss = linear_cross_entropy(
                x.view(B * T, -1),  # (B*T, C)
                self.lm_head.weight,
                targets.reshape(-1),  # (B*T,); reshape: targets may be a non-contiguous slice
                vocab_size=V,
                chunk_size=chunk,
                reduction=reduction,
            )
            return None, (loss.view(B, T) if reduction == "none" else loss)
        logits = self.lm_head(x)  # (B, T, V_rows)
        if V < logits.size(-1):
            # Padded vocabulary rows never receive probability mass. In place: no mask tensor,
            # and Linear's backward does not need its output.
            logits[..., V:] = float("-inf")
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),  # (B*T, V_rows)
                targets.reshape(-1),  # (B*T,); reshape: targets may be a non-contiguous slice
                ignore_index=-100,
                reduction=reduction,
            )
            if reduction == "none":
                loss = loss.view(B, T)
        return (logits if return_logits else None), loss

    def set_reference_attention(self, on: bool = True) -> None:
        """Route attention through ``reference_attention`` (tests compare it with SDPA)."""
        for block in self.transformer.h:
            block.attn.use_reference = on


# ---------------------------------------------------------------------------------------------
# The LM head fused with the cross-entropy


def _head_ce_chunks(h, weight, targets, vocab_size, chunk_size, compute_dtype, reduction, with_grad):
    """The loop behind :func:`linear_cross_entropy`, over chunks of ``chunk_size`` rows.

    h: (N, C); weight: (V_rows, C), only the first ``vocab_size`` rows are used; targets: (N,).
    Returns (loss, grad_h, grad_w): loss is the sum / mean (0-dim) or (N,) for 'none'; with
    ``with_grad`` the gradients of that loss w.r.t. h (N, C) and weight (V_rows, C), computed
    chunk by chunk from the chunk's softmax (so the backward pass has nothing left to do but
    scale them). No host sync: the ignored-token count stays a tensor."""
    N = h.size(0)
    w = weight[:vocab_size].to(compute_dtype)  # (V, C): padded rows sliced off
    valid = targets != -100  # (N,)
    safe_t = torch.where(valid, targets, 0)  # (N,) an in-range index for ignored rows
    # d loss / d logit_ij = scale_i * (softmax_ij - [j == t_i]); scale 0 on ignored rows.
    scale = valid.float()
    if reduction == "mean":
        scale = scale / valid.sum()  # 0-dim tensor: nan when every target is ignored, as F.cross_entropy
    grad_h = torch.empty_like(h) if with_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if with_grad else None
    losses = []
    for lo in range(0, N, chunk_size):
        hi = min(lo + chunk_size, N)
        hc = h[lo:hi].to(compute_dtype)  # (R, C)
        t = safe_t[lo:hi]  # (R,)
        sc = scale[lo:hi]  # (R,)
        # The chunk's logits, transposed: (V, R) = w @ hc^T. The only (vocabulary x rows)
        # tensor, one chunk at a time; vocabulary-major because on CPUs that matmul is ~1.5x
        # faster than (R, V) = hc @ w^T (the output is written in long contiguous rows).
        logits = (w @ hc.t()).float()  # (V, R)
        tgt = logits.gather(0, t[None, :]).squeeze(0)  # (R,)
        # log-sum-exp by hand, in place (no second (V, R) tensor); the exponentials are reused
        # for the gradient: softmax = exp(logit - max) / sum.
        m = logits.amax(dim=0, keepdim=True)  # (1, R)
        e = logits.sub_(m).exp_()  # (V, R)
        s = e.sum(dim=0, keepdim=True)  # (1, R)
        lse = (m + s.log()).squeeze(0)  # (R,)
        losses.append(torch.where(valid[lo:hi], lse - tgt, 0.0))  # (R,)
        if with_grad:
            g = e.mul_(sc[None, :] / s)  # (V, R) scale * softmax
            g.scatter_add_(0, t[None, :], -sc[None, :])  # - scale * one-hot
            g = g.to(compute_dtype)  # (V, R)
            grad_h[lo:hi] = g.t() @ w  # (R, C)
            if compute_dtype == torch.float32:
                grad_w[:vocab_size].addmm_(g, hc)  # (V, C)
            else:
                grad_w[:vocab_size] += (g @ hc).float()  # (V, C), accumulated in fp32
    per_row = torch.cat(losses)  # (N,)
    if reduction == "none":
        loss = per_row
    else:
        loss = per_row.sum()
        if reduction == "mean":
            loss = loss / valid.sum()
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Liger-style: the gradients are computed in the forward pass, chunk by chunk, so no
    chunk's logits are kept for (or recomputed in) the backward pass, which only scales them
    by the incoming gradient (1/accumulation, DDP's hooks, ...)."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size, chunk_size, compute_dtype, reduction):
        loss, grad_h, grad_w = _head_ce_chunks(h, weight, targets, vocab_size, chunk_size, compute_dtype,
                                               reduction, with_grad=True)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # In place: the buffers are this call's own, and a second backward is not supported.
        return grad_h.mul_(grad_loss), grad_w.mul_(grad_loss).to(ctx.weight_dtype), None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int | None = None,
    chunk_size: int = 512,
    reduction: str = "mean",
) -> torch.Tensor:
    """``F.cross_entropy(h @ weight[:vocab_size].T, targets, ignore_index=-100)`` without the
    (N, V) logits: rows are processed ``chunk_size`` at a time, and at most one chunk's
    (chunk_size, V) fp32 logits exist at once, in the forward and the backward pass alike.

    h: (N, C); weight: (V_rows, C) (rows >= ``vocab_size`` are padding: sliced off, and their
    gradient is 0); targets: (N,) long, -100 = ignored. ``reduction``: 'mean' (over the
    non-ignored targets), 'sum' or 'none' (N,) ('none' carries no gradient). Under autocast
    the matmuls run in the autocast dtype and the log-sum-exp in fp32, as the unfused
    ``F.cross_entropy(logits.float())`` does. A plain loop of tensor ops: ``torch.compile``
    traces it without graph breaks and it never syncs with the device."""
    V = weight.size(0) if vocab_size is None else vocab_size
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    dev = h.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if with_grad and reduction == "none":
        raise ValueError("linear_cross_entropy: reduction='none' has no gradient; use 'mean' or 'sum'")
    if with_grad:
        return _LinearCrossEntropy.apply(h, weight, targets, V, chunk_size, compute_dtype, reduction)
    return _head_ce_chunks(h, weight, targets, V, chunk_size, compute_dtype, reduction, with_grad=False)[0]

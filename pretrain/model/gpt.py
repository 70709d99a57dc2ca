"""GPT-2, written from scratch in plain PyTorch: architecture only.

This file imports torch and the standard library and nothing else: no distribution,
no compile, no precision policy, no I/O. Those wrap the model from outside
(``pretrain/training/parallel.py``). Parameter names follow Hugging Face's ``GPT2LMHeadModel``
so that conversion (``pretrain/model/hf.py``) is a table.

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
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.model.head import fp8_linear, linear_cross_entropy, target_logprobs


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

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """A config from :meth:`to_dict`'s output (every field), or from a training config's model
        section: ``preset`` plus overrides, where None means the preset's value. Keys that are not
        architecture fields (``preset``, ``init_from``) are not part of the result."""
        if "preset" in d:
            return cls.from_preset(d["preset"], **{k: d[k] for k in ARCH_FIELDS if d.get(k) is not None})
        return cls(**{k: d[k] for k in ARCH_FIELDS if k in d})

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in ARCH_FIELDS}


# Every field of GPTConfig: the architecture, research options included. The training config's
# model section, the checkpoint and HF readers and init_from's check all read this one tuple.
ARCH_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(GPTConfig))

# The parameters with one row per vocabulary entry, padded rows included (conversion drops or
# adds the padded rows of exactly these).
VOCAB_ROW_PARAMS = ("transformer.wte.weight", "lm_head.weight")

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


def check_context(n: int, block_size: int) -> None:
    """A sequence of n tokens fits the model's context, or a ValueError (one line) that says so."""
    if n > block_size:
        raise ValueError(
            f"sequence of {n} tokens is longer than the model's context (block_size={block_size}); shorten the input"
        )


class CacheStep(NamedTuple):
    """One call's T new tokens in a KV cache, made by :meth:`AttentionCache.begin`: the model reads
    ``positions`` and ``mask``; ``columns`` is the cache's own (where it writes the tokens), handed
    back to :meth:`AttentionCache.update`."""

    positions: int | torch.Tensor  # int p: every row's tokens at positions p .. p+T-1; or (B, T) long, per row
    mask: torch.Tensor | None  # SDPA's attn_mask against the keys ``update`` returns; None: every key
    columns: int | torch.Tensor  # the cache's columns for the tokens: from column p, or (T,) of them


class AttentionCache(Protocol):
    """The seam between attention and a KV cache: all the model asks of one. The caches themselves
    (the dynamic ``KVCache``, the fixed-shape ``StaticKVCache``) are inference's,
    ``pretrain/inference/cache.py``; the model does not import them. Per call of
    :meth:`GPT.hidden_states`::

        step = cache.begin(T, block_size)        # once, before the first layer
        k, v = cache.update(i, k, v, step)       # in layer i: write k, v; get what to attend over
        y = SDPA(q, k, v, attn_mask=step.mask)
    """

    def begin(self, T: int, block_size: int) -> CacheStep:
        """The next T tokens of every row: their positions (< block_size) and the attention mask;
        the cache moves past them. A ValueError, changing nothing, where they do not fit."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer ``layer``'s k, v (B, nh, T, hs) of ``step``'s tokens; return the keys and
        values (B, nh, S, hs) its queries attend over, with ``step.mask``."""
        ...


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused qkv projection.

    ``c_attn`` maps C -> 3C (q, k, v for all heads at once); ``c_proj`` maps the concatenated
    heads back to C and writes into the residual stream, so it carries the scaled init
    (``is_residual_proj``). Attention is ``F.scaled_dot_product_attention`` (flash /
    memory-efficient kernels on GPU)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_proj = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm
        self.rotary_base = config.rotary_base if config.rotary else None

    def forward(self, x: torch.Tensor, cache: tuple[AttentionCache, CacheStep, int] | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). ``cache``: (the KV cache, this call's step, this layer's index):
        the T tokens' keys and values go into the cache and the queries attend over what it returns
        (:class:`AttentionCache`); without it, causal attention over x alone."""
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 × (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:  # research option: unit-RMS queries and keys per head
            q, k = F.rms_norm(q, (hs,)), F.rms_norm(k, (hs,))
        if self.rotary_base is not None:  # research option: rotate q, k by absolute position
            where = cache[1].positions if cache is not None else 0
            q, k = apply_rotary(q, where, self.rotary_base), apply_rotary(k, where, self.rotary_base)

        if cache is not None:
            kv_cache, step, layer = cache
            k, v = kv_cache.update(layer, k, v, step)  # (B, nh, S, hs) each: the keys so far
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


def apply_rotary(x: torch.Tensor, start: int | torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of x (B, nh, T, hs) at positions start .. start+T-1 (an int), or
    at ``start`` itself when it is a (B, T) tensor of positions (each row its own: a fixed-shape cache), in
    the "rotate half" layout: channel i pairs with channel i + hs/2 and the pair turns by angle
    position * base**(-2i/hs). Scores q·k then depend on positions only through their difference."""
    T, hs = x.size(-2), x.size(-1)
    inv_freq = base ** (-torch.arange(0, hs, 2, device=x.device, dtype=torch.float32) / hs)  # (hs/2,)
    if isinstance(start, torch.Tensor):
        angle = (start[..., None].float() * inv_freq)[:, None]  # (B, 1, T, hs/2)
    else:
        pos = torch.arange(start, start + T, device=x.device, dtype=torch.float32)  # (T,)
        angle = torch.outer(pos, inv_freq)  # (T, hs/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]  # (B, nh, T, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, nh, T, hs)


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

    def forward(self, x: torch.Tensor, cache: tuple[AttentionCache, CacheStep, int] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
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
        # The LM head's matmuls in FP8 while training (pretrain/model/head.py fp8_linear): a lever
        # for the GPU check's A/B, off by default; evaluation and sampling keep the exact head.
        self.head_fp8 = False
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

    def hidden_states(self, idx: torch.Tensor, kv_cache: AttentionCache | None = None) -> torch.Tensor:
        """The trunk without the LM head: idx (B, T) -> the final hidden states (B, T, C), after
        ``ln_f``. ``forward`` applies the head to them; samplers that need one position's logits
        apply it to that position only. With ``kv_cache``: the T tokens follow what the cache holds,
        at the positions it gives (:class:`AttentionCache`), and it moves past them."""
        B, T = idx.size()
        if kv_cache is None:
            check_context(T, self.config.block_size)
        step = kv_cache.begin(T, self.config.block_size) if kv_cache is not None else None
        start = step.positions if step is not None else 0  # an int, or (B, T): each row's own positions
        x = self.transformer.wte(idx)  # (B, T, C)
        if not self.config.rotary:
            if isinstance(start, int):
                # Positions start..start+T-1 are rows of wpe: a slice (a view) is the lookup, with no
                # per-step arange. (B, T, C) + (T, C)
                x = x + self.transformer.wpe.weight[start : start + T]
            else:
                x = x + self.transformer.wpe(start)  # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, (kv_cache, step, i) if step is not None else None)
        x = self.transformer.ln_f(x)
        return x  # (B, T, C)

    # ---- the LM head: one home for it and for the padded vocabulary ---------------------------
    #
    #   hidden_states (B, T, C) ──► logits(h)          full: (..., vocab_rows), padded columns -inf
    #                          ├──► loss(h, targets)   fused with the cross-entropy, row chunks
    #                          └──► token_logprobs(h, rows, targets)   scoring, vocabulary slices
    #   head_weight(): the (vocab_size, C) rows of the real vocabulary, for samplers' own layouts

    def head_weight(self) -> torch.Tensor:
        """The LM head's rows of the real vocabulary, (vocab_size, C): padded rows sliced off (a
        view). Samplers that lay the head out their own way start from it."""
        return self.lm_head.weight[: self.config.vocab_size]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The full head: hidden states (..., C) -> logits (..., vocab_rows); in FP8 while training
        when ``head_fp8`` is set (the full-logits path: compiled training). Padded vocabulary
        columns are -inf (set in place: no mask tensor, and Linear's backward does not need its
        output), so they never receive probability mass."""
        if self.head_fp8 and torch.is_grad_enabled() and self.lm_head.bias is None:
            logits = fp8_linear(h, self.lm_head.weight)  # (..., vocab_rows), bf16
        else:
            logits = self.lm_head(h)  # (..., vocab_rows)
        if self.config.vocab_size < logits.size(-1):
            logits[..., self.config.vocab_size :] = float("-inf")
        return logits

    def loss_chunk(self, device: torch.device) -> int:
        """Rows per chunk of the fused head + cross-entropy: ``loss_chunk_size`` when set (0 = the
        full-logits path, for A/B runs); automatic (None): the full path inside ``torch.compile``,
        where inductor fuses the logits' log-softmax and its backward itself (faster than the chunked
        loop: 521.8k vs 495.2k tokens/s, 31.1 vs 30.0 GB peak, 124M at micro-batch 64 on an H200;
        on a CPU 1.12x vs 1.01x a compiled bare loop, W1), and in eager mode chunks of 8192 rows
        on CUDA, 512 on CPU (where the full path would hold the fp32 logits: 70.6 GB eager peak)."""
        if self.loss_chunk_size is not None:
            return self.loss_chunk_size
        if torch.compiler.is_compiling():
            return 0
        return 8192 if device.type == "cuda" else 512

    def loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the head's logits at hidden states h (B, T, C) against targets (B, T)
        (-100 = ignored). 'mean' over the counted targets, 'sum', or 'none' -> (B, T). Fused
        (:func:`pretrain.model.head.linear_cross_entropy`: no (B*T, V) logits, in the forward or the
        backward) unless :meth:`loss_chunk` picks the full path, or 'none' is asked with a gradient."""
        B, T, _ = h.shape
        chunk = self.loss_chunk(h.device)
        grad_none = reduction == "none" and torch.is_grad_enabled() and h.requires_grad
        if chunk > 0 and not grad_none:
            loss = linear_cross_entropy(
                h.reshape(B * T, -1),  # (B*T, C)
                self.lm_head.weight,  # its padded rows are sliced off inside, not masked
                targets.reshape(-1),  # (B*T,); reshape: targets may be a non-contiguous slice
                vocab_size=self.config.vocab_size,
                chunk_size=chunk,
                reduction=reduction,
            )
            return loss.view(B, T) if reduction == "none" else loss
        return cross_entropy(self.logits(h), targets, reduction)

    def token_logprobs(self, h: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                       greedy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """log p(targets[s] | hidden state h[rows[s]]) for each scored position s, fp32 (S,), from
        h (U, C) (several positions may share a row), over the real vocabulary, in vocabulary
        slices (:func:`pretrain.model.head.target_logprobs`). For scoring (HellaSwag, harness tasks).
        ``greedy``: also (S,) bool, whether each target is its row's argmax."""
        return target_logprobs(h, self.lm_head.weight, rows, targets, vocab_size=self.config.vocab_size,
                               bias=self.lm_head.bias, greedy=greedy)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: AttentionCache | None = None,
        reduction: str = "mean",
        return_logits: bool | None = None,
        at: str | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) token ids. targets: (B, T) ids, -100 = ignored.

        Returns ``(logits, loss)``. Without targets: logits (B, T, padded V) (padded columns
        -inf, :meth:`logits`) and None. ``at`` applies the head at some positions only:
        ``"last"`` -> logits (B, 1, padded V) (sampling, as nanoGPT's ``lm_head(x[:, [-1], :])``);
        ``(rows, pos)``, two (S,) index tensors -> logits (S, padded V) of those positions
        (scoring). With targets: the cross-entropy loss (:meth:`loss`;
        ``reduction``: 'mean' over non-ignored tokens, 'sum', or 'none' -> (B, T)) and, by
        default, **no logits** (None): the head and the loss run fused, so the (B, T, V) logits
        and their gradient never exist. ``return_logits=True`` asks for both (the full-logits
        path). With ``kv_cache`` (:class:`AttentionCache`), idx follows the tokens the cache holds
        and the cache moves past them (:meth:`hidden_states`)."""
        x = self.hidden_states(idx, kv_cache)  # (B, T, C)
        if at == "last":
            x = x[:, -1:]  # (B, 1, C)
        elif at is not None:
            x = x[at[0], at[1]]  # (S, C)
        if targets is None:
            return self.logits(x), None
        if not return_logits:
            return None, self.loss(x, targets, reduction)
        logits = self.logits(x)  # (B, T, vocab_rows)
        return logits, cross_entropy(logits, targets, reduction)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The unfused loss: logits (B, T, V) in fp32 against targets (B, T) (-100 = ignored);
    'none' -> (B, T)."""
    B, T, _ = logits.shape
    loss = F.cross_entropy(
        logits.float().view(B * T, -1),  # (B*T, V)
        targets.reshape(-1),  # (B*T,); reshape: targets may be a non-contiguous slice
        ignore_index=-100,
        reduction=reduction,
    )
    return loss.view(B, T) if reduction == "none" else loss

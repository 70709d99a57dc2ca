"""The KV caches: keys and values of past positions, so that decoding feeds only the new tokens.

The model does not import this module; it asks a cache for two things, through the protocol it
declares (:class:`pretrain.model.gpt.AttentionCache`)::

    GPT.hidden_states(idx (B, T), kv_cache)
      step = kv_cache.begin(T, block_size)      once per call: positions and mask of the T new
                                                tokens (a CacheStep); the cache moves past them
      per layer i:  k, v = kv_cache.update(i, k, v, step)    write this layer's k, v (B, nh, T, hs);
                    y = SDPA(q, k, v, attn_mask=step.mask)  attend over the keys it returns

- :class:`KVCache`: the dynamic one, a Python-int position; every call attends over the keys
  written so far (HellaSwag's shared prefixes, tests' reference path).
- :class:`StaticKVCache`: the fixed-shape one of generation and serving; its shapes and Python
  values never change while decoding, so one decode step is one fixed graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pretrain.model.gpt import CacheStep, GPTConfig, check_context


def _empty_layers(config: GPTConfig, batch_size: int, max_len: int, device, dtype) -> list[torch.Tensor]:
    """One zeroed (B, nh, max_len, hs) tensor per layer."""
    shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
    return [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]


@dataclass
class KVCache:
    """Keys and values of past positions for incremental decoding, one pair per layer.

    ``k[i]``, ``v[i]``: (B, nh, T_max, hs), filled up to ``pos``. Preallocated so decoding
    never reallocates; ``pos`` is the number of positions already written, a Python int: every
    call attends over the ``pos + T`` keys written so far, so shapes grow with each token (fine
    eagerly; HellaSwag's shared prefixes use it). :class:`StaticKVCache` is the fixed-shape one."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    pos: int = 0

    @classmethod
    def empty(cls, config: GPTConfig, batch_size: int, max_len: int, device, dtype) -> KVCache:
        return cls(k=_empty_layers(config, batch_size, max_len, device, dtype),
                   v=_empty_layers(config, batch_size, max_len, device, dtype))

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def begin(self, T: int, block_size: int) -> CacheStep:
        """The next T tokens of every row sit at positions ``pos .. pos+T-1`` (and columns: the
        same); ``pos`` advances by T. A query at position pos+i sees keys 0..pos+i, so the mask is
        causal with an offset of pos; one new token (T == 1, every step of sampling) sees every key:
        no mask at all (unmasked SDPA is the fastest kernel on every device). Built once per call,
        not per layer. A sequence past ``block_size`` is a ValueError, before anything changes."""
        start = self.pos
        check_context(start + T, block_size)
        device = self.k[0].device
        mask = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)
        self.pos = start + T
        return CacheStep(positions=start, mask=mask, columns=start)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at [columns, columns+T) and return everything written so far."""
        at, T = step.columns, k.size(2)
        k_all, v_all = self.k[layer], self.v[layer]
        k_all[:, :, at : at + T] = k
        v_all[:, :, at : at + T] = v
        return k_all[:, :, : at + T], v_all[:, :, : at + T]  # (B, nh, at+T, hs) each


@dataclass
class StaticKVCache:
    """A KV cache whose shapes and Python values never change while decoding, so that one decode
    step is one fixed graph (``torch.compile`` compiles it once; a CUDA graph replays it).

    ::

        columns   0   1   2   3   4   5   6   7      (L = 8 preallocated)
        row 0     p   p   a   b   c | x   y   .      start[0] = 2 (left padding p), then the prompt
        row 1     d   e   f   g   h | x   y   .      start[1] = 0
                                      ^ slot = 7: the column the next token is written to

    ``k[i]``, ``v[i]``: (B, nh, L, hs). ``start`` (B,) long: the first column of each row's
    tokens (columns before it are left padding); ``slot`` (1,) long: the column of the next token,
    the same for every row, advanced in place -- a tensor, not a Python int, so nothing a graph
    was traced with changes. Column j of row b is position ``j - start[b]`` (learned positions,
    RoPE), so a left-padded prompt keeps the positions it has alone. Attention runs over all L
    columns with a mask: the query at column q of row b sees keys ``start[b] <= j <= q``; a
    padding query (q < start[b]) sees the padding columns q .. start[b] (itself at least, so its
    output stays finite; it is never used)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    start: torch.Tensor
    slot: torch.Tensor
    columns: torch.Tensor  # (L,) 0 .. L-1, made once (no arange per step)

    def __post_init__(self) -> None:
        # Views of ``start`` shaped for broadcasting, made once (they follow ``reset``).
        B = self.start.size(0)
        self.start_rows = self.start.view(B, 1)  # (B, 1): against positions (B, T)
        self.start_keys = self.start.view(B, 1, 1, 1)  # (B, 1, 1, 1): against the mask (B, nh, T, L)

    @classmethod
    def empty(cls, config: GPTConfig, batch_size: int, max_len: int, device, dtype) -> StaticKVCache:
        return cls(k=_empty_layers(config, batch_size, max_len, device, dtype),
                   v=_empty_layers(config, batch_size, max_len, device, dtype),
                   start=torch.zeros(batch_size, dtype=torch.long, device=device),
                   slot=torch.zeros(1, dtype=torch.long, device=device),
                   columns=torch.arange(max_len, device=device))

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def reset(self, start: torch.Tensor) -> None:
        """Begin a new batch: rows start at columns ``start`` (B,), the next write is column 0.
        In place (a captured graph keeps reading these tensors); old keys are never seen again:
        a query only sees columns written since (``<= q``)."""
        self.start.copy_(start)
        self.slot.zero_()

    def narrow(self, n: int) -> StaticKVCache:
        """The same cache over its first n columns (views: writes land in this cache, ``slot`` and
        ``start`` are shared). Eager decoding attends over the columns written so far this way; a
        compiled or captured step keeps all L."""
        return StaticKVCache(k=[k[:, :, :n] for k in self.k], v=[v[:, :, :n] for v in self.v],
                             start=self.start, slot=self.slot, columns=self.columns[:n])

    def begin(self, T: int, block_size: int) -> CacheStep:
        """The next T tokens go to columns ``slot .. slot+T-1`` (all rows at the same columns, each
        row at its own positions); ``slot`` advances by T, in place. Every shape depends on T and
        the cache's size only. Positions past the context (rows that ran out of room, discarded)
        and of padding columns are clamped."""
        cols = self.slot + self.columns[:T]  # (T,): the columns of these tokens
        # Each row's own positions (left padding shifts columns, not positions).
        pos = (cols - self.start_rows).clamp_(0, block_size - 1)  # (B, T)
        # Query column q sees key column j when (j - start) * (q - j) >= 0: start <= j <= q for a
        # real query; q <= j <= start for a padding one (itself at least: finite, never used).
        # (B, 1, 1, L) * (T, L) -> (B, 1, T, L), the same for every head. Additive, in the cache's
        # (= the queries') dtype, built once per call rather than converted in every layer.
        see = (self.columns - self.start_keys) * (cols.view(T, 1) - self.columns) >= 0
        mask = torch.where(see, 0.0, float("-inf")).to(self.k[0].dtype)  # (B, 1, T, L)
        self.slot.add_(T)  # cols is its own tensor: the writes below still go to these columns
        return CacheStep(positions=pos, mask=mask, columns=cols)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: CacheStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nh, T, hs) at the step's columns (a tensor index: fixed shapes) and return
        all L columns; the step's mask keeps each query to its own row's keys up to itself."""
        self.k[layer].index_copy_(2, step.columns, k)
        self.v[layer].index_copy_(2, step.columns, v)
        return self.k[layer], self.v[layer]  # (B, nh, L, hs) each

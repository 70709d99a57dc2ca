"""Sampling from a GPT: batched prompts of any lengths, a fixed-shape decode step, stop strings.

Batching. Prompts of different lengths share one batch, left-padded: row b's tokens start at
column ``start[b]`` of a :class:`~pretrain.inference.cache.StaticKVCache`, each at the positions it has
alone (GPT-2's positions are learned and absolute: padding shifts columns, not positions), and a
mask keeps every query to its own row's keys. ``--num-samples N`` is N copies of each prompt.

What holds between a row in a batch and the same row alone (:data:`GUARANTEE`; tests/numerics.py
derives the bound, tests/test_generate.py holds every path to it): the same computation, with the
sums in another order -- a GEMM's reduction order depends on its shapes (the batch, the padding)
and on the CPU's instruction set, so bitwise equality is not promised across batches or machines.

The decode step (``pretrain/inference/decode.py``, :class:`Decoder`): the prompt is prefilled by a
normal forward; every further token is one step whose shapes depend on (batch, cache bucket) only
and whose changing values (the cache column, the draw count) are tensors updated in place -- one
graph, compiled once by ``torch.compile`` and, on CUDA, captured once in a CUDA graph and replayed
(one launch per token instead of ~150). Decoders are kept per (batch size, cache bucket, settings):
the first batch of a shape pays the compile / capture, the next ones replay. ``step="auto"``: a
captured graph on CUDA, eager on a CPU (where compiling costs more than it saves in one call).

Sampling per step (on fp32 logits, padded-vocab columns removed):
temperature 0 -> greedy argmax; else logits / temperature, then top-k (keep the k largest;
ties with the k-th are kept), then top-p (keep the smallest set of most likely tokens whose
probability reaches p), then one draw by inversion of the cumulative distribution (:func:`draw`)
with one uniform number per row and token. The uniforms are a counter-based stream
(:func:`uniforms`): draw t of a row is a hash of (the row's seed, t), so a row's tokens do not
depend on the other rows of its batch, the device or a captured graph (no generator state to
advance); row i of a call with ``seed=s`` uses seed ``s + i``, so
``generate(m, ps, seed=s)[i]`` and ``generate(m, [ps[i]], seed=s + i)[0]`` draw the same uniforms and
agree as :data:`GUARANTEE` says. On a CPU, top-k works on
the k candidates only (:func:`sample_next`): the same distribution, without passes over the whole
vocabulary.

The LM head while sampling (``pretrain/inference/decode.py``): only the last position of each row
needs logits, so the trunk (``GPT.hidden_states``) runs and the head is applied to that one
position, from the weight layout that reads fastest on the device (:func:`decode_layout`,
:class:`DecodeHead`), or screened for top-k and greedy on a CPU (:class:`ScreenedHead` in int8 for
one row; :class:`BatchScreenedHead` in bf16 through oneDNN for a batch, whose Linear layers run
through oneDNN too: chosen by the batch size, decode.py).

Stopping, per row: at its first ``<|endoftext|>`` (not included in the output), after the first
token that completes one of its ``stop`` strings (included: the caller cuts the text there, as
lm-evaluation-harness does with ``until``), or after ``max_new_tokens``; the batch stops when
every row has (checked every token on a CPU, every 16 on CUDA, where a check waits for the GPU).
Context: prompt + continuation must fit in ``block_size`` positions, so a row generates at most
``block_size - len(prompt)`` tokens (the CLI says so); a prompt longer than ``block_size`` is an error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from data_pipeline.arguments import Parser
from data_pipeline.tokenizer import EOT_ID
from pretrain.dist import is_fsdp
from pretrain.inference.cache import StaticKVCache
from pretrain.inference.decode import (
    DECODE_MODES,
    BatchScreenedHead,
    DecodeHead,
    Decoder,
    ScreenedHead,
    cache_bucket,
    decode_layout,
    eager_width,
    get_decoder,
)
from pretrain.model.gpt import GPT

# Attention backends while decoding. Not cuDNN's: it builds (and caches) a graph per shape -- on an
# H200 the 124M model spent 599 of 759 ms of host time generating 16 tokens in
# _cudnn_attention_forward when every token was a new key length (the GPU check's host profile).
# Flash / memory-efficient / math take any shape as it comes (the decode step's mask: not flash).
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


GUARANTEE = (
    "each row's logits, in any batch, are within a derived bound (fp32 rounding along the model's sums) of its "
    "exact logits alone, so its tokens equal generating it alone (with its seed) except where the exact logits "
    "put a decision within that bound of a tie (a near-tie: rare; the two continue differently from there); "
    "the same call on the same machine gives the same tokens"
)
"""What a row of a batch promises against the same row alone (README, DESIGN and --help say it too)."""


class GenerationError(ValueError):
    """Bad generation input (prompt too long, bad sampling settings): a one-line message."""


class GenerationInterrupted(KeyboardInterrupt):
    """A Ctrl-C while :func:`generate` ran: ``finished`` maps the row index of every row whose
    batch completed to its new tokens (a stopped ``gpt2-generate`` prints them)."""

    def __init__(self, finished: dict[int, list[int]]) -> None:
        super().__init__()
        self.finished = finished


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / top-p support to -inf. logits: (B, V) float."""
    V = logits.size(-1)
    if top_k is not None and top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold >= top_p of the mass;
        # the most likely token is always kept.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row from logits (B, V): greedy when temperature is 0. ``u`` (B,) or (B, 1): each
    row's uniform in [0, 1) for the draw (else drawn from ``generator``). Returns (B,) long. No host
    sync except on a CPU with top-k (the tie check), so on CUDA it can be captured in a graph."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1) and logits.device.type == "cpu":
        nxt = _sample_top_k(logits, top_k, top_p, generator, u)
        if nxt is not None:
            return nxt
    logits = filter_logits(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return draw(probs, generator, u)


def _sample_top_k(logits: torch.Tensor, top_k: int, top_p: float | None,
                  generator: torch.Generator | None, u: torch.Tensor | None = None) -> torch.Tensor | None:
    """:func:`sample_next` after top-k on the k candidates alone: softmax, top-p and the draw on
    (B, k) instead of (B, V) -- the same distribution as masking the full row. The candidates
    are put back in vocabulary order before the draw, so the inversion walks the same cumulative
    distribution as over the full row (the masked entries add 0). None when a row has ties with
    its k-th value beyond the k (they are kept by the full path; the caller falls back to it):
    top-k takes k + 1 values, and a tie exists exactly when the (k+1)-th equals the k-th. On CPU
    only: the tie check reads a value on the host (a device sync on a GPU)."""
    vals, ids = torch.topk(logits, top_k + 1, dim=-1)  # (B, k+1) each, values descending
    return _sample_from_top(vals, ids, top_k, top_p, generator, u)


def _sample_from_top(vals: torch.Tensor, ids: torch.Tensor, top_k: int, top_p: float | None,
                     generator: torch.Generator | None, u: torch.Tensor | None = None) -> torch.Tensor | None:
    """The second half of :func:`_sample_top_k`: vals (B, k+1), the k + 1 largest logits of each
    row (descending, temperature applied), ids (B, k+1) their token ids. (B,) long, or None on a
    tie with the k-th value."""
    if bool((vals[:, top_k] == vals[:, top_k - 1]).any()):  # the (k+1)-th ties with the k-th
        return None
    vals, ids = vals[:, :top_k], ids[:, :top_k]  # (B, k)
    if top_p is not None and top_p < 1.0:
        probs = vals.softmax(dim=-1)  # (B, k), descending
        drop = (probs.cumsum(dim=-1) - probs) >= top_p  # as filter_logits
        vals = vals.masked_fill(drop, float("-inf"))
    ids, order = ids.sort(dim=-1)  # (B, k): vocabulary order
    probs = vals.gather(-1, order).softmax(dim=-1)  # (B, k)
    return ids.gather(-1, draw(probs, generator, u)[:, None]).squeeze(-1)  # (B,)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """One index per row of ``probs`` (B, V), with probability proportional to its entry, by
    inversion: the first index whose cumulative probability exceeds u * (row total), u ~ U[0, 1)
    given per row ((B,) or (B, 1)) or drawn from ``generator``. One random number per row, where
    ``torch.multinomial`` draws one per vocabulary entry (on a CPU that was a third of the time of
    a token of a small model). Returns (B,) long."""
    cdf = probs.double().cumsum(dim=-1)  # (B, V), fp64: exact enough over 50k entries
    total = cdf[:, -1:]  # (B, 1)
    if u is None:
        u = torch.rand(probs.size(0), generator=generator, device=probs.device, dtype=cdf.dtype)
    x = u.to(cdf.dtype).view(-1, 1) * total  # (B, 1)
    # x < total strictly, so the index is a token with probability > 0 (never a filtered one).
    x = torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)  # (B,)


# ---------------------------------------------------------------------------------------------
# The random stream: counter-based, one per row


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) and c < 2**32, without int64 overflow: the high
    and low 16 bits of x are multiplied separately (each product < 2**48)."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit integers with full avalanche ("triple32", C. Wellons' hash-prospector:
    three xorshift-multiply rounds; bias 0.02 against an ideal random permutation)."""
    x = x ^ (x >> 17)
    x = _mul32(x, 0xED5AD4BB)
    x = x ^ (x >> 11)
    x = _mul32(x, 0xAC4C1B51)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x31848BAB)
    return x ^ (x >> 14)


def uniforms(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) float64 uniforms in [0, 1): entry (b, t) is a hash of (seeds[b], t), 53 random bits
    from two 32-bit hashes. A counter-based stream: a row's numbers depend on its seed and the
    draw's index only -- not on the batch, the device or any generator state -- so a row sampled in
    a batch draws what it draws alone, and a captured decode step needs no RNG state. seeds: (B,)
    int64 >= 0."""
    lo, hi = seeds & 0xFFFFFFFF, seeds >> 32  # (B,) each, < 2**32 (seeds < 2**63)
    key = _mix32(lo ^ _mix32(hi ^ 0x9E3779B9))[:, None]  # (B, 1)
    key2 = _mix32(key ^ 0x85EBCA6B)  # (B, 1)
    counter = torch.arange(2 * n, device=seeds.device, dtype=torch.long)[None, :]  # (1, 2n)
    h = _mix32((_mix32(counter ^ key) + key2) & 0xFFFFFFFF)  # (B, 2n)
    hi27, lo26 = h[:, 0::2] >> 5, h[:, 1::2] >> 6  # (B, n) each: 27 + 26 = 53 bits
    return (hi27 * 2**26 + lo26).double() * 2.0**-53


def row_seeds(n: int, seed: int | Sequence[int] | None, generator: torch.Generator | None, device) -> torch.Tensor:
    """(n,) int64: row i's seed. ``seed`` an int: seed + i; a sequence: one per row; None: from
    ``generator`` (one draw), else from torch's global generator (so ``torch.manual_seed`` holds)."""
    if isinstance(seed, Sequence):
        if len(seed) != n:
            raise GenerationError(f"seed holds {len(seed)} values for {n} prompts; give one per prompt or one int")
        values = [int(s) for s in seed]
    else:
        if seed is None:
            g_device = generator.device if generator is not None else "cpu"
            seed = int(torch.randint(0, 2**62, (), generator=generator, device=g_device))
        values = [int(seed) + i for i in range(n)]
    return torch.tensor([v % 2**63 for v in values], dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------
# Checks, samplers, stop strings


def _check_settings(max_new_tokens, temperature, top_k, top_p, step) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not 0 <= temperature < float("inf"):  # NaN fails every comparison
        raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1 (or None for no limit), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1] (or None), got {top_p!r}")
    if step != "auto" and step not in DECODE_MODES:
        raise GenerationError(f"step must be 'auto' or one of {', '.join(DECODE_MODES)}; got {step!r}")


def _check_prompts(prompts, cfg) -> list[list[int]]:
    """The prompts as lists, checked; a bad one is named by its place counted from 1 (a prompts
    file's line number when the prompts are its lines)."""
    rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]
    for i, p in enumerate(rows, 1):
        if not p:
            raise GenerationError(f"prompt {i} is empty; start it with <|endoftext|> ({EOT_ID}) for unconditional samples")
        if len(p) > cfg.block_size:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens but the model's context is {cfg.block_size} (block_size); "
                "shorten the prompt"
            )
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} holds token ids outside [0, {cfg.vocab_size}): {bad[:4]}")
    return rows


def _sampler(model: GPT, temperature: float, top_k: int | None, top_p: float | None, rows: int = 1):
    """``(trunk, pick, static)``: ``trunk(idx, cache)`` -> what ``pick(x, u)`` turns into the next
    token of each row, from the logits at the last position, real vocabulary only (padded ids can
    never be produced); ``static``: pick makes no host sync (it can be compiled whole or captured).
    A plain GPT: the trunk, then the head at that position -- screened for top-k and greedy on a
    CPU (:class:`ScreenedHead` for one row, :class:`BatchScreenedHead` for ``rows`` >= 2, the
    batch size of a step: the table there), else :class:`DecodeHead`. An FSDP-sharded one
    goes through ``forward`` (its hooks gather the parameters, and the head weight outside the
    forward is a shard)."""
    V = model.config.vocab_size

    def pick_logits(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, temperature, top_k, top_p, u=u)

    def hidden(idx: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        return model.hidden_states(idx, kv_cache=cache)[:, -1]  # (B, C)

    cpu = model.transformer.wte.weight.device.type == "cpu"
    static = not (cpu and temperature > 0 and top_k is not None and top_k < V)  # CPU top-k: a tie check
    if is_fsdp(model):  # the head at the last position; padded columns are -inf, never drawn
        return (lambda idx, cache: model(idx, kv_cache=cache, at="last")[0][:, -1]), pick_logits, False
    greedy = temperature == 0
    wanted = (greedy or (top_k is not None and top_k < V)) and not torch.is_autocast_enabled("cpu")
    head = None
    if wanted:  # under autocast the logits are not fp32
        head = BatchScreenedHead.build(model) if rows >= 2 else None
        head = head or ScreenedHead.build(model)  # (no oneDNN bf16 here: int8 for every batch)
    if head is None:  # the whole head (no host sync: a CUDA graph can capture it)
        full = DecodeHead(model, rows)
        return hidden, lambda h, u: pick_logits(full.logits(h), u), static

    def top_pick(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        found = head.top(h, 1 if greedy else top_k + 1)
        if found is not None:
            cand, r = found  # (U,), (B, U)
            if greedy:
                return cand[r.argmax(dim=-1)]  # the first maximum, as over the full row
            vals, pos = torch.topk(r, top_k + 1, dim=-1)  # (B, k+1) each
            if temperature != 1.0:
                vals = vals / temperature
            nxt = _sample_from_top(vals, cand[pos], top_k, top_p, None, u)
            if nxt is not None:
                return nxt
        return pick_logits(head.logits(h), u)  # ties at the k-th value (or a non-finite screen)

    return hidden, top_pick, False


class _StopStrings:
    """Which rows have completed one of their stop strings, and after which token. Matched on the
    tokens' bytes (GPT-2's BPE is byte-level, so a string is in the decoded text exactly when its
    UTF-8 bytes are in the tokens' bytes), scanning only what is new since the last check."""

    def __init__(self, stop: list[list[str]]) -> None:
        from data_pipeline.tokenizer import get_tokenizer

        self.tok = get_tokenizer()
        self.stop = [[s.encode() for s in row if s] for row in stop]
        self.buf = [b"" for _ in stop]
        self.ends: list[list[int]] = [[] for _ in stop]  # byte offset after each token
        self.cut: list[int | None] = [None for _ in stop]  # tokens to keep, once stopped

    def update(self, b: int, tokens: list[int]) -> bool:
        """Row b's tokens so far (up to its end-of-text); True once it has stopped."""
        if self.cut[b] is not None or not self.stop[b]:
            return self.cut[b] is not None
        seen = len(self.ends[b])
        old = len(self.buf[b])
        for t in tokens[seen:]:
            self.buf[b] += self.tok.decode_bytes([t])
            self.ends[b].append(len(self.buf[b]))
        longest = max(len(s) for s in self.stop[b])
        window = max(0, old - longest + 1)  # a match ending in the new bytes starts after this
        found = [i + len(s) for s in self.stop[b] if (i := self.buf[b].find(s, window)) >= 0]
        if found:
            end = min(found)
            self.cut[b] = next(i + 1 for i, e in enumerate(self.ends[b]) if e >= end)
        return self.cut[b] is not None


def _stop_lists(stop, n: int) -> list[list[str]] | None:
    if stop is None or len(stop) == 0:
        return None
    if isinstance(stop, str):
        raise GenerationError("stop must be a list of strings (or one list per prompt), not a string")
    if all(isinstance(s, str) for s in stop):
        return [list(stop)] * n
    if len(stop) != n:
        raise GenerationError(f"stop holds {len(stop)} lists for {n} prompts; give one list, or one per prompt")
    return [list(s) for s in stop]


# ---------------------------------------------------------------------------------------------
# Generation


CUDA_STEPS = ("graph", "compile+graph", "reduce-overhead")  # decode steps replayed as CUDA graphs


def _decode_mode(step: str, model: GPT, static: bool) -> str:
    if step == "auto":
        cuda = model.transformer.wte.weight.device.type == "cuda"
        return "graph" if cuda and static and not is_fsdp(model) else "eager"
    if is_fsdp(model) and step != "eager":
        raise GenerationError(f"step {step!r}: an FSDP-sharded model decodes eagerly (step='eager' or 'auto')")
    if step in CUDA_STEPS and not static:
        raise GenerationError(f"step {step!r} needs CUDA and a sampler without host syncs (not top-k on a CPU)")
    return step


def _cache_dtype(model: GPT, device: torch.device) -> torch.dtype:
    """k, v come out of the qkv projection: in the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.transformer.wte.weight.dtype


@sdpa_kernel(DECODE_BACKENDS)
def _decode_batch(model: GPT, rows: list[list[int]], limits: list[int], seeds: torch.Tensor, sampler, mode: str,
                  eot_id: int | None, stops: _StopStrings | None, settings: tuple) -> list[list[int]]:
    """New tokens of each row (cut at its limit and end-of-text) for one left-padded batch."""
    device = model.transformer.wte.weight.device
    B, T0, N = len(rows), max(map(len, rows)), max(limits)
    trunk, pick, static = sampler
    L = cache_bucket(T0 + N - 1)  # the last token is never fed back
    dtype = _cache_dtype(model, device)

    def build() -> Decoder:
        return Decoder(model, B, L, dtype, trunk, pick, eot_id, mode, static)

    autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    key = (B, L, mode, dtype, autocast, eot_id, settings)
    dec = build() if mode == "eager" else get_decoder(model, key, build)
    pad = [T0 - len(r) for r in rows]
    idx = torch.tensor([[eot_id or 0] * p + r for p, r in zip(pad, rows)], dtype=torch.long, device=device)  # (B, T0)
    limit = torch.tensor(limits, device=device)  # (B,)
    dec.start(idx, torch.tensor(pad, device=device), uniforms(seeds, N), None if static and mode != "eager" else pick)
    # Rows end early only at end-of-text or a stop string: then check every token on a CPU, every
    # 16 on CUDA (a check waits for the device; the extra tokens are cut off).
    check = (1 if device.type == "cpu" else 16) if eot_id is not None or stops is not None else N
    n = 1
    while n < N:
        dec.step()
        n += 1
        if n % check == 0 and _finished(dec, n, limit, limits, stops):
            break
    out = dec.tokens(n)
    results = []
    for b, toks in enumerate(out):
        toks = toks[: limits[b]]
        if eot_id is not None and eot_id in toks:
            toks = toks[: toks.index(eot_id)]
        if stops is not None and stops.update(b, toks):
            toks = toks[: stops.cut[b]]
        results.append(toks)
    return results


def _finished(dec: Decoder, n: int, limit: torch.Tensor, limits: list[int], stops: _StopStrings | None) -> bool:
    """Every row has ended (end-of-text, its limit, or a stop string)."""
    ended = dec.done | (limit <= n)  # (B,)
    if stops is None:
        return bool(ended.all())
    ended, out = ended.tolist(), dec.tokens(n)
    for b, toks in enumerate(out):
        if not ended[b]:
            toks = toks[: limits[b]]
            eot = dec.eot_id
            ended[b] = stops.update(b, toks[: toks.index(eot)] if eot is not None and eot in toks else toks)
    return all(ended)


@sdpa_kernel(DECODE_BACKENDS)
def _recompute_batch(model: GPT, rows: list[list[int]], limits: list[int], seeds: torch.Tensor, sampler,
                     eot_id: int | None) -> list[list[int]]:
    """The reference without a cache: every token runs the whole left-padded context again, from an
    emptied cache (as wide as the eager decode step's at that token, so that attention sees the same
    masked columns: in bf16 the CPU kernel's rounding depends on how many there are)."""
    device = model.transformer.wte.weight.device
    trunk, pick, _ = sampler
    T0, N = max(map(len, rows)), max(limits)
    pad = [T0 - len(r) for r in rows]
    seq = torch.tensor([[eot_id or 0] * p + r for p, r in zip(pad, rows)], dtype=torch.long, device=device)
    u = uniforms(seeds, N)  # (B, N)
    out, done = [], torch.zeros(len(rows), dtype=torch.bool, device=device)
    L = cache_bucket(T0 + N - 1)
    full = StaticKVCache.empty(model.config, len(rows), L, device, _cache_dtype(model, device))
    for t in range(N):
        full.reset(torch.tensor(pad, device=device))
        nxt = pick(trunk(seq, full.narrow(eager_width(seq.size(1), L))), u[:, t])  # (B,)
        if eot_id is not None:
            nxt = torch.where(done, eot_id, nxt)
            done |= nxt == eot_id
        out.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)  # (B, T0 + t + 1)
    results = []
    for b, toks in enumerate(torch.stack(out, 1).tolist()):
        toks = toks[: limits[b]]
        results.append(toks[: toks.index(eot_id)] if eot_id is not None and eot_id in toks else toks)
    return results


def generate(
    model: GPT,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    eot_id: int | None = EOT_ID,
    use_kv_cache: bool = True,
    stop: Sequence[str] | Sequence[Sequence[str]] | None = None,
    batch_size: int | None = None,
    step: str = "auto",
) -> list[list[int]]:
    """Continue each prompt (token ids); returns the new tokens of each, in input order, cut before
    the first ``eot_id`` (None = never stop early) and after the token that completes a ``stop``
    string (one list for every prompt, or one list per prompt).

    ``prompts``: a (B, T) long tensor or a list of id lists of any lengths, decoded together
    (``batch_size`` rows at a time; None = all at once). ``seed``: row i samples with seed + i (or
    give one seed per row); None draws one from ``generator`` or torch's global generator. A row and
    the same row alone with its seed agree as :data:`GUARANTEE` says. ``step``: how the decode step runs
    (``auto`` or one of :data:`~pretrain.inference.decode.DECODE_MODES`). ``use_kv_cache=False``
    recomputes the whole context every token (a reference for tests and benchmarks)."""
    _check_settings(max_new_tokens, temperature, top_k, top_p, step)
    cfg = model.config
    device = model.transformer.wte.weight.device
    rows = _check_prompts(prompts, cfg)
    if batch_size is not None and batch_size < 1:
        raise GenerationError(f"batch_size must be >= 1 (or None), got {batch_size!r}")
    stop_lists = _stop_lists(stop, len(rows))
    seeds = row_seeds(len(rows), seed, generator, device)
    limits = [min(max_new_tokens, cfg.block_size - len(p)) for p in rows]
    settings = (temperature, top_k, top_p)
    results: list[list[int]] = [[] for _ in rows]
    # Longest first, so a batch holds prompts of similar lengths (less padding); rows keep their seeds.
    order = sorted((i for i in range(len(rows)) if limits[i] > 0), key=lambda i: -len(rows[i]))
    size = batch_size or max(len(order), 1)
    was_training = model.training
    done: set[int] = set()
    model.eval()
    try:
        # FSDP2 checks its parameters' version counters when it gathers them, which inference
        # tensors do not have: no_grad for a sharded model (torch 2.13 raises under inference_mode).
        fsdp = is_fsdp(model)
        # The rows of a decode step (the batch size) choose a CPU model's weight layout and head
        # (decode.py: the figures); eager and compiled steps alike.
        step_rows = min(size, max(len(order), 1))
        with nullcontext() if fsdp else decode_layout(model, step_rows), \
                torch.no_grad() if fsdp else torch.inference_mode():
            sampler = _sampler(model, temperature, top_k, top_p, step_rows)
            mode = _decode_mode(step, model, sampler[2])
            for at in range(0, len(order), size):
                members = order[at : at + size]
                args = ([rows[i] for i in members], [limits[i] for i in members], seeds[members], sampler)
                if use_kv_cache:
                    stops = _StopStrings([stop_lists[i] for i in members]) if stop_lists else None
                    new = _decode_batch(model, *args, mode, eot_id, stops, settings)
                else:
                    new = _recompute_batch(model, *args, eot_id)
                    if stop_lists:
                        stops = _StopStrings([stop_lists[i] for i in members])
                        new = [t[: stops.cut[b]] if stops.update(b, t) else t for b, t in enumerate(new)]
                for i, toks in zip(members, new):
                    results[i] = toks
                    done.add(i)
    except KeyboardInterrupt:
        raise GenerationInterrupted({i: results[i] for i in sorted(done)}) from None
    finally:
        model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------
# CLI


class _Prompts(argparse.Action):
    """``--prompt`` may be repeated: the first use replaces the default ('' = unconditional)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*current, values] if isinstance(current, list) else [values])


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gpt2-generate",
        description="Sample continuations of prompts from a GPT-2 (HF directory, hub name or native checkpoint). "
                    "Batched prompts: " + GUARANTEE + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="HF model directory / hub name, or a native checkpoint directory")
    parser.add_argument(
        "--prompt", default="", action=_Prompts,
        help="text to continue; repeat for several prompts, generated as one batch "
             "(default: '%(default)s' = unconditional, starting at <|endoftext|>)",
    )
    parser.add_argument("--prompts-file", default=None, metavar="FILE",
                        help="a UTF-8 text file, one prompt a line (after any --prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    parser.add_argument("--seed", type=int, default=1337, help="sample i draws with seed + i (its random stream does not depend on the batch)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples of each prompt, generated as one batch")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="end a sample after this text (kept in the output); repeatable")
    parser.add_argument("--batch-size", type=int, default=None, help="samples decoded at once; default: all")
    parser.add_argument("--step", default="auto", choices=["auto", *DECODE_MODES],
                        help="how the decode step runs: auto = a captured CUDA graph on CUDA, eager on a CPU")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto = cuda when available")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and activations dtype"
    )
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the whole context every step")
    return parser


MAX_PROMPTS_BYTES = 64 << 20  # a prompts file: a few thousand lines; more is the wrong file
BATCH_MEMORY_BYTES = 1 << 30  # the default batch: as many rows as this much KV cache and logits hold


def default_batch(config, prompt_tokens: int, max_new_tokens: int, rows: int, itemsize: int) -> int:
    """Rows decoded together when --batch-size is not given: all of them, or as many as
    ``BATCH_MEMORY_BYTES`` of KV cache (2 x layers x context x width) and logits (the vocabulary)
    hold -- a prompts file of 20,000 lines is decoded in batches, not one 20,000-row tensor."""
    context = min(config.block_size, prompt_tokens + max_new_tokens)
    per_row = (2 * config.n_layer * context * config.n_embd + 2 * config.vocab_size) * itemsize
    return max(1, min(rows, BATCH_MEMORY_BYTES // max(per_row, 1)))


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts in order: every ``--prompt``, then each line of ``--prompts-file``."""
    prompts = list(args.prompt) if isinstance(args.prompt, list) else []
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        try:
            with open(path, "rb") as f:  # a bound whatever the file is (a pipe, /dev/zero)
                raw = f.read(MAX_PROMPTS_BYTES + 1)
            if len(raw) > MAX_PROMPTS_BYTES:
                raise GenerationError(f"--prompts-file {path}: more than {MAX_PROMPTS_BYTES:,} bytes; split it "
                                      "into several files of one prompt a line")
            lines = raw.decode("utf-8").splitlines()
        except OSError as e:
            raise GenerationError(f"--prompts-file {path}: cannot read it ({e.strerror}); "
                                  "give a text file with one prompt a line") from None
        except UnicodeDecodeError:
            raise GenerationError(f"--prompts-file {path}: not UTF-8 text; save it as UTF-8") from None
        if not lines:
            raise GenerationError(f"--prompts-file {path}: holds no prompts; write one prompt a line")
        prompts += lines
    return prompts or [args.prompt]


def _print_samples(texts: list[str], outs: dict[int, list[int]], tok, total: int) -> None:
    """Each sample (its prompt and continuation) in order, numbered among all ``total``."""
    for i in sorted(outs):
        if total > 1:
            print(f"--- sample {i + 1}/{total} ---")
        print(texts[i] + tok.decode(outs[i]), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from data_pipeline.tokenizer import get_tokenizer
    from pretrain.model.weights import WeightsError, load_model, resolve

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        if args.num_samples < 1:
            raise GenerationError(f"--num-samples must be >= 1, got {args.num_samples}")
        _check_settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.step)  # before the model loads
        if args.batch_size is not None and args.batch_size < 1:
            raise GenerationError(f"--batch-size must be >= 1, got {args.batch_size}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise GenerationError(f"--device {args.device}: CUDA is not available here; pass --device cpu")
        if args.step in CUDA_STEPS and not device.startswith("cuda"):
            raise GenerationError(f"--step {args.step} replays CUDA graphs, which need --device cuda; on {device} "
                                  "pass --step auto, eager or compile")
        for s in args.stop or []:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise GenerationError(f"--stop {s.encode('utf-8', 'surrogateescape')!r}: not UTF-8 text (the "
                                      "tokenizer's text is); pass it in UTF-8") from None
        texts = read_prompts(args)
        source = resolve(args.model)
        model = load_model(source).to(device=device, dtype=getattr(torch, args.dtype))
        if source.note:
            print(source.note, file=sys.stderr)
        tok = get_tokenizer()
        ids = _check_prompts([tok.encode(t) or [tok.eot_id] for t in texts], model.config)  # per prompt, from 1
        for i, p in enumerate(ids):
            room = model.config.block_size - len(p)
            if 0 <= room < args.max_new_tokens:
                print(f"note: the context holds {model.config.block_size} tokens and prompt {i + 1} {len(p)}; "
                      f"generating at most {room}", file=sys.stderr)
        rows = [p for p in ids for _ in range(args.num_samples)]
        batch = args.batch_size or default_batch(model.config, max(map(len, rows)), args.max_new_tokens, len(rows),
                                                 torch.empty((), dtype=getattr(torch, args.dtype)).element_size())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = generate(
            model,
            rows,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            use_kv_cache=not args.no_kv_cache,
            stop=args.stop,
            batch_size=batch,
            step=args.step,
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    except (GenerationError, WeightsError) as e:
        print(f"gpt2-generate: error: {e}", file=sys.stderr)
        return 2
    except GenerationInterrupted as e:  # print what was finished, then the one line (pretrain/cli.py's 130)
        _print_samples([t for t in texts for _ in range(args.num_samples)], e.finished, tok, len(rows))
        print(f"gpt2-generate: interrupted (Ctrl-C); printed the {len(e.finished)} of {len(rows)} samples that were "
              "finished", file=sys.stderr)
        return 130
    _print_samples([t for t in texts for _ in range(args.num_samples)], dict(enumerate(outs)), tok, len(outs))
    n = sum(len(o) for o in outs)
    print(
        f"{n} new tokens in {dt:.2f} s: {n / max(dt, 1e-9):.1f} tokens/s (batch {batch}, "
        f"{'no KV cache' if args.no_kv_cache else 'KV cache, step ' + args.step}, {device}, {args.dtype})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

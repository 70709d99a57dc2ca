"""Decoding one token at a time (used by ``generate.py``): the LM head, the weight layout, and the
fixed-shape decode step with its compiled / captured graphs.

The LM head while sampling: only the last position of each row needs logits, so the trunk
(``GPT.hidden_states``) runs and the head is applied to that one position. For top-k sampling
and greedy decoding on a CPU (:class:`ScreenedHead`), an int8 copy of the head screens the
vocabulary and only the candidates it cannot rule out get their fp32 logits: the same exact
top-k logits, reading a quarter of the head's bytes per token. Otherwise (:class:`DecodeHead`)
the fp32 head over the whole vocabulary.

One row or several (a CPU decides by the batch size; the figures are beside each choice). At one
row a token is memory reads: MKL over the layout below, the int8 screen. A batch of 8 rows is
compute on one core (W1, issue 20: 8.2 ms a step before this split, of which the int8 kernel's 8
rows 2.5 ms, rescoring the union of ~3,800 candidates 2.0, MKL's GEMMs ~1.6), so from two rows on
every nn.Linear runs through oneDNN with packed weights (:func:`decode_layout`), the head is
screened in bf16 through oneDNN (:class:`BatchScreenedHead`: a tighter bound, ~1,000 candidates)
and the full head, where needed, is packed too (:class:`DecodeHead`).

Weight layout while decoding on a CPU (:func:`decode_layout`). At batch 1 a token's cost is
reading every weight once (W1: 65 MB, 51.5 of them the head). ``F.linear`` computes
``x @ W^T`` with ``W`` in nn.Linear's (out, in) row-major layout, which a CPU BLAS runs as one
short dot product per output: 7 GB/s on the project's 2-core EPYC (7.2 ms for the 50,257 x 256
fp32 head). With ``W`` stored column-major (``W^T`` contiguous), the same product streams the
matrix at the memory's read bandwidth: 22 GB/s (2.3 ms). So ``generate`` gives every
nn.Linear weight with more outputs than inputs (the qkv and MLP expansions) of a plain CPU model
a column-major copy for the call and its original tensor back afterwards; the tied head, which
the token embedding reads by rows, is copied transposed by :class:`DecodeHead` instead (one
extra copy of those weights while sampling runs; ~45 ms for W1's), or screened in int8 by
:class:`ScreenedHead` (~15-25 ms to build). Same fp32 arithmetic; only the summation order
differs.

The decode step (:class:`Decoder`). The prompt is prefilled by a normal forward; each further token
is one call of a step whose tensors are all allocated once (a
:class:`~pretrain.inference.cache.StaticKVCache`, the last tokens, each row's uniforms, the output) and
whose changing values are tensors updated in place, so the step is one fixed graph: compiled once
(``torch.compile``, no recompilation across steps) and, on CUDA, captured once in a CUDA graph and
replayed -- a token costs one launch instead of ~150 kernels launched from Python (those launches,
with cuDNN planning an attention graph per key length, since avoided, made a token of the 124M model
47.6 ms at batch 1 on an H200; RESULTS.md, "gpu"). Decoders are kept per
model, keyed by batch size, cache bucket (:func:`cache_bucket`), mode and settings
(:func:`get_decoder`), so the compile / capture is paid by the first batch of a shape.
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from pretrain.inference.cache import StaticKVCache
from pretrain.inference.cpu import int8_applies, int8_mm, onednn_applies, onednn_linear, onednn_pack
from pretrain.model.gpt import GPT

# The decode-time heads, one interface: ``logits(h)`` -> (B, V) fp32 logits of the real vocabulary
# for hidden states h (B, C) after ln_f; ``top(h, n)`` -> (ids (U,) ascending, their logits (B, U)):
# a superset of every row's n largest (ties with the n-th included), with the same fp32 logits, or
# None where the head cannot tell (the caller uses ``logits``). DecodeHead reads the whole head;
# the screened heads read a low-precision copy and compute fp32 logits for the candidates only.


class DecodeHead:
    """The LM head for sampling: logits (B, V) of the real vocabulary at one position per row.
    Padded vocabulary rows are sliced off, so sampled ids are always < ``config.vocab_size``.
    On a CPU, for one row, it multiplies by ``W^T`` (C, V) directly: a view when
    :func:`decode_layout` has laid the weight out column-major, else a copy made once here. For
    ``rows`` >= 2 (the batch it will see), through oneDNN with a packed copy of ``W``: W1's
    50,257 x 256 fp32 head at 8 rows, 1 thread, 2.1 ms (the 51.5 MB at the read rate) against
    5.5 ms for the column-major product (MKL; 6.8 ms row-major) -- at one row MKL's column-major
    product is the faster (1.8 vs 2.6 ms)."""

    def __init__(self, model: GPT, rows: int = 1) -> None:
        weight = model.head_weight()  # (V, C): the real vocabulary's rows
        self.weight = self.weight_t = self.packed = None
        if rows >= 2 and onednn_applies(weight):
            self.packed = onednn_pack(weight)
        if self.packed is not None:
            return
        if weight.device.type == "cpu":
            wt = weight.t()  # (C, V)
            self.weight_t = wt if wt.stride(1) == 1 else wt.contiguous()
        else:
            self.weight = weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, C) hidden states (after ``ln_f``) -> logits (B, V)."""
        if self.packed is not None:
            return onednn_linear(h.float(), self.packed, None)
        if self.weight_t is None:
            return F.linear(h, self.weight)
        return h.to(self.weight_t.dtype) @ self.weight_t  # (B, C) @ (C, V)

    __call__ = logits

    def top(self, h: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token is a candidate: (arange(V), logits (B, V))."""
        logits = self.logits(h)
        return torch.arange(logits.size(-1), device=logits.device), logits


class ScreenedHead:
    """The n largest logits of the LM head at one position, exact (fp32), on a CPU, after reading
    a low-precision copy of the head (the screen) instead of the fp32 weights: top-k sampling and
    greedy decoding need the exact logits of the k + 1 largest only (the softmax of top-k sampling
    runs over the k kept tokens; the (k+1)-th is the tie check).

    1. The screen: approximate logits of every token, ``a = bf16(h) @ w~^T``. This class, for one
       row: ``w~ = q * s`` with ``q`` (V, C) int8 and ``s`` (V,) bf16 per-row scales
       (``cpu.int8_mm``: fp32 accumulation, bf16 output), W1's head 12.9 MB instead
       of 51.5. :class:`BatchScreenedHead`, for several rows: ``w~ = bf16(w)`` through oneDNN.
    2. The bound: for every token j, ``|a_j - r_j| <= D + rho * |a_j|``, where ``r_j`` is the exact
       fp32 logit computed in step 3. ``D = ||h|| * c``, with ``c`` from the head's rows, measured
       once when the screen is built: ``||w~_j - w_j|| (1+u) + ||w_j|| u + gamma (||w~_j|| (1+u)
       + ||w_j||)`` (the quantisation error of the row, the bf16 rounding of ``h`` (u = 2^-8
       relative), fp32 accumulation over C terms on both sides (gamma = C 2^-24 / (1 - C 2^-24)),
       Cauchy-Schwarz for each), maximised over rows; ``rho = u / (1 - u)`` is the bf16 rounding of
       the output. ``w~_j`` is exact in fp32 (int8: a 7-bit integer times an 8-bit mantissa; bf16:
       an fp32 value) and ``bf16(h)_i w~_ji`` too, so the screen's products are exact and only its
       sums round. Both terms are taken 1.25x larger than derived.
    3. The candidates: ``g`` = the n-th largest of the maxima of groups of 64 approximate logits (a
       lower bound of the n-th largest ``a``: the n largest group maxima are n distinct entries);
       every token in the exact top n has ``r_j >= g - D - rho |g|``, hence ``a_j + D + rho |a_j|
       >= g - D - rho |g|``: one threshold on ``a``. The candidates' fp32 rows of the head (the
       row-major weight: contiguous rows) give their exact logits ``r = h @ W[cand]^T``; the top n
       of them is the exact top n, ties included (every token tying with the n-th is a candidate).
       For several rows the candidates are the union of the rows'.

    Exact means as the fp32 head computes it, up to the order of summation (as for
    :func:`decode_layout`). W1, 1 thread: 0.8 ms for the screen plus ~0.3 ms for the candidates
    (~300 of 50,257) vs 2.3 ms for the fp32 head (at the read bandwidth); building the screen
    (one pass over the head) costs about what the transposed copy of :class:`DecodeHead` costs.
    ``build`` returns None where it does not apply (another device or dtype, a bias, a width
    that is not a multiple of 16, the op missing from this torch, weights that are not finite)."""

    GROUP = 64  # logits per group for the lower bound of the n-th largest
    SAFETY = 1.25  # the derived bound, taken this much larger
    _ROWS = 2048  # head rows quantised at a time (bounded temporaries)

    def __init__(self, weight: torch.Tensor, screen: tuple[torch.Tensor, ...], c: float, rho: float) -> None:
        self.weight, self.screen, self.c, self.rho = weight, screen, c, rho

    @classmethod
    def _applies(cls, weight: torch.Tensor) -> bool:
        return int8_applies(weight)

    @classmethod
    def _quantise(cls, weight: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """(the screen's tensors, ``||w~_j - w_j||`` (V,), ``||w_j||`` (V,)): int8 rows ``q`` and
        bf16 scales ``s``. One pass over the head, a block of rows at a time (each block read
        while it is in cache)."""
        V, C = weight.shape
        q = torch.empty(V, C, dtype=torch.int8)
        scale = torch.empty(V, dtype=torch.bfloat16)
        err, norm = torch.empty(V), torch.empty(V)
        for i in range(0, V, cls._ROWS):
            w = weight[i : i + cls._ROWS]  # (R, C)
            s = (w.abs().amax(dim=1) / 127).to(torch.bfloat16)  # (R,): |w| / s <= 127, up to rounding
            s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any scale
            t = w.div(s.float()[:, None]).round_().clamp_(-127, 127)  # (R, C), integer-valued
            q[i : i + cls._ROWS] = t
            scale[i : i + cls._ROWS] = s
            err[i : i + cls._ROWS] = t.mul_(s.float()[:, None]).sub_(w).norm(dim=1)  # ||w~ - w|| per row
            norm[i : i + cls._ROWS] = w.norm(dim=1)
        return (q, scale), err, norm

    @classmethod
    def build(cls, model: GPT) -> ScreenedHead | None:
        weight = model.head_weight()  # (V, C): the real rows
        if not cls._applies(weight):
            return None
        V, C = weight.shape
        with torch.no_grad():
            try:
                screen, err, norm = cls._quantise(weight)
            except RuntimeError:  # a private op refused the weight
                return None
        E, N = err.max().item(), norm.max().item()
        u, u32 = 2.0**-8, 2.0**-24
        gamma = C * u32 / (1 - C * u32)
        c = cls.SAFETY * (E * (1 + u) + N * u + gamma * ((N + E) * (1 + u) + N))  # ||w~|| <= N + E
        if not (c == c and c < float("inf")):  # NaN or inf weights
            return None
        head = cls(weight, screen, c, cls.SAFETY * u / (1 - u))
        try:  # a private op: if this torch's kernel refuses these shapes, the full head it is
            head.approximate(torch.zeros(2, C))
        except RuntimeError:
            return None
        return head

    def approximate(self, h: torch.Tensor) -> torch.Tensor:
        """The screen: approximate logits (B, V) fp32 of h (B, C), within ``bound(h)`` of the exact."""
        q, scale = self.screen
        return int8_mm(h, q, scale)

    def _offset(self, norm):
        """D of the bound for hidden states of this norm (a float, or a tensor of norms)."""
        return self.c * norm + 1e-6

    def bound(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(B, V): the bound on ``|a - exact|`` that the candidate threshold uses (for tests)."""
        return self._offset(h.norm(dim=1, keepdim=True)) + self.rho * a.abs()

    def top(self, h: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """h: (B, C) fp32 hidden states (after ``ln_f``). Returns ``cand`` (U,) ascending token ids,
        a superset of every row's top n, and ``r`` (B, U) their exact logits; None when the screen
        finds fewer than n (non-finite hidden states)."""
        B, V = h.size(0), self.weight.size(0)
        a = self.approximate(h)  # (B, V)
        G = self.GROUP
        if V // G >= n:
            m = V // G * G
            g = a[:, :m].view(B, V // G, G).amax(dim=-1)  # (B, V // G): group maxima
        else:
            g = a
        g = torch.topk(g, n, dim=-1).values[:, -1]  # (B,): <= the n-th largest approximate logit
        thresholds = []
        for g_b, norm_b in torch.stack([g, h.norm(dim=1)], dim=1).tolist():
            D = self._offset(norm_b)
            y = g_b - D - self.rho * abs(g_b) - D  # lower bound of the n-th exact logit, minus D
            t = y / (1 + self.rho) if y >= 0 else y / (1 - self.rho)  # a_j >= t  <=>  a_j + D + rho|a_j| >= y + D
            thresholds.append(t - 1e-6 * (1 + abs(t)))  # margin for this arithmetic itself
        t = torch.tensor(thresholds, dtype=a.dtype)[:, None]  # (B, 1)
        if B == 1:
            keep = (a >= t)[0]  # (V,)
        else:
            # The union: some row has a_j >= t_b, i.e. max over rows of a_j - t_b >= 0 (a rounded
            # difference keeps its sign, so no candidate is lost). W1, 8 rows: 0.1 ms, where
            # (a >= t).any(dim=0) took 0.34 (bool comparisons and reductions are slow kernels on a CPU).
            keep = a.sub_(t).amax(dim=0) >= 0  # (V,)
        cand = keep.nonzero().squeeze(1)  # (U,) ascending
        if cand.numel() < n:
            return None
        return cand, h @ self.weight.index_select(0, cand).t()  # (B, C) @ (C, U) -> (B, U)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, V) exact logits of every token (the fallback: rows with ties at the k-th value)."""
        return F.linear(h, self.weight)


class BatchScreenedHead(ScreenedHead):
    """:class:`ScreenedHead` for several rows: the screen is the head in bf16 (``w~ = bf16(w)``,
    half the fp32 bytes), multiplied through oneDNN with a packed copy; the same bound with this
    ``w~``'s error, which is ~3x smaller than int8's (2^-8 relative per entry), so ~1/4 of the
    candidates (W1, 8 ragged rows of random init: ~1,000 for the union vs ~3,800).

    Which screen, by rows (W1's head, 1 thread, cold cache, one call; RESULTS.md "issue 20"):

    ======  =========================  ===================
    rows    int8 (cpu.int8_mm)         bf16 (oneDNN, packed)
    ======  =========================  ===================
    1       764 us                     840 us
    2       917                        792
    4       1,204                      886
    8       2,427                      1,123
    ======  =========================  ===================

    int8's kernel is at the read rate for one row and compute-bound beyond (it widens each int8
    weight again for every row); oneDNN's bf16 kernel (AVX512-BF16 dot products) reads the head
    once for all rows. So: one row, :class:`ScreenedHead`; two or more, this class."""

    @classmethod
    def _applies(cls, weight: torch.Tensor) -> bool:
        return weight.is_contiguous() and onednn_applies(weight, torch.bfloat16)

    @classmethod
    def _quantise(cls, weight: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """(the packed bf16 head,), ``||bf16(w_j) - w_j||`` (V,), ``||w_j||`` (V,)."""
        V, C = weight.shape
        wb = torch.empty(V, C, dtype=torch.bfloat16).copy_(weight)  # round to nearest even: 2^-8 relative
        err, norm = torch.empty(V), torch.empty(V)
        for i in range(0, V, cls._ROWS):
            w = weight[i : i + cls._ROWS]  # (R, C)
            err[i : i + cls._ROWS] = wb[i : i + cls._ROWS].float().sub_(w).norm(dim=1)
            norm[i : i + cls._ROWS] = w.norm(dim=1)
        packed = onednn_pack(wb)
        if packed is None:
            raise RuntimeError("oneDNN refuses the bf16 head")  # build returns None
        return (packed,), err, norm

    def approximate(self, h: torch.Tensor) -> torch.Tensor:
        """The screen: approximate logits (B, V) fp32 of h (B, C), within ``bound(h)`` of the exact
        (oneDNN: bf16 products, exact in fp32, summed in fp32; bf16 output, rounded to nearest)."""
        return onednn_linear(h.to(torch.bfloat16), self.screen[0], None).float()


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, packed, bias)

    return forward


@contextmanager
def decode_layout(model: torch.nn.Module, rows: int = 1) -> Iterator[None]:
    """While active, the weights of a CPU model's nn.Linear layers are laid out for a decode step
    of ``rows`` rows (the batch size), and each parameter gets back the very tensor it had
    afterwards (same storage, strides and version: the optimizer, DDP's bucket views and compiled
    graphs see nothing). Weights on other devices, weights shared with an Embedding (the tied head:
    the sampler's head lays it out itself) and tied weights seen twice are left alone.

    One row: every 2-D weight with more outputs than inputs is a column-major copy (same values
    and shape; ``W.t()`` is contiguous), which is how MKL reads such a matrix fastest when one
    token goes through (see the module docstring). Weights with as many outputs as inputs or
    fewer (attention's and the MLP's output projections) stay row-major: there one dot product per
    output is long and is the faster order (the MLP's (256, 1024) projection, cold cache, 1 thread:
    99-121 us row-major vs 160-184 us column-major; its (1024, 256) expansion 100-107 vs 185-203 us
    the other way round). Costs one extra copy of those weights while active.

    Two rows or more: every such nn.Linear runs through oneDNN with a packed copy of its weight
    (the module's ``forward``, for the duration: ``torch.ops.pretrain.onednn_linear``, which a
    compiled step calls too, so eager and compiled steps compute the same; fp32 arithmetic, another
    summation order than MKL's). W1's 16 body matmuls, 1
    thread, cold cache: 8 rows 771 us vs 1,231 us for MKL on the one-row layout (4 rows 676 vs 984;
    a prefill of 8 x 64 rows 13.8 vs 31.6 ms); at one row MKL is as fast or faster with the cache
    warm (14 vs 22 us for the (768, 256) qkv), so one row keeps the layout above. Costs one packed
    copy of those weights while active."""
    changed: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    forwards: list[torch.nn.Module] = []
    # A weight an Embedding also uses (GPT-2's tied head) stays row-major: a token's lookup reads
    # one contiguous row of it; column-major it would be C scattered reads. DecodeHead copies it.
    seen: set[int] = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    try:
        with torch.no_grad():
            for module in model.modules():
                w = getattr(module, "weight", None)
                if (not isinstance(module, torch.nn.Linear) or w is None or w.device.type != "cpu"
                        or w.dim() != 2 or id(w) in seen or not w.is_contiguous()):
                    continue
                if rows >= 2 and "forward" not in module.__dict__ and onednn_applies(w):
                    packed = onednn_pack(w)
                    if packed is not None:
                        seen.add(id(w))
                        forwards.append(module)
                        module.forward = _packed_forward(packed, module.bias)
                        continue
                if w.size(0) <= w.size(1):
                    continue
                seen.add(id(w))
                changed.append((w, w.data))
                w.data = w.data.t().contiguous().t()  # (out, in), strides (1, out)
        yield
    finally:
        with torch.no_grad():
            for w, original in changed:
                w.data = original  # the very tensor it had (same storage: nothing else notices)
        for module in forwards:
            del module.forward  # the class's forward again


# ---------------------------------------------------------------------------------------------
# The fixed-shape decode step
#
#   prefill (eager, any prompt length)        decode step (fixed shapes: one graph)
#   idx (B, T0) ──► trunk ──► pick ──► out[:, 0]     tok (B, 1) ──► trunk ──► pick ──► out[:, count]
#   writes cache columns 0 .. T0-1                   writes cache column slot; slot, count += 1
#
# Every tensor a decode step reads or writes lives in the Decoder, allocated once; the step's
# shapes depend on (B, L) only and its changing values (slot, count) are tensors updated in place.

DECODE_MODES = ("eager", "compile", "graph", "compile+graph", "reduce-overhead")
"""How the decode step runs. ``eager``: op by op from Python. ``compile``: ``torch.compile`` (inductor),
one graph, no recompilation across steps. ``graph``: the eager step captured once in a
``torch.cuda.CUDAGraph`` and replayed (one launch per token). ``compile+graph``: the compiled step
captured the same way. ``reduce-overhead``: ``torch.compile(mode="reduce-overhead")`` (inductor's
own CUDA graphs). The graph modes need CUDA and a sampler without host syncs."""


EAGER_COLUMNS = 32
"""An eager step attends over the columns written so far rounded up to this (not all L: on a CPU the
keys and values read are a fair share of a token's bytes at batch 8)."""


def eager_width(n: int, max_len: int) -> int:
    """Columns an eager step attends over when n have been written (including its own)."""
    return min(max_len, -(-n // EAGER_COLUMNS) * EAGER_COLUMNS)


def cache_bucket(n: int) -> int:
    """Cache columns for ``n`` needed: a power of two from 64 to 256, then a multiple of 256. Batches
    whose prompt + continuation fall in one bucket share one decoder (one compiled / captured
    graph), for at most twice the columns (the masked columns cost attention reads only)."""
    if n <= 256:
        return max(64, 1 << (n - 1).bit_length())
    return -(-n // 256) * 256


class Decoder:
    """The decode step for B rows and a :class:`~pretrain.inference.cache.StaticKVCache` of L columns.

    ``trunk(idx, cache) -> (B, C)`` runs the model and returns what ``pick(x, u) -> (B,)`` turns
    into the next token of each row (``u`` (B, 1) float64: each row's uniform for this draw). ``start``
    prefills (eager) and picks the first token; ``step`` produces one more per row; ``tokens(n)``
    reads the first n of each row. A row that produced ``eot_id`` repeats it (``done``). Built once
    per (batch, bucket, settings) and reused (:func:`get_decoder`); ``build_s`` is what compiling /
    capturing cost, paid by the first batch."""

    def __init__(self, model: GPT, batch_size: int, max_len: int, dtype: torch.dtype, trunk: Callable,
                 pick: Callable, eot_id: int | None, mode: str, static_pick: bool) -> None:
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
        device = model.transformer.wte.weight.device
        if mode in ("graph", "compile+graph", "reduce-overhead") and (device.type != "cuda" or not static_pick):
            raise ValueError(f"decode mode {mode!r} needs CUDA and a sampler without host syncs")
        B, L = batch_size, max_len
        self.cache = StaticKVCache.empty(model.config, B, L, device, dtype)
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=device)  # the last token of each row
        self.u = torch.zeros(B, L, dtype=torch.float64, device=device)  # each row's uniforms, draw by draw
        self.count = torch.zeros(1, dtype=torch.long, device=device)  # tokens picked so far
        self.done = torch.zeros(B, dtype=torch.bool, device=device)  # rows past their eot_id
        self.out = torch.zeros(B, L, dtype=torch.long, device=device)  # the picked tokens
        self.trunk, self.pick, self.eot_id, self.mode = trunk, pick, eot_id, mode
        self.step_trunk = trunk  # the decode step's (compiled alone when the pick cannot be)
        self.step_cache = self.cache  # what the step reads: all L columns, or (eager) those written so far
        self.written = 0  # columns written (host side; eager steps narrow the cache by it)
        self.batch_size, self.max_len = B, L
        self.graph: torch.cuda.CUDAGraph | None = None
        t0 = time.perf_counter()
        self._run = self._build(mode, static_pick)
        self.build_s = time.perf_counter() - t0

    def _step_eager(self) -> None:
        u = self.u.index_select(1, self.count)  # (B, 1): this draw's uniforms
        self._record(self.pick(self.step_trunk(self.tok, self.step_cache), u))

    def _record(self, nxt: torch.Tensor) -> None:
        if self.eot_id is not None:  # a finished row keeps emitting eot_id (cut off by the caller)
            nxt = torch.where(self.done, self.eot_id, nxt)
            self.done.logical_or_(nxt == self.eot_id)
        nxt = nxt[:, None]  # (B, 1)
        self.out.index_copy_(1, self.count, nxt)
        self.tok.copy_(nxt)
        self.count.add_(1)

    def _build(self, mode: str, static_pick: bool) -> Callable[[], None]:
        """The step as a callable; compiles and captures now (warm-up steps on this decoder's own
        buffers, which ``start`` resets), so the first batch pays ``build_s`` and later ones do not."""
        if mode == "eager":
            return self._step_eager
        if mode == "compile" and not static_pick:  # a sampler with host syncs (CPU): the trunk alone
            self.step_trunk = torch.compile(self.trunk, fullgraph=True, dynamic=False)
            fn = self._step_eager
        elif mode == "reduce-overhead":
            c = self.cache
            for t in [*c.k, *c.v, c.start, c.start_rows, c.start_keys, c.slot, c.columns,
                      self.tok, self.u, self.count, self.done, self.out]:
                torch._dynamo.mark_static_address(t)  # mutated in place: must be static for CUDA graphs
            fn = torch.compile(self._step_eager, mode="reduce-overhead", fullgraph=True, dynamic=False)
        elif mode in ("compile", "compile+graph"):
            fn = torch.compile(self._step_eager, fullgraph=True, dynamic=False)
        else:  # graph
            fn = self._step_eager
        if mode not in ("graph", "compile+graph"):
            for _ in range(3):  # compile (and reduce-overhead's own warm-up and recording)
                fn()
            return fn
        return self._capture(fn)

    def _capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        # Warm up on a side stream (allocator, cuBLAS workspaces, the compile), then capture one
        # step. Under autocast the cast weights must not come from autocast's cache: the graph
        # would keep reading copies that the cache frees when the caller's autocast ends.
        ac = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False) \
            if torch.is_autocast_enabled("cuda") else nullcontext()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with ac, torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with ac, torch.cuda.graph(self.graph):
            fn()
        return self.graph.replay

    def start(self, idx: torch.Tensor, start: torch.Tensor, u: torch.Tensor, pick: Callable | None = None) -> None:
        """A new batch: prompts idx (B, T0) left-padded (row b's tokens begin at column start[b]),
        u (B, n) each row's uniforms for n draws. Prefills (eager, whatever the prompt length: no
        graph per length) and picks the first tokens.
        ``pick``: this batch's sampler, for a step that calls it eagerly (one that is compiled or
        captured keeps the one it was built with)."""
        if pick is not None:
            self.pick = pick
        self.cache.reset(start)
        self.count.zero_()
        self.done.zero_()
        self.u[:, : u.size(1)].copy_(u)
        self.written = idx.size(1)
        cache = self._narrowed() if self.mode == "eager" else self.cache
        self._record(self.pick(self.trunk(idx, cache), self.u[:, :1]))

    def _narrowed(self) -> StaticKVCache:
        width = eager_width(self.written, self.max_len)
        if self.step_cache.max_len != width:
            self.step_cache = self.cache.narrow(width)
        return self.step_cache

    def step(self) -> None:
        """One more token for every row."""
        self.written += 1
        if self.mode == "eager":
            self._narrowed()
        self._run()

    def tokens(self, n: int) -> list[list[int]]:
        return self.out[:, :n].tolist()


# Decoders kept per model: compiled / captured graphs and their buffers, least recently used
# dropped first. A model that is garbage-collected takes its decoders with it.
_DECODERS: weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict] = weakref.WeakKeyDictionary()
MAX_DECODERS = 8


def get_decoder(model: GPT, key: tuple, build: Callable[[], Decoder]) -> Decoder:
    """The model's decoder for ``key`` (batch, bucket, mode, sampling settings, dtypes), built on
    first use. A captured graph reads the parameters' memory: a graph-mode decoder built before the
    parameters were replaced (``load_state_dict(assign=True)``, ``.to()``) is rebuilt. (Compiled
    steps take the parameters as inputs, so they follow a replacement by themselves.)"""
    per_model = _DECODERS.setdefault(model, OrderedDict())
    weights = tuple(p.data_ptr() for p in model.parameters())
    found = per_model.get(key)
    if found is not None and (found[0].mode in ("eager", "compile") or found[1] == weights):
        per_model.move_to_end(key)
        return found[0]
    per_model.pop(key, None)
    dec = build()
    per_model[key] = (dec, weights)
    while len(per_model) > MAX_DECODERS:
        per_model.popitem(last=False)
    return dec


def decoders(model: GPT) -> list[Decoder]:
    """The decoders kept for ``model`` (benchmarks print their build cost)."""
    return [d for d, _ in _DECODERS.get(model, {}).values()]

"""Continuous batching over one static KV cache: the server's engine, without HTTP.

One thread runs the loop. Each iteration: rows whose client went away are freed; waiting sequences
take free rows (the lowest first), each prefilled alone (batch 1, eager, any prompt length) and its
first token picked; then one decode step feeds every running row's last token -- the new rows'
beside the older ones -- and picks the next. A row leaves at its end-of-text, a stop string or its
token limit, and the next waiting sequence takes it at the next iteration. Nothing waits for a
batch to finish.

The cache (:class:`~pretrain.inference.cache.StaticKVCache`, ``max_batch`` rows of ``L = block_size +
runway`` columns, runway = block_size / 2 within [32, 256]) is shared the way the static decode step shares it: every row writes its next
key/value at the same column ``slot``, and row b's tokens are the columns ``start[b] .. slot-1``
(column j is position ``j - start[b]``, so a row keeps the positions it has alone, as a left-padded
row of ``gpt2-generate`` does). A prompt of T tokens joins at columns ``slot-T .. slot-1`` (if
``slot < T``, the running rows' columns move right first); when ``slot`` reaches L the running
rows' columns move left by the smallest ``start`` (>= runway + 1, since no running row has fed
``block_size`` tokens), so the columns are copied once per ``runway`` steps at most. A decode step
attends over rows ``0 .. last running`` and the columns written so far (``eager_width``): its cost
follows the running rows, not ``max_batch``.

Sampling is ``gpt2-generate``'s, piece by piece: the samplers of ``_sampler`` (one per setting,
kept; rows with different settings share the trunk and are picked in groups), the counter-based
stream ``uniforms(seed)`` (draw t of a row is a hash of (seed, t): independent of the batch), the
stop-string matcher ``_StopStrings``, end-of-text and the per-row limit ``min(max_tokens,
block_size - len(prompt))``. So a sequence's tokens are those ``generate(model, [prompt],
seed=seed, ...)`` returns, within what generation guarantees between batch sizes (the same
arithmetic up to summation order: tested equal on the suite's models).

Runs eagerly on every device (no compiled / captured step: the rows' membership changes every few
steps; the graph modes of ``gpt2-generate`` are for fixed batches).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.attention import sdpa_kernel

from pretrain.inference.cache import StaticKVCache

# Generation's pieces, in one place (the decode step's cache, layout and head; the samplers, the
# seeded stream, the stop strings and the checks).
from pretrain.inference.decode import DecodeHead, decode_layout, eager_width
from pretrain.inference.generate import (
    DECODE_BACKENDS,
    EOT_ID,
    GenerationError,
    _cache_dtype,
    _check_settings,
    _sampler,
    _StopStrings,
    uniforms,
)
from pretrain.model.gpt import GPT

MAX_SAMPLERS = 8  # samplers kept per engine (one per sampling setting; a screened head each)


class QueueFull(RuntimeError):
    """More waiting sequences than ``max_queue`` (the server answers 429)."""


class NotAccepting(RuntimeError):
    """The engine is shutting down (the server answers 503)."""


@dataclass
class Event:
    """What a sequence gets from the engine: a token (``token``, with ``logprob`` / ``top`` when
    asked), or its end (``finish``: "stop", "length", "cancelled" or "abort")."""

    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish: str | None = None
    prompt_logprobs: list | None = None  # echo with logprobs: [(logprob, top) | None per prompt token]


@dataclass(eq=False)
class Sequence:
    """One continuation of one prompt (an OpenAI "choice"). ``logprobs``: alternatives to report
    besides the sampled token (None: no logprobs). ``on_event`` is called from the engine thread."""

    prompt: list[int]
    max_tokens: int
    on_event: Callable[[Event], None]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    echo_logprobs: bool = False
    # the engine's
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    arrival: float = 0.0
    last_time: float = 0.0
    cancel_step: int | None = None
    freed_step: int | None = None
    row: int = -1

    @property
    def settings(self) -> tuple:
        return (self.temperature, self.top_k, self.top_p)


@dataclass
class Counters:
    admitted: int = 0  # sequences given a row
    reused: int = 0  # ... a row that an earlier sequence had used
    finished: int = 0
    cancelled: int = 0
    steps: int = 0  # decode steps
    tokens: int = 0  # tokens produced
    compactions: int = 0  # times the cache's columns moved
    cancel_lag: int = 0  # the most decode steps between a cancel and its row's release


class Engine:
    """``submit`` sequences from any thread; ``start`` runs the loop in a thread of its own;
    ``shutdown(grace_s)`` stops admitting, lets running rows finish for ``grace_s``, cancels the rest
    and joins. ``observer`` (optional): ``first_token(seconds)``, ``next_token(seconds)``, called per
    token from the engine thread (the server's metrics)."""

    def __init__(self, model: GPT, max_batch: int = 8, max_queue: int = 64, observer=None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.model = model.eval()
        cfg = model.config
        self.context = cfg.block_size
        self.runway = max(32, min(cfg.block_size // 2, 256))
        self.max_batch, self.max_queue, self.observer = max_batch, max_queue, observer
        device = model.transformer.wte.weight.device
        self.L = cfg.block_size + self.runway
        self.cache = StaticKVCache.empty(cfg, max_batch, self.L, device, _cache_dtype(model, device))
        self.device = device
        self.rows: list[Sequence | None] = [None] * max_batch
        self.used = [False] * max_batch
        self.queue: deque[Sequence] = deque()
        self.cond = threading.Condition()
        self.counters = Counters()
        self.accepting = True
        self._deadline: float | None = None  # shutting down: cancel running rows after this
        self._stop = False
        self._thread: threading.Thread | None = None
        self._samplers: OrderedDict[tuple, tuple] = OrderedDict()
        self.error: BaseException | None = None

    # ---- the client side (any thread) --------------------------------------------------------

    def check(self, seq: Sequence) -> None:
        """Raise :class:`GenerationError` for settings or a prompt the engine cannot run."""
        _check_settings(seq.max_tokens, seq.temperature, seq.top_k, seq.top_p, "auto")
        if not seq.prompt:
            raise GenerationError("prompt is empty")
        if len(seq.prompt) > self.context:
            raise GenerationError(f"the prompt has {len(seq.prompt)} tokens but the model's context is "
                                  f"{self.context}; shorten the prompt")
        V = self.model.config.vocab_size
        if any(not 0 <= t < V for t in seq.prompt):
            raise GenerationError(f"the prompt holds token ids outside [0, {V})")

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue these sequences, all or none (:class:`QueueFull`, :class:`NotAccepting`)."""
        for s in seqs:
            self.check(s)
        now = time.perf_counter()
        with self.cond:
            if not self.accepting:
                raise NotAccepting("the server is shutting down")
            if len(self.queue) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.queue)} sequences are waiting (--max-queue {self.max_queue})")
            for s in seqs:
                s.arrival = s.last_time = now
                self.queue.append(s)
            self.cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Free these sequences' rows at the next iteration (a client that went away); those still
        waiting leave the queue now."""
        with self.cond:
            for s in seqs:
                if s.cancelled:
                    continue
                s.cancelled, s.cancel_step = True, self.counters.steps
                if s.row < 0 and s in self.queue:
                    self.queue.remove(s)
                    self.counters.cancelled += 1
                    s.on_event(Event(finish="cancelled"))
            self.cond.notify()

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    # ---- the loop ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gpt2-serve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop admitting; waiting sequences end at once ("abort"), running rows may finish within
        ``grace_s`` seconds, then end ("abort"). Returns when the loop has stopped."""
        with self.cond:
            self.accepting = False
            self._deadline = time.perf_counter() + grace_s
            self._stop = True
            self.cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        try:
            with decode_layout(self.model, self.max_batch), torch.inference_mode(), sdpa_kernel(DECODE_BACKENDS):
                self._head = DecodeHead(self.model, self.max_batch)  # logprobs: the full head
                while True:
                    admit = self._wait()
                    if admit is None:
                        return
                    self.iterate(admit)
        except BaseException as e:  # the server reports it (/health) and fails the open requests
            self.error = e
            with self.cond:
                self.accepting = False
                pending = [*self.queue, *(r for r in self.rows if r is not None)]
                self.queue.clear()
            for s in pending:
                s.on_event(Event(finish="abort"))
            raise

    def _wait(self) -> list[Sequence] | None:
        """Sequences to admit now (possibly none), once there is work; None when the loop must end."""
        with self.cond:
            while not self.queue and self.running == 0 and not self._stop:
                self.cond.wait()
            if self._stop:
                for s in self.queue:
                    s.on_event(Event(finish="abort"))
                self.queue.clear()
                if self.running == 0:
                    return None
                if time.perf_counter() > self._deadline:
                    for b, s in enumerate(self.rows):
                        if s is not None:
                            self._free(b, "abort")
                    return None
            admit = []
            free = [b for b, r in enumerate(self.rows) if r is None]
            while self.queue and len(admit) < len(free):
                s = self.queue.popleft()
                if s.cancelled:
                    s.on_event(Event(finish="cancelled"))
                    self.counters.cancelled += 1
                    continue
                s.row = free[len(admit)]
                admit.append(s)
            return admit

    def iterate(self, admit: list[Sequence]) -> None:
        """One iteration: free cancelled rows, prefill ``admit`` into their rows, one decode step."""
        for b, s in enumerate(self.rows):
            if s is not None and s.cancelled:
                self._free(b, "cancelled")
        for s in admit:
            self._admit(s)
        if self.running:
            self._step()

    # ---- rows and columns --------------------------------------------------------------------

    def _free(self, b: int, reason: str) -> None:
        s = self.rows[b]
        self.rows[b] = None
        self.cache.start[b] = 0  # an idle row's query sees columns 0 .. slot: finite, never used
        s.freed_step = self.counters.steps
        if reason == "cancelled":
            self.counters.cancelled += 1
            self.counters.cancel_lag = max(self.counters.cancel_lag, s.freed_step - s.cancel_step)
        else:
            self.counters.finished += 1
        s.on_event(Event(finish=reason))

    def _active(self) -> list[int]:
        return [b for b, r in enumerate(self.rows) if r is not None]

    def _move_columns(self, lo: int, hi: int, to: int) -> None:
        """Every row's columns lo .. hi-1 copied to to .. to+hi-lo-1 (all layers, k and v)."""
        for t in (*self.cache.k, *self.cache.v):  # (B, nh, L, hs) each
            t[:, :, to : to + hi - lo] = t[:, :, lo:hi].clone()
        self.counters.compactions += 1

    def _make_room(self, T: int) -> int:
        """The slot a prompt of T tokens ends before: its tokens go to columns slot-T .. slot-1."""
        slot = int(self.cache.slot)
        active = self._active()
        if not active:
            self.cache.slot.fill_(T)
            return T
        if slot < T:  # the running rows move right by T - slot (T <= block_size < L: room stays)
            lo = int(self.cache.start[active].min())
            self._move_columns(lo, slot, lo + T - slot)
            self.cache.start[active] += T - slot
            self.cache.slot.fill_(T)
            return T
        return slot

    def _compact(self) -> None:
        """At the last column: the running rows' columns move left by the smallest start."""
        active = self._active()
        if not active:
            self.cache.slot.zero_()
            return
        lo = int(self.cache.start[active].min())  # >= runway + 1
        self._move_columns(lo, self.L, 0)
        self.cache.start[active] -= lo
        self.cache.slot.fill_(self.L - lo)

    def _view(self, rows: slice, width: int, slot: torch.Tensor) -> StaticKVCache:
        c = self.cache
        return StaticKVCache(k=[k[rows, :, :width] for k in c.k], v=[v[rows, :, :width] for v in c.v],
                             start=c.start[rows], slot=slot, columns=c.columns[:width])

    # ---- sampling ----------------------------------------------------------------------------

    def _sampler(self, settings: tuple):
        found = self._samplers.get(settings)
        if found is None:
            found = _sampler(self.model, *settings, rows=self.max_batch)
            self._samplers[settings] = found
            while len(self._samplers) > MAX_SAMPLERS:
                self._samplers.popitem(last=False)
        self._samplers.move_to_end(settings)
        return found

    def _logprobs(self, h: torch.Tensor, tokens: torch.Tensor, k: int) -> list[tuple[float, list]]:
        """h (n, C), tokens (n,): each token's log-probability under the model and the k most likely."""
        lp = self._head(h).float().log_softmax(dim=-1)  # (n, V)
        chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
        top = torch.topk(lp, k, dim=-1) if k > 0 else None
        alts = [list(zip(top.indices[i].tolist(), top.values[i].tolist())) if top is not None else []
                for i in range(len(chosen))]
        return list(zip(chosen, alts))

    def _admit(self, s: Sequence) -> None:
        """Prefill s into its row and pick its first token."""
        b, T = s.row, len(s.prompt)
        s.limit = min(s.max_tokens, self.context - T)
        s.u = uniforms(torch.tensor([s.seed % 2**63], device=self.device), max(s.limit, 1))  # (1, limit)
        s.stops = _StopStrings([s.stop]) if s.stop else None
        self.counters.admitted += 1
        self.counters.reused += self.used[b]
        self.used[b] = True
        slot = self._make_room(T)  # before the row is taken: its start is not set yet
        self.rows[b] = s
        self.cache.start[b] = slot - T
        idx = torch.tensor([s.prompt], device=self.device)  # (1, T)
        view = self._view(slice(b, b + 1), eager_width(slot, self.L), torch.tensor([slot - T], device=self.device))
        h = self.model.hidden_states(idx, kv_cache=view)[0]  # (T, C)
        prompt_lp = None
        if s.echo_logprobs:
            got = self._logprobs(h[:-1], idx[0, 1:], s.logprobs or 0)
            prompt_lp = [None, *got]
        if s.limit <= 0:
            if prompt_lp is not None:
                s.on_event(Event(prompt_logprobs=prompt_lp))
            self._free(b, "length")
            return
        _, pick, _ = self._sampler(s.settings)
        tok = pick(h[-1:], s.u[:, :1])  # (1,)
        self._record(b, tok, h[-1:], prompt_lp)

    def _step(self) -> None:
        active = self._active()
        hi = active[-1] + 1
        slot = int(self.cache.slot)
        tok = torch.tensor([[r.tokens[-1] if r is not None else 0] for r in self.rows[:hi]], device=self.device)
        view = self._view(slice(0, hi), eager_width(slot + 1, self.L), self.cache.slot)
        h = self.model.hidden_states(tok, kv_cache=view)[:, -1]  # (hi, C); slot += 1
        self.counters.steps += 1
        groups: dict[tuple, list[int]] = {}
        for b in active:
            groups.setdefault(self.rows[b].settings, []).append(b)
        for settings, members in groups.items():
            _, pick, _ = self._sampler(settings)
            idx = torch.tensor(members, device=self.device)
            u = torch.stack([self.rows[b].u[0, len(self.rows[b].tokens)] for b in members])[:, None]  # (n, 1)
            nxt = pick(h[idx], u)  # (n,)
            for i, b in enumerate(members):
                self._record(b, nxt[i : i + 1], h[b : b + 1])
        if int(self.cache.slot) >= self.L:
            self._compact()

    def _record(self, b: int, tok: torch.Tensor, h: torch.Tensor, prompt_lp=None) -> None:
        """Row b picked ``tok`` (1,) from hidden state h (1, C): tell its client; end it if done."""
        s = self.rows[b]
        t = int(tok)
        now = time.perf_counter()
        if self.observer is not None:
            (self.observer.next_token if s.tokens else self.observer.first_token)(now - s.last_time)
        s.last_time = now
        self.counters.tokens += 1
        if t == EOT_ID:
            if prompt_lp is not None:
                s.on_event(Event(prompt_logprobs=prompt_lp))
            self._free(b, "stop")
            return
        s.tokens.append(t)
        lp, top = self._logprobs(h, tok, s.logprobs)[0] if s.logprobs is not None else (None, None)
        s.on_event(Event(token=t, logprob=lp, top=top, prompt_logprobs=prompt_lp))
        if s.stops is not None and s.stops.update(0, s.tokens):
            self._free(b, "stop")
        elif len(s.tokens) >= s.limit:
            self._free(b, "length")

"""The distributed, resumable token loader over llm.c shards.

The data of a split is one *global stream* of sequences per epoch::

    shard s holds n_s tokens -> (n_s - 1) // T sequences; sequence i = tokens[i*T : i*T + T + 1]
    epoch e: shards in order perm(seed, e)            (identity when shuffle=False)
             sequences of shard s in order perm(seed, e, s)
    stream  = epoch 0 sequences, epoch 1 sequences, ...   (infinite)

One optimizer step consumes ``global_batch_seqs`` consecutive sequences of the stream whatever
the world size W. With micro-batch B there are ``global_batch_seqs // (W*B)`` micro-steps per
step, and micro-step m of rank r reads stream positions ``base + m*W*B + r*B + [0, B)``::

    step k:   |-- m=0: r0 r1 .. rW-1 --|-- m=1: r0 r1 .. --| ...   (each cell B sequences)

so ranks are disjoint, together they cover the global batch, and the token order of a run
depends on the seed and the global batch only: a run can resume on another world size at a
step boundary. The only state is the number of stream sequences consumed, identical on every
rank, so ``state_dict()`` is the same everywhere and resuming is exact mid-shard, across shard
boundaries and across epochs.

Shards are memory-mapped (never read whole); a batch gathers B rows of T+1 tokens from the
maps (one fancy index per run of rows within a shard) and widens uint16 -> int64 into one
``(2, B, T)`` tensor whose halves are ``x`` and ``y``. On CUDA the batch goes through pinned memory with a
non-blocking copy.

Integrity (each check once per shard, never a stall of step 1 for the whole dataset): when the
manifest records a shard's sha256, the shard is hashed before its tokens are first used -- on a
daemon thread that works ahead through the shards in the order the stream reaches them, or on
the caller's thread if the loader needs a shard the thread has not reached. A shard whose bytes
differ from the manifest raises :class:`ShardError` naming the file, both hashes and the
``gpt2-prepare`` command that rebuilds it (a failure found ahead is raised by the next
``next_batch()``). With ``vocab_size`` the loader refuses token ids ``>= vocab_size``, naming
shard, position and id: at construction from the manifest's ``max_token_id``, and from a max
taken in the same pass as the hash when first opened (always: a manifest whose sha256 was
rewritten to match a changed shard cannot vouch for its ids) -- before any batch of that shard
is returned. Remote data (``data_dir`` an fsspec URL, ``cache_dir`` node-local) goes through the
same checks on copies (``data_pipeline.store``): the thread then works one shard ahead, fetching
the next shard while the current one is read. ``state_dict()`` records each shard's
sha256, so a resume onto data whose content changed is refused. Every rank checks the shards it
reads for itself (no collective): the files are the same, so the ranks reach the same verdict, and
a rank that raises ends the job (torchrun stops the others).

For validation loss, build a fresh loader with ``shuffle=False`` each time and take the first
k batches: that is always the same fixed prefix of the val split.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline import integrity
from data_pipeline.shards import HEADER_BYTES, TOKEN_DTYPE, ShardError, expected, read_shard
from data_pipeline.store import PREFETCH_SHARDS, ShardStore, token_range_error

__all__ = ["DistributedTokenLoader", "SplitInfo", "inspect_split", "as_saved", "check_resume_state", "rebuild_hint",
           "integrity_error", "token_range_error"]

_STATE_VERSION = 1


def rebuild_hint(data_dir: str | os.PathLike) -> str:
    """How to rebuild the shards of ``data_dir``: its manifest's exact ``gpt2-prepare`` command."""
    try:
        return ShardStore(data_dir).manifest.rebuild_hint()
    except ShardError:
        return f"rebuild it with the `gpt2-prepare SOURCE {data_dir}` command that made it"


def integrity_error(bad: integrity.Mismatch, data_dir: str | os.PathLike, digits: int = 64) -> ShardError:
    """One line: the file, the expected and actual hash (or size; ``digits`` of each hash), and the
    command that rebuilds it."""
    return ShardStore(data_dir).integrity_error(bad, digits=digits)


@dataclass(frozen=True)
class SplitInfo:
    """One split of a prepared directory, checked (:func:`inspect_split`): its shards in stream
    order (local paths: in place, or where the store copies them) with their token counts,
    manifest entries and records (None without a manifest) and recorded maximum token ids (None
    when not recorded)."""

    store: ShardStore
    split: str
    files: list[Path]
    shard_tokens: np.ndarray
    entries: list[dict | None]
    expected: list[integrity.Expected | None]
    max_ids: list[int | None]

    @property
    def data_dir(self) -> Path:
        """The local directory the shards are read from."""
        return self.store.root

    def record(self) -> list[list]:
        """``[[name, tokens, sha256 | None], ...]``: what a loader state records of the data."""
        return [[f.name, int(n), e.sha256 if e is not None else None]
                for f, n, e in zip(self.files, self.shard_tokens, self.expected)]


def inspect_split(data_dir: str | os.PathLike, split: str, seq_len: int, micro_batch_size: int,
                  global_batch_seqs: int, vocab_size: int | None = None, verify: bool = True,
                  cache_dir: str | os.PathLike | None = None, allow_incomplete: bool = False) -> SplitInfo:
    """Check a split without reading its tokens: the prepare finished (unless ``allow_incomplete``),
    every shard's header and size (remote: its size in one listing; ``data_pipeline.store``), its
    token count against the manifest, the manifest's recorded token range against ``vocab_size``,
    each shard holding a micro-batch and the split holding a global batch. Raises
    :class:`ShardError` naming the file (or the directory) and the fix. The run plan calls it
    before anything is built; the loader calls it when built."""
    store = ShardStore(data_dir, cache_dir)
    manifest = store.manifest  # read once, here; handed on in the SplitInfo
    manifest.check_complete(allow_incomplete)
    pairs = manifest.entries(split)
    files, entries = [p for p, _ in pairs], [e for _, e in pairs]
    shard_tokens = manifest.token_counts(pairs)
    max_ids = [int(e["max_token_id"]) if e is not None and isinstance(e.get("max_token_id"), int) else None
               for e in entries]
    if vocab_size is not None:
        for f, m in zip(files, max_ids):
            if m is not None and m >= vocab_size:  # the manifest says so: refuse before any step
                raise (token_range_error(f, read_shard(f), vocab_size) if not store.remote
                       else token_range_error(f"{store.where}/{f.name}", None, vocab_size, m))
    need = micro_batch_size * seq_len + 1
    for f, n, e in zip(files, shard_tokens, entries):
        # The last shard of a prepared stream (each task of a prepare split into tasks has one) may be
        # short: sequences are read across shard boundaries, so it just holds fewer (maybe none).
        if n < need and not (e is not None and e.get("final") is True):
            raise ShardError(
                f"{f}: shard holds {int(n)} tokens, fewer than one micro-batch "
                f"(micro_batch_size*seq_len+1 = {need}); re-run prepare with a larger --shard-tokens "
                "or lower the batch size / sequence length"
            )
    num_sequences = int(((shard_tokens - 1) // seq_len).sum())
    if num_sequences < global_batch_seqs:
        raise ShardError(
            f"{store.where}: split '{split}' holds {num_sequences} sequences of {seq_len} tokens, "
            f"fewer than one global batch ({global_batch_seqs}); prepare more tokens "
            "(--val-tokens / --max-tokens) or lower the batch size"
        )
    store.check_cache_room(files)
    verify = verify or store.remote  # a copy is only ever used verified
    exp = [expected(f, e) if verify else None for f, e in pairs]
    return SplitInfo(store, split, files, shard_tokens, entries, exp, max_ids)


def as_saved(info: SplitInfo, state: Any) -> SplitInfo:
    """The split a resume continues on: when the loader ``state`` was saved on the first shards of
    ``info`` and the prepare has since written more (a run with ``data.allow_incomplete``, resumed
    after the prepare finished), those first shards; else ``info`` itself."""
    saved = state.get("shards") if isinstance(state, dict) else None
    if not isinstance(saved, list) or not 0 < len(saved) < len(info.files):
        return info
    now = [[f.name, int(n)] for f, n in zip(info.files, info.shard_tokens)]
    if [list(s[:2]) for s in saved] != now[: len(saved)]:
        return info  # another set of shards: check_resume_state says so
    k = len(saved)
    return replace(info, files=info.files[:k], shard_tokens=info.shard_tokens[:k], entries=info.entries[:k],
                   expected=info.expected[:k], max_ids=info.max_ids[:k])


def check_resume_state(state: Any, info: SplitInfo, seq_len: int, global_batch_seqs: int, micro_batch_size: int,
                       world_size: int, seed: int, shuffle: bool) -> int:
    """Whether a loader state (``DistributedTokenLoader.state_dict()``) can continue on this data
    and these settings; returns its consumed-sequence count, or raises ``ValueError`` (settings,
    shard list) / :class:`ShardError` (a shard's recorded sha256 changed) in one line. The data,
    seed, shuffle, seq_len and global batch must match; world size and micro-batch may change,
    but only at a step boundary."""
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"loader state: version {found!r}, expected {_STATE_VERSION}")
    mine = {"split": info.split, "seq_len": seq_len, "global_batch_seqs": global_batch_seqs, "seed": int(seed),
            "shuffle": bool(shuffle), "shards": info.record()}
    saved = state.get("shards")
    if isinstance(saved, list) and len(saved) == len(info.files):  # else: the comparison below reports it
        for f, s, now in zip(info.files, saved, info.expected):
            old = s[2] if isinstance(s, (list, tuple)) and len(s) > 2 else None
            if old is not None and now is not None and now.sha256 != old:
                raise ShardError(
                    f"loader state: {f} had sha256 {old[:12]}... when the checkpoint was saved but "
                    f"{info.store.manifest_ref} now records {now.sha256[:12]}...: the data changed since; resume "
                    "with the data the run was trained on (or start a new run from the checkpoint's weights: "
                    "model.init_from, another train.run_dir)"
                )
    for key, now in mine.items():
        theirs = state.get(key)
        if key == "shards" and isinstance(theirs, list):  # names and sizes; contents checked above
            theirs, now = [list(s[:2]) for s in theirs], [s[:2] for s in now]
        if theirs != now:
            if key == "shards":
                theirs, now = f"{len(theirs or [])} shards", f"{len(now)} shards in {info.store.where}"
            raise ValueError(
                f"loader state: '{key}' was {theirs} at save time but is {now} now; resume with the "
                "same data and settings (or start a new run from the checkpoint's weights: model.init_from, "
                "another train.run_dir)"
            )
    consumed = int(state["consumed_sequences"])
    same_layout = (state["world_size"], state["micro_batch_size"]) == (world_size, micro_batch_size)
    if not same_layout and consumed % global_batch_seqs:
        raise ValueError(
            f"loader state: saved mid-step (sequence {consumed}) with world_size={state['world_size']}, "
            f"micro_batch_size={state['micro_batch_size']}; a different layout "
            f"({world_size}, {micro_batch_size}) can resume only at a step boundary"
        )
    return consumed


class _ShardChecks:
    """Runs ``check(i, stop)`` once per shard in ``todo``: on a daemon thread, ahead of the loader,
    in the order given to :meth:`start`; or on the caller's thread when :meth:`require` needs a
    shard the thread has not claimed yet (a shard being checked by the thread is waited for).
    ``ahead``: the thread stays at most this many shards (of that order) past the last one the
    loader required (None: no limit) -- remote data is fetched one shard ahead, not all at once."""

    def __init__(self, check: Callable[[int, Callable[[], bool]], None], todo: list[int],
                 ahead: int | None = None):
        self._check = check
        self._state = dict.fromkeys(todo, "pending")  # pending -> running -> done
        self._errors: dict[int, BaseException] = {}
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._ahead = ahead
        self._pos: dict[int, int] = {}  # shard -> its place in the thread's order
        self._front = -1  # the furthest place the loader has required

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, order: list[int]) -> None:
        if self._thread is None:
            with self._cv:
                self._pos = {i: k for k, i in enumerate(order)}
            self._thread = threading.Thread(target=self._run, args=(order,), name="shard-verify", daemon=True)
            self._thread.start()

    def _run(self, order: list[int]) -> None:
        for k, i in enumerate(order):
            with self._cv:
                while self._ahead is not None and k > self._front + self._ahead and not self._stopped:
                    self._cv.wait()
            if self._stopped:
                return
            if self._claim(i):
                self._do(i, lambda: self._stopped)

    def _claim(self, i: int) -> bool:
        with self._cv:
            if self._state.get(i) == "pending":
                self._state[i] = "running"
                return True
            return False

    def _do(self, i: int, stop: Callable[[], bool]) -> None:
        err: BaseException | None = None
        try:
            self._check(i, stop)
        except InterruptedError:  # close(): leave it for whoever needs it
            with self._cv:
                self._state[i] = "pending"
                self._cv.notify_all()
            return
        except BaseException as e:  # noqa: BLE001 - re-raised on the loader's thread
            err = e
        with self._cv:
            self._state[i] = "done"
            if err is not None:
                self._errors[i] = err
            self._cv.notify_all()

    def require(self, i: int) -> None:
        """Return once shard ``i`` passed its check; raise its error if it failed."""
        with self._cv:
            self._front = max(self._front, self._pos.get(i, -1))
            self._cv.notify_all()
        while True:
            if self._claim(i):
                self._do(i, lambda: False)  # the caller needs it now: never abandoned
            with self._cv:
                while self._state.get(i) == "running":
                    self._cv.wait()
                if self._state.get(i) != "pending":
                    break
        if i in self._errors:
            raise self._errors[i]

    def add(self, i: int) -> None:
        """Check shard ``i`` too (before the thread starts)."""
        with self._cv:
            self._state.setdefault(i, "pending")

    def failure(self) -> BaseException | None:
        """A failure found so far (on any shard), or None."""
        with self._cv:
            return next(iter(self._errors.values()), None)

    def pending(self) -> int:
        with self._cv:
            return sum(s != "done" for s in self._state.values())

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()


class DistributedTokenLoader:
    """Yields ``(x, y)`` int64 ``(micro_batch_size, seq_len)`` batches for one rank; see the module doc."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        global_batch_seqs: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        device: str | torch.device = "cpu",
        vocab_size: int | None = None,
        verify: bool = True,
        cache_dir: str | os.PathLike | None = None,
        allow_incomplete: bool = False,
        info: SplitInfo | None = None,
    ) -> None:
        """``info``: the split as :func:`inspect_split` already checked it with these arguments (the
        run plan's), so that it is not listed and read again; None checks it here."""
        for name, v in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size),
                        ("global_batch_seqs", global_batch_seqs), ("world_size", world_size)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"DistributedTokenLoader: {name} must be a positive int, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"DistributedTokenLoader: rank {rank} is outside world_size {world_size}")
        if global_batch_seqs % (micro_batch_size * world_size):  # the run plan's batching() guarantees it
            raise ValueError(
                f"DistributedTokenLoader: global_batch_seqs={global_batch_seqs} is not divisible by "
                f"micro_batch_size*world_size={micro_batch_size}*{world_size}; change the batch sizes"
            )
        self.split = split
        self.T = seq_len
        self.B = micro_batch_size
        self.global_batch_seqs = global_batch_seqs
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()

        self.vocab_size = vocab_size
        self._verify = bool(verify)
        self.info = info or inspect_split(data_dir, split, seq_len, micro_batch_size, global_batch_seqs,
                                          vocab_size, verify, cache_dir=cache_dir, allow_incomplete=allow_incomplete)
        self.data_dir = self.info.data_dir  # where the shard files are read (remote data: the cache)
        self.files, self.shard_tokens = self.info.files, self.info.shard_tokens
        self._expected = list(self.info.expected)  # a checkpoint may add records (load_state_dict)
        self._max_id: list[int | None] = list(self.info.max_ids)  # filled in by the first-open checks
        self.shard_seqs = (self.shard_tokens - 1) // self.T
        self.num_sequences = int(self.shard_seqs.sum())
        self._consumed = 0  # stream position of the next micro-step's rank-0 row
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perm_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._checks = _ShardChecks(self._check_shard, [i for i in range(len(self.files)) if self._needs_check(i)],
                                    ahead=PREFETCH_SHARDS if self.info.store.remote else None)

    # ---- integrity -----------------------------------------------------------------------------------
    def _needs_check(self, i: int) -> bool:
        return self._expected[i] is not None or self.vocab_size is not None or self.info.store.remote

    def _check_shard(self, i: int, stop: Callable[[], bool]) -> None:
        """Fetch shard ``i`` (remote data), hash it against its record and take its max token id, in
        one read of the file. The max is taken even where the manifest records one: a manifest whose
        sha256 was rewritten to match a changed shard must not let ids the model cannot take through."""
        path = self.files[i]
        top = self.info.store.check(path, self._expected[i], self.info.entries[i], stop=stop)
        if self.vocab_size is not None:
            self._max_id[i] = top
            if top >= self.vocab_size:
                raise token_range_error(path, read_shard(path), self.vocab_size)

    def _start_checks(self) -> None:
        """Start the background checks in the order the stream reaches the shards from here on."""
        epoch, q = divmod(self._consumed, self.num_sequences)
        order, cum = self._epoch_order(epoch)
        j = int(np.searchsorted(cum, q, side="right"))
        self._checks.start([int(s) for s in np.roll(order, -j)])

    def verification_pending(self) -> int:
        """Shards whose first-open checks have not finished yet."""
        return self._checks.pending()

    def wait_verified(self) -> None:
        """Check every shard now (the ones not yet done, on this thread); raise the first failure."""
        for i in range(len(self.files)):
            self._checks.require(i)

    def close(self) -> None:
        """Stop the background checks (they resume on demand if the loader is used again)."""
        self._checks.close()

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Full optimizer steps in one pass over the split."""
        return self.num_sequences // self.global_batch_seqs

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_seqs * self.T

    @property
    def epoch(self) -> int:
        return self._consumed // self.num_sequences

    # ---- the stream --------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, cumulative sequence counts in that order) for ``epoch``."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            n = len(self.files)
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            self._epoch_cache = (epoch, order, np.cumsum(self.shard_seqs[order]))
        return self._epoch_cache[1], self._epoch_cache[2]

    def _seq_perm(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        perm = self._perm_cache.get(key)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch, shard]).permutation(int(self.shard_seqs[shard]))
            self._perm_cache[key] = perm
            while len(self._perm_cache) > 4:
                self._perm_cache.popitem(last=False)
        return perm

    def _rows(self, shard: int) -> np.ndarray:
        """Shard ``shard`` as a ``(num_seqs, T+1)`` overlapping-rows view of its memmap (no copy)."""
        rows = self._maps.get(shard)
        if rows is not None:
            self._maps.move_to_end(shard)
        else:
            self._checks.require(shard)  # verified (and range-checked) before its first use
            tokens = read_shard(self.files[shard]).view(np.ndarray)  # plain ndarray: cheaper to index
            n, item = int(self.shard_seqs[shard]), tokens.itemsize
            # row i = tokens[i*T : i*T + T + 1]: rows overlap by one token (y is x shifted by one)
            rows = np.lib.stride_tricks.as_strided(tokens, shape=(n, self.T + 1), strides=(self.T * item, item),
                                                   writeable=False)
            self._maps[shard] = rows
            while len(self._maps) > 8:  # bounded number of open maps
                self._maps.popitem(last=False)
        return rows

    def _segments(self, first: int, count: int) -> list[tuple[int, np.ndarray]]:
        """Stream positions ``[first, first+count)`` as runs ``(shard, sequence indices)`` within one shard."""
        out = []
        p, end = first, first + count
        while p < end:
            epoch, q = divmod(p, self.num_sequences)
            order, cum = self._epoch_order(epoch)
            j = int(np.searchsorted(cum, q, side="right"))  # the shard holding stream position q
            shard = int(order[j])
            n = min(end - p, int(cum[j]) - q)
            local = q - (int(cum[j]) - int(self.shard_seqs[shard])) + np.arange(n)
            if self.shuffle:
                local = self._seq_perm(epoch, shard)[local]
            out.append((shard, local))
            p += n
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: ``x, y`` int64 ``(B, T)``, ``y`` = ``x`` shifted by one."""
        B, T = self.B, self.T
        if not self._checks.started:
            self._start_checks()
        elif (err := self._checks.failure()) is not None:  # found ahead, on the background thread
            raise err
        runs = [self._rows(shard)[seqs] for shard, seqs in self._segments(self._consumed + self.rank * B, B)]
        rows = runs[0] if len(runs) == 1 else np.concatenate(runs)  # (B, T+1) uint16, gathered from the maps
        xy = torch.empty((2, B, T), dtype=torch.int64, pin_memory=self._pin)  # x and y in one allocation
        xy_np = xy.numpy()
        xy_np[0] = rows[:, :-1]  # uint16 -> int64 during the copy
        xy_np[1] = rows[:, 1:]
        self._consumed += self.world_size * B
        if self.device.type != "cpu":
            xy = xy.to(self.device, non_blocking=self._pin)  # one host-to-device copy
        x, y = xy[0], xy[1]  # each (B, T), contiguous
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    # ---- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data, identical on every rank."""
        return {
            "version": _STATE_VERSION,
            "consumed_sequences": int(self._consumed),
            "split": self.split,
            "seq_len": self.T,
            "global_batch_seqs": self.global_batch_seqs,
            "micro_batch_size": self.B,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            # [name, tokens, sha256 or None]: a resume onto changed data is refused
            "shards": [[f.name, int(n), e.sha256 if e is not None else None]
                       for f, n, e in zip(self.files, self.shard_tokens, self._expected)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken (:func:`check_resume_state` says whether it
        can). Where only the checkpoint records a shard's sha256 (the manifest is gone), the shard
        is verified against it on first open."""
        self._consumed = check_resume_state(state, self.info, self.T, self.global_batch_seqs, self.B,
                                            self.world_size, self.seed, self.shuffle)
        for i, s in enumerate(state["shards"]):
            old = s[2] if len(s) > 2 else None
            if old is not None and self._expected[i] is None and self._verify:
                size = HEADER_BYTES + TOKEN_DTYPE.itemsize * int(self.shard_tokens[i])
                self._expected[i] = integrity.Expected(self.files[i], old, size)
                self._checks.add(i)

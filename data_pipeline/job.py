"""One prepare job, the engine under ``gpt2-prepare`` (``prepare.py``), its task split (``tasks.py``)
and ``--index`` (``index.py``): the settings (``PrepareConfig``), documents -> GPT-2 tokens in
parallel (the reader, ``encode_documents``, the ordered worker map) -> shards (``Job``, the writer),
the command that (re)makes a directory from its manifest (``command_line``), and the checks and
signal handling every mode shares. The module docstring of ``prepare.py`` says what is written and
how a run resumes.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from data_pipeline import tokenizer as tok
from data_pipeline.shards import (
    MANIFEST_NAME,
    MAX_TOKEN_ID,
    ShardError,
    is_url,
    join,
    local_path,
    write_manifest,
    write_shard,
)
from data_pipeline.sources import Source, SourceError, check_protocol

MANIFEST_VERSION = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command


class PrepareError(RuntimeError):
    """A prepare run that cannot proceed; one line saying why and what to do."""


@dataclass
class PrepareConfig:
    source: str
    out_dir: str
    text_field: str = "text"
    filters: list[str] = field(default_factory=list)
    txt_per_line: bool = False
    hf_config: str | None = None
    hf_split: str = "train"
    data_files: list[str] | None = None
    shard_tokens: int = 100_000_000
    val_tokens: int = 100_000_000
    max_tokens: int | None = None
    tasks: int | None = None
    """Split the work into this many independent tasks (``--tasks``; data_pipeline/tasks.py)."""
    task_id: int | None = None
    """This run's task, 0 .. tasks-1 (``--task-id``)."""
    # Speed only; never change the output:
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    backend: str = "threads"
    chunk_chars: int = 1_000_000
    progress: bool = True

    def settings(self) -> dict:
        """Everything that determines the output bytes (compared on resume)."""
        d = asdict(self)
        for k in ("out_dir", "workers", "backend", "chunk_chars", "progress", "task_id"):
            d.pop(k)
        if d["tasks"] is None:  # what a single-task directory recorded before tasks existed
            d.pop("tasks")
        return d

    def validate(self) -> None:
        if self.shard_tokens <= 0 or self.shard_tokens >= 2**31:
            raise PrepareError(f"--shard-tokens must be in 1 .. 2**31-1, got {self.shard_tokens}")
        if self.val_tokens < 0:
            raise PrepareError(f"--val-tokens must be >= 0, got {self.val_tokens}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise PrepareError(f"--max-tokens must be positive, got {self.max_tokens}")
        if self.workers < 1:
            raise PrepareError(f"--workers must be >= 1, got {self.workers}")
        if self.backend not in ("threads", "processes"):
            raise PrepareError(f"--backend must be 'threads' or 'processes', got {self.backend!r}")
        if is_url(self.out_dir):
            check_protocol(self.out_dir)  # the same allowlist as sources
            if self.out_dir.startswith("memory://"):  # fsspec's, for tests and notebooks: said, not refused
                print(f"note: OUT_DIR {self.out_dir} is an in-memory filesystem: the shards end with this process; "
                      "pass a local directory or a remote URL (s3://, gs://, ...) to keep them", file=sys.stderr)
        if (self.tasks is None) != (self.task_id is None):
            raise PrepareError("--tasks N and --task-id I go together (or --tasks N --local runs all N here)")
        if self.tasks is not None:
            if self.tasks < 1 or not 0 <= self.task_id < self.tasks:
                raise PrepareError(f"--tasks must be >= 1 and --task-id in 0 .. tasks-1, got --tasks {self.tasks} "
                                   f"--task-id {self.task_id}")
            if self.max_tokens is not None:
                raise PrepareError("--max-tokens cannot be split across --tasks (which task stops where?); select "
                                   "fewer source files instead")


SETTING_FLAGS = {"text_field": "--text-field", "hf_config": "--hf-config", "hf_split": "--hf-split",
                 "shard_tokens": "--shard-tokens", "val_tokens": "--val-tokens", "max_tokens": "--max-tokens"}
"""The gpt2-prepare flag of each setting a manifest records (its command line is rebuilt from them)."""


def command_line(settings: dict, out_dir: str, task_id: int | None = None) -> str:
    """The ``gpt2-prepare`` command that makes ``out_dir`` with a manifest's ``settings`` (the
    same command resumes it, and rebuilds shards that fail their check); for a prepare split into
    tasks, the command of task ``task_id`` (``I`` when not given)."""
    if settings.get("index"):
        return shlex.join(["gpt2-prepare", "--index", str(out_dir), "--val-glob", str(settings.get("val_glob"))])
    defaults = PrepareConfig(source="", out_dir="").settings()
    args = ["gpt2-prepare", str(settings.get("source", "SOURCE")), str(out_dir)]
    if isinstance(settings.get("tasks"), int):
        args += ["--tasks", str(settings["tasks"]), "--task-id", "I" if task_id is None else str(task_id)]
    for key, flag in SETTING_FLAGS.items():
        v = settings.get(key)
        if v is not None and v != defaults[key]:
            args += [flag, str(v)]
    for f in settings.get("filters") or []:
        args += ["--filter", str(f)]
    for f in settings.get("data_files") or []:
        args += ["--data-files", str(f)]
    if settings.get("txt_per_line"):
        args.append("--txt-per-line")
    return shlex.join(args)


def tokenizer_info() -> dict:
    return {"name": "gpt2", "eot_id": tok.EOT_ID, "vocab_size": tok.VOCAB_SIZE,
            "vocab_bpe_sha256": tok.VOCAB_BPE_SHA256, "encoder_json_sha256": tok.ENCODER_JSON_SHA256,
            "document_prefix": tok.EOT_TOKEN}


# ---- encoding (runs in worker threads / processes) ---------------------------------------------
def _fix_surrogates(text: str) -> str:
    # Pairs written as two surrogates become their character; lone ones become U+FFFD.
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def encode_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``[EOT] + ids`` of every text, concatenated as uint16, and each document's length."""
    enc = tok.gpt2_encoding()
    eot = np.array([tok.EOT_ID], dtype=np.uint32)
    parts: list[np.ndarray] = []
    lens = np.empty(len(texts), dtype=np.int64)
    no_special: set[str] = set()
    for i, text in enumerate(texts):
        # encode_to_numpy with no special tokens allowed == encode_ordinary, without a Python list.
        try:
            ids = enc.encode_to_numpy(text, allowed_special=no_special, disallowed_special=())
        except UnicodeEncodeError:
            ids = enc.encode_to_numpy(_fix_surrogates(text), allowed_special=no_special, disallowed_special=())
        parts.append(eot)
        parts.append(ids)
        lens[i] = len(ids) + 1
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    if flat.size and int(flat.max()) > MAX_TOKEN_ID:  # check before the narrowing cast
        raise ShardError(f"token id {int(flat.max())} does not fit uint16; the shard format needs vocab <= 65536")
    return flat.astype(np.uint16), lens


# ---- reading documents (main thread) ------------------------------------------------------------
@dataclass
class _Chunk:
    texts: list[str]
    rows: list[int]  # source row of each document
    empty_before: list[int]  # skip counters before each document's row
    filtered_before: list[int]


class DocReader:
    """Rows of a source -> non-empty, filtered, cleaned document texts in chunks."""

    def __init__(self, source: Source, cfg: PrepareConfig, start_row: int, empty: int, filtered: int):
        from data_pipeline.sources import RowFilter

        self.source, self.cfg = source, cfg
        self.filters = [RowFilter.parse(f) for f in cfg.filters]
        self.row, self.empty, self.filtered = start_row, empty, filtered

    def _text(self, row: dict) -> str | None:
        f = self.cfg.text_field
        try:
            text = row[f]
        except KeyError:
            raise SourceError(
                f"{self.source.spec}: row {self.row} has no field {f!r} (fields: {', '.join(sorted(row))}); "
                "pass --text-field NAME"
            ) from None
        except TypeError:
            raise SourceError(f"{self.source.spec}: row {self.row} is a {type(row).__name__}, not a record") from None
        if text is None:
            return None
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        elif not isinstance(text, str):
            raise SourceError(
                f"{self.source.spec}: row {self.row} field {f!r} is {type(text).__name__}, not text; "
                "pass --text-field NAME of a text column"
            )
        if not text or text.isspace():
            return None
        return text

    def chunks(self) -> Iterator[_Chunk]:
        chunk = _Chunk([], [], [], [])
        chars = 0
        for row in self.source.iter_rows(self.row):
            if self.filters and not all(flt(row) for flt in self.filters):
                self.filtered += 1
            else:
                text = self._text(row)
                if text is None:
                    self.empty += 1
                else:
                    chunk.texts.append(text)
                    chunk.rows.append(self.row)
                    chunk.empty_before.append(self.empty)
                    chunk.filtered_before.append(self.filtered)
                    chars += len(text)
                    if chars >= self.cfg.chunk_chars or len(chunk.texts) >= 4096:
                        yield chunk
                        chunk, chars = _Chunk([], [], [], []), 0
            self.row += 1
        if chunk.texts:
            yield chunk


def ordered_map(cfg: PrepareConfig, chunks: Iterator[_Chunk]) -> Iterator[tuple[_Chunk, tuple]]:
    """(chunk, encode_documents(chunk.texts)) in submission order, ``workers`` at a time."""
    depth = 2 * cfg.workers + 1
    if cfg.backend == "processes" and cfg.workers > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        with ctx.Pool(cfg.workers, initializer=_ignore_sigint) as pool:
            yield from _in_order(chunks, lambda texts: pool.apply_async(encode_documents, (texts,)).get, depth)
        return
    with ThreadPoolExecutor(cfg.workers) as ex:
        yield from _in_order(chunks, lambda texts: ex.submit(encode_documents, texts).result, depth)


def _in_order(chunks: Iterator[_Chunk], submit: Callable[[list[str]], Callable[[], tuple]],
              depth: int) -> Iterator[tuple[_Chunk, tuple]]:
    """Submit each chunk's texts (``submit`` returns a callable that waits for the result) with at
    most ``depth`` in flight; yield (chunk, result) in submission order."""
    pending: deque[tuple[_Chunk, Callable[[], tuple]]] = deque()
    for c in chunks:
        pending.append((c, submit(c.texts)))
        if len(pending) >= depth:
            c0, result = pending.popleft()
            yield c0, result()
    while pending:
        c0, result = pending.popleft()
        yield c0, result()


# ---- the shard writer ---------------------------------------------------------------------------
@dataclass
class Job:
    """What one run writes: a row stream of ``source`` into shards of ``cfg.out_dir``, the first
    ``val_tokens`` tokens as the validation split, listed in the manifest ``manifest_name``. A
    plain prepare is one job; a prepare split into tasks is one job per task (data_pipeline/tasks.py)."""

    cfg: PrepareConfig
    source: Source
    val_tokens: int
    manifest_name: str = MANIFEST_NAME
    shard_prefix: str = ""
    """Inserted into shard names (``train_<prefix>000000.bin``) so tasks never write the same file."""
    extra: dict = field(default_factory=dict)
    """Fields of a new manifest (a task's record)."""
    allow_empty: bool = False
    """A task may own no document (all filtered, or all validation); a plain prepare may not."""

    def shard_name(self, split: str, index: int) -> str:
        return f"{split}_{self.shard_prefix}{index:06d}.bin"

    def temp_patterns(self) -> list[str]:
        """Glob patterns of the temporary files this job may have left (never another task's)."""
        if self.shard_prefix:
            return [f".*_{self.shard_prefix}*.tmp-*", f".{self.manifest_name}.tmp-*"]
        return [".val_[0-9]*.tmp-*", ".train_[0-9]*.tmp-*", f".{self.manifest_name}.tmp-*"]


class ShardWriter:
    """Cuts the token stream at shard boundaries; commits shard, then manifest (the first manifest
    write comes with the first shard, so a run refused before it leaves nothing behind)."""

    def __init__(self, job: Job, manifest: dict):
        self.job, self.cfg, self.manifest = job, job.cfg, manifest
        shards = manifest["shards"]
        self.pos = sum(s["tokens"] for s in shards)  # stream position of the next shard's first token
        self.counts = {"val": sum(s["split"] == "val" for s in shards),
                       "train": sum(s["split"] == "train" for s in shards)}
        self.buf: list[np.ndarray] = []
        self.buf_len = 0
        self.meta: list[np.ndarray] = []  # per chunk: (5, n) starts, ends, rows, empty, filtered

    def next_boundary(self) -> tuple[str, int]:
        S, V = self.cfg.shard_tokens, self.job.val_tokens
        if self.pos < V:
            return "val", min(self.pos + S, V)
        return "train", self.pos + S

    def add(self, tokens: np.ndarray, meta: np.ndarray) -> None:
        if tokens.size:
            self.buf.append(tokens)
            self.buf_len += tokens.size
        self.meta.append(meta)
        while True:
            split, end = self.next_boundary()
            if self.pos + self.buf_len < end:
                break
            self._emit(split, end)

    def _emit(self, split: str, end: int, final: tuple[int, int, int] | None = None) -> None:
        n = end - self.pos
        flat = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
        shard, rest = flat[:n], flat[n:]
        self.buf, self.buf_len = ([rest] if rest.size else []), int(rest.size)
        meta = np.concatenate(self.meta, axis=1)
        starts, ends, rows, empty, filtered = meta
        documents = int(np.count_nonzero((starts >= self.pos) & (starts < end)))
        entry = {"file": self.job.shard_name(split, self.counts[split]), "split": split, "tokens": int(n),
                 "documents": documents, "max_token_id": int(shard.max()) if n else -1}
        if final is None:
            j = int(np.searchsorted(ends, end, side="left"))  # the document the boundary falls in
            entry["resume"] = {"row": int(rows[j]), "skip_tokens": int(end - starts[j]),
                               "skipped_empty": int(empty[j]), "filtered": int(filtered[j])}
            self.meta = [meta[:, j:]]
        else:  # the stream ended here: a rerun (stopped before the manifest said complete) reads no more
            entry["resume"] = {"row": final[0], "skip_tokens": 0, "skipped_empty": final[1], "filtered": final[2]}
            entry["final"] = True  # the short last shard of a stream: the loader does not ask it for a micro-batch
        with _sigint_deferred():  # a Ctrl-C lands after the manifest lists the shard, never between
            if not self.manifest["shards"]:  # a kill -9 before the first listing: the rerun knows the file is ours
                write_manifest(self.cfg.out_dir, {**self.manifest, "writing": entry["file"]}, self.job.manifest_name)
            entry["sha256"] = write_shard(join(self.cfg.out_dir, entry["file"]), shard)
            self.manifest["shards"].append(entry)
            write_manifest(self.cfg.out_dir, self.manifest, self.job.manifest_name)
        self.counts[split] += 1
        self.pos = end

    def finish(self, end: tuple[int, int, int]) -> None:
        """Write the last, shorter shard; ``end`` = (rows consumed, skipped empty, filtered)."""
        if self.buf_len:
            split, _ = self.next_boundary()
            self._emit(split, self.pos + self.buf_len, final=end)


# Signals that stop a run at a safe point (as Ctrl-C does): SIGINT; SIGTERM (scancel, preemption) and
# SIGUSR1 (SLURM's --signal=B:USR1 lead time, passed on by launch/slurm/prepare_array.sbatch) once
# main() has made them raise KeyboardInterrupt (:func:`stop_on_signals`).
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a stop signal (Ctrl-C, and SIGTERM / SIGUSR1 under ``main``) that arrives inside the block
    until the block is done."""
    mine = [s for s in _STOP_SIGNALS if signal.getsignal(s) is signal.default_int_handler]
    if threading.current_thread() is not threading.main_thread() or not mine:
        yield  # not ours to manage (a worker thread; the signals ignored or handled by the embedding program)
        return
    got: list[int] = []
    prev = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in mine}
    try:
        yield
    finally:
        for s, handler in prev.items():
            signal.signal(s, handler)
        if got:
            raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGUSR1 stop the run like Ctrl-C (a safe point, exit 130) instead of killing it.
    A background job of a non-interactive shell starts with SIGINT ignored, so a batch script cannot
    stop it with SIGINT; it passes SIGUSR1 on instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    prev = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    for s, handler in prev.items():
        if handler == signal.SIG_DFL:
            signal.signal(s, signal.default_int_handler)
    try:
        yield
    finally:
        for s, handler in prev.items():
            signal.signal(s, handler)


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the parent, which stops them (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_out_dir(out_dir: str) -> None:
    """OUT_DIR is a directory, or can be created as one, in a place this process may write: checked
    before anything is written (a file, a path under a file, a read-only place: input faults)."""
    if is_url(out_dir):
        return
    d = local_path(out_dir)
    if d.exists() and not d.is_dir():
        raise PrepareError(f"{d}: exists and is not a directory; pass a new or prepared directory as OUT_DIR")
    p = d
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise PrepareError(f"{d}: {p} is a file, so no directory can be made under it; choose another OUT_DIR")
    if not os.access(p, os.W_OK | os.X_OK):
        raise PrepareError(f"{d}: {p} is not writable here (permissions or a read-only filesystem); choose a "
                           "writable OUT_DIR")

"""The token shard file format (llm.c's) and the manifest next to the shards.

A shard is what llm.c's ``dev/data/data_common.py::write_datafile`` writes and its
``llmc/dataloader.h`` reads::

    header  256 x int32 (little endian): [0] magic 20240520, [1] version 1, [2] token count, rest 0
    body    token count x uint16 (little endian)

Files are ``{split}_{index:06d}.bin`` (``val_000000.bin`` first, then ``train_000000.bin``, ...)
next to ``manifest.json``::

    {"shards": [{"file", "split", "tokens", "documents", "sha256", "max_token_id"}, ...],
     "source": ..., "tokenizer": ..., "settings": {...}, ...}

``sha256`` covers the whole file (header and tokens); ``max_token_id`` (written since the
integrity checks; older manifests and llm.c's own shards lack it) lets a reader refuse ids the
model cannot embed without reading the shard. ``final: true`` marks the last (short) shard of a
prepared stream. ``manifest.shard_entries`` gives each shard with its manifest entry;
:func:`expected` turns an entry into what ``data_pipeline.integrity`` checks. The manifest
itself (reading, checking, listing a split) is ``data_pipeline.manifest``; readers go through
``data_pipeline.store``.

Everything written here is atomic: a temporary name in the same directory, fsync, then a
rename, so a reader (or a resumed ``prepare``) never sees half a file under the final name.
Paths may be local or fsspec URLs for writing; reading (``read_shard``) memory-maps, so it
needs a local file.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import integrity

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4  # 1024
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKEN_ID = int(np.iinfo(np.uint16).max)
SPLITS = ("val", "train")
MANIFEST_NAME = "manifest.json"
SHARD_RE = re.compile(r"^(?P<split>[a-z]+)_(?P<index>\d{6})\.bin$")
_PART_RE = re.compile(r"^manifest\.task-(?P<task>\d{5})-of-(?P<tasks>\d{5})\.json$")


class ShardError(ValueError):
    """A shard or manifest that cannot be used; the message names the file and the fix."""


class NoShardsError(ShardError):
    """The data directory does not exist, or holds no shard of the split asked for (a reader says
    how to *create* the data; every other :class:`ShardError` already says how to fix it)."""


def shard_name(split: str, index: int) -> str:
    """``val_000000.bin``-style file name of shard ``index`` of ``split``."""
    return f"{split}_{index:06d}.bin"


def is_url(path: str | os.PathLike) -> bool:
    """True for an fsspec URL other than ``file://`` (those are handled as local paths)."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def local_path(path: str | os.PathLike) -> Path:
    s = str(path)
    return Path(s[len("file://") :]) if s.startswith("file://") else Path(s)


def join(base: str | os.PathLike, name: str) -> str:
    """``base/name`` for a local path or an fsspec URL."""
    s = str(base)
    return s.rstrip("/") + "/" + name if is_url(s) else str(local_path(s) / name)


def make_header(num_tokens: int) -> np.ndarray:
    """The 256 x int32 header of a shard holding ``num_tokens`` tokens."""
    if not 0 <= num_tokens < 2**31:
        raise ShardError(f"a shard holds 0 .. 2**31-1 tokens, got {num_tokens}; use a smaller --shard-tokens")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, num_tokens
    return header


def as_uint16(tokens: Any, what: str = "tokens") -> np.ndarray:
    """``tokens`` as little-endian uint16, checking every id fits *before* the cast."""
    arr = np.asarray(tokens)
    if arr.dtype == TOKEN_DTYPE:
        return arr
    if arr.size and (arr.min() < 0 or arr.max() > MAX_TOKEN_ID):
        raise ShardError(
            f"{what}: token ids must fit uint16 (0..{MAX_TOKEN_ID}), got range "
            f"[{int(arr.min())}, {int(arr.max())}]; the shard format only holds vocabularies up to 65536"
        )
    return arr.astype(TOKEN_DTYPE)


def _atomic_write_bytes(path: str | os.PathLike, chunks: list[bytes | memoryview]) -> None:
    """Write ``chunks`` to ``path`` via a temporary name + fsync + rename."""
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(str(path))
        tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
        fs.mv(tmp, p)
        return
    p = local_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as e:  # e.g. ENOSPC: name the file we were committing, not the temp name
        raise OSError(e.errno, e.strerror or str(e), str(p)) from e
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass


def write_shard(path: str | os.PathLike, tokens: Any) -> str:
    """Write ``tokens`` as one llm.c shard at ``path`` (atomically); return the file's sha256."""
    import hashlib

    body = np.ascontiguousarray(as_uint16(tokens, what=str(path)))
    header = make_header(int(body.size))
    h = hashlib.sha256()
    hb, bb = header.tobytes(), memoryview(body).cast("B")
    h.update(hb)
    h.update(bb)
    _atomic_write_bytes(path, [hb, bb])
    return h.hexdigest()


def read_header(path: str | os.PathLike, fix: str | None = None) -> int:
    """Validate the header and size of the shard at ``path``; return its token count. ``fix`` is
    the advice the errors end with (default: re-run prepare)."""
    p = local_path(path)
    redo = fix or "re-run prepare"
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(f"{p}: shard not found; {fix or 'run `gpt2-prepare SOURCE OUT_DIR` to create it'}") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{p}: truncated shard ({size} bytes, less than the {HEADER_BYTES}-byte header); {redo}")
    header = np.frombuffer(raw, dtype="<i4")
    if int(header[0]) != MAGIC:
        raise ShardError(f"{p}: bad magic {int(header[0])} (expected {MAGIC}); not an llm.c token shard, {redo}")
    if int(header[1]) != VERSION:
        raise ShardError(
            f"{p}: unsupported shard version {int(header[1])} (expected {VERSION}, uint16 GPT-2 tokens); {redo}"
        )
    count = int(header[2])
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if count < 0 or size != expected:
        raise ShardError(
            f"{p}: header says {count} tokens ({expected} bytes) but the file has {size} bytes; "
            f"the shard is truncated or corrupt, {redo}"
        )
    return count


def read_shard(path: str | os.PathLike) -> np.memmap:
    """The tokens of the shard at ``path`` as a read-only uint16 memmap (header validated)."""
    count = read_header(path)
    p = local_path(path)
    if count == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)  # np.memmap refuses empty maps
    return np.memmap(p, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    if is_url(path):
        import hashlib

        import fsspec

        h = hashlib.sha256()
        with fsspec.open(str(path), "rb") as f:
            while b := f.read(chunk):
                h.update(b)
        return h.hexdigest()
    return integrity.sha256_file(local_path(path), chunk)[0]


def shard_bytes(tokens: int) -> int:
    """File size of a shard holding ``tokens`` tokens."""
    return HEADER_BYTES + int(tokens) * TOKEN_DTYPE.itemsize


def expected(path: Path, entry: dict | None) -> integrity.Expected | None:
    """What the manifest ``entry`` of the shard at ``path`` says it holds (None: no sha256 recorded)."""
    if not entry or not isinstance(entry.get("sha256"), str):
        return None
    tokens = entry.get("tokens")
    return integrity.Expected(path, entry["sha256"], shard_bytes(tokens) if isinstance(tokens, int) else None)


def write_manifest(data_dir: str | os.PathLike, manifest: dict, name: str = MANIFEST_NAME) -> None:
    """Write ``manifest.json`` (or the manifest ``name``) into ``data_dir`` atomically (temp + rename)."""
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    _atomic_write_bytes(join(data_dir, name), [text.encode()])


def part_name(task: int, tasks: int) -> str:
    """The manifest of task ``task`` of a prepare split into ``tasks`` (``gpt2-prepare --tasks``)."""
    return f"manifest.task-{task:05d}-of-{tasks:05d}.json"


def part_manifests(data_dir: Path) -> list[Path]:
    """The task manifests in ``data_dir`` (a prepare split into tasks, merged or not)."""
    return sorted(p for p in Path(data_dir).glob("manifest.task-*-of-*.json") if _PART_RE.match(p.name))

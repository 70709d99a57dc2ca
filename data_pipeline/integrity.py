"""Content integrity: sha256 of files against a manifest's record, one helper for all manifests.

Both kinds of manifest this project writes record a sha256 per file -- token shards
(``data_pipeline/shards.py``: ``{"file", "sha256", "tokens", ...}``) and checkpoints
(``pretrain/checkpoint``: ``{"files": {name: {"sha256", "size"}}}``) -- and both verify through
:func:`verify_files`, so "does this file still hold what was written" means the same thing
everywhere. It lives here, in the lower layer, because ``data_pipeline`` imports nothing of
``pretrain`` while ``pretrain`` may import ``data_pipeline``.

Hashing streams the file in chunks (hashlib releases the GIL on large updates, so several
files hash in parallel on threads, and a background thread hashes without stalling the caller).
``on_chunk`` lets a caller look at the bytes while they pass (the loader takes the max token id
of a shard in the same read).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 1 << 22  # 4 MiB: large enough to release the GIL, small enough to stop promptly


@dataclass(frozen=True)
class Expected:
    """What a manifest says a file holds: its sha256 and (when recorded) its size in bytes."""

    path: Path
    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class Mismatch:
    """A file that does not hold what its manifest says. ``actual`` is None for a missing file."""

    path: Path
    expected: str
    actual: str | None
    expected_size: int | None = None
    actual_size: int | None = None

    def describe(self, digits: int = 64) -> str:
        """``missing`` / ``size X bytes, expected Y`` / ``sha256 X, expected Y`` (no file name; the
        hashes cut to ``digits`` hex digits, for a message that must stay short)."""
        if self.actual is None:
            return "missing"
        if self.expected_size is not None and self.actual_size != self.expected_size:
            return f"size {self.actual_size} bytes, expected {self.expected_size}"
        cut = "" if digits >= 64 else "..."
        return f"sha256 {self.actual[:digits]}{cut}, expected {self.expected[:digits]}{cut}"


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK_BYTES,
                on_chunk: Callable[[int, bytes], None] | None = None,
                stop: Callable[[], bool] | None = None) -> tuple[str, int]:
    """(hex sha256, size in bytes) of the file at ``path``.

    ``on_chunk(offset, data)`` sees every chunk as it is hashed; ``stop()`` is polled between
    chunks and abandons the hash (``InterruptedError``) when it returns True."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
            if on_chunk is not None:
                on_chunk(size, data)
            size += len(data)
            if stop is not None and stop():
                raise InterruptedError(f"{path}: hashing stopped")
    return h.hexdigest(), size


def sha256_many(paths: Sequence[str | os.PathLike], workers: int | None = None,
                scan: Callable[[Path], Callable[[int, bytes], None] | None] | None = None,
                stop: Callable[[], bool] | None = None) -> list[tuple[str, int]]:
    """(sha256, size) of each file, hashed on up to ``workers`` threads (default: min(8, CPUs));
    ``scan(path)`` gives the ``on_chunk`` of that file's read, ``stop`` is polled (see :func:`sha256_file`)."""
    def one(p):
        return sha256_file(p, on_chunk=scan(Path(p)) if scan is not None else None, stop=stop)

    workers = min(workers or 8, len(paths), os.cpu_count() or 1)
    if workers <= 1:
        return [one(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sha256") as pool:
        return list(pool.map(one, paths))


def check(expected: Expected, actual: tuple[str, int] | None) -> Mismatch | None:
    """Compare one hashed file (``actual`` = (sha256, size), None when missing) with its record."""
    if actual is None:
        return Mismatch(expected.path, expected.sha256, None, expected.size, None)
    digest, size = actual
    if (expected.size is not None and size != expected.size) or digest != expected.sha256:
        return Mismatch(expected.path, expected.sha256, digest, expected.size, size)
    return None


def verify_files(expected: Sequence[Expected], workers: int | None = None,
                 scan: Callable[[Path], Callable[[int, bytes], None] | None] | None = None,
                 stop: Callable[[], bool] | None = None) -> list[Mismatch]:
    """Hash every listed file (on threads) and return those that differ from their record, in
    the order given; an empty list means every file holds exactly what its manifest says.
    ``scan(path)`` may look at each file's bytes in the same read (e.g. a shard's largest token id)."""
    present = [e for e in expected if e.path.is_file()]
    hashes = dict(zip((e.path for e in present), sha256_many([e.path for e in present], workers, scan, stop)))
    out = []
    for e in expected:
        bad = check(e, hashes.get(e.path))
        if bad is not None:
            out.append(bad)
    return out

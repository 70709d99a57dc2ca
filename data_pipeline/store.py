"""Where a prepared directory's shards are read from: in place, or copied from object storage.

``data.dir`` is a local directory or an fsspec URL (``s3://``, ``gs://``, ``hf://``, ``file://``,
``memory://`` ...; the protocols of ``data_pipeline.sources.ALLOWED_PROTOCOLS``). Every reader of
shards -- the run plan's data check and the token loader (``data_pipeline.loader``), the val-loss
evaluator (``evals/val_loss.py``) -- goes through one :class:`ShardStore`::

    local dir   root = the directory; a shard is hashed where it lies
    URL         root = data.cache_dir/<name>-<hash of the URL>/ (node-local); manifest.json is read
                from the URL and a copy kept in root; a shard is copied into root the first time it
                is needed (under a lock, so the ranks of a node fetch it once), then hashed there

Checks, cheapest first: opening a store reads the manifest (remote: one small object); the plan
checks every shard's size (remote: one listing of the directory, no shard is read before step 1);
before a shard's tokens are first used, :meth:`ShardStore.check` hashes the local file against the
manifest's sha256 and takes its largest token id in the same read. A remote copy that does not
match is fetched again once; a second mismatch stops the run in one line (the object itself is
bad). The loader calls ``check`` on a background thread, one shard ahead of the one it reads
(``PREFETCH_SHARDS``), so the next shard downloads while the current one trains.

A remote directory needs a manifest with sha256 records (what ``gpt2-prepare`` writes, and
``gpt2-prepare --index`` for shards made by other tools): a copy is only used once verified.
The cache is not evicted (a later epoch or run reads the copies; they are re-hashed on first use).

Error advice names the command for *this* directory: the ``gpt2-prepare`` command its manifest
records (``data_pipeline.manifest.Manifest.rebuild_hint``), never a configured default.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_pipeline import integrity
from data_pipeline.manifest import MANIFEST_NAME, Manifest, open_manifest
from data_pipeline.shards import HEADER_BYTES, TOKEN_DTYPE, ShardError, local_path

PREFETCH_SHARDS = 1  # remote data: shards fetched ahead of the one being read
_CHUNK = 1 << 22


def is_remote(data_dir: str | os.PathLike) -> bool:
    """True for any fsspec URL, ``file://`` included (a ``file://`` URL stands for remote storage:
    its shards are copied into the cache like any other)."""
    return "://" in str(data_dir) or "::" in str(data_dir)


class MaxId:
    """``on_chunk`` for :func:`integrity.sha256_file`: the largest token id of a shard, taken
    while its bytes are hashed (a pass restarts at offset 0 and starts over)."""

    def __init__(self) -> None:
        self.value = -1

    def __call__(self, offset: int, data: bytes) -> None:
        if offset == 0:
            self.value = -1
        skip = max(HEADER_BYTES - offset, 0)  # chunks are large and even: the header sits in the first
        if skip < len(data):
            self.value = max(self.value, int(np.frombuffer(data, dtype=TOKEN_DTYPE, offset=skip).max()))


def token_range_error(path: Path | str, tokens: np.ndarray | None, vocab_size: int,
                      recorded: int | None = None) -> ShardError:
    """One line naming the first id ``>= vocab_size`` in ``tokens`` (the shard at ``path``) and
    where; without the tokens (a remote shard not fetched yet), the id its manifest records."""
    if tokens is None:
        where, tok = "(the largest id its manifest records)", int(recorded if recorded is not None else -1)
    else:
        pos = 0
        for lo in range(0, len(tokens), 1 << 24):  # in slices: never a full-shard boolean array
            hits = np.flatnonzero(np.asarray(tokens[lo:lo + (1 << 24)]) >= vocab_size)
            if hits.size:
                pos = lo + int(hits[0])
                break
        tok, where = int(tokens[pos]), f"at position {pos}"
    return ShardError(
        f"{path}: token id {tok} {where} is >= the model's vocab_size {vocab_size} (ids in the "
        f"padded rows have no trained embedding either); this data was tokenized for another vocabulary: "
        f"re-prepare it with the model's tokenizer or use a model with vocab_size > {tok}"
    )


class ShardStore:
    """The shards of one prepared directory, readable as local files under :attr:`root`.

    ``ShardStore(data_dir, cache_dir=None)``: see the module doc. Attributes: ``where`` (the
    directory as given), ``root`` (the local directory of the files to read), ``remote``,
    ``manifest`` (a ``data_pipeline.manifest.Manifest``, read once here and handed on: a split's
    shards, their token counts, the prepare's command) and ``manifest_ref`` (its location)."""

    def __init__(self, data_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> None:
        self.where = str(data_dir)
        self.remote = is_remote(data_dir)
        if not self.remote:
            self.root = local_path(data_dir)
            self.manifest_ref = str(self.root / MANIFEST_NAME)
            text = None
        else:
            text = self._open_remote(cache_dir)
        self.manifest: Manifest = open_manifest(self.where, self.root, self.manifest_ref, text,
                                                self._remote_sizes if self.remote else None)

    # ---- remote ------------------------------------------------------------------------------------
    def _open_remote(self, cache_dir: str | os.PathLike | None) -> str:
        """Set up the cache for the URL and fetch its manifest's text (a copy kept in the cache)."""
        import fsspec

        from data_pipeline.sources import SourceError, check_protocol

        url = self.where.rstrip("/")
        try:
            check_protocol(url)
        except SourceError as e:
            raise ShardError(str(e)) from None
        if cache_dir is None or is_remote(cache_dir):
            raise ShardError(f"{url}: shards at a URL are copied to a node-local cache directory first; set one "
                             "(data.cache_dir=/local/scratch/gpt2-cache)")
        try:
            self.fs, self._path = fsspec.core.url_to_fs(url)
        except ImportError as e:  # e.g. s3:// without s3fs
            raise ShardError(f"{url}: cannot read this kind of URL here ({e})") from None
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rsplit("/", 1)[-1])[:40] or "data"
        self.root = Path(cache_dir) / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
        self.manifest_ref = f"{url}/{MANIFEST_NAME}"
        try:
            text = self.fs.cat_file(f"{self._path}/{MANIFEST_NAME}").decode()
        except FileNotFoundError:
            raise ShardError(
                f"{self.manifest_ref}: not found; a remote data.dir needs the manifest.json of a prepared "
                "directory (gpt2-prepare writes one; gpt2-prepare --index DIR writes one for llm.c shards)"
            ) from None
        except OSError as e:
            raise ShardError(f"{self.manifest_ref}: cannot read it ({e}); check the URL and credentials") from None
        self._sizes: dict[str, int] | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _atomic_copy(self.root / MANIFEST_NAME, [text.encode()])  # the cache dir describes itself
        except OSError as e:
            raise ShardError(f"{self.root}: cannot write the shard cache ({e.strerror or e}); set data.cache_dir "
                             "to a writable node-local directory") from None
        return text

    def _remote_sizes(self) -> dict[str, int]:
        """Sizes of the files at the URL (one listing)."""
        if self._sizes is None:
            try:
                listing = self.fs.ls(self._path, detail=True)
            except OSError as e:
                raise ShardError(f"{self.where}: cannot list it ({e}); check the URL and credentials") from None
            self._sizes = {str(x["name"]).rstrip("/").rsplit("/", 1)[-1]: int(x.get("size") or 0) for x in listing
                           if x.get("type", "file") != "directory"}
        return self._sizes

    def check_cache_room(self, files: list[Path]) -> None:
        """Before anything is fetched or written: the cache's disk has room for every one of
        ``files`` not copied yet (each is fetched once and kept), else one line naming the cache,
        the bytes needed and free, and the fix. Local data: nothing to copy."""
        if not self.remote:
            return
        import shutil

        sizes = self._remote_sizes()
        missing = [f.name for f in files if not (self.root / f.name).is_file()]
        need = sum(sizes.get(n, 0) for n in missing)
        free = shutil.disk_usage(self.root).free
        if need > free:
            raise ShardError(f"{self.root}: the shard cache needs {_size(need)} for {len(missing)} shard(s) not yet "
                             f"copied and its disk has {_size(free)} free; free space there or set data.cache_dir to a "
                             "node-local directory with room for the shards")

    def _fetch(self, name: str, replace_inode: int | None = None, stop: Callable[[], bool] | None = None) -> None:
        """Copy ``name`` into :attr:`root` unless a copy is there (or, ``replace_inode`` given, unless
        the copy there is another file than that one, i.e. someone fetched it again already)."""
        import fcntl

        dest = self.root / name
        with open(self.root / f".{name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the ranks of a node fetch a shard once
            try:
                st = dest.stat()
            except FileNotFoundError:
                st = None
            if st is not None and (replace_inode is None or st.st_ino != replace_inode):
                return
            try:
                with self.fs.open(f"{self._path}/{name}", "rb") as src:
                    _atomic_copy(dest, iter(lambda: src.read(_CHUNK), b""), stop)
            except FileNotFoundError:
                raise ShardError(f"{self.manifest.url(name)}: listed in {MANIFEST_NAME} but not found there; "
                                 f"{self.manifest.rebuild_hint()} and upload it again") from None
            except OSError as e:  # the cache's disk (full, read-only) or the network: one line either way
                if e.errno in _CACHE_ERRNOS:
                    raise ShardError(f"{self.root}: cannot copy {name} into the shard cache ({e.strerror}); free "
                                     "space there or set data.cache_dir to a node-local directory with room for the "
                                     "shards, then resume") from None
                raise ShardError(f"{self.manifest.url(name)}: cannot fetch it ({' '.join(str(e).split())[:120]}); check the "
                                 "URL, the network and credentials, then resume") from None

    # ---- both ----------------------------------------------------------------------------------------
    def integrity_error(self, bad: integrity.Mismatch, entry: dict | None = None, fetched: bool = False,
                        digits: int = 64) -> ShardError:
        """One line: the file, the expected and actual hash (or size; ``digits`` of each), and the
        command that rebuilds it."""
        if fetched:
            return ShardError(
                f"{self.manifest.url(bad.path.name)}: fetched twice into {self.root}, and neither copy matches "
                f"{self.manifest_ref} ({bad.describe(digits)}); the stored shard is corrupt -- "
                f"{self.manifest.rebuild_hint(entry)} and upload it again"
            )
        return ShardError(
            f"{bad.path}: content does not match {self.manifest_ref} ({bad.describe(digits)}); the shard is "
            f"corrupt -- {self.manifest.rebuild_hint(entry)} (the rerun re-verifies and rewrites bad shards)"
        )

    def check(self, path: Path, exp: integrity.Expected | None, entry: dict | None = None,
              stop: Callable[[], bool] | None = None) -> int:
        """Make the shard at ``path`` safe to read: fetch it (remote), hash it against ``exp`` (None:
        no record, only the max is taken) and return its largest token id, from the same read. A
        remote copy that does not match is fetched again once; then :class:`ShardError`."""
        top = MaxId()
        for attempt in range(2 if self.remote else 1):
            inode = None
            if self.remote:
                if attempt:
                    with contextlib.suppress(FileNotFoundError):
                        inode = path.stat().st_ino
                self._fetch(path.name, replace_inode=inode if attempt else None, stop=stop)
            if exp is None:  # no record to check against: only the max
                integrity.sha256_file(path, on_chunk=top, stop=stop)
                return top.value
            bad = next(iter(integrity.verify_files([exp], None, lambda _: top, stop)), None)
            if bad is None:
                return top.value
        raise self.integrity_error(bad, entry, fetched=self.remote)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


_CACHE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}  # the cache's own disk


def _atomic_copy(dest: Path, chunks, stop: Callable[[], bool] | None = None) -> None:
    """Write ``chunks`` to ``dest`` through a temporary name and a rename (``stop()`` polled)."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
                if stop is not None and stop():
                    raise InterruptedError(f"{dest}: fetch stopped")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()

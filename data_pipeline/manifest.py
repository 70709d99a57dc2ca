"""The manifest of a prepared directory: read once, checked, and asked for a split's shards.

``manifest.json`` sits next to the shards; ``data_pipeline.shards`` has the file format, the
entry fields, the manifests' names and their writer (a prepare split into tasks keeps one per
task until ``--merge`` writes ``manifest.json``). This module reads them.

A reader opens a :class:`ShardStore` (``data_pipeline.store``), which reads the manifest once (in
place, or the one object at a URL) and hands it on as a :class:`Manifest`: the prepare finished
(:meth:`Manifest.check_complete`), a split's shards with their entries (:meth:`Manifest.entries`),
their token counts against the files (:meth:`Manifest.token_counts`) and the ``gpt2-prepare``
command that remakes the directory (:meth:`Manifest.command`). The value goes one way: store ->
manifest -> shards / job; nothing here calls back into the store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_pipeline.shards import (
    MANIFEST_NAME,
    SHARD_RE,
    NoShardsError,
    ShardError,
    is_url,
    join,
    local_path,
    part_manifests,
    read_header,
    shard_bytes,
)


class Manifest:
    """The manifest of the directory ``where`` as its store read it (``data``: None for a local
    directory without one; ``ref``: its location), its shards under ``root`` (remote: where their
    copies go). ``sizes`` gives the sizes of the files at a URL (one listing; remote only)."""

    def __init__(self, where: str, root: Path, ref: str, data: dict | None, remote: bool,
                 sizes: Callable[[], dict[str, int]] | None = None) -> None:
        self.where, self.root, self.ref, self.data, self.remote = where, root, ref, data, remote
        self._sizes = sizes

    def url(self, name: str) -> str:
        return f"{self.where.rstrip('/')}/{name}"

    def check_complete(self, allow_incomplete: bool = False) -> None:
        """Refuse a directory whose ``gpt2-prepare`` has not finished (``complete: false``), naming the
        command that finishes it, unless ``allow_incomplete``."""
        m = self.data
        if m is None or m.get("complete", True) is not False or allow_incomplete:
            return
        cmd = self.command()
        n = len(m.get("shards") or [])
        finish = f"finish it with: {cmd}" if cmd else "finish its prepare"
        raise ShardError(
            f"{self.ref}: the prepare has not finished ('complete': false, {n} shards so far); "
            f"{finish}, or set data.allow_incomplete=true to train on them"
        )

    def command(self, entry: dict | None = None) -> str | None:
        """The ``gpt2-prepare`` command(s) that (re)make this directory (the shard ``entry``'s task
        for a directory prepared in tasks), from its manifest; None without a record."""
        m = self.data
        if not m:
            return None
        settings = m.get("settings")
        if isinstance(settings, dict):
            from data_pipeline.job import command_line  # only on error paths: it imports the tokenizer

            task = entry.get("task") if isinstance(entry, dict) else None
            cmd = command_line(settings, self.where, task_id=task if isinstance(task, int) else None)
            if isinstance(settings.get("tasks"), int) and not settings.get("index"):
                cmd += f", then gpt2-prepare --merge {self.where}"
            return cmd
        return None

    def rebuild_hint(self, entry: dict | None = None) -> str:
        """How to rebuild the shards of this directory: its manifest's exact ``gpt2-prepare`` command."""
        cmd = self.command(entry)
        if cmd:
            return f"rebuild it with: {cmd}"
        return f"rebuild it with the `gpt2-prepare SOURCE {self.where}` command that made it"

    def entries(self, split: str) -> list[tuple[Path, dict | None]]:
        """The local paths of ``split``'s shards (remote: where their copies go) with their manifest entries."""
        if not self.remote:
            return shard_entries(self.root, split, self.data)
        out = []
        for e in manifest_entries(self.data, split, self.ref):
            if not isinstance(e.get("sha256"), str) or not isinstance(e.get("tokens"), int):
                raise ShardError(f"{self.ref}: entry {e['file']!r} records no sha256 or token count, so a "
                                 "copy cannot be verified; index the directory again (gpt2-prepare --index DIR)")
            out.append((self.root / e["file"], e))
        if not out:
            raise NoShardsError(f"{self.ref}: no '{split}' shards; {self.rebuild_hint()}")
        return out

    def token_counts(self, entries: list[tuple[Path, dict | None]]) -> np.ndarray:
        """Each shard's token count, checked without reading its tokens: a local shard's header and
        size against its manifest entry; a remote one's size (one listing) against its entry."""
        out = []
        for path, entry in entries:
            if self.remote:
                n = int(entry["tokens"])
                size = self._sizes().get(path.name)
                if size is None:
                    raise ShardError(f"{self.url(path.name)}: listed in {MANIFEST_NAME} but not found there; "
                                     f"{self.rebuild_hint(entry)} and upload it")
                if size != shard_bytes(n):
                    raise ShardError(f"{self.url(path.name)}: {size} bytes, but {MANIFEST_NAME} says {n} tokens "
                                     f"({shard_bytes(n)} bytes); the stored shard is truncated or corrupt -- "
                                     f"{self.rebuild_hint(entry)} and upload it again")
            else:
                n = read_header(path, fix=self.rebuild_hint(entry))  # every header first: a missing file is named
            out.append(n)
        for (path, entry), n in zip(entries, out):
            if not self.remote and entry is not None and isinstance(entry.get("tokens"), int) and entry["tokens"] != n:
                raise ShardError(
                    f"{path}: holds {int(n)} tokens but {self.ref} says {entry['tokens']}; "
                    f"the shard was replaced or is corrupt -- {self.rebuild_hint(entry)}"
                )
        return np.array(out, dtype=np.int64)


def open_manifest(where: str, root: Path, ref: str, text: str | None = None,
                  sizes: Callable[[], dict[str, int]] | None = None) -> Manifest:
    """The :class:`Manifest` of ``where``: a local directory's read from ``root`` (``text`` None),
    a URL's parsed from the ``text`` its store fetched (``sizes``: its listing)."""
    if text is not None:
        return Manifest(where, root, ref, parse_manifest(text, ref), True, sizes)
    return Manifest(where, root, ref, read_manifest(root) if root.is_dir() else None, False)


# A damaged manifest's advice: its shards stay, and a prepare refuses shards it has no manifest for.
_DAMAGED = "restore it from a copy, or prepare again into a new OUT_DIR (remove this directory once that is done)"


def parse_manifest(text: str, where: str) -> dict:
    """A manifest's JSON text, checked to be an object with a ``shards`` list (``where`` names it)."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardError(f"{where}: not valid JSON ({str(e)[:80]}); {_DAMAGED}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardError(f"{where}: a manifest needs a 'shards' list; {_DAMAGED}")
    return manifest


def read_manifest(data_dir: str | os.PathLike, name: str = MANIFEST_NAME) -> dict | None:
    """The parsed ``manifest.json`` (or the manifest ``name``) of ``data_dir``, or None when there is none."""
    path = join(data_dir, name)
    try:
        if is_url(path):
            import fsspec

            fs, p = fsspec.core.url_to_fs(path)
            if not fs.exists(p):
                return None
            with fs.open(p, "r") as f:
                text = f.read()
        else:
            text = Path(path).read_text()
    except FileNotFoundError:
        return None
    return parse_manifest(text, path)


def safe_name(name: str) -> bool:
    """A manifest names plain files next to it; never a path elsewhere ('..', absolute, subdirs)."""
    return bool(name) and name not in (".", "..") and Path(name).name == name and "\\" not in name


def manifest_entries(manifest: dict, split: str, where: str) -> list[dict]:
    """The entries of ``split`` in ``manifest`` (``where`` names it in errors), each a safe name."""
    out = []
    for s in manifest["shards"]:
        if not isinstance(s, dict) or s.get("split") != split:
            continue
        name = str(s.get("file", ""))
        if not safe_name(name):
            raise ShardError(
                f"{where}: shard entry {name!r} points outside its directory; a manifest may only list "
                "plain file names in its own directory (re-run prepare)"
            )
        out.append(s)
    totals = manifest.get("totals")
    said = totals.get(f"{split}_shards") if isinstance(totals, dict) else None
    if manifest.get("complete") and isinstance(said, int) and said != len(out):
        raise ShardError(f"{where}: lists {len(out)} {split} shards but its totals say {said}; the manifest was "
                         "edited or damaged: restore it, or prepare again into a new OUT_DIR")
    return out


def shard_entries(data_dir: str | os.PathLike, split: str, manifest: dict | None = None,
                  ) -> list[tuple[Path, dict | None]]:
    """The shard files of ``split`` in ``data_dir`` with their manifest entries: manifest order
    when there is a manifest (``manifest``: already read), else the sorted ``{split}_*.bin`` files
    (e.g. shards written by llm.c's own scripts), whose entries are None."""
    d = local_path(data_dir)
    if not d.is_dir():
        raise NoShardsError(f"{d}: data directory not found; run `gpt2-prepare SOURCE {d}` first")
    if manifest is None:
        manifest = read_manifest(d)
    if manifest is not None:
        out = [(d / s["file"], s) for s in manifest_entries(manifest, split, str(d / MANIFEST_NAME))]
    else:
        parts = part_manifests(d)
        if parts:
            raise ShardError(
                f"{d}: holds the task manifests of a prepare split into tasks ({parts[0].name}, ...) but no "
                f"{MANIFEST_NAME}; when every task is complete, run: gpt2-prepare --merge {d}"
            )
        out = [(p, None) for p in sorted(p for p in d.glob(f"{split}_*.bin") if SHARD_RE.match(p.name))]
    if not out:
        where = f"{d / MANIFEST_NAME}" if manifest is not None else f"{d}/{split}_*.bin"
        raise NoShardsError(f"{where}: no '{split}' shards; run `gpt2-prepare SOURCE {d}` (or check the split name)")
    return out


def list_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shard files of ``split`` in ``data_dir`` (see :func:`shard_entries`)."""
    return [p for p, _ in shard_entries(data_dir, split)]

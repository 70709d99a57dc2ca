"""The on-disk layout of a checkpoint directory: names, discovery, the manifest and its verification.

A checkpoint directory is complete when it holds ``COMMITTED`` and a ``manifest.json`` whose
``files`` table gives the sha256 and size of every other file. Files are verified with
``data_pipeline.integrity.verify_files``, the same helper the token shards use.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from data_pipeline import integrity

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMMITTED = "COMMITTED"
_STEP_RE = re.compile(r"^step_(\d{8})$")
_REPLACED_RE = re.compile(r"^step_(\d{8})\.replaced$")
_TMP_RE = re.compile(r"^step_(\d{8})\.tmp$")
_CORRUPT_HINT = "the checkpoint is corrupt: use an earlier step_XXXXXXXX of the same run (--resume PATH to continue it)"


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded. The message names the file and what to do."""


def _sha256(path: Path) -> tuple[str, int]:
    """(sha256, size) of one file."""
    return integrity.sha256_file(path)


def _sha256_many(paths: list[Path]) -> list[tuple[str, int]]:
    """(sha256, size) of each file, hashed on a few threads (hashlib releases the GIL)."""
    return integrity.sha256_many(paths)


def _is_complete(path: Path) -> bool:
    if not (path / COMMITTED).is_file():
        return False
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)


def _complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found: dict[int, Path] = {}
    replaced: dict[int, Path] = {}
    for entry in ckpt_dir.iterdir():
        if (m := _STEP_RE.match(entry.name)) and entry.is_dir() and _is_complete(entry):
            found[int(m.group(1))] = entry
        elif (m := _REPLACED_RE.match(entry.name)) and entry.is_dir() and _is_complete(entry):
            replaced[int(m.group(1))] = entry
    # A crash between "rename old aside" and "rename new in" while re-saving a step leaves only
    # step_N.replaced: it is still a complete checkpoint, so it still counts.
    for step, path in replaced.items():
        found.setdefault(step, path)
    return sorted(found.items())


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} does not exist or is not a directory; pass the path of a step_XXXXXXXX "
            f"directory (or --resume auto / none to a trainer)"
        )
    if not (path / COMMITTED).is_file():
        raise CheckpointError(
            f"checkpoint {path} has no {COMMITTED} marker: it is incomplete (a crashed save); use an earlier "
            f"step_XXXXXXXX of the same run (--resume PATH to continue it)"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path / MANIFEST} is missing or unreadable ({e}); {_CORRUPT_HINT}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint file {path / MANIFEST} has no 'files' table; {_CORRUPT_HINT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint file {path / MANIFEST} has format_version {manifest.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION}; load it with the version of the code that wrote it"
        )
    root = path.resolve()
    for name in manifest["files"]:
        _resolve_in(root, name, path)
    return manifest


def _resolve_in(root: Path, name: str, path: Path) -> Path:
    """The manifest entry ``name`` as a path inside ``root``; refuses anything that escapes it."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
        raise CheckpointError(f"checkpoint file {path / MANIFEST} lists an invalid file name {name!r}; refused")
    target = (root / name).resolve()
    if target != root and root not in target.parents:
        raise CheckpointError(
            f"checkpoint file {path / MANIFEST} lists {name!r}, which is outside the checkpoint "
            f"directory {path}; refused (the manifest was tampered with)"
        )
    return target


def _verify(path: Path, manifest: dict, names: list[str] | None = None) -> None:
    """Check size and sha256 of the listed files (all of them when ``names`` is None)."""
    root = path.resolve()
    files = manifest["files"]
    names = sorted(files) if names is None else names
    records = []
    for name in names:
        if name not in files:
            raise CheckpointError(f"checkpoint {path} has no {name!r} in {MANIFEST}; {_CORRUPT_HINT}")
        target = _resolve_in(root, name, path)
        if not target.is_file():
            raise CheckpointError(f"checkpoint file {path / name} is missing; {_CORRUPT_HINT}")
        entry = files[name]
        records.append(integrity.Expected(target, str(entry.get("sha256")), entry.get("size")))
    bad = integrity.verify_files(records)
    if bad:
        name = names[[r.path for r in records].index(bad[0].path)]
        raise CheckpointError(f"checkpoint file {path / name} failed its sha256 check; {_CORRUPT_HINT}")

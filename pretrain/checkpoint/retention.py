"""Retention: keep the newest ``keep_last`` complete checkpoints, and clear what crashed saves and
re-saves left. Deleting a checkpoint removes its COMMITTED marker first, so a half-deleted one is
never loaded. Failures only warn: retention is housekeeping and never fails a committed save."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pretrain.checkpoint.fsio import _rmtree_quiet
from pretrain.checkpoint.layout import (
    _REPLACED_RE,
    _STEP_RE,
    _TMP_RE,
    COMMITTED,
    _complete_checkpoints,
    _is_complete,
)

log = logging.getLogger("pretrain.checkpoint")


def delete(path: Path) -> bool:
    """Delete a checkpoint dir: the COMMITTED marker first, so a half-deleted one is never loaded."""
    try:
        (path / COMMITTED).unlink(missing_ok=True)
        shutil.rmtree(path)
        return True
    except OSError as e:
        log.warning("could not delete old checkpoint %s (%s); delete it by hand", path, e)
        return False


def retain(ckpt_dir: Path, keep_last: int, keep: Path) -> None:
    """Delete complete checkpoints older than the newest ``keep_last`` (never ``keep`` or the newest)."""
    remove_replaced(ckpt_dir)
    complete = _complete_checkpoints(ckpt_dir)
    if not complete:
        return
    newest = complete[-1][1]
    for _, path in complete[: -keep_last]:
        if path == keep or path == newest:
            continue
        delete(path)


def remove_stale(ckpt_dir: Path) -> None:
    """Remove what crashed saves and failed deletes left (none is in flight: the previous save
    was joined and committed)."""
    for entry in ckpt_dir.iterdir():
        if _TMP_RE.match(entry.name) and entry.is_dir():
            log.warning("removing %s, left by an interrupted checkpoint save", entry)
            _rmtree_quiet(entry)
        elif _STEP_RE.match(entry.name) and entry.is_dir() and not _is_complete(entry):
            # Never loadable (no COMMITTED / manifest): a half-deleted old one, or a save killed
            # between its rename and its marker.
            log.warning("removing %s, an incomplete checkpoint (no COMMITTED marker or manifest)", entry)
            _rmtree_quiet(entry)
    remove_replaced(ckpt_dir)


def remove_replaced(ckpt_dir: Path) -> None:
    """Delete old copies moved aside by a re-save once the new copy is complete."""
    for entry in ckpt_dir.iterdir():
        m = _REPLACED_RE.match(entry.name)
        if m and entry.is_dir() and _is_complete(ckpt_dir / f"step_{m.group(1)}"):
            delete(entry)

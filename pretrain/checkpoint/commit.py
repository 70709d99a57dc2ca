"""The commit protocol: why a half-written checkpoint is never picked up.

  1. every rank gathers its state; rank 0 removes what crashed saves left (``*.tmp`` dirs, step
     dirs without COMMITTED) and creates a fresh ``step_N.tmp/``; the ranks agree (all-reduce).
  2. every rank writes its files into it, each fsynced; the ranks agree (all-reduce) that all succeeded.
  3. rank 0 hashes every file (DCP's shards included: DCP has no checksums of its own), writes
     manifest.json, renames ``step_N.tmp`` -> ``step_N`` (an existing ``step_N`` is first renamed
     aside to ``step_N.replaced`` and deleted after), fsyncs the parent, writes COMMITTED.
  4. rank 0 deletes complete checkpoints older than the newest ``keep_last`` (failures only warn).
``latest()`` only returns directories named exactly ``step_XXXXXXXX`` holding COMMITTED and a
valid manifest.json (or ``step_N.replaced``, if a re-save of step N was killed between its two
renames). Deleting a checkpoint removes its COMMITTED marker first, so a half-deleted one is
never loaded either.

Failures: any error while saving (ENOSPC, permission, a bad ``rank_state``) removes the tmp dir and
raises ``CheckpointError`` on every rank, naming the directory and the last intact checkpoint.
The trainer should catch it, log it and stop (exit non-zero): the previous checkpoint is intact,
and training on without checkpoints would risk losing far more work than the stop costs.

Steps 1-2 (the agreements) are run by ``Checkpointer`` (``checkpointer.py``), which owns the process
group; steps 3-4 and the undo of a failed save are here, on rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from pretrain.checkpoint.fsio import _fsync_dir, _rmtree_quiet, _write_text
from pretrain.checkpoint.layout import (
    COMMITTED,
    FORMAT_VERSION,
    MANIFEST,
    CheckpointError,
    _is_complete,
    _sha256_many,
)
from pretrain.checkpoint.retention import retain

log = logging.getLogger("pretrain.checkpoint")


class Pending:
    """A save whose files are (being) written and whose commit may still be due."""

    def __init__(self, step: int, tmp: Path, final: Path):
        self.step, self.tmp, self.final = step, tmp, final
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None  # this rank's write error
        self.committed = False


def commit(pending: Pending, ckpt_dir: Path, world_size: int, keep_last: int) -> None:
    """Steps 3-4 of the protocol (rank 0): hash, manifest, rename into place, COMMITTED, retention."""
    tmp, final = pending.tmp, pending.final
    for r in range(world_size):
        if not (tmp / f"rank_{r}.pt").exists() and any(tmp.glob("rank_*.pt")):
            raise CheckpointError(
                f"rank {r}'s file is missing from {tmp}: train.run_dir (its checkpoints/ "
                f"folder) must be on a filesystem all ranks share"
            )
    paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
    files = {
        p.relative_to(tmp).as_posix(): {"sha256": digest, "size": size}
        for p, (digest, size) in zip(paths, _sha256_many(paths))
    }
    dcp_dir = tmp / "dcp"
    fsdp = dcp_dir.is_dir()
    if fsdp:
        for d in dcp_dir.rglob("*"):
            if d.is_dir():
                _fsync_dir(d)
        _fsync_dir(dcp_dir)
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": pending.step,
        "world_size": world_size,
        "fsdp": fsdp,
        "created_unix": time.time(),
        "torch_version": torch.__version__,
        "files": files,
    }
    _write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    _fsync_dir(tmp)

    aside = None
    if final.exists():
        if _is_complete(final):
            aside = final.with_name(final.name + ".replaced")
            _rmtree_quiet(aside)
            os.rename(final, aside)
        else:
            shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    _write_text(final / COMMITTED, f"{pending.step}\n")
    _fsync_dir(final)
    pending.committed = True
    try:
        retain(ckpt_dir, keep_last, keep=final)  # also deletes `aside`
    except Exception as e:  # retention is housekeeping: it never fails a committed save
        log.warning("checkpoint step %d is committed, but cleaning up old ones failed: %s", pending.step, e)


def rollback(pending: Pending) -> None:
    """Undo a failed save (rank 0): drop its tmp dir and any half-committed step dir, and put
    back a complete checkpoint of the same step that was moved aside."""
    _rmtree_quiet(pending.tmp)
    if pending.committed:
        return
    final = pending.final
    aside = final.with_name(final.name + ".replaced")
    if final.exists() and not _is_complete(final):
        _rmtree_quiet(final)
    if aside.exists() and not final.exists():
        try:
            os.rename(aside, final)
        except OSError as e:
            log.warning("could not move %s back to %s (%s); it is still found by latest()", aside, final, e)

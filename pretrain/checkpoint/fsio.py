"""Durable file operations of the commit protocol: fsync'd writes, directory fsync, quiet removal."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("pretrain.checkpoint")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _rmtree_quiet(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove %s: %s", path, e)


def _is_enospc(err: BaseException | None, depth: int = 0) -> bool:
    """ENOSPC anywhere in ``err``: its cause chain, or the per-rank failures DCP wraps."""
    if err is None or depth > 8:
        return False
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    failures = getattr(err, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
    if isinstance(failures, dict):
        for f in failures.values():
            inner = f[0] if isinstance(f, tuple) and f else f
            if isinstance(inner, BaseException) and _is_enospc(inner, depth + 1):
                return True
    return _is_enospc(err.__cause__ or err.__context__, depth + 1)

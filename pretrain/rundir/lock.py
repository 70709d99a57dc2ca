"""The run directory's lock and overwrite: one trainer at a time, and nothing lost on overwrite.

**The lock.** Rank 0 of a run holds an exclusive POSIX record lock (``fcntl.lockf``, i.e.
``fcntl(F_SETLK)``) on ``run_dir/.lock`` from before it changes anything in the directory until
it exits. A second trainer on the same directory fails to take it and refuses (exit 2) with one
line naming the holder, whose host, PID and start time are written into the file. The lock
belongs to the process, not to the file: when the holder dies -- exit, exception, ``os._exit``,
SIGKILL, OOM kill -- the kernel (or, on a network filesystem, the lock server) drops it, so a
crashed run never leaves a lock behind that a human must delete, and a SLURM requeue or a
``torchrun --max-restarts`` restart (whose old workers are gone before new ones start) takes it
again. What it relies on is in launch/README.md ("One run per run directory").

Why ``lockf`` and not ``flock``: on Linux NFS clients ``flock`` is emulated with POSIX locks
anyway, and a ``flock`` lock is shared with forked children (data-loader or compile workers),
which could outlive the trainer and keep the directory locked. The one POSIX-lock pitfall --
closing *any* descriptor of the file in the holding process drops the lock -- is avoided by
never opening ``.lock`` anywhere else (``move_run_aside`` skips it).

**Overwrite.** ``move_run_aside`` moves everything a previous run left in the directory
(checkpoints, the metrics log, the records, eval files, plots) into one dated folder
``run_dir/overwritten-YYYYmmdd-HHMMSS/`` and returns it; earlier such folders and the lock stay.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from pretrain.rundir.layout import ASIDE_PREFIX
from pretrain.rundir.layout import LOCK as LOCK_NAME


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory's lock (the message names it)."""


def _holder_text(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        info = json.loads(raw)
        return (f"host {info.get('host', '?')}, PID {info.get('pid', '?')}, "
                f"started {info.get('started', '?')}")
    except (OSError, ValueError):
        return "holder unknown (it has not written its name yet)"


class RunDirLock:
    """An exclusive lock on ``run_dir`` for this process (see the module docstring).

    ``acquire()`` creates ``run_dir`` if needed and raises ``RunDirBusy`` when another live
    process holds the lock; ``release()`` (idempotent) drops it. Also a context manager."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, command: str = "") -> RunDirLock:
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder_text(fd)
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise RunDirBusy(
                    f"train.run_dir={str(self.run_dir)!r} is in use by another trainer ({holder}; lock "
                    f"{self.path}); wait for it to finish or stop it, or choose another train.run_dir"
                ) from None
            raise  # ENOLCK etc.: the filesystem cannot lock (see launch/README.md)
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock. The file stays: deleting it would let a process that opened the old
        inode and one that creates a new file both 'hold' the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no stale holder name for the next reader
        except OSError:
            pass
        os.close(fd)  # closing drops the POSIX lock

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def previous_run_entries(run_dir: str | os.PathLike) -> list[Path]:
    """What a previous run left in ``run_dir`` (everything but the lock and earlier aside folders)."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name != LOCK_NAME and not p.name.startswith(ASIDE_PREFIX))


def move_run_aside(run_dir: str | os.PathLike) -> Path | None:
    """Move every entry of ``previous_run_entries`` into one new ``overwritten-<date>`` folder
    inside ``run_dir`` (a rename each: same filesystem, nothing copied); the folder, or None if
    there was nothing to move."""
    d = Path(run_dir)
    entries = previous_run_entries(d)
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = d / f"{ASIDE_PREFIX}{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = d / f"{ASIDE_PREFIX}{stamp}-{n}"
    aside.mkdir()
    for p in entries:
        os.rename(p, aside / p.name)
    return aside

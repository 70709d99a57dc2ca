"""Process-group setup and teardown, rank/world info, reduce helpers.

Under ``torchrun`` the rank and world come from its environment (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); without it the
program is one process (rank 0 of 1) and needs no process group at all, except for FSDP,
which gets a one-rank group on an in-memory store. NCCL on CUDA, gloo on CPU; the collective
timeout is configurable (a hung rank then fails the job instead of hanging it forever).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pretrain.guards import collective


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None
    """None when no process group was created (a single process)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={raw!r} is not an integer") from None


def pick_device(device: str, local_rank: int) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=auto or cpu")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return torch.device("cuda", local_rank % n)
    return torch.device("cpu")


_made_group = False  # this process created a process group (setup() or note_group())


def note_group() -> None:
    """Record that this process created a process group itself (for :func:`exit_process`)."""
    global _made_group
    _made_group = True


def exit_process(rc: int) -> None:
    """``sys.exit(rc)``, except in a process that created a process group: there, finish what
    Python's exit would (flush the streams and logging, join non-daemon threads), then
    ``os._exit(rc)``, skipping the interpreter's finalisation. In it, gloo's background threads
    (torch 2.13, CPU) can abort the process *after* ``destroy_process_group`` and after the
    program is done ("terminate called without an active exception", SIGABRT, no Python frame):
    seen in 3 of 16 two-rank runs on a loaded 2-core machine (0 of 18 with this exit), a finished run that torchrun (and
    SLURM after it) reports as failed. Call it only after a normal return: every file the
    program wrote is closed by then (the Trainer closes its logs and waits for its checkpoint)."""
    if not _made_group:
        sys.exit(rc)
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing more to write
            pass
    os._exit(rc)


def setup(device: str = "auto", backend: str = "auto", timeout_s: int = 600, need_group: bool = False) -> DistInfo:
    """Initialise the process group from torchrun's environment (or stay a single process).

    ``need_group``: create a one-rank group even without torchrun (FSDP needs a mesh)."""
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", 0)
    world_size = env_int("WORLD_SIZE", 1)
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise RuntimeError("distributed.backend=nccl needs CUDA; use distributed.backend=gloo (or auto) on CPU")
    if dist.is_initialized():
        return DistInfo(rank, local_rank, world_size, dev, dist.get_backend())
    under_launcher = "MASTER_ADDR" in os.environ and "RANK" in os.environ
    if (rank == 0 and env_int("TORCHELASTIC_MAX_RESTARTS", 0) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        # torchrun's shared rendezvous store keeps the previous attempt's keys, and the agents
        # count restarts independently, so a restarted group can hang connecting to dead peers.
        print("warning: torchrun --max-restarts with a shared rendezvous store can hang on restart "
              "(pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun",
              file=sys.stderr, flush=True)
    timeout = timedelta(seconds=timeout_s)
    if world_size > 1 or under_launcher:
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
        note_group()
    elif need_group:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        note_group()
    else:
        return DistInfo(0, 0, 1, dev, None)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), dev, backend)


def teardown(clean: bool = True) -> None:
    """Destroy the process group. ``clean``: every rank got here normally, so meet at a barrier
    first; a rank that closes its sockets while a peer is still in a collective makes the peer
    abort, and torchrun then reports a finished run as failed."""
    if dist.is_available() and dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            try:
                dist.barrier()
            except Exception:  # a peer is gone: nothing left to wait for
                pass
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor, op: str = "sum", what: str = "tensor") -> torch.Tensor:
    """In-place all-reduce (sum | max | avg) that is a no-op on a single process. A peer that
    stops answering fails it within the group's timeout with one line naming
    ``all_reduce(what)`` (``guards.CollectiveError``) instead of a bare backend error."""
    if is_dist():
        with collective(f"all_reduce({what})"):
            if op == "avg":
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t /= dist.get_world_size()
            else:
                dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def barrier(what: str = "barrier") -> None:
    if is_dist():
        with collective(f"barrier({what})"):
            dist.barrier()

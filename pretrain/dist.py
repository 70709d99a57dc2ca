"""The one home of everything distributed: process-group setup and teardown, rank / world info,
the collectives every other module runs (each named, each failing loudly), and the checks
"is a process group up" / "is this model FSDP-sharded".

Under ``torchrun`` the rank and world come from its environment (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``); without it the
program is one process (rank 0 of 1) and needs no process group at all, except for FSDP,
which gets a one-rank group on an in-memory store. NCCL on CUDA, gloo on CPU; the collective
timeout is configurable (a hung rank then fails the job instead of hanging it forever).

Collectives that fail loudly
----------------------------
A rank that stops answering (deadlocked, stuck in I/O, SIGSTOPped, crashed without closing its
sockets) leaves every other rank waiting inside a collective. The process group's ``timeout``
bounds that wait (gloo honours it for every collective; NCCL does with the watchdog / async error
handling on), but the backend's error names a socket, not the operation::

    [gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete

:func:`all_reduce` and :func:`barrier` run the collective under :func:`collective`, which re-raises
a backend failure as :class:`CollectiveError` with one line a person can act on::

    all_reduce(loss) timed out after 3s on rank 0 of 2; a rank stopped responding; check the other
    ranks' logs (a crash, a hang, a full disk) or raise dist.timeout_s
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


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
    """``auto`` (this rank's GPU when CUDA is available, else the CPU) | ``cpu`` | ``cuda`` (this
    rank's GPU) | ``cuda:N`` (that one)."""
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} but CUDA is not available; use device auto or cpu")
    if device.startswith("cuda:"):
        return torch.device(device)
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
    if group_up():
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
    if group_up():
        if clean and dist.get_world_size() > 1:
            try:
                dist.barrier()
            except Exception:  # a peer is gone: nothing left to wait for
                pass
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Is a process group up? Is a model sharded?


def group_up() -> bool:
    """A process group exists in this process (possibly of one rank)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the process group; 1 without one."""
    return dist.get_world_size() if group_up() else 1


def rank() -> int:
    """This process's rank in the group; 0 without one."""
    return dist.get_rank() if group_up() else 0


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether ``model`` is FSDP2-sharded (``fully_shard``): its parameters outside a forward are
    shards, and every rank must run the same forwards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


# ---------------------------------------------------------------------------------------------
# Collectives


class CollectiveError(RuntimeError):
    """A collective that timed out or lost a peer; the message names the operation and the rank."""


def group_timeout_s(group: Any = None) -> float | None:
    """The configured timeout of ``group`` (default: the world) in seconds, or None if unknown."""
    if not group_up():
        return None
    pg = group if group is not None else dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            backend = pg._get_backend(torch.device(device))
            return backend.options._timeout.total_seconds()
        except Exception:  # noqa: BLE001 - private API; a missing backend just means "try the next"
            continue
    return None


def _is_comm_error(e: BaseException) -> bool:
    """A failure of the communication layer (not, say, a shape error raised inside the ``with``)."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    m = str(e).lower()
    return any(w in m for w in ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "broken pipe"))


def _is_timeout(msg: str) -> bool:
    m = msg.lower()
    return "timed out" in m or "timeout" in m or "deadline" in m


@contextlib.contextmanager
def collective(what: str, group: Any = None) -> Iterator[None]:
    """Run the collective in the ``with`` body; a backend failure becomes one clear
    :class:`CollectiveError` naming ``what`` (e.g. ``"all_reduce(loss)"``), the rank and the timeout."""
    t0 = time.monotonic()
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:  # DistBackendError / DistNetworkError / gloo's RuntimeError
        if not group_up() or not _is_comm_error(e):
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        waited = time.monotonic() - t0
        configured = group_timeout_s(group)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if _is_timeout(str(e)):
            limit = f"{configured:g}s" if configured is not None else f"{waited:.0f}s"
            msg = (f"{what} timed out after {limit} on rank {rank} of {world}; a rank stopped responding; "
                   f"check the other ranks' logs (a crash, a hang, a full disk) or raise dist.timeout_s "
                   f"[backend: {first}]")
        else:
            msg = (f"{what} failed on rank {rank} of {world} after {waited:.1f}s; a peer closed its "
                   f"connection (another rank crashed?); check the other ranks' logs [backend: {first}]")
        raise CollectiveError(msg) from e


def _backend_device(group: Any = None) -> torch.device:
    """Where ``group`` (default: the world) reduces: the current CUDA device for NCCL, else the CPU."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, what: str, op: str = "sum", group: Any = None) -> torch.Tensor:
    """Reduce ``t`` over the process group, in place (``op``: sum | max | min | avg), and return it;
    a no-op without a group or with one rank. ``t`` may live anywhere: it is reduced on the
    backend's device (NCCL: the current GPU, gloo: the CPU) and copied back. Runs under
    :func:`collective`: a peer that stops answering fails it within the group's timeout with one
    :class:`CollectiveError` naming ``all_reduce(what)``."""
    if world_size() == 1:
        return t
    dev = _backend_device(group)
    buf = t if t.device == dev else t.to(dev)
    with collective(f"all_reduce({what})", group):
        dist.all_reduce(buf, op=_OPS["sum" if op == "avg" else op], group=group)
    if op == "avg":
        buf /= dist.get_world_size(group)
    if buf is not t:
        t.copy_(buf)
    return t


def barrier(what: str, group: Any = None) -> None:
    """A barrier under :func:`collective` (a tiny all-reduce, so gloo's timeout applies to it)."""
    if group_up():
        with collective(f"barrier({what})", group):
            dist.all_reduce(torch.zeros(1, device=_backend_device(group)), group=group)


def all_gather_object(obj: Any, what: str, group: Any = None) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a group.
    Under :func:`collective`. For small results (the harness's per-rank request counts and
    per-example metrics, ``evals/harness.py``), not tensors on a hot path."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    with collective(f"all_gather_object({what})", group):
        dist.all_gather_object(out, obj, group=group)
    return out

"""Process helpers for the chaos and hardening tests: free ports, torchrun commands, and killing a
whole torchrun job (the agent *and* its workers: torchrun starts each worker in its own session,
so signalling torchrun's process group alone would leave the workers running)."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(script: str | os.PathLike, *args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` on 127.0.0.1 with a fresh port (a standalone rendezvous
    would also work, but a fixed address keeps the command reproducible in logs)."""
    return [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *map(str, args)]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """SIGKILL ``pid`` and every descendant at (nearly) the same moment, descendants collected
    first so none escapes by being re-parented. Returns the pids signalled."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    groups = set()
    for p in procs:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    me = os.getpgid(0)
    for g in groups - {me}:
        try:
            os.killpg(g, sig)
        except ProcessLookupError:
            pass
    for p in procs:  # anything that shared our group (or raced a setsid)
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return [p.pid for p in procs]

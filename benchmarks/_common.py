"""Helpers shared by the benchmark scripts (imported by path: nothing in the packages uses it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """CPU model, logical CPUs, OS, Python and the load average (the machine may be shared)."""
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, load avg {load}")


def synthetic_shards(d: Path, train_tokens: int, val_tokens: int = 100_000, vocab: int = 50257,
                     period: int = 0) -> Path:
    """A val and a train shard of random token ids in ``d`` (throughput does not depend on what the
    tokens say). ``period`` > 0 tiles one random sequence of that length through the train shard,
    so the loss falls quickly (runs can compare learning curves); 0 = uniform random tokens."""
    import numpy as np

    from data_pipeline.shards import write_shard

    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    if period:
        train = np.tile(rng.integers(0, vocab, period), train_tokens // period + 1)[:train_tokens]
    else:
        train = rng.integers(0, vocab, train_tokens)
    write_shard(d / "val_000000.bin", rng.integers(0, vocab, val_tokens))
    write_shard(d / "train_000000.bin", train)
    return d


def read_bandwidth(device: str = "cpu", mb: int = 256, repeats: int = 5) -> float:
    """Bytes read per second by a streaming reduction (``amax``) over an ``mb`` MB tensor on
    ``device`` (median of ``repeats``): what a matrix-vector product, which only reads its matrix,
    can reach -- the bound of a decode step that reads every weight once. (A copy also writes every
    byte, and reads the destination first, so it moves 2-3x the bytes it counts.)"""
    import time

    import torch

    src = torch.randn(mb * 2**20 // 4, device=device)
    src.amax()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        src.amax()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return src.numel() * 4 / sorted(times)[repeats // 2]

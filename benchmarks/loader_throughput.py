"""Throughput of ``DistributedTokenLoader`` against raw memcpy bandwidth.

    .venv/bin/python benchmarks/loader_throughput.py [--mb 50] [--workers 1 2] [--seq-len 1024] [--micro-batch 64]

Writes ~``--mb`` MB of shards (random GPT-2 ids, 4 shards) and, for each worker count N, runs N
loader processes at once as ranks 0..N-1 of one world (each rank reads its own disjoint rows,
as in training), each through one full epoch, shuffled and not. Reported:

* tokens/s delivered (all ranks together) and the output bandwidth: ``x`` and ``y`` are int64,
  so each token delivered is 16 bytes written;
* raw memcpy bandwidth with the same N processes: ``np.copyto`` between two 64 MB int64 arrays,
  bytes copied per second (best of 5).

Target: loader output bandwidth >= 50% of memcpy. The machine may be shared (load avg printed):
a rank that is throttled mid-epoch looks slow on the wall clock, so the output bandwidth per
CPU-second of each rank is printed too (memcpy's short 64 MB copies are rarely throttled).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402

from data_pipeline.loader import DistributedTokenLoader  # noqa: E402
from data_pipeline.shards import write_shard  # noqa: E402


def _memcpy(q, nbytes: int) -> None:
    import torch

    torch.set_num_threads(1)
    src = np.ones(nbytes // 8, dtype=np.int64)
    dst = np.zeros_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    q.put(nbytes / best)


def _rank(q, data_dir, rank, world, T, B, shuffle, barrier) -> None:
    import torch

    torch.set_num_threads(1)
    ld = DistributedTokenLoader(data_dir, "train", T, B, B * world, rank=rank, world_size=world, seed=0,
                                shuffle=shuffle)
    steps = ld.num_sequences // (B * world)
    ld.next_batch()  # open the first map outside the timing
    ld.load_state_dict(dict(ld.state_dict(), consumed_sequences=0))
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        x, y = ld.next_batch()
    q.put((steps * B * T, time.perf_counter() - t0, time.process_time() - c0))


def run_procs(target, args_list) -> list:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(q, *a)) for a in args_list]
    for p in procs:
        p.start()
    out = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0, help="total shard size in MB (2 bytes per token)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader processes (ranks)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=64, help="64 x 1024: the GPT-2 124M micro-batch of llm.c / build-nanogpt")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    T, B = args.seq_len, args.micro_batch
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        n_tok = int(args.mb * 1e6 / 2)
        rng = np.random.default_rng(0)
        for i in range(4):
            write_shard(Path(tmp) / f"train_{i:06d}.bin", rng.integers(0, 50257, size=n_tok // 4, dtype=np.uint16))
        print(f"shards: 4 x {n_tok // 4:,} tokens ({args.mb:.0f} MB), seq_len {T}, micro-batch {B}")
        for n in args.workers:
            mem = max(sum(run_procs(_memcpy, [(64 << 20,)] * n)) for _ in range(args.repeats))
            print(f"  N={n}  memcpy                  {mem / 1e9:6.2f} GB/s")
            for shuffle in (False, True):
                best = best_cpu = 0.0
                for _ in range(args.repeats):
                    barrier = mp.get_context("fork").Barrier(n)
                    res = run_procs(_rank, [(tmp, r, n, T, B, shuffle, barrier) for r in range(n)])
                    tok = sum(r[0] for r in res)
                    best = max(best, tok / max(r[1] for r in res))
                    best_cpu = max(best_cpu, tok / sum(r[2] for r in res) * n)  # per CPU-s of each rank
                bw, bw_cpu = best * 16, best_cpu * 16
                print(f"  N={n}  loader shuffle={shuffle!s:<5}     {bw / 1e9:6.2f} GB/s out "
                      f"({best / 1e6:6.1f} M tok/s) = {100 * bw / mem:.0f}% of memcpy (target >= 50%); "
                      f"per CPU-s of each rank {bw_cpu / 1e9:.2f} GB/s = {100 * bw_cpu / mem:.0f}%", flush=True)
        print(f"load avg at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

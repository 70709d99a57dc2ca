"""What shard verification costs: sha256 throughput, the projected start-up delay on a 10B-token
directory, and the start-up of a 124M run on a synthetic 1B-token prepared directory, before and
after the integrity checks (code in ``data_pipeline/integrity.py`` and ``data_pipeline/loader.py``).

    .venv/bin/python benchmarks/shard_verify.py --before /tmp/main-checkout [--tokens 1e9] [--repeats 3]

1. sha256 MB/s: ``integrity.sha256_file`` over one shard already in the page cache (what a loader
   sees right after ``gpt2-prepare``), alone and with the loader's max-token-id pass in the same read.
2. Projection: a 10B-token directory is 20 GB of uint16; hashing all of it on one thread takes
   20 GB / (MB/s). The loader never waits for that: it hashes in a background thread, and step 1
   waits only for the shard it reads first (one shard: 200 MB at 100M tokens per shard).
3. Start-up: ``pretrain/train.py`` with the 124M preset (``configs/gpt2_124m.yaml``, CPU, fp32, no
   compile, micro-batch 1 x 1024) on ``--tokens`` synthetic tokens in 100M-token shards with a
   prepare-style manifest, timed from process start to the moment the first batch is in hand (the
   first forward could start), run alternately with the code in ``--before`` (a checkout of the
   revision before the checks) and this checkout; median of ``--repeats``. The synthetic directory
   is written under ``--work`` (default /tmp) and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402

from data_pipeline import integrity  # noqa: E402
from data_pipeline.shards import HEADER_BYTES, TOKEN_DTYPE, write_manifest, write_shard  # noqa: E402

SHARD_TOKENS = 100_000_000

# Run inside the child: patch the trainer's loader so the first batch prints the elapsed time and exits.
CHILD = r"""
import os, sys, time
t0 = float(os.environ["BENCH_T0"])
sys.path.insert(0, os.environ["BENCH_ROOT"])
sys.argv = ["train.py"] + sys.argv[1:]
from data_pipeline import loader as L
real = L.DistributedTokenLoader.next_batch
def first(self):
    out = real(self)
    pending = self.verification_pending() if hasattr(self, "verification_pending") else -1
    print(f"BENCH_FIRST_BATCH {time.time() - t0:.3f} pending={pending}", flush=True)
    os._exit(0)
L.DistributedTokenLoader.next_batch = first
from pretrain import train
sys.exit(train.main())
"""


def make_dir(d: Path, tokens: int, vocab: int = 50257) -> Path:
    """``tokens`` random ids in 100M-token train shards (+ one small val shard) with a manifest."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    plan = [("val", 1_000_000)] + [("train", min(SHARD_TOKENS, tokens - i)) for i in range(0, tokens, SHARD_TOKENS)]
    counts = {"val": 0, "train": 0}
    for split, n in plan:
        name = f"{split}_{counts[split]:06d}.bin"
        counts[split] += 1
        t = rng.integers(0, vocab, n, dtype=np.uint16)
        sha = write_shard(d / name, t)
        shards.append({"file": name, "split": split, "tokens": int(n), "documents": 1, "sha256": sha,
                       "max_token_id": int(t.max())})
    settings = {"source": "synthetic:uniform", "text_field": "text", "filters": [], "txt_per_line": False,
                "hf_config": None, "hf_split": "train", "data_files": None, "shard_tokens": SHARD_TOKENS,
                "val_tokens": 1_000_000, "max_tokens": None}
    write_manifest(d, {"version": 1, "complete": True, "settings": settings, "shards": shards})
    return d


def hash_rate(path: Path, repeats: int) -> tuple[float, float]:
    """(MB/s sha256 only, MB/s sha256 + max token id) over ``path``, median of ``repeats``."""
    size = path.stat().st_size
    top = [0]

    def on_chunk(offset: int, data: bytes) -> None:
        skip = max(HEADER_BYTES - offset, 0)
        top[0] = max(top[0], int(np.frombuffer(data, dtype=TOKEN_DTYPE, offset=skip).max()))

    integrity.sha256_file(path)  # warm the page cache
    plain, both = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        integrity.sha256_file(path)
        plain.append(size / (time.perf_counter() - t) / 1e6)
        t = time.perf_counter()
        integrity.sha256_file(path, on_chunk=on_chunk)
        both.append(size / (time.perf_counter() - t) / 1e6)
    return statistics.median(plain), statistics.median(both)


def loader_first_batch(data: Path, verify: bool) -> float:
    """Seconds to build the 124M run's loader (seq_len 1024, micro-batch 1) and get its first batch."""
    from data_pipeline.loader import DistributedTokenLoader

    t = time.perf_counter()
    ld = DistributedTokenLoader(data, "train", 1024, 1, 1, vocab_size=50257, verify=verify)
    ld.next_batch()
    dt = time.perf_counter() - t
    ld.close()
    return dt


def startup(root: Path, data: Path, run_dir: Path) -> tuple[float, str]:
    overrides = [f"data.dir={data}", f"train.run_dir={run_dir}", "train.device=cpu", "train.compile=false",
                 "train.dtype=fp32", "train.micro_batch_size=1", "train.global_batch_tokens=1024",
                 "eval.interval=0", "eval.hellaswag=false", "eval.sample_prompt=", "logging.wandb=disabled",
                 "checkpoint.resume=none", "schedule.max_steps=10", "schedule.warmup_steps=1"]
    env = dict(os.environ, BENCH_ROOT=str(root), BENCH_T0=repr(time.time()), OMP_NUM_THREADS="1",
               PYTHONPATH=str(root), WANDB_MODE="disabled")
    p = subprocess.run([sys.executable, "-c", CHILD, "--config", str(REPO / "configs" / "gpt2_124m.yaml"),
                        *overrides], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    for line in p.stdout.splitlines():
        if line.startswith("BENCH_FIRST_BATCH"):
            _, secs, pending = line.split()
            return float(secs), pending
    raise RuntimeError(f"{root}: no first batch (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="a checkout of the code before the checks (e.g. main)")
    ap.add_argument("--tokens", type=float, default=1e9, help="synthetic training tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp", help="where the synthetic directory is written (then deleted)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="shard-verify-", dir=args.work))
    try:
        t = time.perf_counter()
        data = make_dir(work / "data", int(args.tokens))
        total = sum(p.stat().st_size for p in data.glob("*.bin"))
        print(f"wrote {int(args.tokens):,} tokens ({total / 1e9:.2f} GB) in {time.perf_counter() - t:.0f}s")
        mbs, mbs_max = hash_rate(data / "train_000000.bin", args.repeats)
        print(f"sha256: {mbs:,.0f} MB/s; sha256 + max token id (the loader's pass): {mbs_max:,.0f} MB/s")
        for name, b in (("10B tokens (20.0 GB)", 20e9), (f"this directory ({total / 1e9:.2f} GB)", total)):
            print(f"projected full hash of {name} on one thread: {b / 1e6 / mbs_max:,.1f} s (in the background); "
                  f"step 1 waits for one 100M-token shard: {(HEADER_BYTES + 2 * SHARD_TOKENS) / 1e6 / mbs_max:.2f} s")
        lt: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for v in (False, True):
                lt[v].append(loader_first_batch(data, v))
        lo_off, lo_on = statistics.median(lt[False]), statistics.median(lt[True])
        print(f"loader build + first batch: verify=False {lo_off:.3f}s, verify=True {lo_on:.3f}s "
              f"(+{lo_on - lo_off:.3f}s; runs {lt})")
        times: dict[str, list[float]] = {"before": [], "after": []}
        for i in range(args.repeats):
            for label, root in (("before", Path(args.before)), ("after", REPO)):
                secs, pending = startup(root, data, work / f"run-{label}-{i}")
                times[label].append(secs)
                print(f"  run {i + 1} {label}: first batch after {secs:.2f}s (shards still verifying: {pending})")
        b, a = statistics.median(times["before"]), statistics.median(times["after"])
        print(json.dumps({"sha256_MBps": round(mbs), "sha256_max_MBps": round(mbs_max),
                          "startup_before_s": round(b, 2), "startup_after_s": round(a, 2),
                          "startup_delta_s": round(a - b, 2), "runs": times,
                          "loader_first_batch_s": {"verify_off": round(lo_off, 3), "verify_on": round(lo_on, 3)}}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

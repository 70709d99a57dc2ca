"""How long a checkpoint save blocks training: sync vs async, on the 124M model's state.

    .venv/bin/python benchmarks/checkpoint_save.py [--preset gpt2] [--repeats 3] [--dir /tmp]

Builds GPT(GPTConfig.from_preset(preset)) + AdamW on CPU with its state filled by one optimizer
step (~1.5 GB for gpt2: fp32 weights + exp_avg + exp_avg_sq), then times, into a fresh temp dir:
  - sync:  save() from call to return (write + fsync + sha256 + commit; all of it blocks);
  - async: save() from call to return (the CPU snapshot: what training waits for), then
           wait() (the background write + commit still running when training would resume),
           while the main thread stays idle (best case for the writer thread);
  - load:  load() into a fresh model + optimizer (sha256 check + torch.load + load_state_dict).
Prints one JSON line and a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(preset: str):
    from pretrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset))
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=False)
    for p in model.parameters():  # one step with random grads: a full-size AdamW state, no forward needed
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def state_bytes(model, opt) -> int:
    seen, total = set(), 0
    tensors = list(model.state_dict().values()) + [
        t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    ]
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def main(argv: list[str] | None = None) -> None:
    from pretrain.checkpoint import Checkpointer, capture_rng_state

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="parent of the temp checkpoint dir (default: the system temp dir)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, opt = build(args.preset)
    nbytes = state_bytes(model, opt)
    config = {"model": model.config.to_dict()}
    root = Path(tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.dir))
    times: dict[str, list[float]] = {"sync_blocking_s": [], "async_blocking_s": [], "async_wait_s": [], "load_s": []}
    step = 0
    try:
        for _ in range(args.repeats):
            for mode in ("sync", "async"):
                ck = Checkpointer(root / mode, keep_last=1, async_save=(mode == "async"))
                step += 1
                t0 = time.perf_counter()
                path = ck.save(step, model, opt, {"step": step}, {"rng": capture_rng_state()}, config)
                t1 = time.perf_counter()
                ck.wait()
                t2 = time.perf_counter()
                times[f"{mode}_blocking_s"].append(t1 - t0)
                if mode == "sync":
                    sync_path = path
                if mode == "async":
                    times["async_wait_s"].append(t2 - t1)
            m2, o2 = build(args.preset)
            t0 = time.perf_counter()
            Checkpointer(root / "sync", keep_last=1).load(sync_path, m2, o2)
            times["load_s"].append(time.perf_counter() - t0)
            del m2, o2
        ckpt_bytes = sum(f.stat().st_size for f in (root / "sync").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    result = {
        "preset": args.preset,
        "state_gb": round(nbytes / 1e9, 3),
        "checkpoint_gb": round(ckpt_bytes / 1e9, 3),
        "repeats": args.repeats,
        **med,
        "all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
    }
    print(json.dumps(result))
    print()
    print("| what | median s |")
    print("|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()

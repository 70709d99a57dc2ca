"""Training throughput through the real Trainer (loader, autocast, accumulation, clipping, AdamW):
tokens/s, and MFU on GPUs.

    python benchmarks/train_throughput.py                 # CPU: the smoke model, eager and compiled;
                                                          # CUDA (when present): the 124M preset too
    python benchmarks/train_throughput.py --only cpu --steps 20

Data are synthetic token shards written to a temporary directory (throughput does not depend on
what the tokens say). Each case builds a Trainer, runs ``--warmup`` steps (compilation, allocator
warm-up), then times ``--steps`` optimizer steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def make_data(d: Path, tokens: int, vocab: int = 50257) -> Path:
    from data_pipeline.shards import write_shard

    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    write_shard(d / "val_000000.bin", rng.integers(0, vocab, 100_000))
    write_shard(d / "train_000000.bin", rng.integers(0, vocab, tokens))
    return d


def measure(config: str, overrides: list[str], warmup: int, steps: int) -> dict:
    from pretrain.config import load_config
    from pretrain.metrics import mfu
    from pretrain.trainer import Trainer

    cfg, _ = load_config(REPO / "configs" / config, overrides)
    t = Trainer(cfg).build()
    try:
        sync = torch.cuda.synchronize if t.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        for _ in range(warmup):
            t.train_step()
        sync()
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            r = t.train_step()
        sync()
        dt = time.perf_counter() - t0
        tps = steps * t.derived.tokens_per_step / dt
        m = mfu(tps, t.flops_token, t.peak, t.info.world_size)
        return {
            "config": config, "compile": cfg.train.compile, "dtype": cfg.train.dtype, "device": str(t.device),
            "params": t.n_params, "tokens_per_step": t.derived.tokens_per_step, "steps": steps,
            "tokens_per_s": round(tps, 1), "ms_per_step": round(1000 * dt / steps, 1),
            "mfu": None if m is None else round(m, 4), "warmup_s": round(warm_s, 1), "final_loss": r.loss,
        }
    finally:
        if hasattr(t, "logger"):
            t.logger.close()
        t.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["cpu", "cuda"], help="run only the CPU cases or only the CUDA case")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU cases")
    p.add_argument("--micro-batch", type=int, default=64, help="124M micro-batch on CUDA")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = ["eval.interval=0", "checkpoint.interval=0", "logging.wandb=disabled"]
        if args.only in (None, "cpu"):
            data = make_data(tmp / "cpu-data", 2_000_000)
            for compile in (False, True):
                ov = common + [f"data.dir={data}", f"train.run_dir={tmp / f'cpu-{compile}'}", "train.device=cpu",
                               f"train.compile={str(compile).lower()}", "train.global_batch_tokens=512",
                               "train.micro_batch_size=8", "checkpoint.resume=none"]
                res = measure("smoke_cpu.yaml", ov, args.warmup, args.steps)
                res["threads"] = torch.get_num_threads()
                results.append(res)
                print(json.dumps(res), flush=True)
        if args.only in (None, "cuda"):
            if not torch.cuda.is_available():
                print("CUDA not available: skipping the 124M (gpt2_124m.yaml) case", file=sys.stderr)
            else:
                B, T = args.micro_batch, 1024
                data = make_data(tmp / "gpu-data", (args.warmup + args.steps + 2) * B * T + 1)
                ov = common + [f"data.dir={data}", f"train.run_dir={tmp / 'gpu'}", f"train.micro_batch_size={B}",
                               f"train.global_batch_tokens={B * T}", "checkpoint.resume=none"]
                res = measure("gpt2_124m.yaml", ov, args.warmup, args.steps)
                res["gpu"] = torch.cuda.get_device_name()
                results.append(res)
                print(json.dumps(res), flush=True)
    print(f"# {platform.node()} {platform.processor() or platform.machine()} torch {torch.__version__}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

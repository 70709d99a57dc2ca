"""Training throughput through the real Trainer (loader, autocast, accumulation, clipping, AdamW):
tokens/s against a bare nanoGPT-style loop, peak RSS, and MFU on GPUs.

    python benchmarks/train_throughput.py --only w1             # CPU: the Trainer vs the bare loop (W1)
    python benchmarks/train_throughput.py --only w1 --compile both --repeats 3
    python benchmarks/train_throughput.py --only memory-124m     # peak RSS of one 124M step, full vs fused head
    python benchmarks/train_throughput.py --only cpu --steps 20  # the smoke model, eager and compiled
    python benchmarks/train_throughput.py --only cuda            # the 124M preset on a GPU

W1 (issue 13): GPT-2 architecture at 4 layers x 4 heads x 256 wide, 256 positions, vocabulary padded
to 50,304, micro-batch 8 x 256, AdamW (0.9, 0.95), weight decay 0.1 on 2-D weights, clip 1.0, no
accumulation, random tokens, fp32. "trainer" is ``build_trainer()`` + ``Trainer.train()`` (the loop
of ``pretrain/train.py``: step, metrics record, logging); "bare" is the ~80-line plain-PyTorch
loop below (``bare_gpt`` / ``bare_loop``: no project code). Every measurement is its own
process (so peak RSS = that process's ``ru_maxrss``), and the cases are interleaved
(bare, trainer, bare, trainer, ...) so a shared machine's load hits both alike; the figures are
medians over ``--repeats``. tokens/s is timed from the start of the first step after
``--warmup`` to the start of the last step (the whole loop body in between).

Data are synthetic token shards written to a temporary directory (throughput does not depend on
what the tokens say).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from _common import synthetic_shards  # noqa: E402


def measure(config: str, overrides: list[str], warmup: int, steps: int) -> dict:
    from pretrain.config import load_config, world_size_from_env
    from pretrain.plan import make_plan
    from pretrain.training.build import build_trainer
    from pretrain.training.metrics import mfu

    cfg = load_config(REPO / "configs" / config, overrides)
    t = build_trainer(make_plan(cfg, world_size_from_env()))
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
        tps = steps * t.plan.batch.tokens_per_step / dt
        m = mfu(tps, t.flops_token, t.peak, t.info.world_size)
        return {
            "config": config, "compile": cfg.train.compile, "dtype": cfg.train.dtype, "device": str(t.device),
            "params": t.n_params, "tokens_per_step": t.plan.batch.tokens_per_step, "steps": steps,
            "tokens_per_s": round(tps, 1), "ms_per_step": round(1000 * dt / steps, 1),
            "mfu": None if m is None else round(m, 4), "warmup_s": round(warm_s, 1), "final_loss": r.loss,
        }
    finally:
        if hasattr(t, "logger"):
            t.logger.close()
        t.close()


# ---------------------------------------------------------------------------------------------
# The bare reference: a plain GPT-2 and a nanoGPT-style loop (zero_grad, forward, backward, clip,
# step). Deliberately no project code.


def bare_gpt(n_layer: int, n_head: int, n_embd: int, block_size: int, vocab: int):
    import torch.nn as nn
    import torch.nn.functional as F

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = self.c_attn(x).split(n_embd, dim=2)
            q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(n_embd), Attn(), nn.LayerNorm(n_embd)
            self.c_fc, self.c_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block_size, n_embd)
            self.h = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(n_embd)
            self.lm_head = nn.Linear(n_embd, vocab, bias=False)
            self.lm_head.weight = self.wte.weight  # tied
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                    torch.nn.init.normal_(p, 0.0, std)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))  # (B, T, C)
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))  # (B, T, V)
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return GPT()


def bare_loop(args) -> dict:
    torch.manual_seed(0)
    B, T = args.micro_batch, args.seq_len
    model = bare_gpt(args.n_layer, args.n_head, args.n_embd, T, args.vocab_rows)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95))
    step_fn = torch.compile(model) if args.compile else model
    tokens = torch.randint(0, 50257, ((args.warmup + args.steps) * B * T + 1,))
    stamps = []
    for step in range(args.warmup + args.steps):
        stamps.append((time.perf_counter(), time.process_time()))
        args.on_step(step)
        buf = tokens[step * B * T: (step + 1) * B * T + 1]
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        opt.zero_grad(set_to_none=True)
        _, loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return {"stamps": stamps, "final_loss": loss.item()}


def trainer_loop(args) -> dict:
    """``build_trainer()`` + ``Trainer.train()`` (the loop of pretrain/train.py) on W1."""
    from pretrain.config import load_config
    from pretrain.plan import make_plan
    from pretrain.training.build import build_trainer

    B, T = args.micro_batch, args.seq_len
    ov = [f"data.dir={args.data}", f"train.run_dir={args.run_dir}", "train.device=cpu", "train.dtype=fp32",
          f"train.compile={str(args.compile).lower()}", f"train.global_batch_tokens={B * T}",
          f"train.micro_batch_size={B}", f"data.seq_len={T}", "checkpoint.resume=none", "checkpoint.interval=0",
          "eval.interval=0", "eval.sample_tokens=0", "logging.wandb=disabled", "optim.weight_decay=0.1",
          "optim.grad_clip=1.0", f"schedule.max_steps={args.warmup + args.steps}", "schedule.warmup_steps=2",
          f"model.preset={args.preset}", f"model.n_layer={args.n_layer}", f"model.n_head={args.n_head}",
          f"model.n_embd={args.n_embd}", f"model.block_size={T}", f"model.padded_vocab_size={args.vocab_rows}",
          "train.log_interval=10"]
    cfg = load_config(REPO / "configs" / "smoke_cpu.yaml", ov)
    t = build_trainer(make_plan(cfg, 1))
    if args.loss_chunk is not None:
        t.model.loss_chunk_size = args.loss_chunk  # 0 = the full (B, T, V) logits path
    stamps = []
    step = t.train_step

    def timed_step():
        stamps.append((time.perf_counter(), time.process_time()))
        args.on_step(len(stamps) - 1)
        return step()

    t.train_step = timed_step
    try:
        t.train()
    finally:
        t.close()
    return {"stamps": stamps}


def worker(args) -> None:
    """One measurement in this process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    prof = None

    def on_step(i: int) -> None:  # --profile: torch.profiler over steps [warmup, warmup + 2)
        nonlocal prof
        if args.profile and i == args.warmup:
            prof = torch.profiler.profile()
            prof.__enter__()
        elif prof is not None and i == args.warmup + 2:
            prof.__exit__(None, None, None)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
            prof = None

    args.on_step = on_step
    out = (bare_loop if args.case == "bare" else trainer_loop)(args)
    st = out.pop("stamps")
    timed = st[args.warmup:]
    tokens = (len(timed) - 1) * args.micro_batch * args.seq_len
    tps = tokens / (timed[-1][0] - timed[0][0]) if len(timed) > 1 else None
    # tokens per CPU-second of this process: steadier than wall time on a shared machine
    tpc = tokens / (timed[-1][1] - timed[0][1]) if len(timed) > 1 else None
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
    print(json.dumps({"case": args.case, "compile": args.compile, "tokens_per_s": tps, "tokens_per_cpu_s": tpc, "peak_rss_gb": rss_gb,
                      "loss_chunk": args.loss_chunk, **out}), flush=True)


def spawn(args, case: str, compile: bool, data: Path, run_dir: Path, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--worker", case, "--data", str(data), "--run-dir", str(run_dir),
           "--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--preset", args.preset, "--n-layer", str(args.n_layer), "--n-head", str(args.n_head),
           "--n-embd", str(args.n_embd), "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
           "--vocab-rows", str(args.vocab_rows), *extra] + (["--compile-worker"] if compile else [])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode != 0:
        raise SystemExit(f"{case} worker failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare_w1(args, tmp: Path) -> None:
    """bare vs trainer, interleaved, ``--repeats`` times each, eager and/or compiled."""
    data = synthetic_shards(tmp / "w1-data", (args.warmup + args.steps + 2) * args.micro_batch * args.seq_len * 2)
    modes = {"eager": [False], "compiled": [True], "both": [False, True]}[args.compile]
    rows = {}
    for rep in range(args.repeats):
        for compile in modes:
            for case in ("bare", "trainer"):
                r = spawn(args, case, compile, data, tmp / f"run-{case}-{compile}-{rep}")
                rows.setdefault((compile, case), []).append(r)
                print(json.dumps({"repeat": rep, **r}), flush=True)
    for compile in modes:
        bare, tr = rows[(compile, "bare")], rows[(compile, "trainer")]
        tb = statistics.median(r["tokens_per_s"] for r in bare)
        tt = statistics.median(r["tokens_per_s"] for r in tr)
        cb = statistics.median(r["tokens_per_cpu_s"] for r in bare)
        ct = statistics.median(r["tokens_per_cpu_s"] for r in tr)
        mb = statistics.median(r["peak_rss_gb"] for r in bare)
        mt = statistics.median(r["peak_rss_gb"] for r in tr)
        label = "compiled" if compile else "eager"
        print(f"W1 {label}: trainer {tt:.1f} tokens/s vs bare loop {tb:.1f} = {tt / tb:.2f}x; "
              f"per CPU-second {ct:.1f} vs {cb:.1f} = {ct / cb:.2f}x; peak RSS trainer {mt:.2f} GB vs bare {mb:.2f} GB = {mt / mb:.2f}x "
              f"(medians of {args.repeats}; runs: trainer {[round(r['tokens_per_s'], 1) for r in tr]}, "
              f"bare {[round(r['tokens_per_s'], 1) for r in bare]})", flush=True)


def memory_124m(args, tmp: Path) -> None:
    """Peak RSS of one 124M training step (micro-batch 8 x 1024, fp32, eager) with the full-logits
    head (loss_chunk_size=0) and the fused one."""
    B, T = 8, 1024
    data = synthetic_shards(tmp / "m-data", 4 * B * T + 1)
    a = argparse.Namespace(**{**vars(args), "preset": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768,
                              "seq_len": T, "micro_batch": B, "vocab_rows": 50304, "warmup": 0, "steps": 1})
    for chunk in ("0", None):
        extra = ["--loss-chunk", chunk] if chunk is not None else []
        r = spawn(a, "trainer", False, data, tmp / f"m-run-{chunk}", extra)
        label = "full logits (loss_chunk_size=0)" if chunk == "0" else "fused head (default chunks)"
        print(f"124M, micro-batch {B} x {T}, one step, {label}: peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["w1", "memory-124m", "cpu", "cuda"], default="w1",
                   help="w1: Trainer vs bare loop on CPU; memory-124m: peak RSS of a 124M step; cpu: the smoke "
                        "model through the Trainer; cuda: the 124M preset on a GPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="w1: interleaved runs of each case (medians reported)")
    p.add_argument("--compile", choices=["eager", "compiled", "both"], default="both", help="w1: which modes")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU cases (w1: 2)")
    p.add_argument("--micro-batch", type=int, default=None, help="micro-batch (W1: 8; 124M on CUDA: 64)")
    # W1 and the worker processes
    p.add_argument("--preset", default="gpt2", help=argparse.SUPPRESS)
    p.add_argument("--n-layer", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--n-head", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--n-embd", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--vocab-rows", type=int, default=50304, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["bare", "trainer"], help=argparse.SUPPRESS)
    p.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loss-chunk", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only == "w1" and args.worker is None and args.steps < 2:  # w1 times from the first timed step's start to the last's
        p.error(f"--only w1 needs --steps >= 2 (the timing spans the steps between the first and the last), "
                f"got {args.steps}")
    if args.worker:
        args.case, args.compile = args.worker, args.compile_worker
        worker(args)
        return 0
    if args.only in ("w1", "memory-124m"):
        args.threads = args.threads or 2
        args.micro_batch = args.micro_batch or 8
        with tempfile.TemporaryDirectory() as tmp:
            (compare_w1 if args.only == "w1" else memory_124m)(args, Path(tmp))
        print(f"# {platform.node()} {platform.processor() or platform.machine()} torch {torch.__version__}, "
              f"{args.threads} threads, load avg {os.getloadavg()[0]:.2f}", file=sys.stderr)
        return 0
    args.micro_batch = args.micro_batch or 64
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = ["eval.interval=0", "checkpoint.interval=0", "logging.wandb=disabled"]
        if args.only == "cpu":
            data = synthetic_shards(tmp / "cpu-data", 2_000_000)
            for compile in (False, True):
                ov = common + [f"data.dir={data}", f"train.run_dir={tmp / f'cpu-{compile}'}", "train.device=cpu",
                               f"train.compile={str(compile).lower()}", "train.global_batch_tokens=512",
                               "train.micro_batch_size=8", "checkpoint.resume=none"]
                res = measure("smoke_cpu.yaml", ov, args.warmup, args.steps)
                res["threads"] = torch.get_num_threads()
                results.append(res)
                print(json.dumps(res), flush=True)
        if args.only == "cuda":
            if not torch.cuda.is_available():
                print("CUDA not available: skipping the 124M (gpt2_124m.yaml) case", file=sys.stderr)
            else:
                B, T = args.micro_batch, 1024
                data = synthetic_shards(tmp / "gpu-data", (args.warmup + args.steps + 2) * B * T + 1)
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

"""The default recipe against the fast one on the demo model: validation loss at equal tokens, and
the tokens each needs to reach the default recipe's final validation loss.

    python benchmarks/recipe_compare.py                     # 3 seeds x 2 recipes, 30 steps each
    python benchmarks/recipe_compare.py --seeds 0 --steps 40 --out /tmp/rc   # a quick look

Both recipes train the demo-sized GPT-2 (``configs/demo.yaml``: 4 layers x 128 wide, 256
positions, the real 50,257-token vocabulary, tied head) on the embedded corpus
(``builtin:python-docs``, prepared once into ``--data``) through the real entry point
(``pretrain/train.py`` in a subprocess), for the same number of steps of the same global batch:
the same tokens. Seed k sets ``train.seed`` (init) and ``data.seed`` (order) to k for *both*
recipes, so the two recipes of a seed see the same tokens in the same order. The runs of a seed
are interleaved (default, fast, default, fast, ...) so the shared machine's load hits both alike.

The validation loss is evaluated every ``--eval-every`` steps on the same fixed prefix of the val
split (``--val-tokens``). "Tokens to target" is the first point where a run's val loss is at or
below the *same seed's* default final val loss, interpolated linearly between the two evaluations
that bracket it (and ``None`` when it never gets there). The ratio fast / default is what the
issue asks for (target: <= 0.6 on every seed).

The recipes (the architecture is the same; only ``optim`` and ``schedule`` differ):

- default: ``configs/demo.yaml`` as it is: AdamW lr 3e-3, betas (0.9, 0.95), wd 0.1, cosine to
  10% (the build-nanogpt / llm.c recipe, scaled to the small model), with its warmup (10% of
  the steps in the demo) kept at 10% of ``--steps`` (``--warmup``) for both recipes;
- fast: the ``optim`` / ``schedule`` choices of ``configs/gpt2_124m_fast.yaml`` at the demo's
  scale (``FAST`` below): Muon on the hidden matrices, AdamW on embeddings / head / gains,
  warmup-stable-decay with a 1-sqrt cool-down to 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The fast recipe at the demo's scale (the same structure as configs/gpt2_124m_fast.yaml).
FAST = {
    "optim.name": "muon",
    "optim.muon_lr": 0.03,
    "optim.muon_momentum": 0.95,
    "optim.muon_adjust_lr": "original",
    "optim.lr": 6e-3,                 # AdamW: embeddings, tied head, gains
    "schedule.name": "wsd",
    "schedule.cooldown": "1-sqrt",
    "schedule.cooldown_frac": 0.4,
    "schedule.min_lr_ratio": 0.0,
}


def prepare(data: Path) -> None:
    if (data / "manifest.json").exists():
        return
    cmd = [sys.executable, "-m", "data_pipeline.prepare", "builtin:python-docs", str(data),
           "--val-tokens", "65536", "--shard-tokens", "1000000"]
    subprocess.run(cmd, cwd=REPO, check=True)


def train(run_dir: Path, data: Path, seed: int, steps: int, warmup: int, eval_every: int, val_tokens: int,
          extra: dict, threads: int) -> list[dict]:
    overrides = {
        "data.dir": str(data), "data.seed": seed, "train.seed": seed, "train.run_dir": str(run_dir),
        "train.device": "cpu", "schedule.max_steps": steps, "schedule.warmup_steps": warmup,
        "eval.interval": eval_every,
        "eval.val_tokens": val_tokens, "eval.sample_prompt": "", "eval.hellaswag": "false",
        "checkpoint.interval": 0, "checkpoint.keep_last": 1, "checkpoint.resume": "none",
        "train.log_interval": eval_every, **extra,
    }
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(REPO / "pretrain" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
           *[f"{k}={v}" for k, v in overrides.items()]]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"recipe_compare: {run_dir.name} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "tokens": r["tokens_seen"], "val": r["val/loss"]} for r in rows if "val/loss" in r]


def tokens_to(curve: list[dict], target: float) -> float | None:
    """First tokens at which ``curve`` reaches ``target``, linear between bracketing evaluations."""
    prev = None
    for pt in curve:
        if pt["val"] <= target:
            if prev is None:
                return float(pt["tokens"])
            frac = (prev["val"] - target) / (prev["val"] - pt["val"])
            return prev["tokens"] + frac * (pt["tokens"] - prev["tokens"])
        prev = pt
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (2,048 tokens each)")
    ap.add_argument("--warmup", type=int, default=None, help="LR warmup steps of both recipes; default 10%% of --steps")
    ap.add_argument("--eval-every", type=int, default=5, help="val loss every N steps")
    ap.add_argument("--val-tokens", type=int, default=4096, help="val tokens per evaluation (fixed prefix)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--data", default=str(REPO / "demo" / "data"), help="prepared embedded corpus (made if absent)")
    ap.add_argument("--out", default=str(REPO / "runs" / "recipe_compare"), help="run directories and results.json")
    args = ap.parse_args(argv)
    from _common import machine

    seeds = [int(s) for s in args.seeds.split(",")]
    warmup = args.warmup if args.warmup is not None else max(1, round(0.1 * args.steps))
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prepare(data)
    t0 = time.time()
    results: dict = {"steps": args.steps, "tokens_per_step": 2048, "tokens": args.steps * 2048,
                     "warmup": warmup, "eval_every": args.eval_every, "val_tokens": args.val_tokens, "fast": FAST,
                     "machine": machine(), "seeds": {}}
    for seed in seeds:
        curves = {}
        for name, extra in (("default", {}), ("fast", FAST)):
            ts = time.time()
            curves[name] = train(out / f"{name}-seed{seed}", data, seed, args.steps, warmup, args.eval_every,
                                 args.val_tokens, extra, args.threads)
            print(f"seed {seed} {name}: final val {curves[name][-1]['val']:.4f} ({time.time() - ts:.0f}s)",
                  flush=True)
        target = curves["default"][-1]["val"]
        need = {name: tokens_to(c, target) for name, c in curves.items()}
        ratio = need["fast"] / need["default"] if need["fast"] is not None else None
        results["seeds"][seed] = {"curves": curves, "target": target, "tokens_to_target": need, "ratio": ratio}
        print(f"seed {seed}: target {target:.4f}; tokens to target default {need['default']:.0f}, fast "
              f"{need['fast'] if need['fast'] is None else round(need['fast'])}; ratio {ratio}", flush=True)
    results["wall_s"] = round(time.time() - t0)
    (out / "results.json").write_text(json.dumps(results, indent=1))

    # Val loss at equal tokens (mean over seeds), then the per-seed tokens-to-target.
    print(f"\n{results['machine']}; {args.steps} steps ({warmup} warmup) x 2,048 = {args.steps * 2048:,} tokens "
          f"per run; {results['wall_s']} s\n")
    print("| tokens | default val (mean) | fast val (mean) |")
    print("|-------:|-------------------:|----------------:|")
    first = results["seeds"][seeds[0]]["curves"]["default"]
    for i, pt in enumerate(first):
        d = statistics.mean(results["seeds"][s]["curves"]["default"][i]["val"] for s in seeds)
        f = statistics.mean(results["seeds"][s]["curves"]["fast"][i]["val"] for s in seeds)
        print(f"| {pt['tokens']:,} | {d:.4f} | {f:.4f} |")
    print("\n| seed | default final val | tokens to it: default | fast | ratio |")
    print("|-----:|------------------:|----------------------:|-----:|------:|")
    for s in seeds:
        r = results["seeds"][s]
        fast = r["tokens_to_target"]["fast"]
        print(f"| {s} | {r['target']:.4f} | {r['tokens_to_target']['default']:,.0f} | "
              f"{'not reached' if fast is None else f'{fast:,.0f}'} | "
              f"{'-' if r['ratio'] is None else format(r['ratio'], '.2f')} |")
    ok = all(r["ratio"] is not None and r["ratio"] <= 0.6 for r in results["seeds"].values())
    print(f"\ntarget (fast reaches the default's final val loss in <= 60% of the tokens on every seed): "
          f"{'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

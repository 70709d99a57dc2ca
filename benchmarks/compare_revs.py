"""Same run, two or more versions of the code: W1 training and W1 sampling, interleaved.

For an acceptance line such as "within 3% of before, same run". Each revision (a git revision or
a directory holding a checkout) is unpacked side by side (``git archive REV``), and each
measurement runs in a fresh process of this interpreter with ``PYTHONPATH`` set to that tree, in
turn: BASE, REV, ..., BASE, REV, ... (``--repeats`` rounds), so a machine that drifts affects
every version alike. Printed: every run, then per version the median and its ratio to BASE, both
of the medians and paired round by round (the median of the per-round ratios).

- **train**: the tree's own ``benchmarks/train_throughput.py --worker trainer`` (its Trainer loop on
  W1 = GPT-2 4 x 256, 256 positions, the 50,304-row head; micro-batch 8; 3 warm-up + 10 timed
  steps; fp32, eager; 1 thread): tokens/s and tokens per CPU-second.
- **sample**: the tree's ``generate`` (W1, batch 1, a 16-token prompt, 240 new tokens, top-k 50)
  called 12 times after one warm-up call: the median call's CPU time, as tokens per CPU-second.

    .venv/bin/python benchmarks/compare_revs.py e2b6506                 # e2b6506 vs this checkout
    .venv/bin/python benchmarks/compare_revs.py e2b6506 2769423 HEAD --only sample --repeats 15

The trees share this checkout's virtual environment; a revision whose benchmark worker or
``generate`` does not exist yet is refused in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, synthetic_shards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
W1 = ["--preset", "gpt2", "--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--seq-len", "256",
      "--vocab-rows", "50304"]

SAMPLE = r"""
import json, statistics, sys, time
from pathlib import Path
import torch
tree = Path(sys.argv[1])
torch.set_num_threads(1)
if (tree / "pretrain" / "inference" / "generate.py").exists():
    from pretrain.inference.generate import generate
elif (tree / "pretrain" / "model" / "generate.py").exists():
    from pretrain.model.generate import generate
else:
    from pretrain.generate import generate
from pretrain.model import GPT, GPTConfig
torch.manual_seed(0)
cfg = GPTConfig.from_preset("gpt2", n_layer=4, n_head=4, n_embd=256, block_size=256, padded_vocab_size=50304)
model = GPT(cfg).eval()
prompt = [torch.randint(0, 50257, (16,)).tolist()]
generate(model, prompt, max_new_tokens=16, top_k=50, seed=1, eot_id=None)
times = []
for _ in range(12):
    c0 = time.process_time()
    out = generate(model, prompt, max_new_tokens=240, top_k=50, seed=1, eot_id=None)
    times.append(time.process_time() - c0)
elsewhere = [m.__file__ for n, m in list(sys.modules.items()) if n.split(".")[0] in ("pretrain", "data_pipeline")
             and getattr(m, "__file__", None) and not Path(m.__file__).resolve().is_relative_to(tree.resolve())]
assert not elsewhere, f"imported from outside the tree: {elsewhere[:2]}"
print(json.dumps({"tokens_per_cpu_s": 240 / statistics.median(times), "first": out[0][:4]}))
"""


class RevError(Exception):
    """A revision that cannot be measured; one line."""


def unpack(rev: str, into: Path) -> Path:
    """A directory holding ``rev``'s tree: the directory itself, or ``git archive`` of the revision."""
    if Path(rev).is_dir():
        return Path(rev).resolve()
    dest = into / rev.replace("/", "_")
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True)
    if archive.returncode:
        raise RevError(f"{rev}: not a revision of {REPO} nor a directory ({archive.stderr.decode().strip()})")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def run_one(kind: str, tree: Path, data: Path, run_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    if kind == "train":
        cmd = [sys.executable, str(tree / "benchmarks" / "train_throughput.py"), "--worker", "trainer",
               "--data", str(data), "--run-dir", str(run_dir), "--threads", "1", "--warmup", "3",
               "--steps", "10", "--micro-batch", "8", *W1]
    else:
        cmd = [sys.executable, "-c", SAMPLE, str(tree)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if p.returncode:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RevError(f"the {kind} measurement failed: {last}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarise(kind: str, names: list[str], rows: dict[str, list[dict]]) -> None:
    keys = ["tokens_per_s", "tokens_per_cpu_s"] if kind == "train" else ["tokens_per_cpu_s"]
    base = names[0]
    for key in keys:
        print(f"{kind} {key}:")
        b = [r[key] for r in rows[base]]
        for n in names:
            v = [r[key] for r in rows[n]]
            paired = statistics.median(x / y for x, y in zip(v, b))
            print(f"  {n:>20}  median {statistics.median(v):9.1f}  vs {base}: {statistics.median(v) / statistics.median(b):.3f}"
                  f"  paired {paired:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("revs", nargs="+", help="BASE [REV ...]: git revisions or checkout directories (one: BASE vs this checkout)")
    p.add_argument("--only", choices=["train", "sample", "both"], default="both")
    p.add_argument("--repeats", type=int, default=7, help="rounds (each runs every version once)")
    args = p.parse_args(argv)
    revs = args.revs if len(args.revs) > 1 else [args.revs[0], str(REPO)]
    kinds = ["train", "sample"] if args.only == "both" else [args.only]
    print(f"machine: {machine()}; python {sys.executable}; {args.repeats} rounds, 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            trees = {rev: unpack(rev, tmp / "trees") for rev in revs}
        except RevError as e:
            print(f"compare_revs: error: {e}", file=sys.stderr)
            return 2
        data = synthetic_shards(tmp / "data", 16 * 8 * 256 * 2) if "train" in kinds else tmp
        for kind in kinds:
            rows: dict[str, list[dict]] = {rev: [] for rev in revs}
            for r in range(args.repeats):
                for rev, tree in trees.items():
                    try:
                        rec = run_one(kind, tree, data, tmp / f"run-{len(rows[rev])}-{rev.replace('/', '_')}")
                    except RevError as e:
                        print(f"compare_revs: error: {rev}: {e}", file=sys.stderr)
                        return 2
                    rows[rev].append(rec)
                    print(f"{kind} round {r + 1} {rev}: " + ", ".join(
                        f"{k} {v:.1f}" for k, v in rec.items() if isinstance(v, float)), flush=True)
            summarise(kind, revs, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

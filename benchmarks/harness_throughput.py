"""Harness task throughput: ``gpt2-eval --tasks`` (our model in memory, evals/harness.py) vs
``lm_eval --model hf`` (the harness's Hugging Face model) on the same export, tasks and limit, in
the same run, with their figures checked equal.

    python benchmarks/harness_throughput.py [--limit 100] [--preset demo|gpt2] [--batch-size 32] [--threads 2]

The tasks are the harness's own definitions on local files (tests/lm_eval_fixtures.py writes
them: arc_easy, lambada_openai, wikitext, nq_open in their datasets' schemas), one per request
type. The model is a random GPT-2 of the demo's shape (4 x 128, context 256, 7.3M parameters) or
the 124M shape, exported with ``export_hf``; random weights score like trained ones for speed.

Timed, each side: the whole ``lm_eval.simple_evaluate`` call (task building, requests, metrics)
with the model already loaded: ours through ``evals.tasks.run_tasks`` (what ``gpt2-eval --tasks``
runs), theirs with ``model="hf"``; and each command end to end as a subprocess (``gpt2-eval`` vs
``lm_eval``: imports, model load, tasks). Requests/s = harness requests (every loglikelihood
choice, rolling document and generation) / seconds; the per-type counts are the same on both sides.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))  # the task fixtures the tests use: one home for them

from _common import machine  # noqa: E402
from lm_eval_fixtures import TASKS, write_tasks  # noqa: E402

PRESETS = {"demo": dict(n_layer=4, n_head=4, n_embd=128, block_size=256), "gpt2": {}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=100, help="documents per task")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side (best and median shown)")
    p.add_argument("--no-cli", action="store_true", help="skip the end-to-end command timings")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                      OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evals.harness import GPTLM
    from evals.tasks import flatten, run_tasks
    from pretrain.model import GPT, GPTConfig
    from pretrain.model.hf import export_hf
    from pretrain.model.weights import load_model

    work = Path(tempfile.mkdtemp(prefix="harness_bench."))
    include = write_tasks(work / "tasks", n=max(args.limit, 12))
    torch.manual_seed(0)
    export_hf(GPT(GPTConfig.from_preset("gpt2", **PRESETS[args.preset])).eval(), work / "hf")
    model = load_model(work / "hf")  # ours from the export, as gpt2-eval --model EXPORT loads it
    print(f"machine: {machine()}; torch {torch.__version__}, lm-eval {lm_eval.__version__}, threads {args.threads}")
    print(f"model: {args.preset} ({model.num_params() / 1e6:.1f}M parameters, context {model.config.block_size}); "
          f"tasks {','.join(TASKS)}; limit {args.limit}; batch size {args.batch_size}")

    def manager():
        return TaskManager(include_path=str(include), include_defaults=False)

    # What `--model hf --model_args pretrained=EXPORT,dtype=float32` builds, made here so each
    # request type's time can be read (the same object simple_evaluate would make from the string).
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(work / "hf"), dtype="float32", batch_size=args.batch_size, device="cpu")
    hf_seconds: dict[str, float] = {}
    for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        def timed(requests, *a, _real=getattr(hf, kind), _kind=kind, **k):
            t = time.perf_counter()
            try:
                return _real(requests, *a, **k)
            finally:
                hf_seconds[_kind] = hf_seconds.get(_kind, 0.0) + time.perf_counter() - t
        setattr(hf, kind, timed)

    # Alternating repeats; the best of each (the machine may be shared: the least disturbed run).
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    by_type: dict[str, list[dict]] = {"ours": [], "theirs": []}
    for _ in range(args.repeats):
        lm = GPTLM(model, batch_size=args.batch_size)
        t0 = time.perf_counter()
        ours = run_tasks(model, TASKS, limit=args.limit, manager=manager(), lm=lm, bootstrap_iters=0)
        times["ours"].append(time.perf_counter() - t0)
        by_type["ours"].append(dict(lm.seconds))
        hf_seconds.clear()
        t0 = time.perf_counter()
        theirs = lm_eval.simple_evaluate(model=hf, tasks=list(TASKS), task_manager=manager(), limit=args.limit,
                                         bootstrap_iters=0, log_samples=False)
        times["theirs"].append(time.perf_counter() - t0)
        by_type["theirs"].append(dict(hf_seconds))
    n = sum(lm.requests.values())
    a, b = flatten(ours), flatten(theirs)
    worst = max((abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in b), default=0.0)
    equal = set(a) == set(b) and all(a[k] == b[k] or ("perplexity" in k or "bits_per_byte" in k)
                                     and math.isclose(a[k], b[k], rel_tol=1e-5) for k in b)
    print(f"requests: {n} ({dict(lm.requests)}); {args.repeats} alternating repeats, best and median")
    print("requests/s by type (best), ours | theirs: " + ", ".join(
        f"{k} {lm.requests[k] / min(r[k] for r in by_type['ours']):.1f} | "
        f"{lm.requests[k] / min(r[k] for r in by_type['theirs']):.1f}" for k in lm.requests))
    print(f"{'':28s} {'best s':>8s} {'median s':>9s} {'requests/s':>11s}")
    for name, key in (("gpt2-eval --tasks (GPTLM)", "ours"), ("lm_eval --model hf (HFLM)", "theirs")):
        best, med = min(times[key]), statistics.median(times[key])
        print(f"{name:28s} {best:8.2f} {med:9.2f} {n / best:11.1f}")
    print(f"speed-up (best) {min(times['theirs']) / min(times['ours']):.2f}x; figures {'EQUAL' if equal else 'DIFFERENT'} "
          f"(largest relative difference {worst:.1e}); {json.dumps({k: round(v, 4) for k, v in a.items()})}")
    if args.no_cli:
        return
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    bin_dir = Path(py).parent
    cmds = {
        # Both with the harness's default 100,000 bootstrap resamples (its CLI has no flag for it).
        "gpt2-eval --tasks": [py, "-m", "evals.run", "--model", str(work / "hf"), "--tasks", ",".join(TASKS),
                              "--include-path", str(include), "--limit", str(args.limit), "--batch-size",
                              str(args.batch_size), "--device", "cpu"],
        "lm_eval --model hf": [str(bin_dir / "lm_eval"), "run", "--model", "hf", "--model_args",
                               f"pretrained={work / 'hf'},dtype=float32", "--tasks", ",".join(TASKS), "--include_path",
                               str(include), "--limit", str(args.limit), "--batch_size", str(args.batch_size),
                               "--device", "cpu"],
    }
    for name, cmd in cmds.items():
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
        print(f"end to end {name:22s} {dt:8.2f} s  {n / dt:8.1f} requests/s  ({status})")


if __name__ == "__main__":
    main()

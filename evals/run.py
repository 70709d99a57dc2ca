"""Evaluate a checkpoint: HellaSwag (harness and completion styles), validation loss and any
lm-evaluation-harness task.

    gpt2-eval --model CHECKPOINT_OR_HF_DIR [--hellaswag PATH] [--val-data DIR] [--limit N] [--out results.json]
    gpt2-eval --model ... --tasks lambada_openai,arc_easy [--include-path DIR] [--num-fewshot K] [--limit N]
    gpt2-eval --model ... --core eval_bundle [--limit N]    # DCLM CORE (evals/core.py); a limit: not CORE
    torchrun --nproc_per_node 8 -m evals.run --model ... # examples split over ranks, counts all-reduced

``--tasks`` runs the harness (the optional extra ``.[lm-eval]``) as a library on the model in
memory (``evals/tasks.py``, ``evals/harness.py``): the JSON holds the harness's results dict
under ``harness`` and the flat ``tasks/<task>/<metric>`` figures under ``results``; figures
whose task, metric and few-shot count match GPT-2 124M's published ones are printed beside them.
With ``--tasks`` or ``--core``, HellaSwag (the project's own scorer) runs only when ``--hellaswag PATH``
is given. ``--core BUNDLE_DIR`` scores nanochat's eval_bundle (``evals/core.py``): per-task accuracy,
centred accuracy and CORE, printed beside OpenAI GPT-2's CORE.

``--model`` is a Hugging Face GPT-2 directory (``gpt2-export`` writes one), a hub name, or a
native checkpoint directory written by the trainer (``pretrain.model.weights.load_model``). Without
``--hellaswag`` the canonical validation file is downloaded once into
``~/.cache/gpt2-pretrain/hellaswag``. Rank 0 prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from data_pipeline.arguments import Parser

DEFAULT_VAL_TOKENS = 10_485_760  # as eval.val_tokens: the first 10M tokens (all of a smaller split)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gpt2-eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, default=argparse.SUPPRESS, help="HF GPT-2 directory, hub name, or native checkpoint directory")
    p.add_argument("--hellaswag", default=None, metavar="PATH",
                   help="local HellaSwag jsonl; default: download the canonical file once into the cache")
    p.add_argument("--hellaswag-split", default="validation", choices=["validation", "train"],
                   help="which HellaSwag split to download when --hellaswag is not given")
    p.add_argument("--no-hellaswag", action="store_true", help="skip HellaSwag")
    p.add_argument("--limit", type=int, default=None,
                   help="score only the first N examples of HellaSwag and of each --tasks / --core task "
                        "(with --core the mean is then reported as core/mean_centered, not CORE)")
    p.add_argument("--tasks", default=None, metavar="NAMES",
                   help="comma-separated lm-evaluation-harness tasks (e.g. lambada_openai,arc_easy,piqa); "
                        "needs pip install -e '.[lm-eval]'")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="directory of local harness task YAMLs (offline tasks on local data files)")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples per --tasks prompt (default: each task's own, else 0)")
    p.add_argument("--bootstrap-iters", type=int, default=100_000,
                   help="bootstrap resamples for the standard errors of perplexity-type task metrics (0 = none)")
    p.add_argument("--core", default=None, metavar="BUNDLE_DIR",
                   help="DCLM CORE on nanochat's eval_bundle directory (core.yaml, eval_meta_data.csv, eval_data/; "
                        "evals/README.md says where to download it)")
    p.add_argument("--core-limit", type=int, default=None, metavar="N",
                   help="items per --core task (default: --limit); the mean is then core/mean_centered, not CORE")
    p.add_argument("--val-data", default=None, metavar="DIR",
                   help="directory of token shards; its val split gives val/loss (skipped when not set)")
    p.add_argument("--val-tokens", type=int, default=None,
                   help="tokens of the val split to evaluate, the first ones (0 = all; default: up to 10,485,760, "
                        "all of a smaller split)")
    p.add_argument("--seq-len", type=int, default=None, help="val-loss sequence length (default: %(default)s = the model's block_size)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="sequences per forward pass (HellaSwag candidates / val sequences)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--out", default=None, metavar="PATH", help="write the results as JSON here")
    return p


def format_table(results: dict[str, float]) -> str:
    rows = [("metric", "value", "stderr")]
    for k, v in results.items():
        if k.endswith("_stderr"):
            continue
        err = results.get(f"{k}_stderr")
        value = f"{int(v)}" if k.endswith(("num_examples", "tokens")) else f"{v:.4f}"
        rows.append((k, value, "" if err is None or math.isnan(err) else f"±{err:.4f}"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows)


def check_args(args) -> str | None:
    """Before any work: the arguments that can be checked without the model; one line, or None."""
    if args.limit is not None and args.limit < 1:
        return (f"--limit {args.limit}: nothing to score; pass --limit N with N >= 1 (or leave it out to score "
                "every example, or pass --no-hellaswag)")
    if args.core_limit is not None and (args.core is None or args.core_limit < 1):
        return (f"--core-limit {args.core_limit}: pass N >= 1 with --core BUNDLE_DIR (or leave it out to score "
                "every item: CORE)")
    if args.tasks is not None:
        from evals.tasks import missing

        if not [t for t in args.tasks.split(",") if t.strip()]:
            return "--tasks: no task names; pass comma-separated harness task names, e.g. --tasks lambada_openai"
        if missing():
            return f"--tasks: {missing()}"
        if args.include_path is not None and not Path(args.include_path).exists():
            return f"--include-path {args.include_path}: no such file or directory; pass a directory of task YAMLs"
    elif args.include_path is not None or args.num_fewshot is not None:
        return "--include-path / --num-fewshot apply to harness tasks; pass --tasks NAMES too"
    if args.num_fewshot is not None and args.num_fewshot < 0:
        return f"--num-fewshot {args.num_fewshot}: must be >= 0"
    if args.bootstrap_iters < 0:
        return f"--bootstrap-iters {args.bootstrap_iters}: must be >= 0 (0 = no bootstrapped standard errors)"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {args.device}: CUDA is not available here; pass --device cpu (or auto)"
    if args.batch_size < 1:
        return f"--batch-size {args.batch_size}: must be >= 1"
    if args.val_tokens is not None and args.val_tokens < 0:
        return f"--val-tokens {args.val_tokens}: must be >= 0 (0 = the whole val split)"
    if args.val_data is not None and not Path(args.val_data).is_dir():
        return f"--val-data {args.val_data}: no such directory; pass a directory of token shards (gpt2-prepare)"
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir():
            return f"--out {out}: is a directory; pass a file path such as {out / 'results.json'}"
        p = out.parent
        while not p.exists() and p != p.parent:
            p = p.parent
        if not p.is_dir():
            return f"--out {out}: {p} is not a directory; choose another --out"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem is not None:
        print(f"gpt2-eval: error: {problem}", file=sys.stderr)
        return 2
    from pretrain import dist

    # torchrun: one process group (nccl on CUDA, gloo on CPU); alone: none.
    info = dist.setup(args.device)
    try:
        return _run(args, info.rank, info.world_size, info.device)
    finally:
        dist.teardown(clean=False)


def _run(args, rank: int, world: int, device: torch.device) -> int:
    from evals.core import CoreEvaluator, load_bundle
    from evals.hellaswag import HellaSwagError, HellaSwagEvaluator
    from evals.tasks import TaskError, check_fewshot, load_tasks, task_manager
    from evals.val_loss import ValLossEvaluator
    from pretrain.checkpoint import CheckpointError
    from pretrain.model.weights import load_model, resolve

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, file=sys.stderr, flush=True)

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    try:
        evaluators, manager, loaded = [], None, None
        if not args.no_hellaswag and (not (tasks or args.core) or args.hellaswag is not None):
            evaluators.append(HellaSwagEvaluator(args.hellaswag, args.limit, args.batch_size, rank, world, device,
                                                 split=args.hellaswag_split))
        if tasks:
            manager = task_manager(tasks, args.include_path)  # unknown names: before the model is loaded
            # a task's data that cannot be read, or fewer few-shot examples than asked for: before the model too
            loaded = load_tasks(manager, tasks)  # read once: the harness runs these task objects
            check_fewshot(loaded, args.num_fewshot)
        core_limit = args.limit if args.core_limit is None else args.core_limit
        core = load_bundle(args.core, core_limit) if args.core is not None else None  # a bad bundle: before the model
        source = resolve(args.model)
        model = load_model(source).to(device).eval()
        if core is not None:
            evaluators.append(CoreEvaluator(core, core_limit, args.batch_size, rank, world, device,
                                            block_size=model.config.block_size))
        if args.val_data is not None:
            seq_len = args.seq_len or model.config.block_size
            if seq_len > model.config.block_size:
                raise ValueError(f"--seq-len {seq_len} is longer than the model's context ({model.config.block_size} "
                                 f"positions); pass --seq-len {model.config.block_size} or less")
            tokens = DEFAULT_VAL_TOKENS if args.val_tokens is None else args.val_tokens or None
            evaluators.append(ValLossEvaluator(args.val_data, seq_len, args.batch_size, tokens, rank, world, device,
                                               vocab_size=model.config.vocab_size, at_most=args.val_tokens is None,
                                               knob="--val-tokens"))
    except (HellaSwagError, TaskError, CheckpointError, ValueError, OSError) as e:
        print(f"gpt2-eval: error: {e}", file=sys.stderr)
        return 2
    if not evaluators and not tasks:
        print("gpt2-eval: error: nothing to evaluate; drop --no-hellaswag, pass --val-data DIR, --core DIR or --tasks NAMES",
              file=sys.stderr)
        return 2
    scored = torch.compile(model) if args.compile else model
    if source.note:
        log(source.note)
    log(f"model {args.model}: {model.num_params() / 1e6:.1f}M parameters, block_size {model.config.block_size}, "
        f"device {device}, world size {world}")

    results: dict[str, float] = {}
    timings: dict[str, float] = {}
    for ev in evaluators:
        t0 = time.perf_counter()
        results.update(ev(scored, None))
        timings[ev.name] = time.perf_counter() - t0
        log(f"{ev.name}: {timings[ev.name]:.1f}s")
    harness, requests = None, {}
    if tasks:
        try:
            harness, requests = _run_tasks(args, scored, tasks, manager, loaded, device, timings, log)
        except TaskError as e:
            print(f"gpt2-eval: error: {e}", file=sys.stderr)
            return 2
        from evals.tasks import flatten

        results.update(flatten(harness))
    if rank == 0:
        _report(args, results, harness, evaluators, world, device, timings, requests, log)
    return 0


def _run_tasks(args, model, tasks: list[str], manager, loaded: dict, device, timings: dict,
               log) -> tuple[dict | None, dict]:
    """The harness tasks on ``model`` (``loaded``: what ``load_tasks(manager, tasks)`` read): (the
    harness's results dict on rank 0 / None, requests served)."""
    from evals.harness import GPTLM
    from evals.tasks import run_tasks

    lm = GPTLM(model, batch_size=args.batch_size, device=device)
    t0 = time.perf_counter()
    harness = run_tasks(model, tasks, limit=args.limit, num_fewshot=args.num_fewshot, bootstrap_iters=args.bootstrap_iters,
                        manager=manager, loaded=loaded, lm=lm, fork_bootstrap=True)  # as the harness's own CLI
    timings["tasks"] = dt = time.perf_counter() - t0
    n = sum(lm.requests.values())
    log(f"tasks: {n} requests on rank 0 ({dict(lm.requests)}) in {dt:.1f}s: {n / max(dt, 1e-9):.1f} requests/s")
    return harness, dict(lm.requests)


def _report(args, results, harness, evaluators, world, device, timings, requests, log) -> None:
    """Rank 0: the table, GPT-2 124M's figures beside ours where they match, and the JSON."""
    from evals.tasks import format_reference, reference_rows

    print(format_table(results))
    ours = {"results": {"hellaswag": {f"{m},none": results[f"hellaswag/{m}"] for m in ("acc", "acc_norm")
                                      if f"hellaswag/{m}" in results}}, "n-shot": {"hellaswag": 0}}
    rows = reference_rows(ours) + reference_rows(harness)
    if rows:
        print("\nGPT-2 124M (OpenAI) in lm-evaluation-harness, same task, metric and shots (evals/README.md):")
        print(format_reference(rows))
    if "core/CORE" in results:  # a bundle scored whole: beside OpenAI GPT-2's
        from evals.tasks import core_reference_line

        print(f"\nCORE {results['core/CORE']:.4f}; {core_reference_line()}")
    core = next((ev for ev in evaluators if ev.name == "core"), None)
    if "core/mean_centered" in results:
        print(f"\ncore/mean_centered {results['core/mean_centered']:.4f} over the first {core.limit} items of each "
              "task: not CORE (CORE scores every item; drop the limit)")
    if not args.out:
        return
    hs = next((ev for ev in evaluators if ev.name == "hellaswag"), None)
    payload = {
        "model": str(args.model),
        "results": results,
        "hellaswag": None if hs is None else {
            "path": str(hs.path), "examples": hs.num_examples,
            "split": args.hellaswag_split if args.hellaswag is None else "file",
        },
        "val_data": args.val_data,
        "core": None if core is None else {"bundle": str(args.core), "limit": core.limit,
                                           "is_core": "core/CORE" in results},
        "harness": harness,
        "requests": requests,
        "world_size": world,
        "device": str(device),
        "seconds": timings,
        "args": vars(args),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
    log(f"wrote {out}")


def cli() -> None:
    """The ``gpt2-eval`` command: :func:`main`, then ``pretrain.dist.exit_process``; a Ctrl-C ends
    in one line, exit 130 (nothing is written before the results)."""
    from pretrain.cli import run

    run(main, "gpt2-eval: interrupted (Ctrl-C); no results were written")


if __name__ == "__main__":
    cli()

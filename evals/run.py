"""Evaluate a checkpoint: HellaSwag (harness and completion styles) and validation loss.

    gpt2-eval --model CHECKPOINT_OR_HF_DIR [--hellaswag PATH] [--val-data DIR] [--limit N] [--out results.json]
    torchrun --nproc_per_node 8 -m evals.run --model ... # examples split over ranks, counts all-reduced

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

DEFAULT_VAL_TOKENS = 10_485_760  # as eval.val_tokens: the first 10M tokens (all of a smaller split)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    p.add_argument("--limit", type=int, default=None, help="score only the first N HellaSwag examples")
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
    from evals.hellaswag import HellaSwagError, HellaSwagEvaluator
    from evals.val_loss import ValLossEvaluator
    from pretrain.checkpoint import CheckpointError
    from pretrain.model.weights import load_model, resolve

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, file=sys.stderr, flush=True)

    try:
        evaluators = []
        if not args.no_hellaswag:
            evaluators.append(HellaSwagEvaluator(args.hellaswag, args.limit, args.batch_size, rank, world, device,
                                                 split=args.hellaswag_split))
        source = resolve(args.model)
        model = load_model(source).to(device).eval()
        if args.val_data is not None:
            seq_len = args.seq_len or model.config.block_size
            if seq_len > model.config.block_size:
                raise ValueError(f"--seq-len {seq_len} is longer than the model's context ({model.config.block_size} "
                                 f"positions); pass --seq-len {model.config.block_size} or less")
            tokens = DEFAULT_VAL_TOKENS if args.val_tokens is None else args.val_tokens or None
            evaluators.append(ValLossEvaluator(args.val_data, seq_len, args.batch_size, tokens, rank, world, device,
                                               vocab_size=model.config.vocab_size, at_most=args.val_tokens is None,
                                               knob="--val-tokens"))
    except (HellaSwagError, CheckpointError, ValueError, OSError) as e:
        print(f"gpt2-eval: error: {e}", file=sys.stderr)
        return 2
    if not evaluators:
        print("gpt2-eval: error: nothing to evaluate; drop --no-hellaswag or pass --val-data DIR", file=sys.stderr)
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
    if rank == 0:
        print(format_table(results))
        if args.out:
            payload = {
                "model": str(args.model),
                "results": results,
                "hellaswag": None if args.no_hellaswag else {
                    "path": str(evaluators[0].path), "examples": evaluators[0].num_examples,
                    "split": args.hellaswag_split if args.hellaswag is None else "file",
                },
                "val_data": args.val_data,
                "world_size": world,
                "device": str(device),
                "seconds": timings,
                "args": vars(args),
            }
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(payload, indent=2) + "\n")
            log(f"wrote {out}")
    return 0


def cli() -> None:
    """The ``gpt2-eval`` command: :func:`main`, then ``pretrain.dist.exit_process``; a Ctrl-C ends
    in one line, exit 130 (nothing is written before the results)."""
    try:
        from pretrain.dist import exit_process

        rc = main()
    except KeyboardInterrupt:
        print("gpt2-eval: interrupted (Ctrl-C); no results were written", file=sys.stderr)
        sys.exit(130)
    exit_process(rc)


if __name__ == "__main__":
    cli()

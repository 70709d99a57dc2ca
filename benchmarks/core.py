"""CORE scoring throughput (evals/core.py): items/s on the random 124M model and the demo-sized model,
batched (the evaluator) against nanochat's loop (one item per forward, full logits).

    python benchmarks/core.py [--bundle eval_bundle] [--items 8] [--models gpt2,demo] [--threads 2]

Without ``--bundle`` a CORE-shaped synthetic bundle is written (``synthetic_bundle``): the task
types and few-shot counts that dominate the real one -- HellaSwag-like multiple choice at 0 and 10
shots (4 choices of ~20 words after ~60 words), a Winograd-like schema task (2 options, 0 shots),
LAMBADA-like language modelling (0 shots, one word) and SQuAD-like language modelling (10 shots of
~100-word contexts) -- ``--items`` items each (at least 11 for the 10-shot tasks); 10-shot prompts overflow the demo model's 256-token
context (left-cropped) and approach the 124M model's 1,024. With ``--bundle`` (nanochat's
eval_bundle) the first ``--items`` of each task after the reference's shuffle are scored.

Prints, per model: the prompt tokenization time, the evaluator's items/s (the shared-prefix path an
eager ``GPT`` takes), nanochat's loop's items/s on the same items, and that the two agree item for
item (the same accuracies). Figures: benchmarks/RESULTS.md, "CORE".
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("the a man woman is on in with and then he she they it of to runs holds puts takes water ball field "
         "kitchen grill brush table paper car dog quickly slowly again before after while camera shows begins "
         "continues player crowd stage city river history year war king team game music science").split()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def synthetic_bundle(root: Path, items: int, seed: int = 0) -> Path:
    """A CORE-shaped bundle (module docstring) in ``root``: core.yaml, eval_meta_data.csv, eval_data/."""
    rng = random.Random(seed)
    mc = [{"query": _text(rng, 40, 70) + ".", "choices": [_text(rng, 10, 30) for _ in range(4)],
           "gold": rng.randrange(4)} for _ in range(max(items, 11))]  # 10 shots need 10 other items
    schema = [{"context_options": [f"{_text(rng, 8, 12)} {w}" for w in rng.sample(WORDS, 2)],
               "continuation": _text(rng, 4, 8) + ".", "gold": rng.randrange(2)} for _ in range(items)]
    lambada = [{"context": _text(rng, 50, 90), "continuation": rng.choice(WORDS)} for _ in range(items)]
    squad = [{"context": f"{_text(rng, 80, 120)}\nQuestion: {_text(rng, 6, 10)}?\nAnswer:",
              "continuation": _text(rng, 1, 3)} for _ in range(max(items, 11))]
    tasks = [("hellaswag_zeroshot", "multiple_choice", 0, mc[:items], 25.0),
             ("hellaswag", "multiple_choice", 10, mc, 25.0),
             ("winograd", "schema", 0, schema, 50.0),
             ("lambada_openai", "language_modeling", 0, lambada, 0.0),
             ("squad", "language_modeling", 10, squad, 0.0)]
    (root / "eval_data").mkdir(parents=True, exist_ok=True)
    entries = []
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Random baseline"])
        for label, kind, shots, data, baseline in tasks:
            (root / "eval_data" / f"{label}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in data))
            entries.append({"label": label, "dataset_uri": f"{label}.jsonl", "num_fewshot": [shots],
                            "icl_task_type": kind})
            w.writerow([label, baseline])
    import yaml

    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}))
    return root


@torch.inference_mode()
def nanochat_loop(model, prepared) -> list[float]:
    """Items right per task as nanochat's evaluate_example computes them: per item, its rows (already
    rendered, tokenized and cropped by the evaluator's prepare) padded into one batch, full logits,
    cross-entropy at every position, then the decision."""
    out = []
    for prep in prepared:
        right = 0
        for local in range(len(prep.items)):
            rows = [prep.rows[r] for r, i in enumerate(prep.item_of) if i == local]
            T = max(len(t) for t, _ in rows)
            idx = torch.zeros(len(rows), T, dtype=torch.long)
            for j, (t, _) in enumerate(rows):
                idx[j, :len(t)] = torch.from_numpy(t).long()
            logits = model(idx)[0][..., :model.config.vocab_size]  # (R, T, V)
            losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), idx[:, 1:], reduction="none")  # (R, T-1)
            if prep.task.task_type == "language_modeling":
                t, s = rows[0]
                right += bool((logits[0, s - 1:len(t) - 1].argmax(-1) == idx[0, s:len(t)]).all())
            else:
                means = [losses[j, s - 1:len(t) - 1].mean().item() for j, (t, s) in enumerate(rows)]
                right += means.index(min(means)) == prep.task.items[prep.items[local]]["gold"]
        out.append(float(right))
    return out


def demo_config():
    import yaml

    from pretrain.model import GPTConfig

    m = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())["model"]
    return GPTConfig.from_preset(m.pop("preset", "gpt2"), **{k: v for k, v in m.items() if k != "init_from"})


def bench(name: str, config, bundle: Path, items: int | None, batch_size: int, baseline: bool) -> dict:
    from evals.core import CoreEvaluator, load_bundle
    from pretrain.model import GPT

    torch.manual_seed(0)
    model = GPT(config).eval()
    tasks = load_bundle(bundle, items)
    from data_pipeline.tokenizer import gpt2_encoding

    gpt2_encoding()  # built once per process (reading and checking the BPE files): not the evaluator's cost
    t0 = time.perf_counter()
    ev = CoreEvaluator(tasks, batch_size=batch_size, block_size=config.block_size)
    prep_s = time.perf_counter() - t0
    n = ev.num_examples
    t0 = time.perf_counter()
    res = ev(model)
    dt = time.perf_counter() - t0
    row = {"model": name, "params_m": round(model.num_params() / 1e6, 1), "block_size": config.block_size,
           "items": n, "tokens": int(sum(len(t) for p in ev.prepared(config.block_size) for t, _ in p.rows)),
           "tokenize_s": round(prep_s, 2), "seconds": round(dt, 2), "items_per_s": round(n / dt, 2),
           "score": res.get("core/CORE", res.get("core/mean_centered"))}
    if baseline:
        t0 = time.perf_counter()
        ref = nanochat_loop(model, ev.prepared(config.block_size))
        bt = time.perf_counter() - t0
        ours = [res[f"core/{t.label}/acc"] * len(t.items) for t in tasks]
        row.update(nanochat_loop_s=round(bt, 2), nanochat_loop_items_per_s=round(n / bt, 2),
                   speedup=round(bt / dt, 2), same_accuracies=all(abs(a - b) < 1e-9 for a, b in zip(ours, ref)))
    return row


def main(argv: list[str] | None = None) -> int:
    from _common import machine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=None, help="nanochat's eval_bundle (default: a synthetic CORE-shaped one)")
    p.add_argument("--items", type=int, default=8, help="items per task")
    p.add_argument("--models", default="gpt2,demo", help="gpt2 (random 124M, ctx 1024) and/or demo (configs/demo.yaml)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward (the evaluator's batch)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-baseline", action="store_true", help="skip nanochat's one-item-per-forward loop")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pretrain.model import GPTConfig

    configs = {"gpt2": GPTConfig.from_preset("gpt2"), "demo": demo_config()}
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else synthetic_bundle(Path(tmp) / "bundle", args.items)
        for name in args.models.split(","):
            row = bench(name, configs[name], bundle, args.items if args.bundle else None, args.batch_size,
                        not args.no_baseline)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

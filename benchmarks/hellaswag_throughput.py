"""HellaSwag scoring throughput: the batched scorer (evals.hellaswag) vs one example per forward.

    python benchmarks/hellaswag_throughput.py [--hellaswag PATH] [--examples 200] [--threads 1]

Both score the same examples with the same model and compute the same five metrics (harness
acc / acc_norm / acc_bytes and the completion style). The baseline is build-nanogpt's loop:
per example, one forward over its 8 candidate rows (4 per style) padded to the longest, then
a cross-entropy over every position and a mask. The batched scorer's paths
(``evals.hellaswag.score_sequences``):

- packed: all candidates sorted by length, ``--batch-size`` rows per forward padded to a
  multiple of ``--pad-multiple``, log_softmax only at the scored positions; with full logits
  (what a compiled or FSDP model takes) and with the LM head applied at the scored positions only;
- shared context prefix (the default for an eager ``GPT``): each context runs once, its 4
  candidates attend to its cached keys/values, and the LM head runs once per distinct scored
  prefix, in vocabulary slices.

Without ``--hellaswag``, synthetic examples with HellaSwag's length profile (contexts ~40-70
tokens, endings ~10-35) are generated.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from evals import hellaswag as hs
from pretrain.model import GPT, GPTConfig

WORDS = ("the a man woman is on in with and then he she they it of to runs holds puts takes water ball field "
         "kitchen grill brush table paper car dog quickly slowly again before after while [title] [step] "
         "camera shows begins continues player crowd stage hair towel rope shoes bike").split()


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    out = []
    for i in range(n):
        ctx_a, ctx_b = words(25, 50) + ".", words(1, 4)
        out.append({"ind": i, "activity_label": words(1, 3).title(), "ctx_a": ctx_a, "ctx_b": ctx_b,
                    "ctx": f"{ctx_a} {ctx_b}", "endings": [words(8, 30) + "." for _ in range(4)],
                    "label": rng.randrange(4), "split": "val", "split_type": "indomain",
                    "source_id": "activitynet~synthetic"})
    return out


def padded_rows(prep: hs.Prepared, rows: range, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate rows ``rows`` as context + continuation (the last ``keep`` tokens of each), right-
    padded with 0 to the longest: tokens (R, L) long and a mask (R, L) of the continuation tokens."""
    seqs = [(prep.context[r] + prep.continuation[r])[-keep:] for r in rows]
    L = max(len(q) for q in seqs)
    tokens = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L)
    for j, (r, q) in enumerate(zip(rows, seqs)):
        tokens[j, : len(q)] = torch.tensor(q)
        mask[j, len(q) - len(prep.continuation[r]): len(q)] = 1
    return tokens, mask


@torch.inference_mode()
def one_example_per_forward(model: GPT, prep: hs.Prepared) -> dict[str, float]:
    """build-nanogpt's loop, generalised to both styles: 8 rows per forward."""
    V, Tmax = model.config.vocab_size, model.config.block_size
    sums, counts = np.zeros(len(prep.context)), np.zeros(len(prep.context), dtype=np.int64)
    for i in range(len(prep)):
        rows = range(8 * i, 8 * i + 8)
        tokens, mask = padded_rows(prep, rows, Tmax + 1)
        logits, _ = model(tokens[:, :-1])  # (8, L-1, V_rows)
        losses = F.cross_entropy(logits[..., :V].reshape(-1, V).float(), tokens[:, 1:].reshape(-1),
                                 reduction="none").view(8, -1)  # (8, L-1)
        sums[list(rows)] = -(losses * mask[:, 1:]).sum(1).numpy()
        counts[list(rows)] = mask.sum(1).long().numpy()
    right = hs.example_predictions(prep, sums, counts)
    return {k: float(v.mean()) for k, v in right.items()}


@torch.inference_mode()
def build_nanogpt_in_training(model: GPT, prep: hs.Prepared) -> float:
    """build-nanogpt's in-training evaluation as written: one style only (the completion style,
    4 rows per example, padded to the longest), full logits, cross-entropy over every position,
    the prediction by the mean loss over the ending (acc_norm). Returns that accuracy (not
    comparable with the five metrics: it is the cost that is compared)."""
    V = model.config.vocab_size
    correct = 0
    for i in range(len(prep)):
        rows = range((2 * i + 1) * 4, (2 * i + 2) * 4)  # style 1 (completion) of example i
        tokens, mask = padded_rows(prep, rows, model.config.block_size)
        logits, _ = model(tokens)  # (4, L, V_rows)
        losses = F.cross_entropy(logits[:, :-1, :V].reshape(-1, V), tokens[:, 1:].reshape(-1),
                                 reduction="none").view(4, -1)  # (4, L-1)
        m = mask[:, 1:]
        avg = (losses * m).sum(1) / m.sum(1)
        correct += int(avg.argmin().item() == prep.labels[i])
    return correct / len(prep)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hellaswag", default=None, help="real HellaSwag jsonl (default: synthetic examples)")
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward of the batched scorer")
    p.add_argument("--pad-multiple", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="best of N timings")
    p.add_argument("--w1", action="store_true",
                   help="issue 13's W1 model: 256 positions, vocabulary padded to 50,304 (with --layers 4 --width 256)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    extra = dict(block_size=256, padded_vocab_size=50304) if args.w1 else {}
    model = GPT(GPTConfig(n_layer=args.layers, n_head=max(1, args.width // 64), n_embd=args.width, **extra)).eval()
    examples = (hs.load_examples(args.hellaswag, args.examples) if args.hellaswag
                else synthetic_examples(args.examples))
    prep = hs.prepare(examples)
    ntok = sum(len(c) + len(k) for c, k in zip(prep.context, prep.continuation))
    print(f"model {args.layers}x{args.width} ({model.num_params() / 1e6:.1f}M params), {len(examples)} examples, "
          f"{ntok / len(prep.context):.0f} tokens per candidate, {args.threads} thread(s)")

    def best(fn):
        """Best of N, in this process's CPU seconds: robust on a shared machine (1 thread)."""
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.process_time()
            out = fn()
            times.append(time.process_time() - t0)
        return min(times), out

    n = len(examples)
    t_nano, _ = best(lambda: build_nanogpt_in_training(model, prep))
    print(f"{'build-nanogpt in-training loop (1 style, 4 rows)':60s} {n / t_nano:7.2f} examples/s  {t_nano:7.2f} CPU s")
    t_base, base = best(lambda: one_example_per_forward(model, prep))
    print(f"{'one example per forward (8 rows)':60s} {n / t_base:7.2f} examples/s  {t_base:7.2f} CPU s  1.00x")
    modes = [  # (name, evaluate() options)
        (f"packed, {args.batch_size} rows/forward", {"head_positions_only": False, "share_prefix": False}),
        (f"packed, {args.batch_size} rows/forward, head at scored positions",
         {"head_positions_only": True, "share_prefix": False}),
        (f"shared context prefix, {args.batch_size} rows/forward (default)", {}),
    ]
    for name, opts in modes:
        t, out = best(lambda o=opts: hs.evaluate(model, prep, batch_size=args.batch_size,
                                                 pad_multiple=args.pad_multiple, **o))
        out = {k.removeprefix("hellaswag/"): v for k, v in out.items() if k.removeprefix("hellaswag/") in base}
        assert all(abs(out[k] - base[k]) < 1e-9 for k in base), (out, base)  # the same answers
        print(f"{name:60s} {n / t:7.2f} examples/s  {t:7.2f} CPU s  {t_base / t:.2f}x "
              f"({t_nano / t:.2f}x build-nanogpt's 1-style loop)")


if __name__ == "__main__":
    main()

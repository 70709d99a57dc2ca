#!/usr/bin/env bash
# gpt2-eval's HellaSwag numbers vs lm-evaluation-harness's own `hellaswag` task, on the same
# model and the same examples, offline. Not run by the tests (it needs lm-eval installed).
#
#   benchmarks/compare_lm_eval.sh [N_EXAMPLES] [HELLASWAG_JSONL]
#
# - lm-eval lives in its own venv (LMEVAL_VENV, default /tmp/lmeval-venv):
#     python3 -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install torch==2.13.0 lm-eval transformers
# - MODEL: a HF GPT-2 directory to compare on; default: a tiny random GPT-2 (2 layers x 64,
#   block_size 64, so long examples also exercise the harness's left truncation), exported
#   with pretrain.model.hf.export_hf.
# - Without HELLASWAG_JSONL, N synthetic HellaSwag-format lines are written (WikiHow ones with
#   [header]/[title]/[step]/[substeps] markers, ActivityNet ones with ctx_b, non-ASCII endings).
# - The task is evals/lm_eval_task/hellaswag_local.yaml (the harness's hellaswag.yaml with a
#   local data file; process_docs is the harness's own function).
# Checks acc and acc_norm, and every per-choice log-likelihood lm-eval logged (--log_samples),
# against ours; exits 1 on a mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-40}
DATA=${2:-}
LMEVAL_VENV=${LMEVAL_VENV:-/tmp/lmeval-venv}
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d /tmp/compare_lm_eval.XXXXXX)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -x "$LMEVAL_VENV/bin/lm_eval" ] || { echo "no lm_eval in $LMEVAL_VENV; install it (see the header of $0)" >&2; exit 2; }

MODEL_DIR=${MODEL:-$WORK/hf}
if [ -z "${MODEL:-}" ]; then
  "$PY" - "$MODEL_DIR" <<'EOF'
import sys, torch
from pretrain.model.hf import export_hf
from pretrain.model import GPT, GPTConfig
torch.manual_seed(0)
model = GPT(GPTConfig.from_preset("tiny", block_size=64))
with torch.no_grad():
    model.transformer.wte.weight.mul_(8.0)  # sharper distributions than the 0.02 init
export_hf(model.eval(), sys.argv[1])
EOF
fi

if [ -z "$DATA" ]; then
  DATA=$WORK/hellaswag_val.jsonl
  "$PY" - "$DATA" "$N" <<'EOF'
import json, random, sys
rng = random.Random(0)
W = ("the a man woman dog he she they it runs holds puts takes water ball field grill brush table car "
     "quickly slowly again then while café naïve résumé — camera crowd stage hair towel rope").split()
def words(lo, hi):
    return " ".join(rng.choice(W) for _ in range(rng.randint(lo, hi)))
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        if i % 2:  # WikiHow: markers, empty ctx_b, sometimes a trailing [step]
            ctx_a = f"[header] How to {words(2, 4)} [title] {words(3, 12).capitalize()}. [step] {words(3, 30)}."
            ctx_a += " [step]" if i % 3 == 0 else ""
            ctx_b, src = "", f"wikihow~{i}"
            endings = [rng.choice(["[substeps] ", "", " [header] ", ""]) + words(3, 15)
                       + rng.choice(["", " [title] " + words(2, 6), " [step] " + words(2, 6)]) + "." for _ in range(4)]
        else:  # ActivityNet: ctx_b starts the sentence the endings complete
            ctx_a, ctx_b, src = words(5, 20).capitalize() + ".", words(1, 3), f"activitynet~v_{i}"
            endings = [words(3, 14) + "." for _ in range(4)]
        ex = {"ind": i, "activity_label": words(1, 3).title(), "ctx_a": ctx_a, "ctx_b": ctx_b,
              "ctx": (ctx_a + " " + ctx_b).strip(), "endings": endings, "label": rng.randrange(4),
              "split": "val", "split_type": "indomain", "source_id": src}
        f.write(json.dumps(ex, ensure_ascii=False) + "\n")
EOF
fi
DATA=$(realpath "$DATA")

mkdir -p "$WORK/task"
cp evals/lm_eval_task/hellaswag_local.yaml evals/lm_eval_task/utils.py "$WORK/task/"
sed -i "s|validation: hellaswag_val.jsonl|validation: $DATA|" "$WORK/task/hellaswag_local.yaml"

echo "== lm-eval ($("$LMEVAL_VENV/bin/python" -c 'import lm_eval; print(lm_eval.__version__)')) on $N examples of $DATA, model $MODEL_DIR"
"$LMEVAL_VENV/bin/lm_eval" --model hf --model_args "pretrained=$MODEL_DIR,dtype=float32" \
  --tasks hellaswag_local --include_path "$WORK/task" --device cpu --limit "$N" --batch_size 8 \
  --output_path "$WORK/lm_eval_out" --log_samples >"$WORK/lm_eval.log" 2>&1 || { tail -20 "$WORK/lm_eval.log"; exit 1; }
grep -v "WARNING\|Truncating" "$WORK/lm_eval.log" | tail -4
echo "(lm-eval left-truncated $(grep -c "Truncating" "$WORK/lm_eval.log" || true) of $((4 * N)) requests to the model's context)"

echo "== gpt2-eval"
"$PY" -m evals.run --model "$MODEL_DIR" --hellaswag "$DATA" --limit "$N" --device cpu --out "$WORK/ours.json"

"$PY" - "$WORK" "$MODEL_DIR" "$DATA" "$N" <<'EOF'
import glob, json, sys
import numpy as np
from evals import hellaswag as hs
from pretrain.model.weights import load_model
work, model_dir, data, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
theirs = json.load(open(sorted(glob.glob(f"{work}/lm_eval_out/**/results_*.json", recursive=True))[-1]))
t = theirs["results"]["hellaswag_local"]
ours = json.load(open(f"{work}/ours.json"))["results"]
# per-choice log-likelihoods: lm-eval's logged responses vs our scorer
samples = [json.loads(line) for f in glob.glob(f"{work}/lm_eval_out/**/samples_hellaswag_local_*.jsonl", recursive=True)
           for line in open(f)]
samples.sort(key=lambda s: s["doc_id"])
their_ll = np.array([[r[0][0] if isinstance(r[0], list) else r[0] for r in s["filtered_resps"]] for s in samples], dtype=float)
model = load_model(model_dir).eval()
prep = hs.prepare(hs.load_examples(data, n))
sums, _ = hs.score_sequences(model, prep.context, prep.continuation, block_size=model.config.block_size,
                             vocab_size=model.config.vocab_size)
our_ll = sums.reshape(len(prep), 2, 4)[:, hs.HARNESS]
diff = float(np.abs(our_ll - their_ll).max())
rows = [("acc", t["acc,none"], ours["hellaswag/acc"]), ("acc_norm", t["acc_norm,none"], ours["hellaswag/acc_norm"]),
        ("acc_stderr", t["acc_stderr,none"], ours["hellaswag/acc_stderr"]),
        ("acc_norm_stderr", t["acc_norm_stderr,none"], ours["hellaswag/acc_norm_stderr"])]
print(f"\n{'metric':16s} {'lm-eval':>10s} {'gpt2-eval':>10s}")
for name, a, b in rows:
    print(f"{name:16s} {a:10.6f} {b:10.6f}")
print(f"examples: lm-eval {len(samples)}, gpt2-eval {int(ours['hellaswag/num_examples'])}; "
      f"max |log-likelihood difference| over {their_ll.size} choices: {diff:.2e}")
ok = all(abs(a - b) < 1e-9 for _, a, b in rows) and diff < 1e-3 and len(samples) == n
print("MATCH" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
EOF

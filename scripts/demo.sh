#!/usr/bin/env bash
# The demo (`make demo`): the whole pipeline on the embedded corpus, offline, on a CPU.
#
#   prepare   builtin:python-docs (CPython's own documentation) -> GPT-2 token shards
#   train     a small GPT-2 (configs/demo.yaml) with the real trainer, pretrain/train.py
#   evaluate  validation loss and bits per byte (HellaSwag when HELLASWAG=path/to/hellaswag_val.jsonl,
#             DCLM CORE when CORE=path/to/eval_bundle) via evals.run
#   export    the checkpoint to Hugging Face format with its model card, README.md (pretrain.export)
#   generate  load the export with transformers (offline) and continue a prompt
#   plot      loss / lr / tokens/s / HellaSwag curves (pretrain.plot), and the run report,
#             RUN/report.md (pretrain.report: environment, config, throughput, evaluations, plot, sample)
#
# Every run gets its own directory, DEMO_DIR/run-YYYYmmdd-HHMMSS, so a rerun never touches an
# earlier result; DEMO_DIR/latest points at the newest and DEMO_DIR/loss.png overlays all runs.
# The prepared shards (DEMO_DIR/data) are reused. An interrupted run resumes from its last
# checkpoint with DEMO_RUN=run-YYYYmmdd-HHMMSS make demo.
#
# Environment (all optional):
#   DEMO_DIR=demo               where data and runs go
#   DEMO_RUN=run-<timestamp>    the run's directory name under DEMO_DIR (reuse one to resume it)
#   DEMO_CONFIG=configs/demo.yaml
#   DEMO_STEPS=                 optimizer steps (default: schedule.max_steps of DEMO_CONFIG)
#   DEMO_VAL_TOKENS=65536       validation split size (the first tokens of the corpus)
#   DEMO_MAX_TOKENS=            prepare only this many tokens (default: the whole corpus)
#   DEMO_TRAIN_ARGS=            extra trainer overrides, e.g. "model.n_layer=2 optim.lr=1e-3"
#   DEMO_PROMPT="The Python interpreter"   DEMO_SAMPLE_TOKENS=60
#   HELLASWAG=                  a local HellaSwag jsonl: evaluated during training and at the end
#   DEMO_HELLASWAG_LIMIT=200    HellaSwag examples per evaluation (the full 10,042 take long on a CPU)
#   CORE=                       nanochat's eval_bundle directory: CORE during training and at the end
#   DEMO_CORE_LIMIT=20          items per CORE task (0 = all: CORE itself; the 22 tasks take long on a CPU)
set -euo pipefail
cd "$(dirname "$0")/.."

T_START=$SECONDS
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "demo: error: $PY not found; run 'make demo' (or 'bash scripts/setup.sh' first)" >&2
  exit 2
fi

DEMO_DIR=${DEMO_DIR:-demo}
DEMO_RUN=${DEMO_RUN:-run-$(date +%Y%m%d-%H%M%S)}
DEMO_CONFIG=${DEMO_CONFIG:-configs/demo.yaml}
DEMO_STEPS=${DEMO_STEPS:-}
DEMO_VAL_TOKENS=${DEMO_VAL_TOKENS:-65536}
DEMO_MAX_TOKENS=${DEMO_MAX_TOKENS:-}
DEMO_TRAIN_ARGS=${DEMO_TRAIN_ARGS:-}
DEMO_PROMPT=${DEMO_PROMPT:-The Python interpreter}
DEMO_SAMPLE_TOKENS=${DEMO_SAMPLE_TOKENS:-60}
DEMO_HELLASWAG_LIMIT=${DEMO_HELLASWAG_LIMIT:-200}
HELLASWAG=${HELLASWAG:-}
DEMO_CORE_LIMIT=${DEMO_CORE_LIMIT:-20}
CORE=${CORE:-}

DATA="$DEMO_DIR/data"
RUN="$DEMO_DIR/$DEMO_RUN"
EXPORT="$RUN/export"
PLOT="$RUN/loss.png"

# Offline: never wait on a network timeout; no wandb.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ ! -f "$DEMO_CONFIG" ]; then
  echo "demo: error: DEMO_CONFIG=$DEMO_CONFIG not found; leave it unset for configs/demo.yaml" >&2
  exit 2
fi
if [ -n "$HELLASWAG" ] && [ ! -f "$HELLASWAG" ]; then
  echo "demo: error: HELLASWAG=$HELLASWAG is not a file; pass the path of hellaswag_val.jsonl or unset it" >&2
  exit 2
fi
if [ -n "$CORE" ] && [ ! -f "$CORE/core.yaml" ]; then
  echo "demo: error: CORE=$CORE is not a CORE bundle (no core.yaml); pass nanochat's eval_bundle directory or unset it" >&2
  exit 2
fi
for v in DEMO_VAL_TOKENS DEMO_SAMPLE_TOKENS DEMO_HELLASWAG_LIMIT DEMO_CORE_LIMIT; do
  if ! [[ ${!v} =~ ^[0-9]+$ ]]; then
    echo "demo: error: $v=${!v} must be a whole number" >&2
    exit 2
  fi
done
for v in DEMO_STEPS DEMO_MAX_TOKENS; do
  if [ -n "${!v}" ] && ! [[ ${!v} =~ ^[1-9][0-9]*$ ]]; then
    echo "demo: error: $v=${!v} must be a positive whole number (or unset for the default)" >&2
    exit 2
  fi
done

# Trainer overrides: where the data and this run live, then the optional ones.
TRAIN_ARGS=("data.dir=$DATA" "train.run_dir=$RUN"
            "data.prepare_command=python -m data_pipeline.prepare builtin:python-docs $DATA --val-tokens $DEMO_VAL_TOKENS")
if [ -n "$DEMO_STEPS" ]; then
  # A shorter run keeps a warmup of a tenth of it (at most the config's 20 steps).
  WARMUP=$(( DEMO_STEPS / 10 )); [ "$WARMUP" -ge 1 ] || WARMUP=1; [ "$WARMUP" -le 20 ] || WARMUP=20
  TRAIN_ARGS+=("schedule.max_steps=$DEMO_STEPS" "schedule.warmup_steps=$WARMUP")
fi
if [ -n "$HELLASWAG" ]; then
  TRAIN_ARGS+=("eval.hellaswag=true" "eval.hellaswag_path=$HELLASWAG" "eval.hellaswag_limit=$DEMO_HELLASWAG_LIMIT")
fi
CORE_LIMIT=$([ "$DEMO_CORE_LIMIT" = 0 ] && echo null || echo "$DEMO_CORE_LIMIT")
if [ -n "$CORE" ]; then
  TRAIN_ARGS+=("eval.core=$CORE" "eval.core_limit=$CORE_LIMIT")
fi
# shellcheck disable=SC2206  # word splitting is the point: a list of key=value overrides
TRAIN_ARGS+=($DEMO_TRAIN_ARGS)

# What the trainer will actually run (also validates the config before any work).
read -r STEPS BATCH MODEL < <("$PY" pretrain/train.py --config "$DEMO_CONFIG" --print-config "${TRAIN_ARGS[@]}" |
  "$PY" -c 'import sys, yaml; c = yaml.safe_load(sys.stdin); m = c["model"]
print(c["schedule"]["max_steps"], c["train"]["global_batch_tokens"],
      "{n_layer}x{n_embd},ctx{block_size}".format(**m))' 2>/dev/null || echo "? ? ?")
if [ "$STEPS" = "?" ]; then
  exit 2  # the trainer has printed what is wrong with the config
fi

DEVICE=$("$PY" -c 'import torch; print(f"CUDA ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)")')
line() { printf '%*s\n' 72 '' | tr ' ' '='; }
stage() { echo; echo "[demo $1/6] $2   (+$(( SECONDS - T_START ))s)"; }

line
echo "gpt2-pretrain demo: prepare -> train -> evaluate -> export -> generate -> plot + report"
echo "  corpus   builtin:python-docs (CPython's documentation, ships with Python; PSF license)"
echo "  data     $DATA  (validation split: first $DEMO_VAL_TOKENS tokens)"
echo "  model    GPT-2 architecture, ${MODEL/,/ }, vocab 50257 ($DEMO_CONFIG)"
echo "  training $STEPS steps x $BATCH tokens = $(( STEPS * BATCH )) tokens on $DEVICE"
echo "  run      $RUN"
echo "  expected a few minutes on 2 CPU cores; Ctrl-C stops, DEMO_RUN=$DEMO_RUN make demo resumes"
line

trap 'echo; echo "demo: interrupted; resume this run with: DEMO_RUN=$DEMO_RUN make demo" >&2; exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
stage 1 "prepare: builtin:python-docs -> $DATA"
PREP=("$PY" -m data_pipeline.prepare builtin:python-docs "$DATA" --val-tokens "$DEMO_VAL_TOKENS"
      --shard-tokens 1000000 --workers 2 --no-progress)
[ -z "$DEMO_MAX_TOKENS" ] || PREP+=(--max-tokens "$DEMO_MAX_TOKENS")
"${PREP[@]}"

# ---------------------------------------------------------------------------------------------
stage 2 "train: pretrain/train.py --config $DEMO_CONFIG"
if [ -d "$RUN/checkpoints" ]; then
  echo "resuming $RUN from its newest checkpoint"
fi
"$PY" pretrain/train.py --config "$DEMO_CONFIG" "${TRAIN_ARGS[@]}"
ln -sfn "$DEMO_RUN" "$DEMO_DIR/latest"

CKPT=$("$PY" -c 'import sys; from pretrain.checkpoint import Checkpointer
p = Checkpointer(sys.argv[1], keep_last=1).latest(); print(p or "")' "$RUN/checkpoints")
if [ -z "$CKPT" ]; then
  echo "demo: error: training finished but $RUN/checkpoints holds no complete checkpoint" >&2
  exit 1
fi

# ---------------------------------------------------------------------------------------------
stage 3 "evaluate: evals.run on $CKPT"
EVAL=("$PY" -m evals.run --model "$CKPT" --val-data "$DATA" --val-tokens 0 --batch-size 16
      --out "$RUN/eval.json")
if [ -n "$HELLASWAG" ]; then
  EVAL+=(--hellaswag "$HELLASWAG" --limit "$DEMO_HELLASWAG_LIMIT")
else
  EVAL+=(--no-hellaswag)
  echo "HellaSwag: skipped (offline, no data); to include it, download hellaswag_val.jsonl from" \
       "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl and run" \
       "HELLASWAG=/path/to/hellaswag_val.jsonl make demo"
fi
if [ -n "$CORE" ]; then
  EVAL+=(--core "$CORE")
  [ "$DEMO_CORE_LIMIT" = 0 ] || EVAL+=(--core-limit "$DEMO_CORE_LIMIT")
fi
"${EVAL[@]}"

# ---------------------------------------------------------------------------------------------
stage 4 "export: Hugging Face format and model card -> $EXPORT"
"$PY" -m pretrain.export export --checkpoint "$CKPT" --out "$EXPORT" --overwrite

# ---------------------------------------------------------------------------------------------
stage 5 "generate: transformers AutoModelForCausalLM from $EXPORT"
"$PY" - "$EXPORT" "$DEMO_PROMPT" "$DEMO_SAMPLE_TOKENS" "$RUN/sample.txt" <<'PYEOF'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
export, prompt, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(export, local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True).eval()
ids = tok(prompt, return_tensors="pt").input_ids
torch.manual_seed(1337)
with torch.no_grad():
    new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=True,
                         top_k=40, temperature=0.8, pad_token_id=tok.eos_token_id)
text = tok.decode(new[0], skip_special_tokens=True)
with open(out, "w", encoding="utf-8") as f:
    f.write(text + "\n")
print(f"{type(model).__name__} ({model.num_parameters() / 1e6:.1f}M parameters) continues {prompt!r}:")
print("-" * 72)
print(text)
print("-" * 72)
PYEOF

# ---------------------------------------------------------------------------------------------
stage 6 "plot and report: $PLOT, $RUN/report.md"
"$PY" -m pretrain.plot "$RUN" --out "$PLOT"
mapfile -t ALL_RUNS < <(ls -d "$DEMO_DIR"/run-*/ 2>/dev/null | while read -r d; do
  [ -f "$d/metrics.jsonl" ] && echo "${d%/}"; done)
if [ "${#ALL_RUNS[@]}" -gt 1 ]; then
  "$PY" -m pretrain.plot "${ALL_RUNS[@]}" --out "$DEMO_DIR/loss.png"
else
  cp "$PLOT" "$DEMO_DIR/loss.png"
fi
# The trainer wrote report.md when training finished; again now, with eval.json and sample.txt.
"$PY" -m pretrain.report "$RUN"

# ---------------------------------------------------------------------------------------------
trap - INT TERM
SUMMARY=$("$PY" - "$RUN" <<'PYEOF'
import json
import math
import sys
from pathlib import Path

run = Path(sys.argv[1])
results = json.loads((run / "eval.json").read_text())["results"]
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
first = next(r for r in records if r.get("loss") is not None)
last = records[-1]
print(f"  final val loss  {results['val/loss']:.4f}  (uniform guess ln 50257 = {math.log(50257):.2f}; train loss"
      f" {first['loss']:.2f} at step {first['step']} -> {last['loss']:.2f} at step {last['step']})")
print(f"  val bits/byte   {results['val/bpb']:.4f}  (nats / ln 2 / UTF-8 bytes: comparable across tokenizers)")
print(f"  trained         {last['step']} steps, {last['tokens_seen']:,} tokens")
if "hellaswag/acc_norm" in results:
    print(f"  HellaSwag       acc_norm {results['hellaswag/acc_norm']:.4f} (chance 0.25)")
if "core/CORE" in results:
    print(f"  CORE            {results['core/CORE']:.4f}  (OpenAI GPT-2 124M 0.1139; chance 0)")
elif "core/mean_centered" in results:
    print(f"  CORE (partial)  {results['core/mean_centered']:.4f}  mean centred accuracy over the first items of each "
          "task, not CORE (DEMO_CORE_LIMIT=0 scores them all)")
PYEOF
)
ELAPSED=$(( SECONDS - T_START ))
echo
line
echo "demo done in $(( ELAPSED / 60 ))m$(printf %02d $(( ELAPSED % 60 )))s"
echo "$SUMMARY"
echo "  checkpoint      $CKPT"
echo "  HF export       $EXPORT   (AutoModelForCausalLM.from_pretrained(\"$EXPORT\"))"
echo "  model card      $EXPORT/README.md   (huggingface_hub.ModelCard.load; push: gpt2-export ... --push-to-hub OWNER/NAME)"
echo "  run report      $RUN/report.md"
echo "  metrics         $RUN/metrics.jsonl, $RUN/eval.json"
echo "  plot            $PLOT   (all demo runs overlaid: $DEMO_DIR/loss.png)"
echo "  sample          $(head -c 400 "$RUN/sample.txt" | tr -s '[:space:]' ' ')"
line

#!/usr/bin/env bash
# One machine, N processes (GPUs, or CPU processes on gloo), through torchrun --standalone.
#
#   launch/local.sh [--dry-run] [--nproc N] CONFIG [train.py args: --resume auto|none|PATH, section.key=value ...]
#
#   launch/local.sh configs/smoke_cpu.yaml                      # all GPUs here (or 1 CPU process)
#   launch/local.sh --nproc 2 configs/smoke_cpu.yaml train.run_dir=runs/smoke2 schedule.max_steps=50
#   launch/local.sh --dry-run configs/gpt2_124m.yaml optim.lr=1e-3   # print the command, run nothing
#
# Processes: --nproc, else $NPROC_PER_NODE, else the GPUs visible here (CUDA_VISIBLE_DEVICES or
# nvidia-smi), else 1. Preemption: SIGUSR1 or SIGTERM sent to this script's pid is passed to
# torchrun once, torchrun passes it to every rank, each rank finishes its step, they checkpoint
# the same step, and this script exits 75 (EX_TEMPFAIL): run the same command again and the
# trainer resumes from that checkpoint (--resume auto is the trainer's default). Ctrl-C reaches
# torchrun from the terminal directly (it is not forwarded a second time).
# Other knobs (VENV, PYTHON, TORCHRUN, OMP_NUM_THREADS, SHUTDOWN_TIMEOUT, ...): launch/common.sh.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=${REPO_DIR:-$(dirname "$LAUNCH_DIR")}
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

launch_usage() {
    echo "usage: launch/local.sh [--dry-run] [--nproc N] CONFIG [train.py args: --resume auto|none|PATH, section.key=value ...]"
}

parse_launch_args "$@"
enter_repo
setup_python

gpus=$(count_gpus)
nproc=${NPROC_ARG:-${NPROC_PER_NODE:-}}
if [[ -z "$nproc" ]]; then
    nproc=$gpus
    ((nproc >= 1)) || nproc=1
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || launch_die "NPROC_PER_NODE must be a positive integer, got '$nproc'"
set_runtime_env "$nproc" "$gpus"
torchrun_tail

cmd=("${TORCHRUN_CMD[@]}" --standalone --nnodes=1 --nproc-per-node="$nproc" "${TORCHRUN_TAIL[@]}")

if ((DRY_RUN)); then
    format_cmd "${cmd[@]}"
    exit 0
fi

launch_log "host $(hostname), $nproc process(es), OMP_NUM_THREADS=$OMP_NUM_THREADS, config $CONFIG"
set +e
run_forwarding "USR1 TERM" "INT" "${cmd[@]}"
set -e
if [[ -n "$SIGNALLED" && "$SIGNALLED" != INT ]] && ((STEP_RC != 0)); then
    # torchrun itself exits 1 after a forwarded signal (it does not pass the ranks' 75 on).
    launch_log "stopped by SIG$SIGNALLED: exiting $EX_TEMPFAIL; the same command resumes from the last checkpoint"
    exit "$EX_TEMPFAIL"
fi
exit "$STEP_RC"

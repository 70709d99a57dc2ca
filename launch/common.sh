# shellcheck shell=bash
# Shared by launch/local.sh and launch/slurm/*.sbatch (sourced, never run). It defines
# functions only; every launcher calls them in the same order:
#
#   parse_launch_args "$@"   [--dry-run] [--nproc N] CONFIG [train.py args ...]
#   enter_repo               cd to the repository root, check CONFIG exists
#   setup_python             venv, $PYTHON, the torchrun command (TORCHRUN_CMD)
#   set_runtime_env NPROC GPUS PYTHONFAULTHANDLER, OMP_NUM_THREADS, NCCL error handling, ...
#   run_forwarding ...       run a command in the background, forward signals, wait for it
#
# Environment knobs (all optional; see launch/README.md):
#   DRY_RUN=1          print the exact command instead of running it (same as --dry-run)
#   REPO_DIR           repository root (default: the directory above launch/, or for sbatch
#                      the submit directory)
#   VENV               virtualenv to activate (default: REPO_DIR/.venv when it exists)
#   PYTHON             python interpreter (default: `python3` on PATH after activation)
#   TORCHRUN           torchrun command line (default: "$PYTHON launch/torchrun.py", torchrun with one
#                      line instead of a traceback when a signal stops it)
#   TRAIN_SCRIPT       the torchrun target (default: pretrain/train.py)
#   NPROC_PER_NODE     processes per node (default: GPUs on the node, else 1)
#   SHUTDOWN_TIMEOUT   seconds torchrun gives workers to checkpoint after a forwarded signal
#                      before SIGKILL (exported as TORCH_ELASTIC_SHUTDOWN_TIMEOUT; default 100,
#                      inside SLURM's 120 s --signal lead time)
#   MAX_RESTARTS       torchrun --max-restarts (default 0: a failed job fails; requeue resumes)

# The signals torchrun handles and forwards to its workers. SIGUSR1 is not in torchrun's
# default list: without it SIGUSR1 kills torchrun outright and orphans the workers.
TORCHRUN_SIGNALS="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# The trainer's exit code after a preemption checkpoint (docs/DESIGN.md).
EX_TEMPFAIL=75

launch_log() {
    printf '[launch %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2
}

launch_die() {
    printf 'launch: error: %s\n' "$*" >&2
    exit 2
}

# A command as one line a shell can run again (a word is single-quoted when it needs it).
format_cmd() {
    local out="" word q="'"
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
            out+="$word "
        else
            out+="$q${word//$q/$q\\$q$q}$q "
        fi
    done
    printf '%s\n' "${out% }"
}

is_true() {
    case "${1:-}" in 1 | true | yes | on | TRUE | True | YES) return 0 ;; *) return 1 ;; esac
}

# Sets DRY_RUN (0/1), NPROC_ARG (may be empty), CONFIG, TRAIN_ARGS (array).
parse_launch_args() {
    if is_true "${DRY_RUN:-}"; then DRY_RUN=1; else DRY_RUN=0; fi
    NPROC_ARG=""
    while (($# > 0)); do
        case "$1" in
            --dry-run) DRY_RUN=1; shift ;;
            --nproc | --nproc-per-node | --nproc_per_node)
                (($# >= 2)) || launch_die "$1 needs a value, e.g. $1 8"
                NPROC_ARG=$2; shift 2 ;;
            --nproc=* | --nproc-per-node=* | --nproc_per_node=*) NPROC_ARG=${1#*=}; shift ;;
            -h | --help) launch_usage; exit 0 ;;
            --) shift; break ;;
            -*) launch_die "unknown launcher option '$1' (launcher options: --dry-run, --nproc N; train.py options go after the config)" ;;
            *) break ;;
        esac
    done
    (($# >= 1)) || { launch_usage >&2; launch_die "missing the config, e.g. configs/gpt2_124m.yaml"; }
    CONFIG=$1
    shift
    TRAIN_ARGS=("$@")
    if [[ -n "$NPROC_ARG" && ! "$NPROC_ARG" =~ ^[1-9][0-9]*$ ]]; then
        launch_die "--nproc must be a positive integer, got '$NPROC_ARG'"
    fi
}

enter_repo() {
    [[ -f "$REPO_DIR/pretrain/train.py" || -n "${TRAIN_SCRIPT:-}" ]] \
        || launch_die "REPO_DIR=$REPO_DIR is not the gpt2-pretrain checkout (no pretrain/train.py); submit from the repository root or set REPO_DIR"
    cd "$REPO_DIR" || launch_die "cannot cd to REPO_DIR=$REPO_DIR"
    [[ -f "$CONFIG" ]] || launch_die "config '$CONFIG' not found (relative to $REPO_DIR); pass e.g. configs/gpt2_124m.yaml"
    TRAIN_SCRIPT=${TRAIN_SCRIPT:-pretrain/train.py}
}

setup_python() {
    if [[ -n "${VENV:-}" ]]; then
        [[ -f "$VENV/bin/activate" ]] || launch_die "VENV=$VENV has no bin/activate; point VENV at a virtualenv (python -m venv) or unset it"
    elif [[ -f "$REPO_DIR/.venv/bin/activate" ]]; then
        VENV="$REPO_DIR/.venv"
    fi
    if [[ -n "${VENV:-}" ]]; then
        # shellcheck source=/dev/null
        source "$VENV/bin/activate"
    fi
    if [[ -z "${PYTHON:-}" ]]; then
        PYTHON=$(command -v python3 || command -v python) \
            || launch_die "no python on PATH; set VENV (or PYTHON) to the environment made by scripts/setup.sh"
    fi
    # TORCHRUN may hold several words ("python -m torch.distributed.run"); split on blanks.
    read -r -a TORCHRUN_CMD <<<"${TORCHRUN:-$PYTHON launch/torchrun.py}"
}

# GPUs visible on this machine: CUDA_VISIBLE_DEVICES, else nvidia-smi, else 0.
count_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        local -a ids
        IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# Exports the runtime defaults every launcher wants; an already-set variable wins.
set_runtime_env() {
    local nproc=$1 gpus=$2 cpus threads
    # Python tracebacks of every thread on a fatal signal (a hung or crashed rank says where).
    export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}
    # A failed or timed-out NCCL collective aborts the process instead of hanging the job.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # How long torchrun lets workers finish the step and checkpoint after a forwarded signal.
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-${SHUTDOWN_TIMEOUT:-100}}
    # Workers restarted by torchrun (--max-restarts) must not reuse the agent's shared TCP
    # store: they would read the crashed attempt's peer addresses and hang in init
    # (pytorch/pytorch#135712).
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
    # CPU threads per rank. GPU ranks: the node's (or the SLURM task's) cores split between them.
    # CPU ranks compute on those threads, and the thread count changes the sums' order: one thread
    # each, so that every layout (2 nodes x 1, 1 node x 2, ...) trains to the same losses.
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        threads=1
        if ((gpus > 0)); then
            cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc 2>/dev/null || echo 1)}}
            threads=$((cpus / nproc))
            ((threads >= 1)) || threads=1
        fi
        export OMP_NUM_THREADS=$threads
    fi
}

# The torchrun options and target shared by all launchers (after the rendezvous options).
torchrun_tail() {
    TORCHRUN_TAIL=(
        --signals-to-handle="$TORCHRUN_SIGNALS"
        --max-restarts="${MAX_RESTARTS:-0}"
        "$TRAIN_SCRIPT" --config "$CONFIG" "${TRAIN_ARGS[@]}"
    )
}

# run_forwarding FORWARD_SIGNALS QUIET_SIGNALS CMD...
# Runs CMD in the background and waits for it, so that this shell's traps run while it waits.
# Each signal in FORWARD_SIGNALS (space-separated names) is passed on to CMD's pid once; each in
# QUIET_SIGNALS is only noted (the sender already signals CMD itself, e.g. SLURM's SIGTERM
# or a terminal's Ctrl-C: forwarding it again would reach torchrun twice, and a second signal
# aborts torchrun's graceful shutdown of its workers).
# Afterwards: STEP_RC = CMD's exit status, SIGNALLED = the name of the first signal received
# (empty if none).
run_forwarding() {
    local forward=$1 quiet=$2 sig status had_status=0
    shift 2
    SIGNALLED=""
    STEP_PID=""
    _LAUNCH_TRAPPED=0
    for sig in $forward; do
        # shellcheck disable=SC2064  # expand $sig now: one trap per signal
        trap "_launch_on_signal $sig forward" "$sig"
    done
    for sig in $quiet; do
        # shellcheck disable=SC2064
        trap "_launch_on_signal $sig quiet" "$sig"
    done
    "$@" &
    STEP_PID=$!
    launch_log "started pid $STEP_PID: $(format_cmd "$@")"
    if [[ -n "$_LAUNCH_PENDING" ]]; then
        # A signal came before the command existed: pass it on now.
        kill -s "$_LAUNCH_PENDING" "$STEP_PID" 2>/dev/null || true
    fi
    STEP_RC=0
    while true; do
        _LAUNCH_TRAPPED=0
        wait "$STEP_PID"
        status=$?
        # 127: already reaped and reported by an earlier (interrupted) wait.
        if ((status == 127 && had_status)); then break; fi
        STEP_RC=$status
        had_status=1
        # `wait` returns early (>128) when a trapped signal arrives; wait again for the real exit.
        ((_LAUNCH_TRAPPED)) || break
    done
    for sig in $forward $quiet; do trap - "$sig"; done
    launch_log "pid $STEP_PID exited with status $STEP_RC${SIGNALLED:+ (after $SIGNALLED)}"
}

_LAUNCH_PENDING=""
_launch_on_signal() {
    local sig=$1 mode=$2
    _LAUNCH_TRAPPED=1
    [[ -n "$SIGNALLED" ]] || SIGNALLED=$sig
    if [[ "$mode" == forward ]]; then
        if [[ -n "${STEP_PID:-}" ]]; then
            launch_log "got SIG$sig: forwarding it to pid $STEP_PID"
            kill -s "$sig" "$STEP_PID" 2>/dev/null || true
        else
            _LAUNCH_PENDING=$sig
        fi
    else
        launch_log "got SIG$sig (already delivered to the workers by its sender; not forwarded)"
    fi
}

# ---------------------------------------------------------------------------------------------
# SLURM (launch/slurm/*.sbatch): one srun task per node, each running torchrun; the torchruns
# meet in a c10d rendezvous on the first node of the allocation.
# Extra knobs: RDZV_HOST (the head's address; default: its IP via `srun hostname --ip-address`),
# RDZV_PORT (default 20000 + job id % 20000), NPROC_PER_NODE (default SLURM_GPUS_ON_NODE).
# ---------------------------------------------------------------------------------------------

# Drops --resume/checkpoint.resume (and checkpoint.overwrite, which only goes with a fresh start)
# from TRAIN_ARGS and appends `--resume auto`: a requeued job must continue from its newest
# checkpoint, not from the path (or `none`) it was first given, and never move its own run aside.
force_resume_auto() {
    local -a kept=()
    local skip=0 a
    for a in "${TRAIN_ARGS[@]}"; do
        if ((skip)); then skip=0; continue; fi
        case "$a" in
            --resume) skip=1 ;;
            --resume=* | checkpoint.resume=* | checkpoint.overwrite=*) ;;
            *) kept+=("$a") ;;
        esac
    done
    TRAIN_ARGS=("${kept[@]}" --resume auto)
}

slurm_main() {
    local early_signal=""
    # Until the training step runs, a preemption signal only needs noting.
    trap 'early_signal=USR1' USR1
    parse_launch_args "$@"
    enter_repo
    setup_python

    local in_slurm=0
    [[ -n "${SLURM_JOB_ID:-}" ]] && in_slurm=1
    if ((!in_slurm && !DRY_RUN)); then
        launch_die "not inside a SLURM job: submit with sbatch $0 CONFIG ... (locally: launch/local.sh; --dry-run prints the command)"
    fi
    local job_id=${SLURM_JOB_ID:-0} nnodes=${SLURM_NNODES:-1} restarts=${SLURM_RESTART_COUNT:-0}

    local gpus=${SLURM_GPUS_ON_NODE:-}
    [[ -n "$gpus" ]] || gpus=$(count_gpus)
    local nproc=${NPROC_ARG:-${NPROC_PER_NODE:-}}
    if [[ -z "$nproc" ]]; then
        nproc=$gpus
        if ((nproc < 1)); then
            launch_log "no GPUs in this allocation (SLURM_GPUS_ON_NODE unset, no nvidia-smi): 1 CPU process per node; on a GPU cluster submit with --gpus-per-node=N, or set NPROC_PER_NODE"
            nproc=1
        fi
    fi
    [[ "$nproc" =~ ^[1-9][0-9]*$ ]] || launch_die "processes per node must be a positive integer, got '$nproc' (NPROC_PER_NODE / --nproc)"
    set_runtime_env "$nproc" "$gpus"
    # Slurm >= 22.05: srun no longer inherits --cpus-per-task from sbatch; without this the
    # one task per node (torchrun and all its ranks) would be pinned to a single core. Without
    # --cpus-per-task (the scripts ask for --exclusive), the task gets the node's CPUs.
    local task_cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
    if [[ -n "$task_cpus" ]]; then export SRUN_CPUS_PER_TASK=$task_cpus; fi

    # The rendezvous host: the first node of the allocation, by address (its hostname may not
    # resolve the same way from every node).
    local head addr port
    if ((in_slurm)); then
        # (awk reads to the end: `head -n1` could SIGPIPE scontrol, which pipefail makes fatal)
        head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
        [[ -n "$head" ]] || launch_die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no node"
    else
        head=$(hostname)
    fi
    if [[ -n "${RDZV_HOST:-}" ]]; then
        addr=$RDZV_HOST
    elif ((DRY_RUN)); then
        addr=$head  # a dry run starts no job step, so it does not look the address up
    else
        addr=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk 'NR == 1 {print $1}')
        [[ -n "$addr" ]] || launch_die "could not get the IP address of $head (srun hostname --ip-address); set RDZV_HOST"
        if [[ "$addr" == 127.* ]] && ((nnodes > 1)); then
            # e.g. Debian's "127.0.1.1 <hostname>" line in /etc/hosts: the other nodes would
            # wait for a rendezvous on themselves until the join timeout.
            launch_log "warning: $head resolves to the loopback address $addr, which other nodes cannot reach; set RDZV_HOST to its cluster address (e.g. of ib0) unless all nodes are this machine"
        fi
    fi
    if [[ -n "${RDZV_PORT:-}" ]]; then
        port=$RDZV_PORT
    elif [[ "$job_id" =~ ^[0-9]+$ ]]; then
        port=$((20000 + job_id % 20000))  # distinct for jobs that share a head node
    else
        port=29500
    fi

    if ((restarts > 0)); then force_resume_auto; fi
    torchrun_tail
    local -a cmd=(
        srun --nodes="$nnodes" --ntasks-per-node=1
        # A node whose torchrun exits first (e.g. after a preemption checkpoint) must not kill
        # the others while they still write theirs; a crash elsewhere still ends the job via
        # the collective timeout (distributed.timeout_s) and TORCH_NCCL_ASYNC_ERROR_HANDLING.
        --kill-on-bad-exit=0
        "${TORCHRUN_CMD[@]}"
        --nnodes="$nnodes" --nproc-per-node="$nproc"
        --rdzv-backend=c10d --rdzv-endpoint="$addr:$port" --rdzv-id="$job_id"
        "${TORCHRUN_TAIL[@]}"
    )
    if ((DRY_RUN)); then
        format_cmd "${cmd[@]}"
        exit 0
    fi

    launch_log "job $job_id (${SLURM_JOB_NAME:-?}) restart $restarts: $nnodes node(s) x $nproc process(es), rendezvous $addr:$port ($head), OMP_NUM_THREADS=$OMP_NUM_THREADS"
    if [[ -n "$early_signal" ]]; then
        launch_log "got SIG$early_signal before the training step started: requeueing without running it"
        STEP_RC=$EX_TEMPFAIL
        SIGNALLED=$early_signal
    else
        # SIGUSR1 (sbatch --signal=B:USR1@120) reaches only this batch shell: pass it to srun,
        # which passes it to each node's torchrun, which passes it to its ranks. SIGTERM
        # (scancel, preemption, time limit) is sent by SLURM to every process of the job
        # already, so it is only noted here.
        set +e
        run_forwarding "USR1" "TERM" "${cmd[@]}"
        set -e
    fi
    trap - USR1
    # launch/torchrun.py exits 128 + the signal that stopped it (the ranks' 75 does not pass
    # through torchrun). SIGUSR1 to this shell (--signal=B:USR1@T), or SIGUSR1/SIGTERM sent to the
    # job's steps only (--signal=TERM@T, scancel --signal without --batch; this shell got nothing):
    # the ranks checkpointed for a time limit -> requeue. A SIGTERM this shell got too (scancel,
    # a preemption SLURM requeues itself) is not requeued here.
    local step_sig=""
    if [[ -z "$SIGNALLED" ]] && ((STEP_RC == 128 + 10 || STEP_RC == 128 + 15)); then
        step_sig=$(kill -l "$((STEP_RC - 128))")
        launch_log "the job's steps were sent SIG$step_sig (not this shell): a time-limit signal"
    fi
    if { [[ "$SIGNALLED" == USR1 ]] && ((STEP_RC != 0)); } || [[ -n "$step_sig" ]]; then
        launch_log "preempted: requeueing job $job_id; the requeued job resumes from the newest checkpoint"
        scontrol requeue "$job_id" || launch_log "scontrol requeue $job_id failed: resubmit the same sbatch command to resume"
        exit "$EX_TEMPFAIL"
    fi
    exit "$STEP_RC"
}

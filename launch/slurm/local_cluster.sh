#!/usr/bin/env bash
# A real SLURM cluster of two compute nodes on this one machine, to try the launchers locally
# (and what tests/cluster runs them on). Needs root, Linux network namespaces and Debian's
# packages: apt-get install -y slurm-wlm munge iproute2.
#
#   sudo bash launch/slurm/local_cluster.sh up      # starts munged, slurmctld, slurmd x 2; prints the env line
#   export SLURM_CONF=/tmp/gpt2-slurm/slurm.conf      # then, from the repository root, exactly as documented:
#   sbatch --nodes=2 launch/slurm/train_multinode.sbatch configs/smoke_cpu.yaml
#   sudo bash launch/slurm/local_cluster.sh down    # stops every daemon it started, removes it all
#
# Layout (CLUSTER_DIR, default /tmp/gpt2-slurm; CLUSTER_NET, default 10.77.0): a bridge gpt2br0
# with $NET.1 in this (root) namespace, where sbatch/srun/scontrol run; one network namespace per
# host: gpt2-ctl ($NET.10, slurmctld), gpt2-n1 and gpt2-n2 ($NET.11, $NET.12, one slurmd each,
# started under its own hostname in its own UTS namespace). The namespaces have no default route:
# nothing in them reaches any address but the bridge's. The names go into /etc/hosts between two
# marker lines (removed by `down`); one munged in the root namespace serves every node (its
# socket is a file, and all namespaces share the filesystem). `down` kills only the processes
# it started (its PID files) and the processes inside its namespaces (the jobs' slurmstepd and
# tasks), then deletes the namespaces, the bridge, the state and the /etc/hosts lines.
set -euo pipefail

DIR=${CLUSTER_DIR:-/tmp/gpt2-slurm}
NET=${CLUSTER_NET:-10.77.0}
BRIDGE=gpt2br0
NODES=(gpt2-n1 gpt2-n2)
CTL=gpt2-ctl
MARK="# gpt2-pretrain local_cluster.sh"

die() { echo "local_cluster: error: $*" >&2; exit 2; }
log() { echo "local_cluster: $*" >&2; }

addr_of() {  # host name -> its address on the bridge
    case "$1" in
        "$CTL") echo "$NET.10" ;;
        gpt2-n1) echo "$NET.11" ;;
        gpt2-n2) echo "$NET.12" ;;
    esac
}

check() {
    ((EUID == 0)) || die "needs root (network namespaces, /etc/hosts, slurmd as root)"
    local b
    for b in ip nsenter unshare munged slurmctld slurmd sbatch; do
        command -v "$b" >/dev/null || die "$b not found: apt-get install -y slurm-wlm munge iproute2 util-linux"
    done
}

write_conf() {
    local cpus=$1 mem=$2 n
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/run"
    for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done
    cat >"$DIR/slurm.conf" <<EOF
# Written by launch/slurm/local_cluster.sh: two compute nodes in network namespaces of one machine.
ClusterName=gpt2local
SlurmctldHost=$CTL($(addr_of "$CTL"))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: also how long a requeued job waits before it may start again (120 s by default).
AuthInfo=socket=$DIR/run/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
# A lost node is noticed in ~10 s instead of 300 s; a cancelled job's processes get 5 s after SIGTERM.
SlurmdTimeout=10
SlurmctldTimeout=10
KillWait=5
MinJobAge=300
SchedulerParameters=sched_interval=2
NodeName=${NODES[0]} NodeAddr=$(addr_of "${NODES[0]}") CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=$(addr_of "${NODES[1]}") CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

# start NAME NETNS|- CMD...: runs CMD detached (its own session), PID into $DIR/run/NAME.pid.
start() {
    local name=$1 ns=$2
    shift 2
    if [[ "$ns" == - ]]; then
        setsid "$@" >>"$DIR/log/$name.out" 2>&1 </dev/null &
    else
        # Not `ip netns exec` (it remounts /sys, and slurmd 22.05 then cannot start): enter the
        # network namespace only, with a UTS namespace of its own for the node's hostname.
        setsid nsenter --net="/run/netns/$ns" unshare --uts \
            sh -c "hostname $ns && exec \"\$@\"" sh "$@" >>"$DIR/log/$name.out" 2>&1 </dev/null &
    fi
    echo $! >"$DIR/run/$name.pid"
}

up() {
    check
    [[ ! -e /run/netns/$CTL ]] || die "a cluster is already up (/run/netns/$CTL); run: $0 down"
    local cpus mem n i=0
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 / 4)}' /proc/meminfo)
    rm -rf "$DIR"
    write_conf "$cpus" "$mem"

    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for n in "$CTL" "${NODES[@]}"; do
        i=$((i + 1))
        ip netns add "$n"
        ip link add "gpt2v$i" type veth peer name eth0 netns "$n"
        ip link set "gpt2v$i" master "$BRIDGE" up
        ip -n "$n" addr add "$(addr_of "$n")/24" dev eth0
        ip -n "$n" link set eth0 up
        ip -n "$n" link set lo up
    done
    cp /etc/hosts "$DIR/hosts.orig"
    {
        echo "$MARK begin"
        for n in "$CTL" "${NODES[@]}"; do echo "$(addr_of "$n") $n"; done
        echo "$MARK end"
    } >>/etc/hosts

    mkdir -p /run/munge
    chown munge:munge /run/munge 2>/dev/null || true
    start munged - munged --foreground --force --num-threads=4 \
        --socket="$DIR/run/munge.socket" --pid-file="$DIR/run/munged.self.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/run/munge.seed"
    export SLURM_CONF=$DIR/slurm.conf
    for i in $(seq 50); do [[ -S "$DIR/run/munge.socket" ]] && break; sleep 0.1; done
    start slurmctld "$CTL" slurmctld -D -i -f "$SLURM_CONF"
    for n in "${NODES[@]}"; do start "slurmd-$n" "$n" slurmd -D -N "$n" -f "$SLURM_CONF"; done
    for i in $(seq 100); do
        if [[ $(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l) == "${#NODES[@]}" ]]; then
            log "up: nodes ${NODES[*]} idle; export SLURM_CONF=$SLURM_CONF"
            echo "export SLURM_CONF=$SLURM_CONF"
            return 0
        fi
        sleep 0.2
    done
    sinfo -N >&2 || true
    tail -n 20 "$DIR"/log/*.log >&2 || true
    die "the nodes did not become idle within 20 s (logs in $DIR/log)"
}

# Kills a process we started if it is still the one we started (its command line names $2).
kill_pidfile() {
    local f=$1 want=$2 pid
    [[ -f "$f" ]] || return 0
    pid=$(<"$f")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$want"; then
        kill -TERM "$pid" 2>/dev/null || true
        echo "$pid"
    fi
}

down() {
    ((EUID == 0)) || die "needs root"
    local n pids=() p i
    for n in "${NODES[@]}"; do
        p=$(kill_pidfile "$DIR/run/slurmd-$n.pid" slurmd) && [[ -n "$p" ]] && pids+=("$p")
    done
    p=$(kill_pidfile "$DIR/run/slurmctld.pid" slurmctld) && [[ -n "$p" ]] && pids+=("$p")
    # Whatever still runs inside our namespaces (slurmstepd, the jobs' tasks) is ours.
    for n in "$CTL" "${NODES[@]}"; do
        if [[ -e /run/netns/$n ]]; then
            for p in $(ip netns pids "$n" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
        fi
    done
    for i in $(seq 50); do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    p=$(kill_pidfile "$DIR/run/munged.pid" munged) || true
    for n in "$CTL" "${NODES[@]}"; do
        if [[ -e /run/netns/$n ]]; then
            for p in $(ip netns pids "$n" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
            ip netns del "$n" 2>/dev/null || true
        fi
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    if grep -q "^$MARK" /etc/hosts; then
        # In place (not a rename: /etc/hosts may be a bind mount); only our marked block goes.
        local kept
        kept=$(sed "/^$MARK begin/,/^$MARK end/d" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
    rm -rf "$DIR"
    log "down: daemons stopped, namespaces, bridge and /etc/hosts lines removed"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down   (CLUSTER_DIR=$DIR, CLUSTER_NET=$NET)" >&2; exit 2 ;;
esac

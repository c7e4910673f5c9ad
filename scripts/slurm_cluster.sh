#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on this machine, for tests/test_slurm.py and for trying the profile:
#   scripts/slurm_cluster.sh start [--cpus N] [--partition NAME]    write slurm.conf, start munged, slurmctld, slurmd
#   scripts/slurm_cluster.sh status                                 the node and the queue
#   scripts/slurm_cluster.sh stop                                   stop the daemons, remove slurm.conf
# Needs root and the packages of scripts/install_slurm.sh. No accounting database (no slurmdbd): sacct has
# nothing to answer from, so the profile's `slurm-status-command: squeue` is what makes it work.
#
# Settings that make SLURM 22.05 start in a container in about a second: no cgroups (proctrack/linuxproc,
# task/none), consumable cores (select/cons_tres, CR_Core: memory is checked against the node, not
# consumed), the node's size taken from the config and not probed (config_overrides), so that --cpus may
# exceed the real cores when jobs spend their time waiting rather than computing.
# slurm.conf goes to /etc/slurm/slurm.conf because the executor plugin's job steps drop SLURM_CONF; a file
# there that this script did not write (a real cluster's) is never overwritten or removed.
#
# Environment: EFFIVLM_SLURM_DIR   state, spool, logs and pid files (default /var/tmp/effivlm-slurm);
#              the log of the controller is $EFFIVLM_SLURM_DIR/slurmctld.log.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by effivlm scripts/slurm_cluster.sh"
DIR="${EFFIVLM_SLURM_DIR:-/var/tmp/effivlm-slurm}"
MUNGE_RUN=/run/munge

die() {
    echo "slurm_cluster: $*" >&2
    exit 1
}

ours() { [[ -f "$CONF" ]] && grep -qxF "$MARK" "$CONF"; }

write_conf() {
    local cpus="$1" partition="$2" host memory
    host="$(hostname -s)"
    memory="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
    mkdir -p "$(dirname "$CONF")" "$DIR/state" "$DIR/spool"
    cat >"$CONF.tmp" <<EOF
$MARK
ClusterName=effivlm
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
# finished jobs stay visible to squeue for 5 minutes: the executor's status checks read them there
MinJobAge=300
ReturnToService=2
KillWait=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=$partition Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    if [[ -S "$MUNGE_RUN/munge.socket.2" ]] && munge -n </dev/null >/dev/null 2>&1; then
        return 0 # already running (ours or the system's): keep it
    fi
    mkdir -p "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chown munge:munge "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chmod 0755 "$MUNGE_RUN"
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile /etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/munged.ours"
}

wait_for() {
    local what="$1" seconds="$2"
    shift 2
    for _ in $(seq $((seconds * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$what did not come up within ${seconds} s (logs: $DIR/*.log)"
}

node_idle() { [[ "$(sinfo -h -N -o %t 2>/dev/null)" == idle ]]; }

start() {
    local cpus partition
    cpus="$(nproc)"
    partition=local
    while (($#)); do
        case "$1" in
            --cpus) cpus="$2"; shift 2 ;;
            --partition) partition="$2"; shift 2 ;;
            *) die "unknown option $1 (start [--cpus N] [--partition NAME])" ;;
        esac
    done
    [[ "$(id -u)" == 0 ]] || die "needs root"
    command -v slurmctld >/dev/null || die "SLURM is not installed (run scripts/install_slurm.sh)"
    if [[ -f "$CONF" ]] && ! ours; then
        die "$CONF exists and was not written by this script; not touching a real cluster's config"
    fi
    if running; then
        stop
    fi
    if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
        die "slurmctld or slurmd is already running (another cluster, or one started with another EFFIVLM_SLURM_DIR)"
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR"
    write_conf "$cpus" "$partition"
    start_munge
    slurmctld -i -c # -c: a cold start, no jobs or node states from an earlier cluster
    wait_for slurmctld 20 scontrol ping
    slurmd
    wait_for "the node" 20 node_idle
    echo "slurm_cluster: up: node $(hostname -s), $cpus CPUs, partition $partition; logs in $DIR"
}

running() { [[ -f "$DIR/slurmctld.pid" || -f "$DIR/slurmd.pid" ]]; }

# Ask every daemon whose pid file is listed to stop, then wait for all (10 s, then SIGKILL).
stop_pids() {
    local file pid pids=()
    for file in "$@"; do
        [[ -f "$file" ]] || continue
        pids+=("$(cat "$file")")
        rm -f "$file"
    done
    ((${#pids[@]})) || return 0
    kill "${pids[@]}" 2>/dev/null || true
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    done
}

stop() {
    [[ "$(id -u)" == 0 ]] || die "needs root"
    local files=("$DIR/slurmd.pid" "$DIR/slurmctld.pid")
    if [[ -f "$DIR/munged.ours" ]]; then
        files+=("$MUNGE_RUN/munged.pid")
        rm -f "$DIR/munged.ours"
    fi
    stop_pids "${files[@]}"
    if ours; then
        rm -f "$CONF"
    fi
    echo "slurm_cluster: stopped"
}

status() {
    running || die "not running (no pid files in $DIR)"
    scontrol ping
    sinfo -N -l
    squeue
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start [--cpus N] [--partition NAME] | stop | status" ;;
esac

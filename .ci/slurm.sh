#!/usr/bin/env bash
# A real one-node SLURM on this machine, for the tests marked `slurm` (tests/test_slurm.py) and CI.
#   bash .ci/slurm.sh start    install slurm-wlm + munge if missing, write slurm.conf, start the daemons and
#                              wait until sinfo shows the node idle
#   bash .ci/slurm.sh stop     cancel this cluster's jobs, stop the daemons `start` started (their pid files)
#   bash .ci/slurm.sh status   the daemons, sinfo and squeue
# Needs root (apt-get, munged as user munge, slurmd). Debian 12 gives Slurm 22.05; the settings are the ones
# known to work on this kind of machine (/work/shared/FIELD-NOTES.md): no cgroups (proctrack/linuxproc,
# task/none), no accounting (submitit's sacct calls warn, jobs run), cons_tres on cores and memory.
# Everything it writes lives in $DISTILL_SLURM_DIR (default /tmp/distill-slurm): slurm.conf, spool, logs,
# munge's socket and the pid files. /etc/slurm/slurm.conf becomes a link to its slurm.conf, so sbatch, sinfo
# and submitit find the cluster without SLURM_CONF; an /etc/slurm/slurm.conf of someone else's is left alone
# (then export SLURM_CONF=$DISTILL_SLURM_DIR/slurm.conf, as `start` says).
set -euo pipefail

DIR="${DISTILL_SLURM_DIR:-/tmp/distill-slurm}"
CONF="$DIR/slurm.conf"
ETC_CONF=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
NODE="$(hostname -s)"
IDLE_TIMEOUT_S="${DISTILL_SLURM_TIMEOUT_S:-90}"
DAEMONS=(munged slurmctld slurmd)  # started in this order, stopped in the reverse one

say() { echo "slurm.sh: $*"; }
die() {
    echo "slurm.sh: error: $*" >&2
    echo "slurm.sh: logs: $DIR/log/slurmctld.log, $DIR/log/slurmd.log, $DIR/munge/munged.log (state: $DIR)" >&2
    exit 1
}

pid_file() { echo "$DIR/run/$1.pid"; }

# The pid in a daemon's pid file, if that process is alive and is that daemon (a stale file whose pid was
# reused by another process must never lead to a kill).
running_pid() {
    local file pid
    file="$(pid_file "$1")"
    [[ -s "$file" ]] || return 1
    pid="$(tr -dc '0-9' < "$file")"
    [[ -n "$pid" && -r "/proc/$pid/comm" && "$(cat "/proc/$pid/comm")" == "$1" ]] && alive "$pid" || return 1
    echo "$pid"
}

# A process that exited but was not reaped (a zombie: a daemon's parent here is pid 1) is not alive.
alive() { [[ -r "/proc/$1/stat" && "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]; }

install_packages() {
    local missing=() pkg
    for pkg in slurm-wlm munge; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    say "installing ${missing[*]} (apt-get)"
    # Package scripts must not start daemons of their own: `stop` could not stop them, and they would hold
    # the ports. A policy-rc.d that refuses every start is put in place for the install when there is none.
    local policy=/usr/sbin/policy-rc.d added_policy=""
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && added_policy=1
    fi
    local rc=0
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}"; } || rc=$?
    [[ -n "$added_policy" ]] && rm -f "$policy"
    [[ $rc -eq 0 ]] || die "apt-get install ${missing[*]} failed (exit $rc)"
}

write_conf() {
    local cpus mem_mb real_mb
    cpus="$(nproc)"
    mem_mb="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
    # below the machine's memory (slurmd drains a node with less than its RealMemory) and what the kernel keeps
    real_mb=$((mem_mb * 9 / 10))
    cat > "$CONF" <<EOF
# Written by .ci/slurm.sh start: a one-node cluster on $NODE ($cpus CPUs, ${mem_mb} MB). Rewritten on each start.
ClusterName=distill-ci
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it starts again (default 120 s)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=15
StateSaveLocation=$DIR/spool/slurmctld
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$(pid_file slurmd)
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
# Tests cancel and requeue jobs: kill a job's processes 5 s after SIGTERM (default 30), and keep finished
# jobs visible to squeue / scontrol for 10 minutes.
KillWait=5
MinJobAge=600
# without a memory request a job would take the whole node's memory and jobs could not share the node
DefMemPerCPU=$((real_mb / cpus))
NodeName=$NODE CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -L "$ETC_CONF" || ! -e "$ETC_CONF" ]]; then
        mkdir -p "$(dirname "$ETC_CONF")"
        ln -sfn "$CONF" "$ETC_CONF"
    elif [[ "${SLURM_CONF:-}" != "$CONF" ]]; then
        say "warning: $ETC_CONF is not ours and was left alone: export SLURM_CONF=$CONF"
    fi
}

start_munged() {
    if [[ ! -s "$MUNGE_KEY" ]]; then
        say "creating the munge key $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        mungekey -c -k "$MUNGE_KEY" || die "mungekey -c failed"
    fi
    chown munge:munge "$MUNGE_KEY" && chmod 600 "$MUNGE_KEY"
    # 755: slurm's daemons and clients (any user) reach the socket through this directory
    install -d -o munge -g munge -m 755 "$DIR/munge"
    runuser -u munge -- munged --socket="$DIR/munge/munge.socket" --key-file="$MUNGE_KEY" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start"
    # munged runs as munge and writes only to $DIR/munge: its pid file is copied to $DIR/run
    wait_for "munged's pid file" 10 test -s "$DIR/munge/munged.pid"
    cp "$DIR/munge/munged.pid" "$(pid_file munged)"
}

wait_for() {  # wait_for <what> <seconds> <command...>
    local what="$1" seconds="$2" t=0
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((t++ < seconds * 2)) || die "timed out after ${seconds}s waiting for $what"
        sleep 0.5
    done
}

node_idle() { [[ "$(sinfo -h -N -n "$NODE" -o %t 2>/dev/null)" == idle ]]; }

start() {
    [[ "$(id -u)" -eq 0 ]] || die "start needs root (apt-get, munged as user munge, slurmd)"
    local daemon
    for daemon in "${DAEMONS[@]}"; do
        if running_pid "$daemon" >/dev/null; then
            say "$daemon is already running (pid $(running_pid "$daemon")); run \`bash $0 stop\` first to restart"
            node_idle && { say "node $NODE is idle"; return 0; }
            die "the cluster of $DIR is running but node $NODE is not idle: $(sinfo -h -N -o '%t %E' 2>&1)"
        fi
    done
    install_packages
    mkdir -p "$DIR"/{run,log,spool/slurmctld,spool/slurmd}
    write_conf
    export SLURM_CONF="$CONF"
    start_munged
    # -i: ignore the state of an earlier start (jobs, node state) in the spool directory
    slurmctld -f "$CONF" -i || die "slurmctld did not start"
    wait_for "slurmctld to answer" 30 scontrol ping
    slurmd -f "$CONF" || die "slurmd did not start"
    wait_for "node $NODE to be idle in sinfo" "$IDLE_TIMEOUT_S" node_idle
    for daemon in "${DAEMONS[@]}"; do
        running_pid "$daemon" >/dev/null || die "$daemon is not running (pid file $(pid_file "$daemon"))"
    done
    say "node $NODE is idle: $(sinfo -h -o '%P %D %c CPUs %m MB %t'); conf $CONF, logs $DIR/log"
}

stop_daemon() {  # SIGTERM, then SIGKILL after 20 s
    local pid t=0
    pid="$(running_pid "$1")" || { rm -f "$(pid_file "$1")"; return 0; }
    say "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid" && ((t++ < 40)); do sleep 0.5; done
    if alive "$pid"; then
        say "$1 (pid $pid) ignored SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$(pid_file "$1")"
}

stop() {
    export SLURM_CONF="$CONF"
    # jobs of this cluster first: slurmd's job steps (slurmstepd) would outlive it
    if running_pid slurmctld >/dev/null && [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
        say "cancelling this cluster's jobs: $(squeue -h -o %i | tr '\n' ' ')"
        scancel --full $(squeue -h -o %i) 2>/dev/null || true
        local t=0
        while [[ -n "$(squeue -h -t running,completing -o %i 2>/dev/null)" ]] && ((t++ < 40)); do sleep 0.5; done
    fi
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_daemon "${DAEMONS[i]}"
    done
    [[ -L "$ETC_CONF" && "$(readlink "$ETC_CONF")" == "$CONF" ]] && rm -f "$ETC_CONF"
    say "stopped; logs kept in $DIR/log"
}

status() {
    local daemon rc=0
    for daemon in "${DAEMONS[@]}"; do
        if running_pid "$daemon" >/dev/null; then
            say "$daemon running (pid $(running_pid "$daemon"))"
        else
            say "$daemon not running"
            rc=1
        fi
    done
    if [[ $rc -eq 0 ]]; then
        SLURM_CONF="$CONF" sinfo -N -o '%N %P %c %m %t'
        SLURM_CONF="$CONF" squeue
    fi
    return $rc
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: bash $0 start|stop|status" >&2; exit 2 ;;
esac

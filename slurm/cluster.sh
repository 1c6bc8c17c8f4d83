#!/usr/bin/env bash
# A real single-node SLURM on loopback, for trying slurm/train.sh and for tests/test_slurm.py.
#
#   slurm/cluster.sh start  [STATE_DIR]   install if missing, configure, start munged/slurmctld/slurmd,
#                                         wait until the node is idle (idempotent: running daemons are kept)
#   slurm/cluster.sh stop   [STATE_DIR]   cancel all jobs, stop the daemons this script started, wait
#   slurm/cluster.sh status [STATE_DIR]   daemons, node and queue; exit 0 only when the node is usable
#
# STATE_DIR (default /tmp/elastictrain-slurm, or $ELASTICTRAIN_SLURM_DIR) holds slurm.conf, the
# controller state, spool, logs and one pidfile per daemon; `stop` signals only those pids. Needs root
# (daemons run as root, no systemd). The node "localhost" (127.0.0.1) advertises $SLURM_NODE_CPUS
# (default 8) CPUs whatever the machine has, so a 2-core CI box can hold several jobs.
#
# slurm.conf is written to STATE_DIR and copied to /etc/slurm/slurm.conf (where sbatch/squeue look by
# default) unless that file exists and was not written by this script; then `export SLURM_CONF=...`
# as printed. The daemons bind 0.0.0.0:6817/6818 (SLURM has no loopback-only option) and talk over
# 127.0.0.1; only one such cluster can run per machine.
#
# Timing choices for tests (see /work/shared/notes/slurm.md): KillWait=10 is the SIGTERM->SIGKILL
# grace; cred_expire=5 lets a requeued job start again within seconds (default 120 s); the scheduler
# runs every second. Partition `high` preempts `debug` by requeueing its jobs: the preempted job first
# gets its --signal (USR1 for train.sh, thanks to preempt_send_user_signal), then SIGTERM after
# GraceTime=30 s if it is still running.
set -euo pipefail

ACTION=${1:-}
STATE_DIR=${2:-${ELASTICTRAIN_SLURM_DIR:-/tmp/elastictrain-slurm}}
NODE_CPUS=${SLURM_NODE_CPUS:-8}
START_TIMEOUT=${SLURM_START_TIMEOUT:-60}
CONF=$STATE_DIR/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
MARKER="# written by elastictrain slurm/cluster.sh"
SBIN="/usr/sbin /usr/bin /sbin /bin"
CONF_CHANGED=0

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# True when the pidfile names a live process whose command is $2 (guards against pid reuse).
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/comm ]] && [[ $(<"/proc/$pid/comm") == "$name" ]]
}

install_packages() {
    local pkgs=(slurmctld slurmd slurm-client munge)
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    log "installing ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${pkgs[@]}" >"$STATE_DIR/apt.log" 2>&1; then
        log "install failed; running apt-get update and retrying"
        apt-get update >>"$STATE_DIR/apt.log" 2>&1 || true
        apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$STATE_DIR/apt.log" 2>&1 \
            || die "apt-get install ${pkgs[*]} failed; see $STATE_DIR/apt.log"
    fi
}

write_conf() {
    local plugindir
    plugindir=$(dirname "$(find /usr/lib* -name select_cons_tres.so -print -quit 2>/dev/null)")
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/spool"
    cat >"$CONF.tmp" <<EOF
$MARKER (state in $STATE_DIR)
ClusterName=elastictrain
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
PluginDir=$plugindir
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pidfile
SlurmdPidFile=$STATE_DIR/slurmd.pidfile
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$NODE_CPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=high Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10
EOF
    if [[ -f $CONF ]] && cmp -s "$CONF.tmp" "$CONF"; then
        rm "$CONF.tmp"
    else
        mv "$CONF.tmp" "$CONF"
        CONF_CHANGED=1
    fi
    if [[ ! -e $SYSTEM_CONF ]] || grep -qF "$MARKER" "$SYSTEM_CONF"; then
        mkdir -p "$(dirname "$SYSTEM_CONF")"
        cp "$CONF" "$SYSTEM_CONF.tmp" && mv "$SYSTEM_CONF.tmp" "$SYSTEM_CONF"
    else
        log "$SYSTEM_CONF exists and is not ours: use  export SLURM_CONF=$CONF"
    fi
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        return  # ours from an earlier start, or a site munged: either way SLURM can authenticate
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid 9>&- \
        || die "munged failed to start; see /var/log/munge/munged.log"
    local _
    for _ in $(seq 50); do
        [[ -s /run/munge/munged.pid ]] && munge_works && break
        sleep 0.1
    done
    munge_works || die "munged started but munge -n | unmunge fails; see /var/log/munge/munged.log"
    cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
}

# Start daemon $1 in the foreground of a new session, detached from our stdio, recording its pid.
start_daemon() {
    local name=$1; shift
    local pidfile=$STATE_DIR/$name.pid
    if pid_alive "$pidfile" "$name"; then
        return
    fi
    setsid "$@" </dev/null >>"$STATE_DIR/$name.out" 2>&1 9>&- &
    echo $! >"$pidfile"
    sleep 0.5
    pid_alive "$pidfile" "$name" || { tail -n 20 "$STATE_DIR/$name.out" "$STATE_DIR/$name.log" >&2 2>/dev/null
        die "$name exited at start; see $STATE_DIR/$name.log"; }
}

node_state() { { SLURM_CONF=$CONF sinfo -h -n localhost -o %t 2>/dev/null || true; } | head -n 1; }

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT)) state=
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in
            idle|mix|alloc|comp) return 0 ;;
            down*|drain*|drng*|fail*)
                SLURM_CONF=$CONF scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
        esac
        for d in slurmctld slurmd; do
            pid_alive "$STATE_DIR/$d.pid" "$d" || die "$d died while starting; see $STATE_DIR/$d.log"
        done
        sleep 0.5
    done
    die "node localhost not idle after ${START_TIMEOUT}s (state '${state:-no answer from slurmctld}');" \
        "see $STATE_DIR/slurmctld.log and slurmd.log"
}

do_start() {
    [[ $(id -u) == 0 ]] || die "must run as root (the daemons run as root; no systemd is used)"
    local t0=$SECONDS
    mkdir -p "$STATE_DIR"
    local daemons_were_running=0
    pid_alive "$STATE_DIR/slurmctld.pid" slurmctld && daemons_were_running=1
    install_packages
    write_conf
    start_munge
    start_daemon slurmctld slurmctld -D -i -f "$CONF"
    start_daemon slurmd slurmd -D -N localhost -f "$CONF"
    wait_idle
    if ((CONF_CHANGED)) && ((daemons_were_running)); then
        # Partitions and scheduler settings apply on reconfigure; node changes need stop + start.
        SLURM_CONF=$CONF scontrol reconfigure || die "scontrol reconfigure failed after slurm.conf changed"
        log "slurm.conf changed: reconfigured the running daemons"
    fi
    log "node localhost $(node_state) after $((SECONDS - t0))s (state in $STATE_DIR, SLURM_CONF=$CONF)"
}

# Signal the daemon in $1's pidfile (only if it is the process we started), wait, then SIGKILL.
stop_daemon() {
    local name=$1 pidfile=$STATE_DIR/$1.pid pid _
    if ! pid_alive "$pidfile" "$name"; then
        rm -f "$pidfile"
        return
    fi
    pid=$(<"$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid ]]; then
        log "$name (pid $pid) ignored SIGTERM for 10s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

do_stop() {
    [[ $(id -u) == 0 ]] || die "must run as root"
    if pid_alive "$STATE_DIR/slurmctld.pid" slurmctld; then
        local ids _
        mapfile -t ids < <(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null || true)
        if ((${#ids[@]})); then
            # SIGKILL first: a test cluster being torn down has no use for graceful snapshots.
            SLURM_CONF=$CONF scancel --full --signal=KILL "${ids[@]}" >/dev/null 2>&1 || true
            SLURM_CONF=$CONF scancel "${ids[@]}" >/dev/null 2>&1 || true
        fi
        # Let slurmd reap the job steps before it goes away.
        for _ in $(seq 100); do
            [[ -z $(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    log "stopped (state kept in $STATE_DIR)"
}

do_status() {
    local d ok=0
    for d in munged slurmctld slurmd; do
        if pid_alive "$STATE_DIR/$d.pid" "$d"; then
            echo "$d: running, pid $(<"$STATE_DIR/$d.pid")"
        else
            echo "$d: not running (from $STATE_DIR)"
        fi
    done
    if munge_works; then
        echo "munge: ok"
    else
        echo "munge: not working"
        ok=1
    fi
    local state=
    # sinfo waits out its message timeout (~10 s) when no controller runs: ask only a live one.
    pid_alive "$STATE_DIR/slurmctld.pid" slurmctld && state=$(node_state)
    echo "node localhost: ${state:-no answer}"
    [[ $state =~ ^(idle|mix|alloc|comp)$ ]] || ok=1
    [[ -n $state ]] && { SLURM_CONF=$CONF squeue 2>/dev/null || true; }
    return $ok
}

export PATH="$PATH:${SBIN// /:}"
if [[ $ACTION == start || $ACTION == stop ]]; then
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/lock"
    # Two concurrent starts (two test sessions) must not both launch daemons. The daemons must not
    # inherit fd 9, or they would hold this lock for as long as they run.
    flock -w 120 9 || die "another cluster.sh has held $STATE_DIR/lock for 120 s"
fi
case $ACTION in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    *) echo "usage: $0 start|stop|status [STATE_DIR]" >&2; exit 2 ;;
esac

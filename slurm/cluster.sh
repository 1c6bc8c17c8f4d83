#!/usr/bin/env bash
# A real SLURM on this one machine, for trying slurm/train.sh and for tests/test_slurm.py and test_multinode.py.
#
#   slurm/cluster.sh start  [--nodes N] [STATE_DIR]   install if missing, configure, start munged/slurmctld/
#                                   slurmd, wait until every node is idle (idempotent: running daemons are kept,
#                                   missing ones started again, downed host links brought back up)
#   slurm/cluster.sh stop   [--nodes N] [STATE_DIR]   cancel all jobs, stop the daemons this script started, wait
#   slurm/cluster.sh status [--nodes N] [STATE_DIR]   daemons, nodes and queue; exit 0 only when all nodes are usable
#
# Without --nodes: one node "localhost" on loopback (below). With --nodes N: N real hosts, each a network
# namespace made by tests/hosts.sh (set "etslurm": hosts et-node1..et-nodeN and et-ctl, addresses 10.213.K.x on
# a private bridge, their own hostnames, an /etc/hosts naming every host), one slurmd per node host and
# slurmctld on et-ctl, so jobs see separate machines with their own addresses and a network that can fail.
# It has its own munged (socket and key in STATE_DIR), so it runs beside the loopback cluster; its STATE_DIR
# defaults to /tmp/elastictrain-slurm-nodes ($ELASTICTRAIN_SLURM_NODES_DIR); use it with
# `export SLURM_CONF=STATE_DIR/slurm.conf` (printed by start; /etc/slurm/slurm.conf is left alone). Spool, log
# and pid files are per node (STATE_DIR/spool/NODE, slurmd-NODE.log). SlurmdTimeout=$SLURMD_TIMEOUT (default
# 10 s; SLURM's own default is 300 s) is how long a silent node stays allocated before SLURM marks it DOWN and
# fails or requeues its jobs. `stop` stops its daemons and removes the hosts (and whatever still runs on them).
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

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOSTS_SH=$ROOT/tests/hosts.sh
HOST_SET=etslurm
CTL_HOST=et-ctl
ACTION=${1:-}
shift || true
NODES=0  # 0: the loopback node "localhost"; N > 0: N host namespaces
STATE_DIR=
while (($#)); do
    case $1 in
        --nodes) NODES=${2:-}; shift 2 || true ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        *) STATE_DIR=$1; shift ;;
    esac
done
[[ $NODES =~ ^[0-9]+$ ]] && ((NODES <= 32)) || { echo "cluster.sh: --nodes must be a number 1-32" >&2; exit 2; }
if [[ -z $STATE_DIR ]]; then
    if ((NODES)); then
        STATE_DIR=${ELASTICTRAIN_SLURM_NODES_DIR:-/tmp/elastictrain-slurm-nodes}
    else
        STATE_DIR=${ELASTICTRAIN_SLURM_DIR:-/tmp/elastictrain-slurm}
    fi
fi
if [[ $ACTION != start ]] && ((NODES == 0)) && [[ -s $STATE_DIR/nodes ]]; then
    NODES=$(<"$STATE_DIR/nodes")  # stop/status of a multi-host cluster by its STATE_DIR
fi
NODE_CPUS=${SLURM_NODE_CPUS:-8}
SLURMD_TIMEOUT=${SLURMD_TIMEOUT:-10}
START_TIMEOUT=${SLURM_START_TIMEOUT:-60}
CONF=$STATE_DIR/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
MARKER="# written by elastictrain slurm/cluster.sh"
SBIN="/usr/sbin /usr/bin /sbin /bin"
CONF_CHANGED=0

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The cluster's node names, one a line.
node_names() {
    if ((NODES)); then
        seq -f "et-node%g" "$NODES"
    else
        echo localhost
    fi
}

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

# The lines of slurm.conf that differ between the loopback node and the host namespaces.
topology_conf() {
    local nodes
    if ((NODES == 0)); then
        cat <<CONF
SlurmctldHost=localhost(127.0.0.1)
AuthInfo=cred_expire=5
SlurmdSpoolDir=$STATE_DIR/spool
SlurmdPidFile=$STATE_DIR/slurmd.pidfile
SlurmdLogFile=$STATE_DIR/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$NODE_CPUS State=UNKNOWN
CONF
        nodes=localhost
    else
        cat <<CONF
SlurmctldHost=$CTL_HOST($(host_addr "$CTL_HOST"))
AuthInfo=socket=$MUNGE_DIR/munge.socket,cred_expire=5
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmdPidFile=$STATE_DIR/slurmd-%n.pidfile
SlurmdLogFile=$STATE_DIR/slurmd-%n.log
SlurmdTimeout=$SLURMD_TIMEOUT
CONF
        local node
        for node in $(node_names); do
            echo "NodeName=$node NodeAddr=$(host_addr "$node") CPUs=$NODE_CPUS State=UNKNOWN"
        done
        nodes=et-node[1-$NODES]
    fi
    cat <<CONF
PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=high Nodes=$nodes MaxTime=INFINITE State=UP PriorityTier=10
CONF
}

write_conf() {
    local plugindir
    plugindir=$(dirname "$(find /usr/lib* -name select_cons_tres.so -print -quit 2>/dev/null)")
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/spool"
    local node
    if ((NODES)); then
        for node in $(node_names); do mkdir -p "$STATE_DIR/spool/$node"; done  # SlurmdSpoolDir=.../spool/%n
    fi
    cat >"$CONF.tmp" <<CONF
$MARKER (state in $STATE_DIR)
ClusterName=elastictrain
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
PluginDir=$plugindir
StateSaveLocation=$STATE_DIR/ctld
SlurmctldPidFile=$STATE_DIR/slurmctld.pidfile
SlurmctldLogFile=$STATE_DIR/slurmctld.log
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
$(topology_conf)
CONF
    if [[ -f $CONF ]] && cmp -s "$CONF.tmp" "$CONF"; then
        rm "$CONF.tmp"
    else
        mv "$CONF.tmp" "$CONF"
        CONF_CHANGED=1
    fi
    ((NODES)) && return  # the multi-host cluster is used with SLURM_CONF; the system default stays the loopback one
    if [[ ! -e $SYSTEM_CONF ]] || grep -qF "$MARKER" "$SYSTEM_CONF"; then
        mkdir -p "$(dirname "$SYSTEM_CONF")"
        cp "$CONF" "$SYSTEM_CONF.tmp" && mv "$SYSTEM_CONF.tmp" "$SYSTEM_CONF"
    else
        log "$SYSTEM_CONF exists and is not ours: use  export SLURM_CONF=$CONF"
    fi
}

host_addr() { bash "$HOSTS_SH" addr "$1"; }

munge_works() {
    if ((NODES)); then
        munge -S "$MUNGE_DIR/munge.socket" -n 2>/dev/null | unmunge -S "$MUNGE_DIR/munge.socket" >/dev/null 2>&1
    else
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1
    fi
}

new_munge_key() {
    mungekey --create --keyfile "$1" 2>/dev/null || dd if=/dev/urandom of="$1" bs=1 count=1024 status=none
    chown munge:munge "$1"
    chmod 0400 "$1"
}

start_munge() {
    if munge_works; then
        return  # ours from an earlier start, or a site munged: either way SLURM can authenticate
    fi
    local pidfile args=() mlog=/var/log/munge/munged.log
    if ((NODES)); then
        # Our own munged, socket and key: the loopback cluster's (or a site's) munged is not ours to rely on.
        mkdir -p "$MUNGE_DIR"
        chown munge:munge "$MUNGE_DIR"
        chmod 0755 "$MUNGE_DIR"  # munged: clients need to reach the socket; the key itself is 0400
        [[ -s $MUNGE_DIR/munge.key ]] || new_munge_key "$MUNGE_DIR/munge.key"
        pidfile=$MUNGE_DIR/munged.pid mlog=$MUNGE_DIR/munged.log
        args=(--socket="$MUNGE_DIR/munge.socket" --key-file="$MUNGE_DIR/munge.key" --pid-file="$pidfile"
              --log-file="$mlog" --seed-file="$MUNGE_DIR/munged.seed")
    else
        [[ -s /etc/munge/munge.key ]] || new_munge_key /etc/munge/munge.key
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown munge:munge /run/munge /var/log/munge /var/lib/munge
        chmod 0755 /run/munge
        pidfile=/run/munge/munged.pid
    fi
    rm -f "$pidfile"
    runuser -u munge -- munged "${args[@]}" 9>&- \
        || die "munged failed to start; see $mlog"
    local _
    for _ in $(seq 50); do
        [[ -s $pidfile ]] && munge_works && break
        sleep 0.1
    done
    munge_works || die "munged started but munge -n | unmunge fails; see $mlog"
    cp "$pidfile" "$STATE_DIR/munged.pid"
}

# Start daemon $2 (the command "$@" after $1 and $2) in the foreground of a new session, detached from our
# stdio, recording its pid in STATE_DIR/$1.pid.
start_daemon() {
    local tag=$1 name=$2; shift 2
    local pidfile=$STATE_DIR/$tag.pid _
    if pid_alive "$pidfile" "$name"; then
        return
    fi
    setsid "$@" </dev/null >>"$STATE_DIR/$tag.out" 2>&1 9>&- &
    echo $! >"$pidfile"
    for _ in $(seq 20); do  # on a host, the pid becomes the daemon after hosts.sh -> ip -> nsenter exec it
        sleep 0.1
        pid_alive "$pidfile" "$name" && break
    done
    sleep 0.3
    pid_alive "$pidfile" "$name" || { tail -n 20 "$STATE_DIR/$tag.out" >&2 2>/dev/null
        die "$name exited at start; see $STATE_DIR/$tag.out and the SLURM logs in $STATE_DIR"; }
}

start_daemons() {
    if ((NODES == 0)); then
        start_daemon slurmctld slurmctld slurmctld -D -i -f "$CONF"
        start_daemon slurmd slurmd slurmd -D -N localhost -f "$CONF"
        return
    fi
    start_daemon slurmctld slurmctld bash "$HOSTS_SH" exec "$CTL_HOST" slurmctld -D -i -f "$CONF"
    local node
    for node in $(node_names); do
        start_daemon "slurmd-$node" slurmd bash "$HOSTS_SH" exec "$node" slurmd -D -N "$node" -f "$CONF"
    done
}

node_state() { { SLURM_CONF=$CONF sinfo -h -n "$1" -o %t 2>/dev/null || true; } | head -n 1; }

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT)) state= node d pending
    while ((SECONDS < deadline)); do
        pending=
        for node in $(node_names); do
            state=$(node_state "$node")
            case $state in
                idle|mix|alloc|comp) continue ;;
                down*|drain*|drng*|fail*)
                    SLURM_CONF=$CONF scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
            esac
            pending="$node (${state:-no answer from slurmctld})"
        done
        [[ -z $pending ]] && return 0
        for d in $(daemon_tags); do
            pid_alive "$STATE_DIR/$d.pid" "${d%%-*}" || die "$d died while starting; see $STATE_DIR/$d.log"
        done
        sleep 0.5
    done
    die "node $pending not idle after ${START_TIMEOUT}s; see $STATE_DIR/slurmctld.log and the slurmd logs"
}

# Pidfile names (STATE_DIR/TAG.pid) of the SLURM daemons; the command name is the part before any "-".
daemon_tags() {
    echo slurmctld
    if ((NODES)); then
        node_names | sed 's/^/slurmd-/'
    else
        echo slurmd
    fi
}

do_start() {
    [[ $(id -u) == 0 ]] || die "must run as root (the daemons run as root; no systemd is used)"
    local t0=$SECONDS
    mkdir -p "$STATE_DIR"
    if ((NODES)); then
        if [[ -s $STATE_DIR/nodes && $(<"$STATE_DIR/nodes") != "$NODES" ]]; then
            die "$STATE_DIR holds a $(<"$STATE_DIR/nodes")-node cluster: stop it first ($0 stop $STATE_DIR)"
        fi
        echo "$NODES" >"$STATE_DIR/nodes"
    fi
    local daemons_were_running=0
    pid_alive "$STATE_DIR/slurmctld.pid" slurmctld && daemons_were_running=1
    install_packages
    if ((NODES)); then
        # shellcheck disable=SC2046
        bash "$HOSTS_SH" up "$HOST_SET" "$CTL_HOST" $(node_names) || die "tests/hosts.sh could not make the hosts"
    fi
    write_conf
    start_munge
    start_daemons
    wait_idle
    if ((CONF_CHANGED)) && ((daemons_were_running)); then
        # Partitions and scheduler settings apply on reconfigure; node changes need stop + start.
        SLURM_CONF=$CONF scontrol reconfigure || die "scontrol reconfigure failed after slurm.conf changed"
        log "slurm.conf changed: reconfigured the running daemons"
    fi
    log "nodes $(node_names | tr '\n' ' ')idle after $((SECONDS - t0))s (state in $STATE_DIR, SLURM_CONF=$CONF)"
    ((NODES)) && log "use it with:  export SLURM_CONF=$CONF"
    return 0
}

# Signal the daemon in STATE_DIR/$1.pid (only if it is the process we started), wait, then SIGKILL.
stop_daemon() {
    local tag=$1 name=$2 pidfile=$STATE_DIR/$1.pid pid _
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
        # Let slurmd reap the job steps before it goes away (a dead host's jobs never finish: 20 s at most).
        for _ in $(seq 100); do
            [[ -z $(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    local tag
    for tag in $(daemon_tags | tac); do
        stop_daemon "$tag" "${tag%%-*}"
    done
    stop_daemon munged munged
    if ((NODES)); then
        bash "$HOSTS_SH" down "$HOST_SET" || die "tests/hosts.sh down $HOST_SET failed"
        rm -f "$STATE_DIR/nodes"
    fi
    log "stopped (state kept in $STATE_DIR)"
}

do_status() {
    local d ok=0 node state
    for d in munged $(daemon_tags); do
        if pid_alive "$STATE_DIR/$d.pid" "${d%%-*}"; then
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
    # sinfo waits out its message timeout (~10 s) when no controller runs: ask only a live one.
    pid_alive "$STATE_DIR/slurmctld.pid" slurmctld || ok=1
    for node in $(node_names); do
        state=
        ((ok == 0)) && state=$(node_state "$node")
        echo "node $node: ${state:-no answer}"
        [[ $state =~ ^(idle|mix|alloc|comp)$ ]] || ok=1
    done
    pid_alive "$STATE_DIR/slurmctld.pid" slurmctld && { SLURM_CONF=$CONF squeue 2>/dev/null || true; }
    return $ok
}

export PATH="$PATH:${SBIN// /:}"
MUNGE_DIR=$STATE_DIR/munge
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
    *) echo "usage: $0 start|stop|status [--nodes N] [STATE_DIR]" >&2; exit 2 ;;
esac

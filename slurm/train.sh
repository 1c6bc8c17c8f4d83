#!/usr/bin/env bash
# elastictrain on SLURM: requeue on preemption and near the time limit, resume from the last snapshot.
#
#   sbatch slurm/train.sh --config configs/tiny.yaml --run.dir runs/tiny
#   NPROC_PER_NODE=2 sbatch --nodes=2 --time=4:00:00 slurm/train.sh --config configs/my.yaml
#   MIN_NODES=1 sbatch --no-kill --nodes=2 slurm/train.sh --config configs/my.yaml   # elastic: shrink on node loss
#
# Submit from the repository root (the job runs `python -m elastictrain` in the submit directory) or
# install the package. Everything after the script name goes to the trainer. The run directory is
# --run.dir, else run.dir from the --config file, else runs/slurm-<job id> (relative paths are relative
# to the submit directory); the job id survives requeues, so a requeued job finds its snapshots.
# The trainer always resumes from the latest complete snapshot in its run directory, so "requeue" is
# simply "run the same command again".
#
# Signals (what SLURM sends, and what this script does with it):
#   USR1 to this shell   the time-limit warning (--signal=B:USR1@90 below) or a preemption notice
#                        (SlurmctldParameters=preempt_send_user_signal). Forwarded once to srun, which
#                        signals its step (torchrun, which passes it on via --signals-to-handle, and the
#                        workers); the workers snapshot at the next step boundary and exit 75, torchrun
#                        exits (status 1). Then this script runs `scontrol requeue`: SLURM
#                        would NOT requeue a job that reaches its time limit (it ends TIMEOUT), even with
#                        --requeue. A trainer that exits 0 (training finished) is never requeued; one
#                        that fails without a snapshot request is not requeued either (no crash loop).
#                        A USR1 that arrives while the workers are still starting (before the trainer
#                        installs its handlers) ends them without a snapshot; the job still requeues.
#   TERM to everything   `scontrol requeue`, preemption after GraceTime, scancel: slurmstepd signals
#                        every process of the job itself; the workers snapshot and exit, and this script
#                        only waits (a TERM from us would make srun SIGKILL the step, see below).
#                        SLURM requeues the job (or cancels it); KillWait later it SIGKILLs what is left.
#
# Losing a node (its slurmd stops answering: a crash, a power or network failure). Chosen by MIN_NODES:
#   unset (fixed size)   the survivors' workers exit once the node is silent for --dist.peer_timeout_s (the
#                        liveness heartbeat, not the collective timeout), torchrun waits for the
#                        missing node; after SlurmdTimeout SLURM marks the node DOWN, ends the job
#                        (NODE_FAIL) and requeues it (--requeue); it runs again, from the latest complete
#                        snapshot, once enough nodes are up. Same world size: nothing changes numerically.
#   MIN_NODES=M < nodes  elastic (torchrun --nnodes M:N): the survivors' agents restart their workers and
#                        the rendezvous drops the silent node (~3 s after it went quiet), so training goes
#                        on at the smaller world size inside the same allocation, from the latest complete
#                        snapshot, with the same global batch. Needs `sbatch --no-kill` (else SLURM ends
#                        the whole job at SlurmdTimeout, and it is requeued as above). The rendezvous
#                        store is a process of this batch script (not of any agent, whose death would
#                        end every other agent): losing the node that runs this script ends the job
#                        anyway (SLURM requeues it), so the store adds no way to fail. A node cut off by
#                        the network cannot reach it, so it can never rejoin or form a world of its own
#                        (a store file on shared storage would let it: measured, the job then failed).
#                        Nodes do not come back into a running allocation: the job stays smaller.
#
# One torchrun per node (one srun task per node), with c10d rendezvous on the first node of the
# allocation (elastic: in this script's store); torchrun starts the workers and restarts them (--max-restarts)
# when one fails. This
# script never sends TERM to srun: srun turns a TERM it receives into SIGKILL of its tasks ("srun:
# forcing job termination"). When SLURM itself ends the job, srun's SIGKILL request comes too late to
# matter (measured: workers keep the full KillWait grace), so TERM snapshots work under srun.
#
# Environment (sbatch exports the submitting shell's environment to the job):
#   ELASTICTRAIN_PYTHON  python with torch and elastictrain (default: python on PATH)
#   NPROC_PER_NODE       workers per node (default: the node's allocated GPUs, else 1)
#   MAX_RESTARTS         torchrun restarts of failed workers within one allocation (default 3)
#   RDZV_PORT            c10d port on the first node (default derived from the job id and restart count)
#   MIN_NODES            fewest nodes to go on with (default: all of them, i.e. not elastic); see above
#   RDZV_CONF            extra torchrun --rdzv-conf key=value,... (elastic: appended to the settings below)
#
#SBATCH --job-name=elastictrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# USR1 to this shell (B:) 90 s before the time limit. SLURM checks limits every 30 s, so it comes
# 90-120 s early. The window must hold a snapshot (preemption.deadline_s, 25 s by default), torchrun's
# worker shutdown and the requeue call; raise it for large models or slow filesystems. Keep --time well
# above start-up time + the warning: a requeued run starts in step with the 30 s cycle, so with a tiny
# limit every run can be warned at the same moment, before it has trained a step (seen with --time=1).
#SBATCH --signal=B:USR1@90
# Set a --time on the command line or here; the partition's limit applies otherwise.
set -uo pipefail

PY=${ELASTICTRAIN_PYTHON:-python}
restart=${SLURM_RESTART_COUNT:-0}   # unset on the first run, 1, 2, ... after each requeue
# What torchrun needs to drop a silent node quickly (shared/notes/elastic.md): ~8 s instead of 45 s.
# keep_alive_max_attempt must stay >= 3 (with 2 a job split into two worlds).
ELASTIC_RDZV_CONF=last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=600,close_timeout=5

log() { echo "[$(date +%H:%M:%S)] train.sh: $*"; }

warned=0      # USR1 received: snapshot, then requeue ourselves
terminated=0  # TERM received: SLURM is requeueing or cancelling the job itself
child=

# shellcheck disable=SC2317  # (trap handlers)
on_warning() {
    if ((warned)); then
        return  # one snapshot request is enough; a second USR1 would interrupt torchrun's shutdown
    fi
    warned=1
    log "USR1: time limit or preemption ahead; asking the trainer for a snapshot"
    [[ -n $child ]] && kill -USR1 "$child" 2>/dev/null
}

# shellcheck disable=SC2317
on_term() {
    terminated=1
    log "TERM: SLURM is ending this run (requeue, preemption or cancel); waiting for the trainer's snapshot"
}

trap on_warning USR1
trap on_term TERM

# Check the configuration once, here, rather than in every worker (and every torchrun restart), and find
# the run directory: --run.dir, else the config file's run.dir, else runs/slurm-<job id>.
args=("$@")
if ! run_dir=$("$PY" -c '
import sys
from elastictrain.config import Config, load_config
try:
    cfg = load_config(sys.argv[1:])
except (ValueError, FileNotFoundError) as e:
    sys.exit(str(e))
explicit = any(a == "--run.dir" or a.startswith("--run.dir=") for a in sys.argv[1:])
print(cfg.run.dir if explicit or cfg.run.dir != Config().run.dir else "")
' "${args[@]}"); then
    log "the trainer configuration is invalid (above); not starting, not requeueing"
    exit 2
fi
if [[ -z $run_dir ]]; then
    run_dir=runs/slurm-${SLURM_JOB_ID}
    args+=(--run.dir "$run_dir")
fi

nnodes=${SLURM_NNODES:-1}
head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
cpus=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / nproc > 0 ? cpus / nproc : 1))}
# The agent-shared TCPStore breaks restarts (stale gloo addresses, pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

min_nodes=${MIN_NODES:-$nnodes}
if ! [[ $min_nodes =~ ^[1-9][0-9]*$ ]] || ((min_nodes > nnodes)); then
    log "MIN_NODES=${MIN_NODES} must be a whole number from 1 to the job's ${nnodes} node(s); not starting"
    exit 2
fi
srun_opts=(--nodes="$nnodes" --ntasks-per-node=1)
# A fresh port per run: the previous run's store may linger in TIME_WAIT or in a stray process.
port=${RDZV_PORT:-$((20000 + (${SLURM_JOB_ID:-0} % 4000) * 10 + restart % 10))}
rdzv=(--rdzv-endpoint "${head_node}:${port}")
store_pid=
if ((min_nodes < nnodes)); then
    # Elastic: the survivors of a lost node continue inside the allocation (see above). The store is ours,
    # on this (the first) node; it ignores the signals SLURM sends the whole job, so agents keep it while
    # their workers snapshot, and goes when this script ends.
    mode="elastic, ${min_nodes}..${nnodes} nodes"
    nnodes_arg=$min_nodes:$nnodes
    rdzv=(--rdzv-endpoint "$(hostname):${port}")
    "$PY" -c '
import signal, sys, time
from datetime import timedelta
from torch.distributed import TCPStore
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(s, signal.SIG_IGN)
store = TCPStore("0.0.0.0", int(sys.argv[1]), is_master=True, wait_for_workers=False, timeout=timedelta(days=365))
print("rendezvous store ready", flush=True)
while True:
    time.sleep(3600)
' "$port" &
    store_pid=$!
    rdzv+=(--rdzv-conf "is_host=false,${ELASTIC_RDZV_CONF}${RDZV_CONF:+,$RDZV_CONF}")
    # --no-kill: srun keeps the step when a node fails (the job needs sbatch --no-kill too);
    # no --kill-on-bad-exit: a lost node's task must not take the survivors' down.
    srun_opts+=(--no-kill --kill-on-bad-exit=0)
else
    # Fixed size: c10d hosted by the first node's agent; a lost node ends the job and SLURM requeues it.
    mode="fixed size"
    nnodes_arg=$nnodes
    [[ -n ${RDZV_CONF:-} ]] && rdzv+=(--rdzv-conf "$RDZV_CONF")
    srun_opts+=(--kill-on-bad-exit=1)
fi

log "job ${SLURM_JOB_ID:-?} restart ${restart} on $(hostname): ${nnodes} node(s) x ${nproc} worker(s) (${mode})," \
    "rendezvous ${rdzv[1]}, run dir ${run_dir}, trainer args: ${args[*]}"

torchrun=("$PY" -m torch.distributed.run
    --nnodes "$nnodes_arg" --nproc-per-node "$nproc"
    --rdzv-backend c10d "${rdzv[@]}" --rdzv-id "${SLURM_JOB_ID:-local}"
    --max-restarts "${MAX_RESTARTS:-3}"
    --signals-to-handle "SIGTERM,SIGINT,SIGUSR1"
    -m elastictrain "${args[@]}")

rc=75
if ((warned || terminated)); then
    log "signalled before the trainer started; not starting it"
else
    srun "${srun_opts[@]}" "${torchrun[@]}" &
    child=$!
    ((warned)) && kill -USR1 "$child" 2>/dev/null  # the warning raced the start
    # `wait` returns early (status > 128) whenever a trapped signal arrives: wait until the child is gone.
    while :; do
        wait "$child"
        rc=$?
        kill -0 "$child" 2>/dev/null || break
    done
fi
[[ -n $store_pid ]] && kill -KILL "$store_pid" 2>/dev/null

if ((rc == 0)); then
    log "training finished (trainer exit 0)"
    exit 0
fi
if ((terminated)); then
    log "trainer exit ${rc} after TERM; SLURM decides whether this job comes back"
    exit "$rc"
fi
if ((warned || rc == 75)); then
    log "trainer exit ${rc} after a snapshot request; requeueing job ${SLURM_JOB_ID}"
    if scontrol requeue "${SLURM_JOB_ID}"; then
        exit 0
    fi
    log "scontrol requeue failed (SLURM may be requeueing a preempted job itself); if job ${SLURM_JOB_ID}" \
        "does not come back, resubmit the same command to resume"
    exit 75
fi
log "trainer failed with exit ${rc}; not requeueing (fix the error, then resubmit to resume)"
exit "$rc"

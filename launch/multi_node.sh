#!/usr/bin/env bash
# elastictrain on SEVERAL machines that may come and go: run this same command on every node.
#
#   # a rendezvous file on storage every node mounts (simplest; no store host that could die; see partitions):
#   RDZV_ENDPOINT=/shared/jobs/exp1.rdzv RDZV_ID=exp1 NNODES=1:4 NPROC=8 \
#       bash launch/multi_node.sh --config configs/default.yaml --run.dir /shared/runs/exp1
#   # or a TCP store on a long-lived machine that is not a training node (start it once):
#   bash launch/multi_node.sh store 29400                       # on host "store-host"
#   RDZV_ENDPOINT=store-host:29400 RDZV_ID=exp1 NNODES=2:4 bash launch/multi_node.sh --config ...
#
# When to use: several machines without SLURM (cloud VMs, spot/preemptible nodes, a lab cluster), when the
# job should keep going with fewer nodes and grow again when nodes return. One machine: single_node.sh.
# SLURM: slurm/train.sh. --run.dir must be on storage every node sees (snapshots are written by all ranks).
#
# What happens (torch 2.14.1, measured on one machine with two agents, shared/notes/elastic.md):
#   - A node is lost: the other nodes' workers fail in their next collective, their agents restart them,
#     the rendezvous drops the silent node after keep_alive_interval x keep_alive_max_attempt seconds, and
#     training continues at the smaller world size from the latest complete snapshot (~8 s with the
#     settings below; 45 s with torchrun's defaults). Global batch stays --train.batch_size: per-rank micro
#     batch and gradient accumulation are recomputed (or a clear error says why they cannot be).
#   - A node arrives: an agent re-rendezvouses only when its workers fail or when, healthy, its monitor
#     loop sees nodes waiting (num_nodes_waiting() > 0). Then it SIGTERMs its workers (not counted as a
#     restart); they snapshot at their current step and exit 75, and the grown world continues from there.
#   - A worker crashes: its agent restarts the whole world (--max-restarts times per agent).
#   - A node is cut off by the network but keeps running (a partition; tests/test_multinode.py, hosts in network
#     namespaces): every worker fails its collective after --dist.timeout_s. With a TCP store on a third host
#     the cut-off agent cannot reach the rendezvous: its workers are gone and it waits, the others continue at the
#     smaller world size from the latest complete snapshot (measured: workers gone 10.7 s after the cut, new world
#     at 25 s, with --dist.timeout_s 10), and when the link returns the cut-off agent finds the rendezvous
#     closed (or, while the job still runs, joins it as an arriving node). With a FILE store the cut-off node
#     still reaches the rendezvous through the shared file system: it is admitted again, the new world cannot
#     connect, and the job fails once the restarts are used up (measured). Where partitions can happen (separate
#     storage and compute networks), use the store host.
#
# Settings that make this reliable:
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1   fresh worker store per attempt (torchrun's shared store brought
#                        only 4 of 10 restarts up: stale gloo addresses, pytorch#135712).
#   --nnodes MIN:MAX     elastic membership (NNODES, default 1:2). A fixed --nnodes never shrinks.
#   c10d rendezvous, store_type=file when RDZV_ENDPOINT is a path. With a TCP endpoint, the agent that hosts
#                        the store is a single point of failure: if it dies, all other agents exit within a
#                        second and no restart can help. So: a file store, or a separate store process
#                        (`multi_node.sh store PORT`, and every agent joins with is_host=false).
#   --rdzv-conf last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=600,close_timeout=5
#                        keep_alive_max_attempt must stay >= 3: with 2 the job split into two worlds writing the
#                        same snapshots (2 of 2 trials). join_timeout: how long a node waits for the others.
#   RDZV_ID              one id per job: reusing an id on a persistent store fails with RendezvousClosedError.
#   --dist.timeout_s     collective timeout (default 300 s): a frozen node becomes a failure, not a hang.
#   --signals-to-handle SIGTERM,SIGINT,SIGUSR1 and --shutdown-timeout above --preemption.deadline_s: a
#                        preemption notice to the agent ends in a snapshot and exit 75 on every worker.
#
# Environment: RDZV_ENDPOINT (required: a shared-storage path, or host:port of a store), RDZV_ID (required),
# NNODES (1:2), NPROC (GPUs on this node, else 1), MAX_RESTARTS (3), SHUTDOWN_TIMEOUT (30),
# RDZV_CONF (extra key=value,... appended), PYTHON (python).
set -euo pipefail

PY=${PYTHON:-python}

if [[ ${1:-} == store ]]; then
    port=${2:?usage: multi_node.sh store PORT}
    echo "c10d store on port ${port}; agents use RDZV_ENDPOINT=$(hostname):${port}. Ctrl-C to stop."
    exec "$PY" -c "
import sys, time
from datetime import timedelta
from torch.distributed import TCPStore
store = TCPStore('0.0.0.0', int(sys.argv[1]), is_master=True, wait_for_workers=False, timeout=timedelta(days=365))
while True:
    time.sleep(3600)
" "$port"
fi

: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT to a path on shared storage or to host:port of a store}"
: "${RDZV_ID:?set RDZV_ID to an id unique to this job}"
if [[ -z ${NPROC:-} ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    ((NPROC > 0)) || NPROC=1
fi
conf="last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=600,close_timeout=5"
if [[ $RDZV_ENDPOINT == */* ]]; then
    conf="store_type=file,${conf}"
else
    conf="is_host=false,${conf}"  # the store runs elsewhere (multi_node.sh store): no agent hosts it
fi
[[ -n ${RDZV_CONF:-} ]] && conf="${conf},${RDZV_CONF}"
cores=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / NPROC > 0 ? cores / NPROC : 1))}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

exec "$PY" -m torch.distributed.run \
    --nnodes "${NNODES:-1:2}" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" --rdzv-conf "$conf" \
    --max-restarts "${MAX_RESTARTS:-3}" \
    --signals-to-handle SIGTERM,SIGINT,SIGUSR1 \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-30}" \
    -m elastictrain "$@"

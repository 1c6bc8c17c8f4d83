#!/usr/bin/env bash
# elastictrain on ONE machine with several workers (GPUs, or CPU processes), restarted in place on a crash.
#
#   NPROC=2 bash launch/single_node.sh --config configs/tiny.yaml --run.dir runs/tiny   # 2 CPU workers
#   NPROC=8 MAX_RESTARTS=5 bash launch/single_node.sh --config configs/default.yaml --run.dir runs/exp1
#
# When to use: one workstation or one cloud VM with several GPUs (or, for testing, several CPU
# processes). For one GPU or a Mac, plain `python -m elastictrain` (see launch/mac.sh) is enough; for
# several machines use launch/multi_node.sh; under SLURM use slurm/train.sh.
#
# Everything after the script name goes to the trainer. The trainer always resumes from the latest
# complete snapshot in --run.dir, so a restart (by torchrun, or you running this command again) simply
# continues. Exit status: 0 finished. 1 when restarts are exhausted, and also when a signal stopped the
# job (SIGTERM/SIGINT/SIGUSR1 to torchrun): then the workers took a snapshot at their current step and
# exited 75 first, and running the same command again continues exactly.
#
# What makes restarts reliable (measured with torch 2.14.1, shared/notes/elastic.md):
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1   workers get their own store per attempt. With torchrun's shared
#                        store, restarted workers read the previous attempt's gloo addresses (pytorch#135712):
#                        only 4 of 10 restarts came up, against 13 of 13 with it.
#   --max-restarts N     a worker that dies (crash, OOM kill, a failed collective) makes torchrun stop the
#                        group and start it again, up to N times (MAX_RESTARTS, default 3).
#   --standalone         c10d rendezvous on a free localhost port with a fresh id: nothing to collide with
#                        another job on the machine. (A fixed port that is taken makes the agent hang.)
#   --dist.timeout_s     the collective timeout (default 300 s; gloo's own is 30 min): a hung or frozen worker
#                        becomes a failure torchrun can restart. torchrun then waits a FIXED 30 s for the
#                        frozen worker before SIGKILLing it (it ignores --shutdown-timeout at restarts).
#   --signals-to-handle  SIGTERM,SIGINT,SIGUSR1 are forwarded to the workers (SIGUSR1 otherwise kills the agent
#                        and orphans the workers). The workers snapshot at the next step boundary and exit 75.
#   --shutdown-timeout   how long torchrun waits for that snapshot before SIGKILL (SHUTDOWN_TIMEOUT, default
#                        30 s): keep it above --preemption.deadline_s (default 25 s).
#
# Environment: NPROC workers (default: the number of GPUs, else 1), MAX_RESTARTS (3), SHUTDOWN_TIMEOUT (30),
# PYTHON (python), OMP_NUM_THREADS (cores / NPROC).
set -euo pipefail

PY=${PYTHON:-python}
if [[ -z ${NPROC:-} ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    ((NPROC > 0)) || NPROC=1
fi
cores=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / NPROC > 0 ? cores / NPROC : 1))}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

exec "$PY" -m torch.distributed.run \
    --standalone --nnodes 1 --nproc-per-node "$NPROC" \
    --max-restarts "${MAX_RESTARTS:-3}" \
    --signals-to-handle SIGTERM,SIGINT,SIGUSR1 \
    --shutdown-timeout "${SHUTDOWN_TIMEOUT:-30}" \
    -m elastictrain "$@"

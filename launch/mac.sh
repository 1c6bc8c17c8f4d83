#!/usr/bin/env bash
# elastictrain on a single Mac (Apple silicon, MPS): world size 1, no torchrun, no process group.
#
#   bash launch/mac.sh --config configs/tiny.yaml --run.dir runs/tiny
#   MAX_RESTARTS=0 bash launch/mac.sh --config configs/default.yaml --run.dir runs/mac
#
# When to use: a laptop or a Mac Studio, one device. --train.device auto picks mps there (cuda, then mps,
# then cpu elsewhere, so this script also runs on Linux). Multi-process on one Mac gains nothing: there
# is one GPU and gloo is the only backend.
#
# Restarts without torchrun: the trainer always resumes from the latest complete snapshot in --run.dir, so
# this script re-runs the same command when it fails (up to MAX_RESTARTS times, default 3), like
# torchrun --max-restarts does. It does not re-run after exit 0 (finished), 2 (invalid configuration) or
# 75 (stopped by Ctrl-C/SIGTERM/SIGUSR1 after a snapshot at the current step: run the command again
# to continue exactly where it stopped).
#
# Settings: PYTORCH_ENABLE_MPS_FALLBACK=1 runs the few operators MPS lacks on the CPU instead of failing;
# caffeinate (macOS) keeps the machine awake while training. Environment: MAX_RESTARTS (3), PYTHON (python).
set -uo pipefail

PY=${PYTHON:-python}
export PYTORCH_ENABLE_MPS_FALLBACK=${PYTORCH_ENABLE_MPS_FALLBACK:-1}
awake=()
command -v caffeinate >/dev/null 2>&1 && awake=(caffeinate -i)

restarts=0
while :; do
    ${awake[@]+"${awake[@]}"} "$PY" -m elastictrain "$@"  # (bash 3.2 on macOS: empty arrays and set -u)
    rc=$?
    case $rc in
        0) exit 0 ;;
        2) exit 2 ;;    # invalid configuration: re-running cannot help
        75) echo "mac.sh: stopped after a snapshot; run the same command again to continue" >&2; exit 75 ;;
    esac
    if ((restarts >= ${MAX_RESTARTS:-3})); then
        echo "mac.sh: exit ${rc}; ${restarts} restart(s) used, giving up" >&2
        exit "$rc"
    fi
    restarts=$((restarts + 1))
    echo "mac.sh: exit ${rc}; restart ${restarts}/${MAX_RESTARTS:-3} from the latest snapshot" >&2
done

#!/usr/bin/env bash
# The GPU check in one call on a GPU machine (bench/gpu_check.py's docstring has the prepared call): install
# the wheels carried in .whl/ (bench/gpu_wheels.sh), run the check, and leave its output and the runs' logs
# and metrics (no snapshots, no weights) in $OUT for the caller: gpu_check.log, gpu_check_runs.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
out=${OUT:-runs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PYTHON" bench/gpu_check.py --out runs/gpu-check "$@" 2>&1 | tee "$out/gpu_check.log"
rc=${PIPESTATUS[0]}
tar czf "$out/gpu_check_runs.tgz" --exclude=snapshots --exclude='*.pt' -C runs gpu-check 2>/dev/null
exit "$rc"

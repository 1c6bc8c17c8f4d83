#!/usr/bin/env bash
# Fetch into .whl/ (ignored by git) the pure-Python packages the GPU machine's image lacks, so that
# bench/gpu_check.sh can install them there with no network: run this here, in the repository root, before
# run(command="bash bench/gpu_check.sh", carry=[".whl"], ...). That image has Python 3.12 and its own torch,
# timm, huggingface_hub, safetensors, aiohttp, psutil and pyyaml; wandb is not needed (the check disables it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
rm -rf .whl && mkdir .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    segmentation-models-pytorch==0.6.0 torchsnapshot-nightly==2024.7.26 nest-asyncio==1.6.0 importlib-metadata==8.7.0
ls -l .whl

"""Shared test helpers (import with `from helpers import ...`): run the real CLI (plainly or under real torchrun) in a subprocess and read
outcomes from disk. Every subprocess gets OMP_NUM_THREADS=1, its own port and rendezvous id, and is
killed with its whole process group if a test fails."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1")
    env.pop("WANDB_API_KEY", None)
    # In-process wandb tests leave this pytest process's wandb-core address here; a trainer that inherited it
    # would share that service, and a killed attempt's run would stay "in use" there for the resumed one.
    env.pop("WANDB_SERVICE", None)
    env.update(extra)
    return env


def cli_cmd(args: list[str], nproc: int = 0, max_restarts: int = 0, torchrun_args: list[str] | None = None,
            log_dir: Path | None = None) -> list[str]:
    """The command a user types: ``python -m elastictrain ...`` (nproc=0) or under torchrun."""
    if nproc == 0:
        return [sys.executable, "-m", "elastictrain", *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--max-restarts", str(max_restarts), "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", uuid.uuid4().hex[:12],
           "--shutdown-timeout", "5"]
    if log_dir is not None:
        cmd += ["--log-dir", str(log_dir)]
    return [*cmd, *(torchrun_args or []), "-m", "elastictrain", *args]


def run_cli(args: list[str], nproc: int = 0, max_restarts: int = 0, timeout: float = 300,
            env: dict[str, str] | None = None, torchrun_args: list[str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run to completion; on timeout kill the whole process group (torchrun's workers included)."""
    cmd = cli_cmd(args, nproc, max_restarts, torchrun_args)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}") from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n{out[-6000:]}")
    return result


def run_script_under_torchrun(script: Path, args: list[str], nproc: int = 2,
                              timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node N SCRIPT ARGS`` to completion (stdout and stderr together); its whole
    process group is killed afterwards whatever happened."""
    cmd = [*cli_cmd([], nproc=nproc)[:-2], str(script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a subprocess started with start_new_session=True and everything in its session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tiny_args(run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--run.dir", str(run_dir), *extra]


def load_final(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True, map_location="cpu")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def read_jsonl(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl so far ([] before it exists); a line still being written is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")

"""Helpers for tests/test_slurm.py: drive a real SLURM (slurm/cluster.sh) with sbatch/scontrol and read
job state and the trainer's metrics while jobs run. Everything polls with a deadline; nothing sleeps
blindly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from helpers import ROOT, base_env, read_jsonl

CLUSTER = ROOT / "slurm" / "cluster.sh"
TRAIN = ROOT / "slurm" / "train.sh"
STATE_DIR = Path(os.environ.get("ELASTICTRAIN_SLURM_DIR", "/tmp/elastictrain-slurm"))
SLURM_CONF = STATE_DIR / "slurm.conf"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def slurm_env(conf: Path = SLURM_CONF, **extra: str) -> dict[str, str]:
    """The environment of SLURM commands and of the jobs they submit (sbatch exports it to the job);
    ``conf`` picks the cluster (the loopback one by default)."""
    env = {k: v for k, v in base_env().items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_CONF=str(conf), ELASTICTRAIN_PYTHON=sys.executable, NPROC_PER_NODE="2")
    env.update(extra)
    return env


def slurm(*args: str, check: bool = True, timeout: float = 30, conf: Path = SLURM_CONF) -> str:
    """Run a SLURM client command; return stdout."""
    proc = subprocess.run(list(args), env=slurm_env(conf), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def cluster(action: str, *options: str, state_dir: Path = STATE_DIR,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """slurm/cluster.sh ACTION [OPTIONS] STATE_DIR (the loopback cluster by default)."""
    return subprocess.run(["bash", str(CLUSTER), action, *options, str(state_dir)], capture_output=True, text=True,
                          timeout=timeout)


def sbatch(train_args: list[str], out: Path, *sbatch_args: str, conf: Path = SLURM_CONF, **env: str) -> int:
    """Submit slurm/train.sh from the repository root; return the job id."""
    cmd = ["sbatch", "--parsable", "--cpus-per-task=2", f"--output={out}", *sbatch_args, str(TRAIN), *train_args]
    proc = subprocess.run(cmd, cwd=ROOT, env=slurm_env(conf, **env), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return int(proc.stdout.strip().split(";")[0])


def sbatch_wrap(command: str, out: Path, *sbatch_args: str) -> int:
    """Submit a one-line job (``sbatch --wrap``); return the job id."""
    return int(slurm("sbatch", "--parsable", f"--output={out}", *sbatch_args, "--wrap", command).split(";")[0])


def job_info(job: int, conf: Path = SLURM_CONF) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
    out = slurm("scontrol", "-o", "show", "job", str(job), check=False, conf=conf)
    return dict(re.findall(r"(\w+)=(\S*)", out))


def poll(predicate: Callable[[], Any], timeout: float, what: str, on_timeout: Callable[[], str] = lambda: "",
         interval: float = 0.25) -> Any:
    """Call ``predicate`` until it returns something truthy; fail with ``what`` and extra context."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


def job_log(out: Path) -> str:
    return out.read_text(errors="replace") if out.exists() else "(no job output yet)"


def wait_final(job: int, out: Path, timeout: float = 240, conf: Path = SLURM_CONF) -> dict[str, str]:
    """Wait until the job reached a final state; return its scontrol record."""
    return poll(lambda: (i := job_info(job, conf)).get("JobState") in FINAL_STATES and i, timeout,
                f"job {job} to end", lambda: f"{job_info(job, conf)}\n--- job output:\n{job_log(out)[-6000:]}")


metrics = read_jsonl  # the trainer's JSONL records so far


def attempts(run_dir: Path) -> list[list[dict[str, Any]]]:
    """Records grouped by trainer attempt: each group starts with its start/resume event."""
    groups: list[list[dict[str, Any]]] = []
    for r in metrics(run_dir):
        if r.get("kind") == "event" and r.get("event") in ("start", "resume"):
            groups.append([])
        if groups:
            groups[-1].append(r)
    return groups


def events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [r for r in metrics(run_dir) if r.get("kind") == "event" and r.get("event") == name]


def wait_training(run_dir: Path, out: Path, attempt: int, steps: int = 1, timeout: float = 180) -> None:
    """Wait until trainer attempt number ``attempt`` (1-based) has logged ``steps`` train records."""
    def ready() -> bool:
        groups = attempts(run_dir)
        return len(groups) >= attempt and sum(r["kind"] == "train" for r in groups[attempt - 1]) >= steps
    poll(ready, timeout, f"attempt {attempt} of {run_dir} to train {steps} step(s)",
         lambda: f"--- job output:\n{job_log(out)[-6000:]}")


def cancel(*jobs: int, conf: Path = SLURM_CONF) -> None:
    """Kill jobs outright (tests' teardown): SIGKILL every process, then cancel (no requeue)."""
    ids = [str(j) for j in jobs]
    if ids:
        slurm("scancel", "--full", "--signal=KILL", *ids, check=False, conf=conf)
        slurm("scancel", *ids, check=False, conf=conf)

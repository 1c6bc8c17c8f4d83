"""What elastictrain asks of the operating system, in one place: files replaced atomically, the launcher's
environment, and what /proc says about a process.

Atomic replacement is write-temp-then-rename: a reader (or the next attempt after a kill) sees the old file
or the whole new one, never a torn one. With ``fsync`` the new file and the rename also outlive a power
loss (the commit record and BEST.json need that; a PNG does not).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------- files replaced atomically ----------


@contextlib.contextmanager
def atomic_path(path: Path, fsync: bool = False, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path`` (fsynced first
    with ``fsync``, and the directory after), on failure it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = tmp or path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomic(path: Path, data: str | bytes, fsync: bool = False, tmp: Path | None = None) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8) atomically; see :func:`atomic_path`."""
    with atomic_path(path, fsync, tmp) as t:
        t.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """JSON that a reader sees whole or not at all, even after a power loss."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True), fsync=True)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------- the launcher's environment ----------


@dataclass(frozen=True)
class Launcher:
    """What torchrun and SLURM tell a process about itself through the environment."""

    launched: bool
    """RANK and WORLD_SIZE are set: torchrun (or another launcher) started us, so we join a process group."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    """LOCAL_WORLD_SIZE: the ranks torchrun started on this host (1 without torchrun)."""
    master_addr: str
    """MASTER_ADDR and MASTER_PORT: where the process group's c10d store listens ('' and 0 when unset)."""
    master_port: int
    torchrun_run_id: str
    """TORCHELASTIC_RUN_ID: set by torchrun's agent for every worker it starts ('' otherwise)."""
    torchrun_restarts: int
    """TORCHELASTIC_RESTART_COUNT: how often torchrun restarted the group in this command (0 again for every
    new command; not a global generation)."""
    in_slurm: bool
    """SLURM_JOB_ID is set: a SLURM job step started us."""
    slurm_job_id: str
    slurm_restarts: int
    """SLURM_RESTART_COUNT: how often SLURM requeued this job (0 before the first requeue, and outside SLURM)."""

    @property
    def by_torchrun(self) -> bool:
        return bool(self.torchrun_run_id)


def launcher(environ: Mapping[str, str] | None = None) -> Launcher:
    """This process's launcher, read from ``environ`` (default: the process environment)."""
    env = os.environ if environ is None else environ
    return Launcher(launched="RANK" in env and "WORLD_SIZE" in env, rank=int(env.get("RANK", 0)),
                    world_size=int(env.get("WORLD_SIZE", 1)), local_rank=int(env.get("LOCAL_RANK", 0)),
                    local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1") or 1),
                    master_addr=env.get("MASTER_ADDR", ""), master_port=int(env.get("MASTER_PORT", 0) or 0),
                    torchrun_run_id=env.get("TORCHELASTIC_RUN_ID", ""),
                    torchrun_restarts=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
                    in_slurm="SLURM_JOB_ID" in env, slurm_job_id=env.get("SLURM_JOB_ID", ""),
                    slurm_restarts=int(env.get("SLURM_RESTART_COUNT", 0)))


def cores_per_rank() -> int:
    """The CPU cores this process may use (its affinity: a SLURM or container limit counts) shared among the
    ranks on this host (torchrun's LOCAL_WORLD_SIZE); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, launcher().local_world_size))


# ---------- /proc ----------


def read_text(path: str | Path) -> str:
    """A small system file's text, stripped; '' when it cannot be read (no such file, not Linux)."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def proc_stat(pid: int | str) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name, which may hold spaces and parentheses), or None
    (no such process, or not Linux). ``pid`` may be 'self'."""
    text = read_text(f"/proc/{pid}/stat")
    return text.rsplit(")", 1)[1].split() if ")" in text else None


def process_started(pid: int | str) -> str:
    """The start time of ``pid`` in clock ticks since boot (field 22 of its stat), '' if unknown."""
    stat = proc_stat(pid)
    return stat[19] if stat else ""


def process_age() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere since this module was imported)."""
    try:
        ticks = int(process_started("self"))
        uptime = float(read_text("/proc/uptime").split()[0])
        return round(uptime - ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return round(time.monotonic() - _IMPORTED, 3)


_IMPORTED = time.monotonic()


def has_errno(error: BaseException, number: int) -> bool:
    """Whether ``error``, its causes, or a DCP CheckpointException's per-rank failures carry ``number``."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == number:
            return True
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
    return False

"""Helpers for tests/test_elastic.py and bench/bench_recovery.py: build torchrun commands, start agents,
kill a node (an agent and its workers), read metrics.jsonl while it is being written, and clean up
every process a test started, orphans included.

Why orphans need a search: torchrun starts each worker in its own session, so killing the agent's
process group leaves the workers running (SIGKILL of the agent, or a signal it does not handle, orphans
them; measured in shared/notes/elastic.md). Each test has its own tmp directory, and every process we
start carries it on its command line (the run dir), so "every process whose command line names the
tmp directory" is exactly what the test may leave behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

from helpers import ROOT, base_env, read_jsonl, wait_for

GLOBAL_BATCH = 8  # configs/tiny.yaml: train.batch_size
STEPS_PER_EPOCH = 4  # 32 training samples / 8

RDZV_CONF = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=60,close_timeout=5"
"""The elastic rendezvous settings from the notes: ~8 s to continue after a node loss instead of 45 s.
keep_alive_max_attempt must stay >= 3 (2 split the job into two worlds writing the same snapshots)."""

# A launcher that imports torchrun first, says so (GO.ready.PID), and joins only when GO appears: the
# tests decide to the tenth of a second when a node arrives, not when a loaded machine finishes importing.
_PREWARMED = ("import os, sys, time\n"
              "import torch.distributed.run as run\n"
              "open(f'{sys.argv[1]}.ready.{os.getpid()}', 'w').close()\n"
              "while not os.path.exists(sys.argv[1]):\n"
              "    time.sleep(0.02)\n"
              "run.main(sys.argv[2:])\n")


def torchrun_cmd(args: list[str], rdzv_dir: Path, *, nproc: int = 1, nnodes: str = "1", max_restarts: int = 3,
                 rdzv_id: str | None = None, shutdown_timeout: int = 5, signals: str = "",
                 go: Path | None = None) -> list[str]:
    """``torchrun ... -m elastictrain ARGS`` with c10d rendezvous on a FILE store under ``rdzv_dir``.

    A file store has no port to collide with another test's, and no agent hosts it, so any agent may
    die without taking the rendezvous down. With ``go``, the agent starts joining when that file exists.
    """
    rdzv_dir.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-c", _PREWARMED, str(go)] if go else [sys.executable, "-m", "torch.distributed.run"]
    cmd = [*launcher, "--nnodes", nnodes, "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", str(rdzv_dir / "store"),
           "--rdzv-id", rdzv_id or uuid.uuid4().hex[:12], "--rdzv-conf", f"store_type=file,{RDZV_CONF}",
           "--shutdown-timeout", str(shutdown_timeout), "--log-dir", str(rdzv_dir / "logs")]
    if signals:
        cmd += ["--signals-to-handle", signals]
    return [*cmd, "-m", "elastictrain", *args]


# ------------------------------------------------------------------------------------------ processes


def _parent_pids() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...), whatever their session."""
    parents = _parent_pids()
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def processes_naming(text: str) -> list[int]:
    """Live processes (other than this one) whose command line contains ``text``."""
    needle, pids = text.encode(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def worker_env(pid: int, key: str) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{key}=".encode()
    return next((e[len(prefix):].decode() for e in env if e.startswith(prefix)), None)


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process and all its descendants at once (what losing the machine does)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


class Jobs:
    """The processes one test starts; :meth:`cleanup` SIGKILLs them, their trees, and any orphan whose
    command line names the test's directory. Output of each goes to ``root/NAME.log``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], name: str, **env: str) -> subprocess.Popen[bytes]:
        with open(self.root / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=base_env(**env), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, proc: subprocess.Popen[bytes], timeout: float, name: str) -> int:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout}s; its log ends:\n"
                                 f"{self.log(name)[-4000:]}") from None

    def cleanup(self) -> None:
        for proc in self.procs:
            kill_tree(proc.pid)
        for pid in self.leftovers():
            kill_tree(pid)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def leftovers(self) -> list[int]:
        return processes_naming(f"{self.root}/")  # the slash: test_x1 must not match test_x10


# -------------------------------------------------------------------------------------------- metrics


read_records = read_jsonl


def wait_for_record(run_dir: Path, match: Callable[[dict[str, Any]], bool], timeout: float, what: str,
                    alive: subprocess.Popen[bytes] | None = None) -> dict[str, Any]:
    """The first record (in file order) that matches, polling until ``timeout``; fails early if ``alive``
    exits first."""
    found: list[dict[str, Any]] = []

    def check() -> bool:
        found[:] = [r for r in read_records(run_dir) if match(r)][:1]
        if not found and alive is not None and alive.poll() is not None:
            raise AssertionError(f"exited with {alive.returncode} before {what}")
        return bool(found)

    wait_for(check, timeout, what, interval=0.02)
    return found[0]


def train_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "train"]


def events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "event" and r.get("event") == name]


def attempts(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Records split at each start/resume event (rank 0 logs one per attempt); each list starts with it."""
    out: list[list[dict[str, Any]]] = []
    for r in records:
        if r["kind"] == "event" and r.get("event") in ("start", "resume"):
            out.append([])
        if out:
            out[-1].append(r)
    return out


def ready_agents(go: Path) -> int:
    """How many prewarmed agents wait for ``go``."""
    return len(list(go.parent.glob(f"{go.name}.ready.*")))


def check_sample_offsets(records: list[dict[str, Any]], batch: int = GLOBAL_BATCH,
                         steps_per_epoch: int = STEPS_PER_EPOCH) -> None:
    """Every epoch's samples seen once (``batch`` samples a step, ``steps_per_epoch`` steps an epoch): see
    test_node_loss_then_a_new_node_joins in test_elastic.py."""
    for attempt in attempts(records):
        head = attempt[0]
        epoch, offset, step = head.get("epoch", 0), head.get("sample_offset", 0), head["step"]
        for r in train_records(attempt):
            if r["epoch"] != epoch:  # the previous epoch ended whole; the next starts at offset 0
                assert (r["epoch"], offset) == (epoch + 1, steps_per_epoch * batch), r
                epoch, offset = r["epoch"], 0
            assert (r["step"], r["sample_offset"]) == (step + 1, offset + batch), (head, r)
            step, offset = r["step"], r["sample_offset"]
    final = {r["step"]: r for r in train_records(records)}  # the last attempt to log a step wins
    assert sorted(final) == list(range(1, max(final) + 1))
    for epoch in {r["epoch"] for r in final.values()}:
        offsets = sorted(r["sample_offset"] for r in final.values() if r["epoch"] == epoch)
        assert offsets == [batch * k for k in range(1, steps_per_epoch + 1)], (epoch, offsets)

"""Recovery time under torchrun: kill to first resumed training step, against a cold start of the same command.

    python bench/bench_recovery.py                 # 3 trials of each scenario, tiny config, CPU/gloo
    python bench/bench_recovery.py --trials 5 --out bench/recovery.json

Scenarios (each trial is one fresh job in its own directory; cold start and recovery come from the same job):
  worker crash  one torchrun, 2 workers, --max-restarts 3; worker rank 1 is SIGKILLed at step >= 6.
  node loss     two torchrun agents (--nnodes 1:2, c10d on a file store, the notes' --rdzv-conf), one worker
                each; the node running global rank 0 (agent and worker) is SIGKILLed at step >= 6; the other
                agent continues at world size 1.
  frozen node   the same two agents; the node of rank 1 is SIGSTOPped whole (agent and worker): a host that
                is gone without closing a socket (no FIN), as when its link is cut; the job continues at world
                size 1 once the liveness heartbeat (or, before it, --dist.timeout_s) notices.
  frozen store  the same, the node of rank 0, whose worker hosts the job's c10d store. On one machine it does
                not recover, by design: the stopped worker still holds the run directory's lock on this host
                (it could write again if continued); tests/test_multinode.py measures it across hosts.
  hung rank     one torchrun, 2 workers; worker rank 1 is SIGSTOPped (alive, silent).
  stalled rank  the same, worker rank 1 sleeps in its step at step 6 (alive, its heartbeat thread beating): the
                hang limit (learned: its floor, 60 s) notices.
The failure kinds run with DEFAULT settings (--dist.timeout_s 300). ``--code DIR`` runs another checkout (e.g. a
``git worktree`` of the code before liveness) for the comparison: expect dist.timeout_s plus a restart there.
``--extra="--dist.heartbeat_s 0"`` (with the =) passes trainer flags to every job; that one turns liveness
off: today's behaviour at default settings, without a second checkout.

cold start = command launched -> its first training step (metrics.jsonl ``time``);
recovery   = kill -> the first training step logged after the resume (any replayed step counts: it is the
             first step the recovered job completes). Target: recovery <= 1.5 x cold start, as medians.

Settings as in launch/: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, OMP_NUM_THREADS=1. The machine's load is
printed with the table, because on 2 shared cores both numbers move with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import elastic_util  # noqa: E402
from elastic_util import Jobs, descendants, kill_tree, read_records, torchrun_cmd, wait_for_record, worker_env  # noqa: E402
from elastictrain.faults import FaultInjector  # noqa: E402
from helpers import tiny_args, wait_for  # noqa: E402

TARGET = 1.5
LIMIT_S = 900.0
"""How long a frozen or hung scenario waits for a resumed step (--limit-s): 3 x the default --dist.timeout_s."""
EXTRA: list[str] = []  # --extra: trainer flags added to every job


def job_args(run_dir: Path, *more: str) -> list[str]:
    return tiny_args(run_dir, *more, *EXTRA)


def is_train(r: dict[str, Any], world_size: int | None = None, min_step: int = 0) -> bool:
    return r["kind"] == "train" and r["step"] >= min_step and world_size in (None, r["world_size"])


def past_step_6(run_dir: Path, agent: Any = None) -> None:
    """At world size 2 past step 6 and the epoch-1 snapshot (step 4) committed: a failure from here on must
    resume, not start over (the commit runs in the background and may land after step 6 on a loaded machine;
    without it the recovered job starts fresh, which is no resume to time)."""
    wait_for_record(run_dir, lambda r: is_train(r, 2, 6), 300, "step 6", agent)
    wait_for(lambda: (run_dir / "snapshots" / "epoch00001-step00000004" / "COMMIT.json").exists(), 60,
             "the epoch-1 snapshot committed")


def worker_of_rank(agent_pid: int, rank: str) -> int:
    return next(pid for pid in descendants(agent_pid) if worker_env(pid, "RANK") == rank)


class NoRecovery(Exception):
    """No resumed step within the scenario's limit; carries the cold start and the run's log tail."""

    def __init__(self, cold: float, run_dir: Path, timeout: float) -> None:
        tail = (run_dir / "train.log").read_text(errors="replace")[-1500:] if (run_dir / "train.log").exists() else ""
        super().__init__(f"no resumed step {timeout:.0f} s after the failure; train.log ends:\n{tail}")
        self.cold = cold


def first_step_after_resume(run_dir: Path, timeout: float, cold: float = math.nan) -> dict[str, Any]:
    def after_resume(records: list[dict[str, Any]]) -> dict[str, Any] | None:
        resumed = False
        for r in records:
            resumed = resumed or (r["kind"] == "event" and r.get("event") == "resume")
            if resumed and r["kind"] == "train":
                return r
        return None

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = after_resume(read_records(run_dir))
        if found:
            return found
        time.sleep(0.02)
    raise NoRecovery(cold, run_dir, timeout)


def worker_crash(root: Path) -> tuple[float, float]:
    jobs, run_dir = Jobs(root), root / "run"
    try:
        launched = time.time()
        agent = jobs.start(torchrun_cmd(job_args(run_dir), root, nproc=2), "agent")
        first = wait_for_record(run_dir, is_train, 300, "first step", agent)
        past_step_6(run_dir, agent)
        victim = worker_of_rank(agent.pid, "1")
        killed = time.time()
        os.kill(victim, 9)
        resumed = first_step_after_resume(run_dir, 300)
        jobs.wait(agent, 300, "agent")
        return first["time"] - launched, resumed["time"] - killed
    finally:
        jobs.cleanup()


def node_loss(root: Path) -> tuple[float, float]:
    jobs, run_dir, rdzv_id = Jobs(root), root / "run", uuid.uuid4().hex[:12]
    try:
        launched = time.time()
        agents = [jobs.start(torchrun_cmd(job_args(run_dir), root, nnodes="1:2", rdzv_id=rdzv_id), f"node-{i}")
                  for i in range(2)]
        first = wait_for_record(run_dir, is_train, 300, "first step")
        past_step_6(run_dir)
        lost = next(a for a in agents if any(worker_env(p, "RANK") == "0" for p in descendants(a.pid)))
        killed = time.time()
        kill_tree(lost.pid)
        resumed = first_step_after_resume(run_dir, 300)
        assert resumed["world_size"] == 1, resumed
        survivor = next(a for a in agents if a is not lost)
        jobs.wait(survivor, 300, "survivor")
        return first["time"] - launched, resumed["time"] - killed
    finally:
        jobs.cleanup()


def frozen(root: Path, rank: str) -> tuple[float, float]:
    """Two agents; SIGSTOP the whole node (agent and worker) of ``rank``: nothing of it closes a socket."""
    jobs, run_dir, rdzv_id = Jobs(root), root / "run", uuid.uuid4().hex[:12]
    try:
        launched = time.time()
        agents = [jobs.start(torchrun_cmd(job_args(run_dir, "--epochs", "6"), root, nnodes="1:2", rdzv_id=rdzv_id),
                             f"node-{i}") for i in range(2)]
        first = wait_for_record(run_dir, is_train, 300, "first step")
        past_step_6(run_dir)
        lost = next(a for a in agents if any(worker_env(p, "RANK") == rank for p in descendants(a.pid)))
        stopped = time.time()
        kill_tree(lost.pid, signal.SIGSTOP)
        resumed = first_step_after_resume(run_dir, LIMIT_S, first["time"] - launched)
        assert resumed["world_size"] == 1, resumed
        return first["time"] - launched, resumed["time"] - stopped
    finally:
        jobs.cleanup()


def hung_rank(root: Path) -> tuple[float, float]:
    jobs, run_dir = Jobs(root), root / "run"
    try:
        launched = time.time()
        agent = jobs.start(torchrun_cmd(job_args(run_dir, "--epochs", "6"), root, nproc=2), "agent")
        first = wait_for_record(run_dir, is_train, 300, "first step", agent)
        past_step_6(run_dir, agent)
        victim = worker_of_rank(agent.pid, "1")
        stopped = time.time()
        os.kill(victim, signal.SIGSTOP)
        resumed = first_step_after_resume(run_dir, LIMIT_S, first["time"] - launched)
        return first["time"] - launched, resumed["time"] - stopped
    finally:
        jobs.cleanup()


def stalled_rank(root: Path) -> tuple[float, float]:
    """One torchrun, 2 workers; worker rank 1 sleeps in its step (``stall`` fault), its threads alive."""
    jobs, run_dir, fault = Jobs(root), root / "run", "stall@step=6:rank=1"
    try:
        launched = time.time()
        agent = jobs.start(torchrun_cmd(job_args(run_dir, "--epochs", "6", "--debug.fault", fault), root, nproc=2),
                           "agent")
        first = wait_for_record(run_dir, is_train, 300, "first step", agent)
        marker = FaultInjector(fault, run_dir, rank=1).marker
        wait_for(lambda: marker.exists(), 300, "the stall")
        wait_for(lambda: (run_dir / "snapshots" / "epoch00001-step00000004" / "COMMIT.json").exists(), 60,
                 "the epoch-1 snapshot committed")
        resumed = first_step_after_resume(run_dir, LIMIT_S, first["time"] - launched)
        return first["time"] - launched, resumed["time"] - marker.stat().st_mtime
    finally:
        jobs.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--scenarios", default="worker crash,node loss,frozen node,hung rank,stalled rank")
    parser.add_argument("--code", type=Path, help="run the trainer of this checkout instead (for 'today')")
    parser.add_argument("--extra", default="",
                        help="trainer flags for every job, e.g. --extra=\"--dist.heartbeat_s 0\"")
    parser.add_argument("--limit-s", type=float, default=LIMIT_S,
                        help="how long a frozen or hung scenario waits for a resumed step (then: none, inf)")
    args = parser.parse_args()
    EXTRA[:] = args.extra.split()
    globals()["LIMIT_S"] = args.limit_s
    os.environ.update(OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    if args.code:  # the workers run `-m elastictrain` in the jobs' working directory
        elastic_util.ROOT = args.code.resolve()
        os.environ["PYTHONPATH"] = str(args.code.resolve())
    scenarios = {"worker crash": worker_crash, "node loss": node_loss,
                 "frozen node": lambda root: frozen(root, "1"), "frozen store": lambda root: frozen(root, "0"),
                 "hung rank": hung_rank, "stalled rank": stalled_rank}
    results: dict[str, list[tuple[float, float]]] = {}
    for name in [s.strip() for s in args.scenarios.split(",")]:
        results[name] = []
        for trial in range(args.trials):
            with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
                try:
                    cold, recovery = scenarios[name](Path(tmp))
                except NoRecovery as e:  # today's code may never recover: a finding, not a crash of the bench
                    cold, recovery = e.cold, math.inf
                    print(f"{name} trial {trial + 1}: {e}", flush=True)
            results[name].append((cold, recovery))
            print(f"{name} trial {trial + 1}: cold start {cold:.2f}s, recovery {recovery:.2f}s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\nrecovery: kill -> first resumed step, vs launch -> first step; medians of {args.trials} "
          f"(min-max); {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"{'scenario':<14}{'cold start s':>20}{'recovery s':>20}{'ratio':>8}   target <= {TARGET}")
    summary = {}
    for name, runs in results.items():
        cold, rec = [c for c, _ in runs], [r for _, r in runs]
        ratio = statistics.median(rec) / statistics.median(cold)
        summary[name] = {"cold_start_s": cold, "recovery_s": rec, "ratio_of_medians": ratio}
        print(f"{name:<14}{_cell(cold):>20}{_cell(rec):>20}{ratio:>8.2f}   {'ok' if ratio <= TARGET else 'MISSED'}")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    return 0


def _cell(values: list[float]) -> str:
    def s(v: float) -> str:
        return f"> {LIMIT_S:.0f}" if math.isinf(v) else f"{v:.1f}"

    return f"{s(statistics.median(values))} ({s(min(values))}-{s(max(values))})"


if __name__ == "__main__":
    sys.exit(main())

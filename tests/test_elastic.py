"""The job survives without intervention: real torchrun agents (c10d rendezvous on a file store, gloo,
CPU) in subprocesses, disturbed the way clusters disturb jobs, judged from what is on disk.

- a worker crashes (SIGKILL, a Python exception, SIGKILL while restoring): torchrun restarts the
  workers in the same invocation and the final weights equal the uninterrupted run's bit for bit;
- a preemption signal reaches the agent (SIGTERM; SIGUSR1 with --signals-to-handle): the workers
  snapshot at the current step and exit 75 well inside the deadline; the same command continues exactly;
- a node (agent and its workers) is lost: the other continues at world size 1; a node that arrives
  is admitted and the job grows back to world size 2, with the same global batch and no sample twice;
- a peer freezes (SIGSTOP): the collective timeout fails the job, torchrun kills and restarts it.

Every test uses its own file store and rendezvous id, and kills what it started (orphans included).
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from elastic_util import (GLOBAL_BATCH, STEPS_PER_EPOCH, Jobs, check_sample_offsets, descendants, events, kill_tree,
                          read_records, ready_agents, torchrun_cmd, train_records, wait_for_record, worker_env)
from elastictrain.snapshot import manifest
from elastictrain.faults import FaultInjector
from helpers import assert_bitwise_equal, load_final, tiny_args, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[Jobs]:
    jobs = Jobs(tmp_path)
    try:
        yield jobs
    finally:
        jobs.cleanup()
    assert not jobs.leftovers(), "processes of this test survived the clean-up"


# ------------------------------------------------------------------------------------------ crashes


@pytest.mark.parametrize("fault", ["sigkill@step=10:rank=1", "raise@step=9:rank=0"])
def test_crashed_worker_is_restarted_by_torchrun(fault: str, reference_runs: dict[int, Path], jobs: Jobs,
                                                 tmp_path: Path) -> None:
    """One torchrun invocation with --max-restarts 3 absorbs the crash and finishes the job exactly."""
    run_dir = tmp_path / "run"
    agent = jobs.start(torchrun_cmd(tiny_args(run_dir, "--debug.fault", fault), tmp_path, nproc=2), "agent")
    assert jobs.wait(agent, 240, "agent") == 0, jobs.log("agent")[-4000:]
    records = read_records(run_dir)
    (resume,) = events(records, "resume")
    # The snapshot after epoch 1 (step 4) is committed before the one after epoch 2 starts (step 8).
    assert resume["step"] in (4, 8) and resume["attempt"] == 1 and resume["world_size"] == 2
    assert_bitwise_equal(load_final(run_dir), load_final(reference_runs[2]))


# --------------------------------------------------------------------------------------- preemption


@pytest.mark.parametrize("signame, fault", [("SIGTERM", "sigkill@restore=0:rank=1"), ("SIGUSR1", "")])
def test_preemption_signal_to_the_agent_snapshots_and_the_same_command_resumes(
        signame: str, fault: str, reference_runs: dict[int, Path], jobs: Jobs, tmp_path: Path) -> None:
    """The signal goes to the torchrun agent only (as SLURM or a cloud scheduler sends it); the agent
    forwards it (SIGUSR1 only when listed in --signals-to-handle); the workers agree at the next step
    boundary, snapshot that step, log it and exit 75, well inside --preemption.deadline_s. Running the
    very same command again continues with the exact next batch. With SIGTERM the command also carries
    ``sigkill@restore=0:rank=1``: it does nothing in the first run (nothing to restore), and in the second
    kills a worker in the middle of the restore, which torchrun's restart absorbs."""
    run_dir, deadline = tmp_path / "run", 20.0
    extra = ["--preemption.deadline_s", str(deadline), *(["--debug.fault", fault] if fault else [])]
    # --shutdown-timeout above the deadline: torchrun SIGKILLs workers that are still snapshotting after it.
    cmd = torchrun_cmd(tiny_args(run_dir, *extra), tmp_path, nproc=2, shutdown_timeout=30,
                       signals="SIGTERM,SIGINT,SIGUSR1")
    first = jobs.start(cmd, "first")
    # Step 2 of 12: mid-epoch, with seconds of training left for the signal to land in.
    wait_for_record(run_dir, lambda r: r["kind"] == "train" and r["step"] >= 2, 300, "training step 2", first)
    sent = time.time()
    os.kill(first.pid, getattr(signal, signame))
    rc = jobs.wait(first, 2 * deadline, "first")
    agent_exit = time.time() - sent
    before = read_records(run_dir)
    (preempted,) = events(before, "preempted")
    last_step = max(r["step"] for r in train_records(before))
    assert preempted["signal"] == signame and preempted["exit_code"] == 75 and preempted["step"] == last_step
    assert manifest.read_commit(run_dir / "snapshots" / preempted["snapshot"]) is not None
    # Measured on the loaded 2-core machine: snapshot logged ~1 s after the signal, the agent gone after ~4.5 s.
    assert preempted["time"] - sent < deadline / 2 and agent_exit < deadline, (preempted["time"] - sent, agent_exit)
    assert "forcefully exiting" not in jobs.log("first"), "torchrun had to SIGKILL a worker"
    print(f"{signame}: snapshot logged {preempted['time'] - sent:.2f}s after the signal, agent exit {rc} "
          f"after {agent_exit:.2f}s (deadline {deadline:.0f}s)")

    second = jobs.start(cmd, "second")
    assert jobs.wait(second, 300, "second") == 0, jobs.log("second")[-4000:]
    after = read_records(run_dir)[len(before):]
    (resume,) = events(after, "resume")  # an attempt killed while restoring logs nothing
    assert resume["attempt"] == (1 if fault else 0)  # ... but torchrun had to restart the group once
    assert (resume["step"], resume["sample_offset"]) == (preempted["step"], preempted_offset(before))
    assert train_records(after)[0]["step"] == preempted["step"] + 1
    assert_bitwise_equal(load_final(run_dir), load_final(reference_runs[2]))


def preempted_offset(records: list[dict[str, Any]]) -> int:
    """The sample offset at the last logged step (0 if it ended an epoch: the next epoch starts at 0)."""
    last = train_records(records)[-1]
    return 0 if last["sample_offset"] == STEPS_PER_EPOCH * GLOBAL_BATCH else last["sample_offset"]


# ---------------------------------------------------------------------------------- node loss and return


def test_node_loss_then_a_new_node_joins(jobs: Jobs, tmp_path: Path) -> None:
    """Two agents (one worker each) under ``--nnodes 1:2`` on a file store; the node running global rank 0
    is lost (agent and worker SIGKILLed at once); the survivor continues at world size 1 from the latest
    complete snapshot; a third agent arrives and the job grows back to world size 2 and finishes.

    How growth happens (torch 2.14.1, agent/server/api.py ``_invoke_run``): an agent re-rendezvouses only
    when its workers fail, or when, with healthy workers, its monitor loop (every --monitor-interval,
    0.1 s) sees ``num_nodes_waiting() > 0``. The arriving agent puts itself on the rendezvous wait list,
    the survivor SIGTERMs its worker (a membership change, not counted as a restart), and that worker
    takes a preemption snapshot at its current step and exits 75: the grown world starts exactly there.

    No sample twice: ``data.py`` makes the samples of global step k of an epoch a pure function of
    (seed, epoch, sample offset k*G), whatever the world size (ranks only split that step's slice). So
    checking offsets is checking samples: within an attempt, the offsets of an epoch go up by exactly the
    global batch G from where the attempt started (0, or the resumed snapshot's offset), and along the
    final history (the last attempt to log each step wins) every epoch consists of offsets G, 2G, ..., 4G
    once each: nothing repeated, nothing skipped. G = 8 at world size 1 and 2 alike (the per-rank micro
    batch and accumulation change instead): the global batch the config asks for.
    """
    run_dir, rdzv_id = tmp_path / "run", uuid.uuid4().hex[:12]
    first, third = tmp_path / "go-first", tmp_path / "go-third"
    args = tiny_args(run_dir, "--epochs", "8", "--dist.timeout_s", "30")

    def node(name: str, go: Path) -> Any:
        return jobs.start(torchrun_cmd(args, tmp_path, nnodes="1:2", rdzv_id=rdzv_id, go=go), name)

    nodes = {"node-a": node("node-a", first), "node-b": node("node-b", first)}
    nodes["node-c"] = node("node-c", third)  # imports now, joins later
    wait_for(lambda: ready_agents(first) == 2 and ready_agents(third) == 1, 180, "three agents imported")
    first.touch()
    wait_for_record(run_dir, lambda r: r["kind"] == "train" and r["world_size"] == 2 and r["step"] >= 6, 300,
                    "training at world size 2")
    # The premise: a complete snapshot (epoch 1, committed in the background while epoch 2 trains).
    wait_for(lambda: (run_dir / "snapshots" / "epoch00001-step00000004" / "COMMIT.json").exists(), 60,
             "the epoch-1 snapshot committed")
    lost = next(name for name in ("node-a", "node-b") if rank_of_worker(nodes[name].pid) == "0")
    kill_tree(nodes.pop(lost).pid)
    killed = time.time()
    shrunk = wait_for_record(run_dir, lambda r: r["kind"] == "train" and r["world_size"] == 1, 180,
                             "training at world size 1")
    third.touch()
    for name, proc in nodes.items():
        assert jobs.wait(proc, 300, name) == 0, jobs.log(name)[-4000:]
    print(f"node loss: first step at world size 1 {shrunk['time'] - killed:.1f}s after the kill")

    records = read_records(run_dir)
    trained = train_records(records)
    sizes = [r["world_size"] for r in trained]
    sizes = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert sizes[sizes.index(2):] == [2, 1, 2]
    resumes = [(r["previous_world_size"], r["world_size"]) for r in events(records, "resume")]
    assert resumes[-2:] == [(2, 1), (1, 2)], resumes
    # The survivor left world size 1 through a preemption snapshot at its current step: nothing lost.
    grow = events(records, "resume")[-1]
    (handover,) = [e for e in events(records, "preempted") if e["world_size"] == 1]
    assert handover["signal"] == "SIGTERM" and grow["step"] == handover["step"]
    check_sample_offsets(records)
    check_loss_continuity(records)
    assert (run_dir / "final_model.pt").exists()


def rank_of_worker(agent_pid: int) -> str | None:
    ranks = [worker_env(pid, "RANK") for pid in descendants(agent_pid)]
    return next((r for r in ranks if r is not None), None)


def check_loss_continuity(records: list[dict[str, Any]]) -> None:
    """Loosely smooth: a step replayed at another world size has nearly the loss it had (batch norm sees
    micro batches of another size), and the final history never jumps by half or more between steps."""
    seen: dict[int, float] = {}
    for r in train_records(records):
        if r["step"] in seen:
            assert abs(r["loss"] - seen[r["step"]]) < 0.25 * seen[r["step"]], (r, seen[r["step"]])
        seen[r["step"]] = r["loss"]
    losses = [seen[s] for s in sorted(seen)]
    assert all(0.67 < b / a < 1.5 for a, b in zip(losses, losses[1:])), losses


# -------------------------------------------------------------------------------------------------- hangs


def test_hung_peer_fails_within_the_collective_timeout_and_is_restarted(
        reference_runs: dict[int, Path], jobs: Jobs, tmp_path: Path) -> None:
    """Rank 1 SIGSTOPs itself right after the epoch-1 snapshot was written (so that one is complete: its commit
    is written by rank 0), while epoch 2 trains. Rank 0's next collective fails after --dist.timeout_s
    (gloo's default would be 30 minutes); torchrun then SIGTERMs both workers, which the stopped one
    cannot act on, and SIGKILLs it after its fixed 30 s restart grace (torch 2.14.1: ``_stop_workers``
    ignores --shutdown-timeout); the restarted workers resume and finish the job exactly."""
    run_dir, timeout_s = tmp_path / "run", 10
    fault = "hang@saved=4:rank=1"
    # The last resort alone: the liveness heartbeats (tests/test_liveness.py) would notice the stop first.
    cmd = torchrun_cmd(tiny_args(run_dir, "--debug.fault", fault, "--dist.timeout_s", str(timeout_s),
                                 "--dist.heartbeat_s", "0"), tmp_path, nproc=2)
    agent = jobs.start(cmd, "agent")
    assert jobs.wait(agent, 300, "agent") == 0, jobs.log("agent")[-4000:]
    hung = FaultInjector(fault, run_dir, rank=1).marker.stat().st_mtime  # made just before the SIGSTOP
    (failed,) = list((tmp_path / "logs").glob("*/attempt_0/0/error.json"))  # rank 0's @record error file
    # gloo's words for its timeout: "timed out", or "Application timeout caused pair closure" when the
    # timeout closed the connection first (seen once in a full run)
    assert re.search(r"timed out|timeout caused", failed.read_text(), re.IGNORECASE), failed.read_text()[:2000]
    # Not `alone` (conftest.py): a second job's load may delay writing the error file, not gloo's timeout.
    assert failed.stat().st_mtime - hung < timeout_s + 10
    assert "forcefully exiting" in jobs.log("agent")  # the stopped worker ignored SIGTERM; torchrun SIGKILLed it
    (resume,) = events(read_records(run_dir), "resume")
    assert resume["time"] - hung < timeout_s + 30 + 60  # + torchrun's grace + a restart on a loaded machine
    print(f"hang: rank 0 failed {failed.stat().st_mtime - hung:.1f}s after the hang, resumed after "
          f"{resume['time'] - hung:.1f}s")
    assert_bitwise_equal(load_final(run_dir), load_final(reference_runs[2]))

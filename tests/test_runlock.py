"""The run-directory lock: the staleness rules (pure, with made-up hosts, pids and clocks), the lock file
on a real file system (take, refuse, take over, renew, fence, release), and two real commands on one
--run.dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from elastic_util import Jobs
from elastictrain import runlock
from elastictrain.errors import UserError
from elastictrain.osutil import proc_stat
from elastictrain.runlock import Holder, RunLock, decide, read_lock
from helpers import ROOT, assert_bitwise_equal, cli_cmd, load_final, run_cli, tiny_args, wait_for

NOW = 1_000_000.0
ME = Holder("node1", "boot-a/pid:[1]", 100, "500", {"slurm_job_id": "", "slurm_restart_count": "",
                                                      "torchelastic_run_id": ""}, NOW, NOW, 30.0, "mine")


def holder(**changes: object) -> Holder:
    fields = {"token": "theirs", "heartbeat": NOW - 1, "since": NOW - 100, **changes}
    return replace(ME, **fields)  # type: ignore[arg-type]


def alive(pids: set[int]) -> object:
    return lambda pid, started: pid in pids


# ------------------------------------------------------------------------------------- the rules


def test_same_machine_decides_by_the_pid_alone() -> None:
    running = decide(holder(pid=7), ME, NOW, alive({7}))
    assert running.action == "refuse" and "pid 7 on host node1" in running.why
    assert decide(holder(pid=7), ME, NOW, alive(set())).action == "take"
    # A lease long expired does not matter while the process runs (a frozen clock, a stopped process).
    assert decide(holder(pid=7, heartbeat=NOW - 3600), ME, NOW, alive({7})).action == "refuse"
    # Another host name on the same machine (network-namespace hosts share boot id and pids): still the pid.
    assert decide(holder(pid=7, host="tr2"), ME, NOW, alive(set())).action == "take"
    # An earlier attempt of our own job still running here (a partitioned worker not yet timed out): wait.
    job = {"slurm_job_id": "", "slurm_restart_count": "", "torchelastic_run_id": "abc"}
    me = replace(ME, job=job)
    assert decide(holder(pid=7, host="tr2", job=job), me, NOW, alive({7})).action == "wait"


def test_another_machine_decides_by_the_lease() -> None:
    for other in (holder(host="node2", machine="boot-b/pid:[1]"), holder(machine="boot-b/pid:[1]"),
                  holder(machine="boot-a/pid:[9]")):
        fresh = decide(other, ME, NOW, alive({other.pid}))  # pids of another machine are never looked at
        assert fresh.action == "refuse" and "expires 30 s after its last renewal" in fresh.why
        assert decide(replace(other, heartbeat=NOW - 31), ME, NOW, alive({other.pid})).action == "take"
    # The holder's own lease counts, not ours.
    other = holder(host="node2", machine="boot-b/pid:[1]", heartbeat=NOW - 31, lease_s=60)
    assert decide(other, ME, NOW, alive(set())).action == "refuse"


def test_slurm_requeue_takes_over_at_once_and_the_same_job_waits() -> None:
    me = replace(ME, job={"slurm_job_id": "42", "slurm_restart_count": "2", "torchelastic_run_id": "42"})
    earlier = holder(host="node2", machine="boot-b/pid:[1]",
                     job={"slurm_job_id": "42", "slurm_restart_count": "1", "torchelastic_run_id": "42"})
    assert decide(earlier, me, NOW, alive(set())).action == "take"
    # The same allocation on another node (rank 0 moved at an elastic restart): wait out its lease.
    same = decide(replace(earlier, job=me.job), me, NOW, alive(set()))
    assert same.action == "wait" and same.until == NOW - 1 + 30
    other_job = holder(host="node2", machine="boot-b/pid:[1]",
                       job={"slurm_job_id": "41", "slurm_restart_count": "5", "torchelastic_run_id": ""})
    assert decide(other_job, me, NOW, alive(set())).action == "refuse"
    # A predecessor of ours still running on this machine: the pid is hard evidence; it is on its way out.
    assert decide(replace(earlier, machine=ME.machine, pid=7), me, NOW, alive({7})).action == "wait"


def test_process_alive_tells_a_reused_pid() -> None:
    started = runlock.process_started(os.getpid())
    assert runlock.process_alive(os.getpid(), started)
    assert not runlock.process_alive(os.getpid(), str(int(started) + 1))  # same pid, another process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not runlock.process_alive(dead.pid, "")


# ----------------------------------------------------------------------------------- the lock file


def write_lock(run_dir: Path, h: Holder) -> None:
    """As another holder would: complete, atomically."""
    tmp = run_dir / "other.tmp"
    tmp.write_text(json.dumps(asdict(h)))
    os.replace(tmp, run_dir / runlock.LOCK_FILE)


def test_take_refuse_release(tmp_path: Path) -> None:
    first = RunLock(tmp_path, 30.0)
    first.acquire(0)
    held = read_lock(tmp_path / ".lock")
    assert held is not None and held.pid == os.getpid() and held.host == socket.gethostname()
    with pytest.raises(UserError) as err:
        RunLock(tmp_path, 30.0).acquire(0)  # the same process again stands for a second command
    assert f"--run.dir {tmp_path} is in use" in str(err.value) and f"pid {os.getpid()} on host" in str(err.value)
    assert "since " in str(err.value)
    first.start(first.token)
    first.release()
    assert not (tmp_path / ".lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp files left either


def test_dead_holder_on_this_machine_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = runlock.myself(30.0)
    write_lock(tmp_path, replace(me, pid=dead.pid, started="", token="old"))
    lock = RunLock(tmp_path, 30.0)
    lock.acquire(0)
    assert read_lock(tmp_path / ".lock").token == lock.token  # type: ignore[union-attr]
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]


def test_another_host_fresh_refuses_and_expired_is_taken_over(tmp_path: Path) -> None:
    other = replace(runlock.myself(5.0), host="elsewhere", machine="x", pid=1234, token="old")
    write_lock(tmp_path, replace(other, heartbeat=time.time() - 1))
    with pytest.raises(UserError, match="pid 1234 on host elsewhere"):
        RunLock(tmp_path, 30.0).acquire(0)
    write_lock(tmp_path, replace(other, heartbeat=time.time() - 6))  # its 5 s lease ran out
    lock = RunLock(tmp_path, 30.0)
    lock.acquire(0)
    assert read_lock(tmp_path / ".lock").host == socket.gethostname()  # type: ignore[union-attr]


def test_an_earlier_attempt_of_our_job_is_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder is our own job's earlier attempt, still running (a partitioned worker waiting out its
    collective timeout): the new rank 0 waits, and takes the lock over once that process is gone."""
    code = ("import os, sys, time\nfrom pathlib import Path\nfrom elastictrain.runlock import RunLock\n"
            "lock = RunLock(Path(sys.argv[1]), 30.0)\nlock.acquire(0)\nprint('held', flush=True)\n"
            "time.sleep(1.5)\nos._exit(1)\n")
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "job-x"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"  # type: ignore[union-attr]
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-x")
        lock = RunLock(tmp_path, 30.0)
        lock.acquire(20)
        assert proc.poll() is not None and read_lock(tmp_path / ".lock").token == lock.token  # type: ignore[union-attr]
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another-job")
        with pytest.raises(UserError, match="is in use"):  # anybody else is refused at once
            RunLock(tmp_path, 30.0).acquire(20)
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_that_is_not_a_lock_refuses_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / ".lock").write_text("garbage")
    with pytest.raises(UserError, match=r"\.lock is not a run lock"):
        RunLock(tmp_path, 30.0).acquire(0)


def test_heartbeat_renews_and_a_taken_over_holder_fences_itself(tmp_path: Path) -> None:
    """A real holder process renews its lease every lease/5 s; when another host takes the lock over, it
    exits at once (within one renewal) with EXIT_FENCED, without waiting for anything."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom elastictrain.runlock import RunLock\n"
            "lock = RunLock(Path(sys.argv[1]), 1.0)\nlock.acquire(0)\nlock.start(lock.token)\n"
            "print('held', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"  # type: ignore[union-attr]
        first = read_lock(tmp_path / ".lock")
        time.sleep(0.7)
        renewed = read_lock(tmp_path / ".lock")
        assert renewed.token == first.token and renewed.heartbeat > first.heartbeat  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        # The newcomer writes its lock as its own heartbeat would (a renewal in flight may overwrite it once).
        while proc.poll() is None and time.monotonic() < deadline:
            write_lock(tmp_path, replace(renewed, host="elsewhere", token="newcomer"))  # type: ignore[arg-type]
            time.sleep(0.1)
        assert proc.wait(timeout=1) == runlock.EXIT_FENCED
        assert read_lock(tmp_path / ".lock").token == "newcomer"  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()


def test_writability_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert "exists and is not a directory" in str(runlock.check_writable(tmp_path / "file"))
    assert runlock.check_writable(tmp_path / "new" / "run") is None
    assert (tmp_path / "new" / "run" / "snapshots").is_dir()


# -------------------------------------------------------------------------------- real commands


@pytest.mark.slow
def test_second_command_on_a_run_dir_refuses_and_the_first_is_untouched(reference_runs: dict[int, Path],
                                                                         tmp_path: Path) -> None:
    """Two plain commands on one --run.dir: the second exits 2 naming the first (host, pid, since) and
    touches nothing; the first finishes bitwise equal to the uninterrupted reference. The first stops
    itself (SIGSTOP, the 'hang' fault) after step 2 while the second runs, so that it cannot finish first."""
    run_dir = tmp_path / "run"
    jobs = Jobs(tmp_path)
    try:
        first = jobs.start(cli_cmd(tiny_args(run_dir, "--debug.fault", "hang@step=2")), "first")
        wait_for(lambda: (proc_stat(first.pid) or ["?"])[0] == "T", 120, "the first run to stop after step 2")
        second = run_cli(tiny_args(run_dir), timeout=120)
        assert second.returncode == 2, second.stdout[-3000:]
        assert f"pid {first.pid} on host {socket.gethostname()} since " in second.stdout
        assert "Traceback" not in second.stdout
        os.kill(first.pid, signal.SIGCONT)
        assert jobs.wait(first, 180, "first") == 0, jobs.log("first")[-3000:]
    finally:
        jobs.cleanup()
    assert "incomplete" not in jobs.log("first")
    assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))
    assert not (run_dir / ".lock").exists()

"""Preemption signals delivered the SLURM way: to every process of the job, DataLoader workers included."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import assert_bitwise_equal, load_final, read_jsonl, run_cli, tiny_args

# The second Ctrl-C is judged against the clock: no second job beside it (conftest.py).
pytestmark = pytest.mark.alone


def test_sigterm_to_whole_process_group_with_loader_workers(reference_runs: dict[int, Path], tmp_path: Path) -> None:
    """SIGTERM reaches the trainer and its two DataLoader workers at once (groupterm fault, fired once).
    The workers ignore it, the trainer snapshots at the step boundary and exits 75; the same command then
    finishes bitwise equal to the uninterrupted run, which used no workers at all: the worker count does
    not change a single sample either."""
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, "--data.num_workers", "2", "--debug.fault", "groupterm@step=5")
    first = run_cli(args)
    assert first.returncode == 75, first.stdout[-3000:]
    assert "preemption requested (SIGTERM)" in first.stdout
    assert "DataLoader worker" not in first.stdout
    preempted = [r for r in read_jsonl(run_dir) if r.get("event") == "preempted"]
    assert preempted and preempted[0]["step"] == 5
    second = run_cli(args, check=True)
    assert "resuming from epoch 1 step 5" in second.stdout
    assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))


@pytest.mark.parametrize("case", ["local tier", "engine killed"])
def test_sigterm_to_the_whole_group_spares_the_snapshot_helpers(reference_runs: dict[int, Path], tmp_path: Path,
                                                                case: str) -> None:
    """The same SIGTERM to every process, with the snapshot helpers running: ``local tier`` (a local snapshot
    every step, the durable copy by the writer process): the engine and writer processes ignore the signal,
    which is their rank's to handle, and die with it, so none of them dies of it. ``engine killed`` (no local
    tier): the engine process is also killed alone while it writes the preemption snapshot, which is then
    taken again by a new one. Either way: exit 75, and the same command resumes from the preemption snapshot
    and ends bitwise."""
    import shutil
    import uuid

    run_dir, shm = tmp_path / "run", Path("/dev/shm") / f"et-test-{uuid.uuid4().hex[:8]}"
    extra = ["--checkpoint.local_every_steps", "1", "--checkpoint.local_dir", str(shm)] if case == "local tier" else []
    fault = "groupterm@step=5" + (",sigkill@engine=5" if case == "engine killed" else "")
    args = tiny_args(run_dir, *extra, "--debug.fault", fault)
    try:
        first = run_cli(args)
        assert first.returncode == 75, first.stdout[-3000:]
        died = "process died (signal SIGKILL)" if case == "engine killed" else None
        assert [line for line in first.stdout.splitlines() if "process died" in line and (died is None or died not in line)] == []
        if case == "engine killed":
            assert "epoch00001-step00000005 not written: the snapshot engine process died (signal SIGKILL)" in first.stdout
            assert "snapshot epoch00001-step00000005 was lost; taking it again" in first.stdout
        else:
            assert "epoch00001-step00000005 committed (copied from the local tier by the writer process" in first.stdout
        preempted = [r for r in read_jsonl(run_dir) if r.get("event") == "preempted"]
        assert [(r["step"], r["snapshot"]) for r in preempted] == [(5, "epoch00001-step00000005")]
        second = run_cli(args, check=True)
        assert "resuming from epoch 1 step 5" in second.stdout
        assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_second_ctrl_c_stops_the_run_at_once_without_a_snapshot(reference_runs: dict[int, Path],
                                                                 tmp_path: Path) -> None:
    """A person's Ctrl-C on a slow step (stalled here by the test fault): the notice appears at once; a second
    Ctrl-C ends the run with 130 while the step still runs, with no snapshot of it; the same command then
    resumes from the last complete snapshot."""
    import signal
    import subprocess

    from helpers import ROOT, base_env, cli_cmd, kill_group, wait_for

    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, "--debug.fault", "stall@step=6", "--checkpoint.mode", "sync")
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cli_cmd(args), cwd=ROOT, env=base_env(), stdout=out, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        faults = run_dir / ".faults"
        wait_for(lambda: faults.is_dir() and any(faults.iterdir()), 120, "the stalled step")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "Press Ctrl-C again to stop at once" in out_path.read_text(), 30, "the notice")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130  # the stall lasts 600 s: only the second Ctrl-C can end it now
    finally:
        kill_group(proc)
    records = read_jsonl(run_dir)
    assert not [r for r in records if r.get("event") == "preempted"]
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir() if p.name.startswith("epoch")) == [
        "epoch00001-step00000004"]
    again = run_cli(args, check=True)
    assert "resuming from epoch 1 step 4" in again.stdout
    assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))

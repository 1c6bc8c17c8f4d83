"""Preemption signals delivered the SLURM way: to every process of the job, DataLoader workers included."""

from __future__ import annotations

from pathlib import Path

from helpers import assert_bitwise_equal, load_final, read_jsonl, run_cli, tiny_args


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

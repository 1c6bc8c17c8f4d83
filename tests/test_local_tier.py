"""The node-local snapshot tier (issue 21): snapshots in /dev/shm every N steps, written during the next step
(which waits only for their staging copy) and committed before it counts, restored when every rank can read
them; bounded, private, removed at the end of the run; off (one log line) where there is no room; another
run's local tier is never read."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from elastic_util import kill_tree
from elastictrain.snapshot import localtier, manifest
from elastictrain.state import TrainState
from helpers import (ROOT, assert_bitwise_equal, base_env, cli_cmd, load_final, read_jsonl, run_cli,
                     run_script_under_torchrun, tiny_args, wait_for)

ENGINES = ["torchsnapshot", "dcp"]
STEPS_PER_EPOCH = 4  # configs/tiny.yaml: 32 samples, batch 8


@pytest.fixture
def shm_base() -> Iterator[Path]:
    """A local_dir of this test's own under /dev/shm (the default base is shared by every run of this user)."""
    base = Path("/dev/shm") / f"et-test-{uuid.uuid4().hex[:8]}"
    yield base
    shutil.rmtree(base, ignore_errors=True)


def local_args(run_dir: Path, base: Path, *extra: str) -> list[str]:
    return tiny_args(run_dir, "--checkpoint.local_every_steps", "1", "--checkpoint.local_dir", str(base), *extra)


def resume_event(run_dir: Path) -> dict:
    return [r for r in read_jsonl(run_dir) if r.get("event") == "resume"][-1]


def local_snapshots(base: Path) -> list[Path]:
    return [p for p in base.glob("*/snapshots/*") if manifest.is_snapshot_name(p.name)]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_one_process_killed_at_a_random_step_resumes_from_the_local_tier(reference_runs: dict[int, Path],
                                                                        tmp_path: Path, shm_base: Path,
                                                                        engine: str) -> None:
    """SIGKILL right after a random optimizer step N (not the first of an epoch, whose predecessor is a
    durable epoch-end snapshot): the same command resumes from the local snapshot of step N-1, bitwise."""
    run_dir = tmp_path / "run"
    killed_at = random.choice([2, 3, 6, 7, 10, 11])
    args = local_args(run_dir, shm_base, "--checkpoint.engine", engine)
    assert run_cli([*args, "--debug.fault", f"sigkill@step={killed_at}"]).returncode != 0
    # The fault fires before step N is logged: the log's last step is N-1, the local snapshot's too.
    assert max(r["step"] for r in read_jsonl(run_dir) if r["kind"] == "train") == killed_at - 1
    kept = local_snapshots(shm_base)
    assert 1 <= len(kept) <= 2, kept  # two generations at most
    assert (shm_base.stat().st_mode & 0o777) == 0o700
    listing = run_cli(["ckpt", "list", str(run_dir)], check=True).stdout
    epoch = (killed_at - 1) // STEPS_PER_EPOCH
    assert "local tier " in listing and manifest.snapshot_name(epoch, killed_at - 1) in listing, listing
    out = run_cli(args, check=True).stdout
    assert f"resuming from epoch {epoch} step {killed_at - 1} (local snapshot {shm_base}" in out
    event = resume_event(run_dir)
    assert event["tier"] == "local" and event["step"] == killed_at - 1  # one step redone
    assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))
    assert local_snapshots(shm_base) == [] and list(shm_base.iterdir()) == []  # removed at the end of the run


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_two_ranks_killed_whole_at_a_random_step_resume_from_the_local_tier(reference_runs: dict[int, Path],
                                                                           tmp_path: Path, shm_base: Path,
                                                                           engine: str) -> None:
    """The whole torchrun job SIGKILLed (agent and both workers) once a random step was logged: the same
    command resumes at most one step before the last step logged, from the local tier, and ends bitwise."""
    run_dir = tmp_path / "run"
    target = random.choice([2, 6, 10])
    args = local_args(run_dir, shm_base, "--checkpoint.engine", engine)
    proc = subprocess.Popen(cli_cmd(args, nproc=2), cwd=ROOT, env=base_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def logged() -> bool:
        return any(r["kind"] == "train" and r["step"] >= target for r in read_jsonl(run_dir))

    try:
        wait_for(logged, 240, f"step {target} logged")
    finally:
        kill_tree(proc.pid)
        proc.wait(30)
    killed_at = max(r["step"] for r in read_jsonl(run_dir) if r["kind"] == "train")
    print(f"target step {target}, killed after step {killed_at}")
    assert len(local_snapshots(shm_base)) <= 2
    out = run_cli(args, nproc=2, check=True).stdout
    event = resume_event(run_dir)
    assert event["step"] >= killed_at - 1, (event, killed_at)
    # The step before an epoch's first is the durable epoch-end snapshot's (no local copy of the same step).
    assert event["tier"] == ("durable" if event["step"] % STEPS_PER_EPOCH == 0 else "local"), event
    if event["tier"] == "local":
        assert f"(local snapshot {shm_base}" in out
    assert_bitwise_equal(load_final(reference_runs[2]), load_final(run_dir))
    assert local_snapshots(shm_base) == []


@pytest.mark.slow
def test_local_dir_on_a_tiny_tmpfs_warns_and_continues_durable_only(reference_runs: dict[int, Path],
                                                                    tmp_path: Path) -> None:
    """A 1 MB tmpfs cannot hold two generations of the state: one log line says why, the run goes on with the
    durable tier alone, is killed, resumes from the durable tier, and ends exact."""
    tiny_fs = tmp_path / "tmpfs"
    tiny_fs.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(tiny_fs)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        run_dir = tmp_path / "run"
        args = local_args(run_dir, tiny_fs)
        first = run_cli([*args, "--debug.fault", "sigkill@saved=4"])  # right after the durable epoch-end commit
        assert first.returncode != 0
        off = [line for line in first.stdout.splitlines() if "local snapshot tier off" in line]
        assert len(off) == 1 and f"{tiny_fs} has" in off[0] and "free" in off[0], first.stdout[-3000:]
        out = run_cli(args, check=True).stdout
        assert "local snapshot tier off" in out
        event = resume_event(run_dir)
        assert event["tier"] == "durable" and event["step"] == 4
        assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))
    finally:
        subprocess.run(["umount", str(tiny_fs)], check=False)


@pytest.mark.slow
def test_a_stale_local_tier_of_another_run_is_ignored_and_named_by_ckpt_clean(reference_runs: dict[int, Path],
                                                                             tmp_path: Path, shm_base: Path) -> None:
    """Run A is killed with a local snapshot; its run directory is deleted and a new run is started at the
    same path with the same local_dir: it never reads A's snapshot (fresh start, exact), says so, and
    ``ckpt clean`` names A's tier as stale and deletes it with --yes."""
    run_dir = tmp_path / "run"
    args = local_args(run_dir, shm_base)
    assert run_cli([*args, "--debug.fault", "sigkill@step=7"]).returncode != 0
    (stale,) = [p for p in shm_base.iterdir()]
    assert local_snapshots(shm_base)
    shutil.rmtree(run_dir)
    out = run_cli([*args, "--debug.fault", "sigkill@step=3"]).stdout
    assert f"ignoring the local snapshot tier {stale}" in out
    assert not [r for r in read_jsonl(run_dir) if r.get("event") == "resume"]  # a fresh start, not step 6
    plan = run_cli(["ckpt", "clean", str(run_dir)], check=True).stdout
    assert f"delete  {stale}  [local]" in plan and "stale" in plan, plan
    assert stale.exists()  # a dry run
    mine = localtier.of_run(run_dir)[1]
    assert f"keep    {shm_base / mine}  [local]" in plan, plan
    run_cli(["ckpt", "clean", str(run_dir), "--yes"], check=True)
    assert not stale.exists() and (shm_base / mine).exists()
    out = run_cli(args, check=True).stdout
    assert resume_event(run_dir)["tier"] == "local"
    assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))


def test_local_tier_settings_are_validated_and_off_explained(tmp_path: Path) -> None:
    from elastictrain.config import load_config

    with pytest.raises(ValueError, match="--checkpoint.local_every_steps"):
        load_config(["--checkpoint.local_every_steps", "-1"])
    assert localtier.base_dir("none") == (None, "--checkpoint.local_dir none")
    assert localtier.base_dir(str(tmp_path)) == (tmp_path, "")
    placed = localtier.place(str(tmp_path / "base"), tmp_path / "run", "abc", 2**50, 1)
    assert placed.root is None and "free, less than two generations" in placed.why_off
    placed = localtier.place(str(tmp_path / "base"), tmp_path / "run", "abc", 1000, 1)
    assert placed.root == tmp_path / "base" / "abc" / "snapshots" and not (tmp_path / "base").exists()
    localtier.create(placed.root, tmp_path / "run")  # at the first local snapshot
    assert (tmp_path / "base").stat().st_mode & 0o777 == 0o700
    # The same tier id claimed by another run directory (a copied run dir) is not this run's.
    other = localtier.place(str(tmp_path / "base"), tmp_path / "copy", "abc", 1000, 1)
    assert other.root is None and "belongs to run directory" in other.why_off


def durable_snapshots(run_dir: Path) -> list[manifest.Snapshot]:
    return manifest.list_snapshots(run_dir / "snapshots")


def assert_no_false_complete(run_dir: Path) -> None:
    """Every durable snapshot that looks complete (has its commit record) is: its files are the committed ones."""
    for snap in durable_snapshots(run_dir):
        assert not snap.damaged, snap.problem
        if snap.complete:
            assert snap.verify() is None, (snap.name, snap.verify())


def orphan_writers() -> list[str]:
    """Durable writer processes whose rank (the pid on their command line) is gone."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"elastictrain.snapshot.writer" in argv and not Path(f"/proc/{argv[-2].decode()}").exists():
            found.append(proc.name)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_a_kill_between_the_local_commit_and_its_durable_copy(reference_runs: dict[int, Path], tmp_path: Path,
                                                              shm_base: Path, engine: str) -> None:
    """The rank is SIGKILLed right after it handed the committed local snapshot of the epoch end (step 4) to
    its writer process: the writer dies with it, no durable snapshot looks complete that is not, the same
    command resumes from the local tier, makes the durable copy that was cut off, and ends bitwise."""
    run_dir = tmp_path / "run"
    args = local_args(run_dir, shm_base, "--checkpoint.engine", engine)
    assert run_cli([*args, "--debug.fault", "sigkill@copy=4"]).returncode != 0
    wait_for(lambda: not orphan_writers(), 10, "the writer process dies with its rank")
    assert_no_false_complete(run_dir)
    # The writer may have finished the copy in the moment before the kill reached it; usually it had not.
    copied = [s.name for s in durable_snapshots(run_dir) if s.complete] == ["epoch00001-step00000004"]
    out = run_cli(args, check=True).stdout
    event = resume_event(run_dir)
    assert event["tier"] == "local" and event["step"] == 4, event
    if not copied:
        assert "epoch00001-step00000004: making the durable copy the last attempt did not finish" in out
        assert "epoch00001-step00000004 committed (copied from the local tier" in out
    assert_no_false_complete(run_dir)
    assert [s.name for s in durable_snapshots(run_dir) if s.complete] == ["epoch00003-step00000012",
                                                                            "epoch00002-step00000008"]
    assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_the_writer_process_killed_alone(reference_runs: dict[int, Path], tmp_path: Path, shm_base: Path,
                                         engine: str) -> None:
    """The writer SIGKILLs itself mid-copy of step 4's durable snapshot: the run goes on (one warning), the
    cut-off copy never looks complete, the next durable snapshot (step 8) is written by a new writer. The
    rank is then killed as the durable snapshot of step 12 starts (after the copy of step 8 was collected:
    one durable snapshot in flight at most) and the node's memory lost (the local tier deleted): the same command
    restores the copied durable snapshot of step 8 and ends bitwise."""
    run_dir = tmp_path / "run"
    args = local_args(run_dir, shm_base, "--checkpoint.engine", engine)
    first = run_cli([*args, "--debug.fault", "sigkill@writer=4,sigkill@saving=12"])
    assert first.returncode != 0
    assert "durable snapshot epoch00001-step00000004 not written: the durable writer process died (signal " \
           "SIGKILL)" in first.stdout, first.stdout[-3000:]
    assert "epoch00002-step00000008 committed (copied from the local tier" in first.stdout
    assert_no_false_complete(run_dir)
    assert [s.name for s in durable_snapshots(run_dir)] == ["epoch00002-step00000008"]
    shutil.rmtree(shm_base)
    run_cli(args, check=True)
    event = resume_event(run_dir)
    assert event["tier"] == "durable" and event["step"] == 8, event
    assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))


def test_the_writer_copies_only_the_committed_bytes(tmp_path: Path) -> None:
    """The writer's copy: the same bytes, checked against the local commit record, the commit record last;
    a local file changed after its commit is one error line naming it, and leaves nothing complete-looking."""
    from elastictrain.snapshot import writer

    src = tmp_path / "local" / manifest.snapshot_name(1, 4)
    (src / "0").mkdir(parents=True)
    (src / ".snapshot_metadata").write_text("{}")
    (src / "0" / "model").write_bytes(os.urandom(3 * 2**20 + 5))
    local = manifest.write_commit(src, {"name": src.name, "epoch": 1, "step": 4, "engine": "torchsnapshot",
                                        "tier": "rolling", "where": "local", "started_at": 0.0})
    record = {k: v for k, v in local.items() if k not in ("record_sha256", "where")}
    dst = tmp_path / "run" / "snapshots" / src.name
    job = {"src": str(src), "dst": str(dst), "record": record, "keep": 2}
    assert writer.copy_snapshot(job)["ok"]
    copied = manifest.Snapshot.at(dst)
    assert copied.complete and copied.verify() is None and copied.commit["files"] == local["files"]
    (src / "0" / "model").write_bytes(b"x" * (3 * 2**20 + 5))  # same size, other bytes
    answer = writer.copy_snapshot(job)  # the complete copy of that name is moved aside, never deleted
    assert not answer["ok"] and f"{src / '0' / 'model'}" in answer["error"] and "\n" not in answer["error"]
    assert manifest.read_commit(dst) is None
    assert [p.name.split(".")[1].split("-")[0] for p in dst.parent.glob("*.superseded-*")] == ["superseded"]


def test_the_writer_never_writes_outside_the_snapshot_for_a_tampered_record(tmp_path: Path) -> None:
    """A local commit record whose file names climb out of the snapshot (tampered /dev/shm): one error line,
    nothing written beside the run directory."""
    from elastictrain.snapshot import writer

    src = tmp_path / "local" / manifest.snapshot_name(1, 4)
    src.mkdir(parents=True)
    (src / "model").write_bytes(b"weights")
    local = manifest.write_commit(src, {"name": src.name, "epoch": 1, "step": 4, "engine": "torchsnapshot",
                                        "tier": "rolling", "where": "local", "started_at": 0.0})
    record = {k: v for k, v in local.items() if k not in ("record_sha256", "where")}
    record["files"] = {"../../../escaped": record["files"]["model"]}
    dst = tmp_path / "run" / "snapshots" / src.name
    answer = writer.copy_snapshot({"src": str(src), "dst": str(dst), "record": record, "keep": 2})
    assert not answer["ok"] and "leaves the snapshot" in answer["error"], answer
    assert not (tmp_path / "escaped").exists() and manifest.read_commit(dst) is None


def test_a_damaged_local_snapshot_is_named_and_moved_aside_and_the_run_ends_exact(reference_runs: dict[int, Path],
                                                                                  tmp_path: Path,
                                                                                  shm_base: Path) -> None:
    """The newest local snapshot's commit record hurt in memory after the kill (cut short): the restart names it
    damaged and moves it aside (as in the run directory; it was skipped without a word), resumes from the
    previous local snapshot and ends bitwise equal to the uninterrupted run."""
    run_dir = tmp_path / "run"
    args = local_args(run_dir, shm_base)
    assert run_cli([*args, "--debug.fault", "sigkill@step=7"]).returncode != 0
    *older, newest = sorted(local_snapshots(shm_base), key=lambda p: manifest.parse_name(p.name))
    assert newest.name == manifest.snapshot_name(1, 6), newest
    record = newest / manifest.COMMIT
    record.write_bytes(record.read_bytes()[:100])
    out = run_cli(args, check=True).stdout
    assert f"snapshot {newest.name} is damaged" in out, out[-3000:]
    # The previous local one (step 4 or 5: which of them is kept depends on the writer process's pace), or the
    # durable epoch-end snapshot when the local tier held only the damaged one.
    if older:
        step, where = manifest.parse_name(older[-1].name)[1], f"local snapshot {older[-1]}"
    else:
        step, where = 4, f"snapshot {run_dir / 'snapshots' / manifest.snapshot_name(1, 4)}"
    assert f"resuming from epoch 1 step {step} ({where}," in out, out[-3000:]
    assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))


class HeldEngine:
    """The real engine, whose write of a snapshot waits until the test releases it (a write slower than a step)."""

    def __init__(self, engine: object) -> None:
        self.engine, self.go = engine, threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)

    def write(self, *args: object) -> None:
        assert self.go.wait(60), "never released"
        self.engine.write(*args)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_optimizer_step_waits_for_a_local_snapshots_staging_not_its_write(tmp_path: Path, shm_base: Path,
                                                                             engine: str) -> None:
    """A local snapshot's write runs during the next step: the optimizer step waits only for the staging copy
    and changes the weights while the write is held (with a short GIL switch interval meanwhile); the snapshot
    looks complete only once written and committed, which the end of the step waits for, and restores the
    values of its step bitwise."""
    import torch

    from elastictrain.config import CheckpointConfig
    from elastictrain.dist import world_of_one
    from elastictrain.snapshot import SnapshotManager

    def job() -> tuple[torch.nn.Module, torch.optim.Optimizer, TrainState, dict]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.BatchNorm1d(256))
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        state = TrainState()
        return model, opt, state, SnapshotManager.app_state(model, opt, sched, None, state)

    cfg = CheckpointConfig(engine=engine, local_every_steps="1", local_dir=str(shm_base))
    model, opt, state, app = job()
    mgr = SnapshotManager(cfg, world_of_one(), tmp_path / "run", total_epochs=10)
    assert mgr.restore_latest(app) is None and mgr.local is not None
    x = torch.randn(32, 256)
    try:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        state.step = 1
        held = mgr.local.engine = HeldEngine(mgr.local.engine)
        assert mgr.wants_local_snapshot(state) == (True, False)
        name = mgr.save_local(app, state, no_room=False)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        model(x).square().mean().backward()
        waiting = threading.Thread(target=mgr.before_optimizer_step)
        waiting.start()
        waiting.join(10)
        stepped = not waiting.is_alive()
        # Beside a write, the training thread gets the GIL back quickly (saver.gil_shared).
        shared_interval = sys.getswitchinterval()
        held.go.set()  # whatever happened: let the write go, so nothing is left waiting
        waiting.join()
        assert stepped, "the optimizer step waited for the local snapshot's write, not just its staging"
        assert manifest.read_commit(mgr.local.root / name) is None  # not complete while being written
        opt.step()  # changes the parameters in place while the write may still be running
        mgr.after_optimizer_step()  # the step counts only once the snapshot of its start is committed
        snap = manifest.Snapshot.at(mgr.local.root / name)
        assert snap.complete and snap.verify() is None
        assert shared_interval <= 0.0005 < sys.getswitchinterval(), (shared_interval, sys.getswitchinterval())
    finally:
        held_engine = getattr(mgr.local, "engine", None)
        if isinstance(held_engine, HeldEngine):
            held_engine.go.set()
        mgr.close()
    model2, _, state2, app2 = job()
    mgr2 = SnapshotManager(cfg, world_of_one(), tmp_path / "run", total_epochs=10)
    try:
        resumed = mgr2.restore_latest(app2)
        assert resumed is not None and resumed.tier == "local" and state2.step == 1
        assert_bitwise_equal(expected, model2.state_dict())
    finally:
        mgr2.close()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_the_engine_process_killed_alone(reference_runs: dict[int, Path], tmp_path: Path, shm_base: Path,
                                         engine: str) -> None:
    """At world size 1 a local snapshot is written by an engine process of its own (engine_process.py). It
    SIGKILLs itself after writing step 3's snapshot, before the checksums: that snapshot is lost (one warning,
    its debris removed), a new process writes the next ones, the durable copies follow, the run ends bitwise."""
    run_dir = tmp_path / "run"
    out = run_cli([*local_args(run_dir, shm_base, "--checkpoint.engine", engine),
                   "--debug.fault", "sigkill@engine=3"], check=True).stdout
    assert "epoch00000-step00000003 not written: the snapshot engine process died (signal SIGKILL)" in out, \
        out[-3000:]
    assert "epoch00001-step00000004 committed (copied from the local tier" in out
    assert_no_false_complete(run_dir)
    assert [s.name for s in durable_snapshots(run_dir) if s.complete] == ["epoch00003-step00000012",
                                                                            "epoch00002-step00000008"]
    assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))


@pytest.mark.slow
@pytest.mark.parametrize("engine,strategy", [("torchsnapshot", "ddp"), ("dcp", "fsdp")])
def test_two_ranks_one_ranks_engine_process_killed_alone(reference_runs: dict[int, Path], tmp_path: Path,
                                                         shm_base: Path, engine: str, strategy: str) -> None:
    """Two ranks under torchrun: each rank's snapshots are written by an engine process of its own, the two
    in a process group of their own (FSDP2's shards as DTensors on a mesh of theirs). Rank 1's SIGKILLs
    itself after writing step 3's local snapshot: that snapshot is lost on both ranks (one warning naming
    rank 1, nothing complete-looking left), both ranks start new engine processes, which write the rest (the
    durable copies come from their local snapshots); the run ends bitwise equal to one never disturbed."""
    run_dir = tmp_path / "run"
    # 'on': this 2-core machine has no core to spare beside each of two ranks, where 'auto' keeps the thread.
    args = local_args(run_dir, shm_base, "--checkpoint.engine", engine, "--dist.strategy", strategy,
                      "--checkpoint.engine_process", "on")
    out = run_cli([*args, "--debug.fault", "sigkill@engine=3:rank=1"], nproc=2, check=True).stdout
    assert "epoch00000-step00000003 not written: the snapshot engine process of rank 1 died (signal SIGKILL)" \
        in out, out[-3000:]
    assert "written by a thread" not in out
    assert "epoch00001-step00000004 committed (copied from the local tier" in out
    assert_no_false_complete(run_dir)
    assert [s.name for s in durable_snapshots(run_dir) if s.complete] == ["epoch00003-step00000012",
                                                                            "epoch00002-step00000008"]
    reference = reference_runs[2]
    if strategy == "fsdp":  # FSDP2 reduces in another order than DDP: its own undisturbed run
        reference = tmp_path / "reference"
        run_cli(local_args(reference, shm_base, "--checkpoint.engine", engine, "--dist.strategy", strategy,
                           "--checkpoint.engine_process", "off"), nproc=2, check=True)
    assert_bitwise_equal(load_final(reference), load_final(run_dir))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_durable_snapshots_without_a_local_tier_come_from_the_engine_process(reference_runs: dict[int, Path],
                                                                           tmp_path: Path, engine: str) -> None:
    """No local tier (a Mac; here --checkpoint.local_dir none): the durable snapshots are written from the
    staged state by the engine process. Killed alone while writing step 4's, that one is lost and never looks
    complete; steps 8 and 12 are committed and verify; the run ends bitwise."""
    run_dir = tmp_path / "run"
    out = run_cli(tiny_args(run_dir, "--checkpoint.engine", engine, "--checkpoint.local_dir", "none",
                            "--debug.fault", "sigkill@engine=4"), check=True).stdout
    assert "epoch00001-step00000004 not written: the snapshot engine process died (signal SIGKILL)" in out, \
        out[-3000:]
    assert_no_false_complete(run_dir)
    assert [s.name for s in durable_snapshots(run_dir)] == ["epoch00003-step00000012", "epoch00002-step00000008"]
    assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))


_NODE_COPIES = """
import os, shutil, sys
from datetime import timedelta
from pathlib import Path
import torch.distributed as dist
from elastictrain.snapshot import localtier, manifest, nodecopy

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
nodecopy.CHUNK_BYTES = 64 * 1024  # several chunks a file
# Two "nodes" with one rank each, each with its own directory: what two hosts' /dev/shm are.
nodes = nodecopy.Nodes(rank, ["node-a", "node-b"], [0, 1], dist.new_group(ranks=[0, 1], backend="gloo"))
tmp = Path(sys.argv[1])
run_dir, root = tmp / "run", tmp / f"node{rank}" / "tier" / "snapshots"
out = open(tmp / f"rank{rank}.txt", "w")
localtier.create(root, run_dir)  # as before a first local snapshot


def write(path, rel, data):
    (path / rel).parent.mkdir(parents=True, exist_ok=True)
    (path / rel).write_bytes(data)


snap = root / "epoch00001-step00000004"
write(snap, f"{rank}/data", bytes([rank + 1]) * (100_000 * (rank + 1)))
write(snap, "replicated/same", b"same on both nodes" * 10_000)
if rank == 0:
    write(snap, ".metadata", b"the engine's metadata")  # what DCP's rank 0 writes
files, held, problem = nodecopy.share(snap, nodes)
out.write(f"shared {sorted(files)} {problem}\\n")
assert held == files  # two nodes: the ring gives each node every file
record = nodecopy.broadcast_record(manifest.commit_record({"name": snap.name, "engine": "dcp", "tier": "rolling",
                                                           "epoch": 1, "step": 4}, files, 0.0) if rank == 0 else None, nodes)
nodecopy.commit_copy(snap, record)
out.write(f"committed {manifest.Snapshot.at(snap).verify()}\\n")

clash = root / "epoch00001-step00000005"
write(clash, "replicated/same", f"rank {rank}".encode())
out.write(f"clash {nodecopy.share(clash, nodes)[2]}\\n")

if rank == 1:  # a replaced node: empty memory
    shutil.rmtree(tmp / "node1")
sent, problem = nodecopy.send_snapshot(root, snap.name, 0, nodes, lambda: localtier.create(root, run_dir))
mode = oct((tmp / f"node{rank}" / "tier").stat().st_mode & 0o777)
out.write(f"sent {sent} {problem} {manifest.Snapshot.at(snap).verify()} {mode}\\n")

if rank == 0:  # changed in memory after its commit (same size)
    (snap / "0/data").write_bytes(b"x" * 100_000)
else:
    shutil.rmtree(snap)
sent, problem = nodecopy.send_snapshot(root, snap.name, 0, nodes, lambda: None)
out.write(f"damaged {problem} {manifest.read_commit(snap) is not None}\\n")
out.close()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_node_copies_are_whole_checked_and_complete_only_when_whole(tmp_path: Path) -> None:
    """Two nodes (two ranks, each with its own directory) pass their files of a snapshot along the ring
    (several chunks a file): both then hold every file, and both commit the same record; a file written differently on two
    nodes is refused on both; a node that lost its memory receives the committed snapshot (its tier made
    owner-only); a source whose bytes changed after the commit is refused by the receiver, which then has no
    commit record (its copy never looks complete)."""
    script = tmp_path / "node_copies.py"
    script.write_text(_NODE_COPIES)
    result = run_script_under_torchrun(script, [str(tmp_path)], timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    said = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    for rank, lines in enumerate(said):
        assert lines[0] == "shared ['.metadata', '0/data', '1/data', 'replicated/same'] None", said
        assert lines[1] == "committed None", said
        assert lines[2].startswith("clash ") and "written differently on two nodes" in lines[2], said
        assert lines[3] == "sent 480021 None None 0o700", said
        assert lines[4].startswith("damaged ") and "received bytes differ from the sender's checksum" in lines[4], said
        assert lines[4].endswith(" True" if rank == 0 else " False"), said


@pytest.mark.slow
def test_three_nodes_hold_parts_in_a_ring_and_two_survivors_complete_the_snapshot(tmp_path: Path) -> None:
    """Three nodes (three ranks, each with its own directory) pass their files along the ring: each holds
    its own and its predecessor's, under a PART.json, never complete (and never removed as debris); one node
    alone cannot complete it; after the loss of the middle node the two survivors complete it from their
    parts (each file it lacks from the node that holds it) and both copies then verify as complete."""
    script = tmp_path / "ring.py"
    script.write_text(_RING)
    result = run_script_under_torchrun(script, [str(tmp_path)], nproc=3, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    said = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1, 2)]
    everything = "['.metadata', '0/data', '1/data', '2/data']"
    held = {0: "['.metadata', '0/data', '2/data']", 1: "['.metadata', '0/data', '1/data']", 2: "['1/data', '2/data']"}
    for rank, lines in enumerate(said):
        assert lines[0] == f"shared {everything} {held[rank]} None", said
        assert lines[1] == f"part False {held[rank]} None True", said  # not complete; kept by discovery
    assert said[0][2] == "alone None", said
    for lines in (said[0][3:], said[2][2:]):
        assert lines == ["assembled epoch00001-step00000004 ['node-a', 'node-c'] 150021 None",
                         "complete None False"], said
    assert said[1][2:] == [], said


_RING = """
import shutil, sys
from datetime import timedelta
from pathlib import Path
import torch.distributed as dist
from elastictrain.snapshot import discovery, localtier, manifest, nodecopy

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
nodecopy.CHUNK_BYTES = 64 * 1024  # several chunks a file
hosts = ["node-a", "node-b", "node-c"]
nodes = nodecopy.Nodes(rank, hosts, [0, 1, 2], dist.new_group(ranks=[0, 1, 2], backend="gloo"))
alone = dist.new_group(ranks=[0], backend="gloo")  # every rank makes every group
survivors = dist.new_group(ranks=[0, 2], backend="gloo")
tmp = Path(sys.argv[1])
run_dir, root = tmp / "run", tmp / f"node{rank}" / "tier" / "snapshots"
out = open(tmp / f"rank{rank}.txt", "w")
localtier.create(root, run_dir)
snap = root / "epoch00001-step00000004"
(snap / str(rank)).mkdir(parents=True)
(snap / str(rank) / "data").write_bytes(bytes([rank + 1]) * (50_000 * (rank + 1)))
if rank == 0:
    (snap / ".metadata").write_bytes(b"the engine's metadata")
files, held, problem = nodecopy.share(snap, nodes)
out.write(f"shared {sorted(files)} {sorted(held)} {problem}\\n")
record = nodecopy.broadcast_record(manifest.commit_record({"name": snap.name, "engine": "dcp", "tier": "rolling",
                                                           "epoch": 1, "step": 4}, files, 0.0) if rank == 0 else None, nodes)
nodecopy.commit_copy(snap, record, held)
part = manifest.Snapshot.at(snap)
out.write(f"part {part.complete} {sorted(part.part['held'])} {discovery.newest_intact(root)} {snap.exists()}\\n")
out.flush()
dist.barrier()
if rank == 0:  # one node alone holds only two thirds of it
    found = nodecopy.assemble(root, nodecopy.Nodes(0, hosts, [0], alone), None, lambda: None)
    out.write(f"alone {found}\\n")
dist.barrier()
if rank == 1:  # the middle node is lost, with its memory
    shutil.rmtree(tmp / "node1")
else:
    done = nodecopy.assemble(root, nodecopy.Nodes(rank, hosts, [0, 2], survivors), None,
                             lambda: localtier.create(root, run_dir))
    out.write(f"assembled {done['assembled']} {done['from_hosts']} {done['bytes']} {done['problem']}\\n")
    whole = manifest.Snapshot.at(snap)
    out.write(f"complete {whole.verify()} {(snap / manifest.PART).exists()}\\n")
out.close()
dist.barrier()
dist.destroy_process_group()
"""


def test_a_node_holds_its_own_ranks_files_and_its_predecessors() -> None:
    """What `local_dir: auto` asks room for on several nodes: this node's ranks' state and its predecessor's
    (with two nodes that is every rank's)."""
    from elastictrain.snapshot.nodecopy import Nodes

    three = ["a", "a", "b", "b", "c", "c"]
    assert [Nodes(r, three, [0, 2, 4]).neighbour(-1) for r in range(6)] == [4, 4, 0, 0, 2, 2]
    assert [Nodes(r, three, [0, 2, 4]).neighbour(1) for r in range(6)] == [2, 2, 4, 4, 0, 0]
    assert Nodes(3, three, [0, 2, 4]).ranks_held == 4
    assert Nodes(1, ["a", "b"], [0, 1]).ranks_held == 2 and Nodes(0, ["a", "a", "b"], [0, 2]).ranks_held == 3


def test_nodes_share_the_durable_copy_each_file_from_a_node_that_holds_it(tmp_path: Path) -> None:
    """Several nodes (copier.py): every file of a local snapshot goes to exactly one node that holds it, the
    bytes spread evenly; each node's writer copies its share into one directory and leaves the commit to rank 0,
    which refuses to commit while a file is missing or cut short."""
    from elastictrain.snapshot import writer
    from elastictrain.snapshot.copier import split_shares

    files = {f"{r}/{k}": {"size": size, "sha256": ""} for r in range(6) for k, size in (("m", 100), ("o", 200))}
    whole = set(files)
    two = split_shares(files, [whole, whole])
    assert sorted(two[0] + two[1]) == sorted(files) and not set(two[0]) & set(two[1])
    assert sum(files[f]["size"] for f in two[0]) == sum(files[f]["size"] for f in two[1]) == 900
    # A ring of three: node i holds its ranks' files (2i, 2i+1) and its predecessor's.
    own = [{f for f in files if int(f[0]) // 2 == i} for i in range(3)]
    three = split_shares(files, [own[i] | own[i - 1] for i in range(3)])
    assert sorted(sum(three, [])) == sorted(files)
    assert all(set(three[i]) <= own[i] | own[i - 1] for i in range(3))
    assert [sum(files[f]["size"] for f in s) for s in three] == [600, 600, 600]
    assert split_shares(files, [own[0], own[1]]) == split_shares(files, [own[0], own[1]])  # the same everywhere
    assert sorted(sum(split_shares(files, [own[0], own[1]]), [])) == sorted(own[0] | own[1])  # 4/5: nobody's

    src = tmp_path / "local" / manifest.snapshot_name(1, 4)
    for r in range(2):
        (src / str(r)).mkdir(parents=True)
        (src / str(r) / "model").write_bytes(os.urandom(2**20 + r))
    (src / ".snapshot_metadata").write_text("{}")
    local = manifest.write_commit(src, {"name": src.name, "epoch": 1, "step": 4, "engine": "torchsnapshot",
                                        "tier": "rolling", "where": "local", "started_at": 0.0})
    record = {k: v for k, v in local.items() if k not in ("record_sha256", "where")}
    dst = tmp_path / "run" / "snapshots" / src.name
    dst.mkdir(parents=True)
    job = {"src": str(src), "dst": str(dst), "record": record, "keep": 2, "commit": False}
    answer = writer.copy_snapshot({**job, "files": ["0/model", ".snapshot_metadata"]})
    assert answer["ok"] and answer["copied"] == ["0/model", ".snapshot_metadata"]
    assert manifest.read_commit(dst) is None
    with pytest.raises(FileNotFoundError):  # rank 0 never commits a copy that lacks a share
        writer.commit_copy(dst, record, 0.0, 2)
    (dst / "1").mkdir()
    (dst / "1" / "model").write_bytes(b"cut short")
    with pytest.raises(ValueError, match="not committed"):
        writer.commit_copy(dst, record, 0.0, 2)
    (dst / "1" / "model").unlink()
    assert writer.copy_snapshot({**job, "files": ["1/model"]})["ok"]
    writer.commit_copy(dst, record, 0.0, 2)
    copied = manifest.Snapshot.at(dst)
    assert copied.complete and copied.verify() is None and copied.commit["files"] == local["files"]

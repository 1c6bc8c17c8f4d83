"""The snapshot manager's lifecycle under a hostile or careless user (issue 12): a read that fails silently,
a tampered or unparsable commit record, a signal before the first step, ``--checkpoint PATH`` kept in a
command, ``ckpt clean`` and what it keeps, ``checkpoint.mode off``, failures decided on every rank at once;
and unit tests of the small policies (``due``, tiers, batch geometry, LR factor, the plot's resume marks)."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from elastictrain.snapshot import manifest
from elastictrain.snapshot import SnapshotManager
from elastictrain.snapshot.appstate import build_app_state
from elastictrain.ckpt_cli import main as ckpt_main
from elastictrain.config import CheckpointConfig
from elastictrain.dist import DistContext
from elastictrain.snapshot.engines import build_engine
from elastictrain.errors import UserError
from elastictrain.snapshot.offline import clean_plan
from elastictrain.state import TrainState
from elastictrain.trainer import batch_geometry, lr_factor
from helpers import assert_bitwise_equal, load_final, run_cli, run_script_under_torchrun, tiny_args
from test_snapshots import ENGINES, largest_data_file, tiny_training, train_one_step, tree_digest

WS1 = DistContext(0, 1, 0, torch.device("cpu"), None)


def six_epochs(run_dir: Path, engine: str, *extra: str) -> list[str]:
    """A tiny run keeping every snapshot (4 steps an epoch), so there is always an older one to fall back to."""
    return tiny_args(run_dir, "--epochs", "6", "--checkpoint.keep", "6", "--checkpoint.engine", engine, *extra)


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    made = {}
    for engine in ENGINES:
        run_dir = tmp_path_factory.mktemp(f"life-{engine}") / "run"
        run_cli(six_epochs(run_dir, engine), check=True)
        made[engine] = run_dir
    return made


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "final_model.pt").unlink()
    (dst / "metrics.jsonl").unlink()
    return dst


# ---------- 1: a read that fails is never taken for a restore ----------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_damage_without_verification_falls_back_and_ends_exact(six: dict[str, Path], tmp_path: Path, engine: str,
                                                               damage: str) -> None:
    """With --checkpoint.verify false nothing hashes the files first. The newest snapshot's biggest data file
    is truncated (caught by its size, before anything is read) or has a run of bytes zeroed (same size: read
    'successfully' by both libraries, caught by the proof of the read, then named by the checksums). Either
    way the snapshot is moved aside as damaged (intact bytes, not deleted), the previous one is used, and the
    run ends with the uninterrupted run's very weights. (On the old main torchsnapshot 'resumed' a truncated
    file as the untrained initialisation and exited 0.)"""
    run_dir = fresh_copy(six[engine], tmp_path / "run")
    newest = run_dir / "snapshots" / manifest.snapshot_name(6, 24)
    data = largest_data_file(newest, build_engine(engine).marker)
    raw = data.read_bytes()
    half = len(raw) // 2
    data.write_bytes(raw[:half] if damage == "truncated" else raw[:half] + bytes(4096) + raw[half + 4096:])
    digest = tree_digest(newest)
    out = run_cli(six_epochs(run_dir, engine, "--checkpoint.verify", "false"), check=True).stdout
    why = "size" if damage == "truncated" else "checksum mismatch"
    assert re.search(rf"snapshot {newest.name} is damaged: {re.escape(str(data))}: {why}", out), out[-3000:]
    if damage == "zeroed":
        assert re.search(r"restoring snapshot epoch00006-step00000024 failed: .*", out), out[-3000:]
    assert "resuming from epoch 5 step 20" in out
    assert out.count("\n") < 200, "the engine's errors are reported once, not as thousands of lines"
    (aside,) = [p for p, why in manifest.aside_dirs(run_dir / "snapshots") if why == "damaged"]
    assert aside.name.startswith(newest.name) and tree_digest(aside) == digest
    assert_bitwise_equal(load_final(six[engine]), load_final(run_dir))


def test_a_tampered_manifest_is_damage_not_a_licence(six: dict[str, Path], tmp_path: Path) -> None:
    """Verification on, but the commit record no longer lists the truncated file: the record's own checksum
    no longer matches, so the snapshot is damaged before anything is read."""
    run_dir = fresh_copy(six["torchsnapshot"], tmp_path / "run")
    newest = run_dir / "snapshots" / manifest.snapshot_name(6, 24)
    data = largest_data_file(newest, build_engine("torchsnapshot").marker)
    data.write_bytes(data.read_bytes()[:100])
    record = json.loads((newest / manifest.COMMIT).read_text())
    del record["files"][str(data.relative_to(newest))]
    (newest / manifest.COMMIT).write_text(json.dumps(record))
    out = run_cli(six_epochs(run_dir, "torchsnapshot"), check=True).stdout
    assert f"snapshot {newest.name} is damaged: {newest / manifest.COMMIT}: checksum mismatch" in out
    assert "resuming from epoch 5 step 20" in out
    assert_bitwise_equal(load_final(six["torchsnapshot"]), load_final(run_dir))


def test_ckpt_export_and_inspect_refuse_a_read_they_cannot_prove(six: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = fresh_copy(six["torchsnapshot"], tmp_path / "run")
    newest = run_dir / "snapshots" / manifest.snapshot_name(6, 24)
    entries = json.loads((newest / ".snapshot_metadata").read_text())["manifest"]
    weight = next(e for k, e in entries.items() if k.startswith("0/model/") and e["type"] == "Tensor")
    data = newest / weight["location"]  # the file holding a model weight, cut off before that weight
    data.write_bytes(data.read_bytes()[: weight["byte_range"][0]])
    assert ckpt_main(["export", str(newest), str(tmp_path / "m.pt"), "--no-verify"]) == 1
    err = capsys.readouterr().err
    assert "snapshot is damaged" in err and len(err.splitlines()) < 5, err[-2000:]
    assert not (tmp_path / "m.pt").exists() and not list(tmp_path.glob(".m.pt*"))
    assert ckpt_main(["inspect", str(newest)]) == 1
    captured = capsys.readouterr()
    assert f"{data}: size" in captured.err and len(captured.err.splitlines()) < 5


def test_a_read_that_left_tensors_untouched_is_caught_by_the_fingerprints(tmp_path: Path) -> None:
    """The proof itself, without the engine's help: the engine 'reads' nothing into the optimizer (a restore
    into a subset that leaves out 'optim'), yet the record expects it."""
    from elastictrain.snapshot import proof

    model, opt, sched = tiny_training()
    state = TrainState()
    mgr = SnapshotManager(CheckpointConfig(mode="sync"), WS1, tmp_path, 4)
    train_one_step(model, opt, sched)
    state.epoch = state.step = 1
    mgr.maybe_save(build_app_state(model, opt, sched, None, state), state, 1.0)
    commit = manifest.read_commit(mgr.root / manifest.snapshot_name(1, 1))
    live = {"model": tiny_training(seed=3)[0].state_dict()}
    complete, partial = proof.local_record(live)
    problems = proof.differences(commit["entries"], proof.combine(complete, [partial]), only=("model/",))
    assert "model/0.weight: values differ from the ones saved (not read, or read from the wrong place)" in problems
    assert proof.differences(commit["entries"], proof.combine(complete, [partial]), only=("optim/",)) == [
        f"{k}: not restored" for k in commit["entries"] if k.startswith("optim/")]
    assert proof.differences(commit["entries"], proof.combine(*_record_of(model)), only=("model/",)) == []


def _record_of(model: torch.nn.Module) -> tuple[dict, list]:
    from elastictrain.snapshot import proof

    complete, partial = proof.local_record({"model": model.state_dict()})
    return complete, [partial]


# ---------- 2: a signal before the first step ----------
def test_signal_before_the_first_step_saves_nothing_and_the_rerun_is_exact(reference_runs: dict[int, Path],
                                                                            tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, "--debug.fault", "sigterm@start=0")
    stopped = run_cli(args)
    assert stopped.returncode == 75, stopped.stdout[-3000:]
    assert "nothing to snapshot" in stopped.stdout
    assert not [p for p in (run_dir / "snapshots").iterdir() if manifest.is_snapshot_name(p.name)]
    run_cli(args, check=True)
    assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))


def test_epoch_zero_is_not_permanent_and_due_follows_the_settings(tmp_path: Path) -> None:
    mgr = SnapshotManager(CheckpointConfig(interval=3, permanent_every=5), WS1, tmp_path, total_epochs=11)
    assert [e for e in range(12) if mgr.due(e)] == [0, 3, 5, 6, 9, 10, 11]
    assert mgr.tier(0, end_of_epoch=True) == "rolling" and mgr.tier(10, end_of_epoch=True) == "permanent"
    assert mgr.tier(10, end_of_epoch=False) == "rolling"  # mid-epoch snapshots are always rolling
    off = SnapshotManager(CheckpointConfig(mode="off"), WS1, tmp_path, total_epochs=11)
    assert not any(off.due(e) for e in range(12))


# ---------- 6: --checkpoint PATH kept in the command ----------
def test_checkpoint_flag_kept_in_the_command_is_a_starting_point_once(reference_runs: dict[int, Path],
                                                                      tmp_path: Path) -> None:
    """A first command rewinds to epoch 1 on purpose (newer snapshots moved aside), is killed mid-epoch 3; the
    same command again (as a requeue would run it) continues from the epoch-2 snapshot of the new branch
    instead of rewinding again, and ends exactly like an uninterrupted run."""
    run_dir = tmp_path / "run"
    run_cli(tiny_args(run_dir, "--checkpoint.keep", "5"), check=True)
    start = run_dir / "snapshots" / manifest.snapshot_name(1, 4)
    args = tiny_args(run_dir, "--checkpoint", str(start), "--checkpoint.mode", "sync", "--checkpoint.keep", "5",
                     "--debug.fault", "sigkill@step=10")
    killed = run_cli(args)
    assert killed.returncode != 0 and "resuming from epoch 1 step 4" in killed.stdout
    superseded = [p for p, why in manifest.aside_dirs(run_dir / "snapshots") if why == "superseded"]
    assert len(superseded) == 2
    again = run_cli(args, check=True).stdout
    assert f"--checkpoint.resume_from {start}: this run already continued from it" in again
    assert "resuming from epoch 2 step 8" in again
    assert [p for p, why in manifest.aside_dirs(run_dir / "snapshots") if why == "superseded"] == superseded
    assert_bitwise_equal(load_final(reference_runs[1]), load_final(run_dir))


# ---------- 7: ckpt clean keeps what it must ----------
def _commit(root: Path, epoch: int, tier: str = "rolling", is_best: bool = False, name: str = "") -> Path:
    path = root / (name or manifest.snapshot_name(epoch, 4 * epoch))
    path.mkdir(parents=True)
    (path / ".snapshot_metadata").write_text("x")
    manifest.write_commit(path, {"name": path.name, "engine": "torchsnapshot", "epoch": epoch, "step": 4 * epoch,
                                 "tier": tier, "val_loss": 1.0 / epoch, "is_best": is_best})
    return path


def test_clean_never_deletes_permanent_best_or_damaged_unless_named(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "snapshots"
    old, best, permanent = _commit(root, 1), _commit(root, 2, is_best=True), _commit(root, 3, "permanent")
    _commit(root, 4)
    newest = _commit(root, 5)
    unparsable = root / manifest.snapshot_name(6, 24)
    unparsable.mkdir()
    (unparsable / manifest.COMMIT).write_text("{not json")
    aside = {"damaged": _commit(root, 7, name="epoch00007-step00000028.damaged-1"),
             "permanent": _commit(root, 8, "permanent", name="epoch00008-step00000032.superseded-1"),
             "best": _commit(root, 9, is_best=True, name="epoch00009-step00000036.superseded-1"),
             "rolling": _commit(root, 10, name="epoch00010-step00000040.superseded-1")}
    plan = {path.name: (delete, tier) for path, delete, tier, _ in clean_plan(root)}
    assert plan[newest.name] == (False, "rolling") and plan[permanent.name] == (False, "permanent")
    assert plan[best.name][0] is False and plan[unparsable.name] == (False, "damaged")
    assert plan[old.name][0] is True and plan[aside["rolling"].name][0] is True
    assert all(not plan[aside[k].name][0] for k in ("damaged", "permanent", "best"))
    assert ckpt_main(["clean", str(tmp_path), "--yes"]) == 0
    out = capsys.readouterr().out
    assert "[permanent]" in out and "--delete-damaged to delete" in out
    left = {p.name for p in root.iterdir() if p.is_dir()}
    assert old.name not in left and aside["rolling"].name not in left
    assert {best.name, permanent.name, newest.name, unparsable.name, aside["damaged"].name,
            aside["permanent"].name, aside["best"].name} <= left
    assert ckpt_main(["clean", str(tmp_path), "--yes", "--delete-damaged", "--delete-best",
                      "--delete-permanent"]) == 0
    assert {p.name for p in root.iterdir() if p.is_dir()} == {newest.name}


# ---------- 8: an unparsable commit record is damage ----------
def test_unparsable_commit_record_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    model, opt, sched = tiny_training()
    state = TrainState()
    app = build_app_state(model, opt, sched, None, state)
    mgr = SnapshotManager(CheckpointConfig(mode="sync", keep=5), WS1, tmp_path, 4)
    for epoch in (1, 2):
        train_one_step(model, opt, sched)
        state.epoch = state.step = epoch
        mgr.maybe_save(app, state, 1.0 / epoch)
    broken = mgr.root / manifest.snapshot_name(2, 2)
    (broken / manifest.COMMIT).write_text('{"format": 2, "files": {')  # e.g. a disk that lost the tail
    before = tree_digest(broken)
    resumed = SnapshotManager(CheckpointConfig(), WS1, tmp_path, 4).restore_latest(
        build_app_state(*tiny_training(seed=1), None, TrainState()))
    assert resumed is not None and resumed.step == 1
    (aside,) = [p for p, why in manifest.aside_dirs(mgr.root) if why == "damaged"]
    assert aside.name.startswith(broken.name) and tree_digest(aside) == before


# ---------- 11: checkpoint.mode off ----------
def test_mode_off_writes_no_snapshot_even_on_preemption(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(tiny_args(run_dir, "--checkpoint.mode", "off", "--debug.fault", "sigterm@step=5"))
    assert result.returncode == 75, result.stdout[-3000:]
    assert "--checkpoint.mode off: no snapshot is taken" in result.stdout
    assert not [p for p in (run_dir / "snapshots").iterdir() if manifest.is_snapshot_name(p.name)]


# ---------- 9: failures decided together ----------
@pytest.mark.slow
def test_a_commit_failure_on_rank_0_stops_every_rank_at_once(tmp_path: Path) -> None:
    """Rank 0's writer fails right before the commit record of epoch 1 (e.g. a full disk). The failure reaches
    every rank at the next save, with the same message, well before the 300 s collective timeout (on the old
    main rank 1 waited in a collective for the whole timeout)."""
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = run_cli(tiny_args(run_dir, "--debug.fault", "raise@commit=4"), nproc=2, timeout=150)
    assert result.returncode != 0 and time.monotonic() - started < 120
    message = f"snapshot {run_dir / 'snapshots' / manifest.snapshot_name(1, 4)} failed: RuntimeError: injected fault"
    assert result.stdout.count(message) >= 2, result.stdout[-4000:]  # both ranks' errors say it
    assert not (run_dir / "snapshots" / manifest.snapshot_name(1, 4) / manifest.COMMIT).exists()


_TOGETHER = """
import os, sys, torch.distributed as dist
from datetime import timedelta
from elastictrain.dist import DistContext, on_main_together
import torch
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
ctx = DistContext(dist.get_rank(), dist.get_world_size(), 0, torch.device("cpu"), "gloo",
                  dist.new_group(backend="gloo"), dist.new_group(backend="gloo"))
def rename():
    os.rename(sys.argv[1] + "/absent", sys.argv[1] + "/elsewhere")
out = open(f"{sys.argv[1]}/rank{ctx.rank}.txt", "w")  # one file a rank: lines on one pipe interleave
try:
    on_main_together(ctx, rename)
except Exception as e:
    out.write(f"raised {type(e).__name__}: {e}\\n")
assert on_main_together(ctx, lambda: ctx.rank + 41) == 41
out.write("agreed\\n")
out.close()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_file_operation_failing_on_rank_0_raises_on_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "together.py"
    script.write_text(_TOGETHER)
    result = run_script_under_torchrun(script, [str(tmp_path)], timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    said = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    messages = [lines[0].split(": ", 1)[1] for lines in said]  # rank 0 keeps its own exception type
    assert "No such file or directory" in messages[0] and messages[0] == messages[1], said
    assert [lines[1] for lines in said] == ["agreed", "agreed"]


# ---------- small policies ----------
def test_batch_geometry() -> None:
    assert batch_geometry(16, 0, 1) == (16, 1)
    assert batch_geometry(16, 0, 4) == (4, 1)
    assert batch_geometry(16, 2, 2) == (2, 4)
    with pytest.raises(UserError, match="not divisible by the world size 3"):
        batch_geometry(16, 0, 3)
    with pytest.raises(UserError, match="does not divide the per-rank batch 8"):
        batch_geometry(16, 3, 2)


def test_lr_factor() -> None:
    cosine = lr_factor("cosine", warmup=4, total=14)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == 1.0 and cosine(9) == pytest.approx(0.5) and cosine(14) == pytest.approx(0.0)
    assert cosine(100) == pytest.approx(0.0)  # past the end (epochs raised later) stays at 0, no wrap-around
    constant = lr_factor("constant", warmup=0, total=10)
    assert all(constant(s) == 1.0 for s in range(20))
    assert all(0 <= cosine(s) <= 1 and not math.isnan(cosine(s)) for s in range(30))


def test_plot_marks_every_resume_and_world_size_changes() -> None:
    from elastictrain.plot import _restarts

    records = [{"kind": "event", "event": "start", "step": 0, "world_size": 2},
               {"kind": "train", "step": 5, "world_size": 2},
               {"kind": "event", "event": "resume", "step": 4, "world_size": 2},
               {"kind": "event", "event": "resume", "step": 8, "world_size": 1},
               {"kind": "train", "step": 9, "world_size": 1}]
    assert _restarts(records) == [(4, "resume 1 at step 4, world size 2", False),
                                  (8, "resume 2 at step 8, world size 2\u21921", True)]


def test_plot_draws_the_marks(tmp_path: Path) -> None:
    from PIL import Image

    from elastictrain.plot import plot_run

    base = [{"kind": "train", "step": s, "loss": 2.0 - s / 10, "time": s, "world_size": 2} for s in range(1, 12)]
    base += [{"kind": "val", "step": s, "val_loss": 1.5, "iou": 0.5, "time": s, "world_size": 2} for s in (4, 8)]
    marks = [{"kind": "event", "event": "resume", "step": 6, "world_size": 1, "time": 6}]
    pictures = {}
    for name, records in (("plain", base), ("marked", base[:6] + marks + base[6:])):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        with Image.open(plot_run(run)) as img:
            pictures[name] = img.convert("RGB")
    red = sum(1 for r, g, b in pictures["marked"].getdata() if r > 180 and g < 80 and b < 80)
    red_plain = sum(1 for r, g, b in pictures["plain"].getdata() if r > 180 and g < 80 and b < 80)
    assert red > red_plain + 100, (red, red_plain)  # the dashed red line of a world-size change


if __name__ == "__main__":
    sys.exit("run with pytest")

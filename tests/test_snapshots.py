"""The snapshot manager and both engines at world size 1: async staging of large tensors, the commit
record, tiers, best and retention, damage detection with fallback, a changed model refused, and the
``ckpt`` subcommands. Engine and manager tests run in-process; the rest runs the real CLI."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from elastictrain.snapshot import manifest, proof
from elastictrain.snapshot import SnapshotManager
from elastictrain.snapshot.appstate import JsonState, build_app_state
from elastictrain.ckpt_cli import main as ckpt_main
from elastictrain.config import CheckpointConfig, from_dict
from elastictrain.dist import DistContext
from elastictrain.snapshot.engines import build_engine
from elastictrain.errors import UserError
from elastictrain.model import build_model
from elastictrain.snapshot.offline import open_snapshot, read_snapshot_state
from elastictrain.state import TrainState
from helpers import assert_bitwise_equal, load_final, read_jsonl, run_cli, tiny_args

ENGINES = ["torchsnapshot", "dcp"]
WS1 = DistContext(0, 1, 0, torch.device("cpu"), None)
SNAPSHOT_EPOCHS = 6


class TensorBag:
    """A Stateful holding plain tensors; restore copies in place (what both engines expect)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, Any]:
        return dict(self.tensors)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for k, v in sd.items():
            if v.data_ptr() != self.tensors[k].data_ptr():
                self.tensors[k].copy_(v)


def manager(tmp_path: Path, engine: str, total_epochs: int = 10, **cfg: Any) -> SnapshotManager:
    return SnapshotManager(CheckpointConfig(engine=engine, **cfg), WS1, tmp_path, total_epochs)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path: 'byte-identical afterwards' made checkable."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------- engines and manager, in-process ----------
@pytest.mark.parametrize("engine", ENGINES)
def test_json_train_state_round_trips(tmp_path: Path, engine: str) -> None:
    """TrainState travels as one JSON string: both engines store a str (DCP as pickled bytes) and give it back."""
    state = TrainState(epoch=3, step=12, sample_offset=16, best_val_loss=math.inf, best_snapshot="",
                       history=[{"epoch": 1, "val_loss": 2.5}], config={"model": {"decoder_channels": [8, 8]}},
                       run_id="abc", world_size=2, rng=[{"torch": list(range(20))}, {"torch": [1]}])
    build_engine(engine).write(tmp_path / "s", {"train": JsonState(state).state_dict()}, WS1)
    back = TrainState()
    build_engine(engine).read(tmp_path / "s", {"train": JsonState(back)}, WS1)
    assert back == state


@pytest.mark.parametrize("engine", ENGINES)
def test_async_snapshot_keeps_values_from_before_in_place_updates(tmp_path: Path, engine: str) -> None:
    """A real async snapshot of a 160 MB tensor (torchsnapshot's own async_take did not copy CPU tensors of
    128 MB or more) and small ones: updating them in place right after the call returns must not reach the
    snapshot, and a second snapshot into the same staging buffers holds the newer values."""
    big = torch.arange(40 * 1024 * 1024, dtype=torch.float32)  # 160 MB
    bag = TensorBag({"big": big, "small": torch.randn(1000), "step": torch.tensor(7)})
    before = {k: v.clone() for k, v in bag.tensors.items()}
    state = TrainState(epoch=1, step=4)
    mgr = manager(tmp_path, engine, mode="async")
    app = {"bag": bag, "train": JsonState(state)}
    assert mgr.maybe_save(app, state, val_loss=1.0)  # returns while the copy and the write are in flight
    mgr.before_optimizer_step()  # what the training loop calls before it changes parameters in place
    for t in bag.tensors.values():
        t.add_(1)
    middle = {k: v.clone() for k, v in bag.tensors.items()}
    state.epoch, state.step = 2, 8  # a second one: copied into the staging buffers of the first again
    assert mgr.maybe_save(app, state, val_loss=0.5)
    mgr.before_optimizer_step()
    for t in bag.tensors.values():
        t.mul_(3)
    mgr.wait()
    for name, expect in ((manifest.snapshot_name(1, 4), before), (manifest.snapshot_name(2, 8), middle)):
        fresh = TensorBag({k: torch.zeros_like(v) for k, v in before.items()})
        commit = open_snapshot(mgr.root / name)  # verifies checksums
        build_engine(engine).read(mgr.root / name, {"bag": fresh}, WS1)
        for k, v in expect.items():
            assert torch.equal(fresh.tensors[k], v), f"{name} {k}: holds values written after save returned"
        assert commit["entries"]["bag/big"][3] == proof.tensor_fingerprint(expect["big"])


def tiny_training(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train_one_step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
    model(torch.randn(16, 4)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


@pytest.mark.parametrize("engine", ENGINES)
def test_manager_tiers_best_retention_and_exact_restore(tmp_path: Path, engine: str) -> None:
    """Six epochs (permanent every 3, keep 2): permanent 3 and 6, best 2, the newest rolling ones; the
    newest restores model, optimizer, scheduler and TrainState exactly; a mid-epoch snapshot too."""
    model, opt, sched = tiny_training()
    state = TrainState()
    app = build_app_state(model, opt, sched, None, state)
    mgr = manager(tmp_path, engine, total_epochs=8, mode="async", keep=2, permanent_every=3)
    for epoch, val in enumerate([3.0, 1.0, 2.0, 2.5, 2.8, 2.9], start=1):
        train_one_step(model, opt, sched)
        state.epoch, state.step = epoch, epoch
        state.history.append({"epoch": epoch, "val_loss": val})
        assert mgr.maybe_save(app, state, val)
    mgr.wait()
    snaps = manifest.list_snapshots(mgr.root)
    assert [(s.name, s.tier) for s in snaps] == [
        ("epoch00006-step00000006", "permanent"), ("epoch00005-step00000005", "rolling"),
        ("epoch00004-step00000004", "rolling"), ("epoch00003-step00000003", "permanent"),
        ("epoch00002-step00000002", "rolling")]  # epoch 1 retired; 2 stays as best
    assert json.loads((mgr.root / manifest.BEST).read_text())["name"] == "epoch00002-step00000002"
    assert state.best_val_loss == 1.0 and state.best_snapshot == "epoch00002-step00000002"
    assert all(s.commit["engine"] == engine for s in snaps)  # type: ignore[index]

    model2, opt2, sched2 = tiny_training(seed=1)
    state2 = TrainState()
    resumed = manager(tmp_path, engine).restore_latest(build_app_state(model2, opt2, sched2, None, state2))
    assert resumed is not None and resumed.path == mgr.root / "epoch00006-step00000006"
    assert (resumed.epoch, resumed.step, resumed.sample_offset) == (6, 6, 0)
    assert_bitwise_equal(model.state_dict(), model2.state_dict())
    assert state2 == state and sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key])

    train_one_step(model, opt, sched)  # a mid-epoch (preemption) snapshot: synchronous, rolling, no val loss
    state.step, state.sample_offset = 7, 8
    name = mgr.save_now(app, state)
    commit = manifest.read_commit(mgr.root / name)
    assert commit is not None and commit["tier"] == "rolling" and commit["val_loss"] is None
    assert read_snapshot_state(mgr.root / name, commit).sample_offset == 8
    assert mgr.save_now(app, state) == name and len(mgr.blocked_seconds) == 7  # it holds this step already


@pytest.mark.parametrize("engine", ENGINES)
def test_discovery_removes_incomplete_and_sets_damaged_aside(tmp_path: Path, engine: str) -> None:
    model, opt, sched = tiny_training()
    state = TrainState()
    app = build_app_state(model, opt, sched, None, state)
    mgr = manager(tmp_path, engine, mode="sync", keep=5)
    for epoch in (1, 2, 3):
        state.epoch = state.step = epoch
        state.history.append({"epoch": epoch, "val_loss": 1.0 / epoch})
        mgr.maybe_save(app, state, 1.0 / epoch)
    (mgr.root / "epoch00003-step00000003" / manifest.COMMIT).unlink()  # as if cut off before the commit
    data = max(manifest.data_files(mgr.root / "epoch00002-step00000002"), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.seek(data.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    fresh = tiny_training(seed=1)
    resumed = manager(tmp_path, engine).restore_latest(build_app_state(*fresh, None, TrainState()))
    assert resumed is not None and resumed.path == mgr.root / "epoch00001-step00000001"
    assert not (mgr.root / "epoch00003-step00000003").exists()
    aside = [p.name for p, why in manifest.aside_dirs(mgr.root) if why == "damaged"]
    assert len(aside) == 1 and aside[0].startswith("epoch00002-step00000002.damaged-")


def test_explicit_snapshot_must_be_complete_and_intact(tmp_path: Path) -> None:
    mgr = manager(tmp_path, "torchsnapshot", resume_from=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="nope is not a complete snapshot"):
        mgr.restore_latest(build_app_state(*tiny_training(), None, TrainState()))


# ---------- the real CLI at world size 1 ----------
@pytest.fixture(scope="module")
def six_epoch_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A tiny run of six epochs keeping every snapshot (permanent at 5), made once per engine and copied
    by each test that changes it."""
    made: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in made:
            run_dir = tmp_path_factory.mktemp(f"six-{engine}") / "run"
            run_cli(tiny_args(run_dir, *six_epoch_args(engine)), check=True)
            made[engine] = run_dir
        return made[engine]

    return get


def six_epoch_args(engine: str) -> list[str]:
    return ["--epochs", str(SNAPSHOT_EPOCHS), "--checkpoint.keep", "6", "--checkpoint.permanent_every", "5",
            "--checkpoint.engine", engine]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def largest_data_file(snapshot: Path, marker: str) -> Path:
    return max((p for p in manifest.data_files(snapshot) if p.name != marker), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("engine", ENGINES)
def test_damaged_snapshots_are_detected_and_resume_falls_back(six_epoch_run: Callable[[str], Path],
                                                              tmp_path: Path, engine: str) -> None:
    """The five newest snapshots each damaged a different way; the same command again names every
    damaged file, moves those snapshots aside (never deletes them), removes the uncommitted one,
    resumes from epoch 1 and ends with the very weights of the undamaged run."""
    run_dir = copy_run(six_epoch_run(engine), tmp_path / "run")
    root, marker = run_dir / "snapshots", build_engine(engine).marker
    snap = {e: root / manifest.snapshot_name(e, 4 * e) for e in range(1, 7)}
    (snap[6] / manifest.COMMIT).unlink()  # the marker of completeness itself
    truncated, flipped, deleted = (largest_data_file(snap[e], marker) for e in (5, 4, 3))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    deleted.unlink()
    (snap[2] / marker).unlink()  # the engine's own metadata
    damaged_dirs = {e: tree_digest(snap[e]) for e in (2, 3, 4, 5)}

    out = run_cli(tiny_args(run_dir, *six_epoch_args(engine)), check=True).stdout
    assert f"ignoring incomplete snapshot {snap[6]}" in out
    for path, why in ((truncated, "truncated"), (flipped, "checksum mismatch"), (deleted, "missing"),
                      (snap[2] / marker, "missing")):
        assert re.search(rf"is damaged: {re.escape(str(path))}: [^\n]*{why}", out), f"{path} not named\n{out[-3000:]}"
    assert f"resuming from epoch 1 step 4 (snapshot {snap[1]}," in out
    for epoch, digest in damaged_dirs.items():
        aside = [p for p, why in manifest.aside_dirs(root) if p.name.startswith(snap[epoch].name)]
        assert len(aside) == 1 and tree_digest(aside[0]) == digest, f"epoch {epoch} was not moved aside intact"
    assert_bitwise_equal(load_final(six_epoch_run(engine)), load_final(run_dir))


@pytest.mark.parametrize("engine", ENGINES)
def test_changed_model_is_refused_and_snapshots_stay_intact(six_epoch_run: Callable[[str], Path],
                                                            tmp_path: Path, engine: str) -> None:
    run_dir = copy_run(six_epoch_run(engine), tmp_path / "run")
    before = tree_digest(run_dir / "snapshots")
    final = (run_dir / "final_model.pt").read_bytes()
    result = run_cli(tiny_args(run_dir, *six_epoch_args(engine), "--model.decoder_channels", "16,16,16,8,8"))
    assert result.returncode != 0
    newest = run_dir / "snapshots" / manifest.snapshot_name(SNAPSHOT_EPOCHS, 4 * SNAPSHOT_EPOCHS)
    assert f"the model differs from the one in snapshot {newest}" in result.stdout
    assert "decoder_channels" in result.stdout
    assert tree_digest(run_dir / "snapshots") == before
    assert (run_dir / "final_model.pt").read_bytes() == final


def test_retention_permanent_tier_and_best_over_an_extended_run(tmp_path: Path) -> None:
    """Six epochs, then extended to twelve with a learning rate that wrecks the model (a warned change):
    rolling keeps the newest two, epochs 5 and 10 are permanent, and the best (epoch 6) survives."""
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, "--data.train_samples", "16", "--checkpoint.permanent_every", "5")
    run_cli([*args, "--epochs", "6"], check=True)
    out = run_cli([*args, "--epochs", "12", "--optim.lr", "1.0"], check=True).stdout
    assert "--optim.lr changed on resume: 0.003 in the snapshot, 1.0 now" in out
    assert "resuming from epoch 6 step 12" in out
    vals = {r["epoch"]: r["val_loss"] for r in read_jsonl(run_dir) if r["kind"] == "val"}
    assert min(vals, key=vals.__getitem__) == 6, vals  # the premise: nothing after epoch 6 was better
    snaps = {s.name: s.tier for s in manifest.list_snapshots(run_dir / "snapshots")}
    assert snaps == {"epoch00012-step00000024": "rolling", "epoch00011-step00000022": "rolling",
                     "epoch00010-step00000020": "permanent", "epoch00006-step00000012": "rolling",
                     "epoch00005-step00000010": "permanent"}
    assert json.loads((run_dir / "snapshots" / manifest.BEST).read_text())["name"] == "epoch00006-step00000012"


# ---------- ckpt list / inspect / export / clean ----------
@pytest.mark.parametrize("engine", ENGINES)
def test_ckpt_subcommands(six_epoch_run: Callable[[str], Path], tmp_path: Path, engine: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = copy_run(six_epoch_run(engine), tmp_path / "run")
    root = run_dir / "snapshots"
    newest = root / manifest.snapshot_name(6, 24)
    best = json.loads((root / manifest.BEST).read_text())["name"]

    assert ckpt_main(["list", str(run_dir), "--verify"]) == 0
    out = capsys.readouterr().out
    rows = {re.search(r"epoch\d+-step\d+", line)[0]: line for line in out.splitlines()  # type: ignore[index]
            if re.search(r"epoch\d+-step\d+", line)}
    assert len(rows) == SNAPSHOT_EPOCHS
    assert all(" complete " in r and " ok " in r for r in rows.values())
    assert " permanent " in rows["epoch00005-step00000020"] and rows[best].startswith("*")
    assert f"{json.loads((root / best / manifest.COMMIT).read_text())['val_loss']:.4f}" in rows[best]

    assert ckpt_main(["inspect", str(newest)]) == 0
    out = capsys.readouterr().out
    for expect in (f"engine          {engine}", "epoch           6 completed", "step            24 optimizer steps",
                   "history         6 epoch(s)", "world size      1", "encoder='tu-mobilenetv3_small_050'"):
        assert expect in out, out

    assert ckpt_main(["export", str(newest), str(tmp_path / "model.pt")]) == 0
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    stored = from_dict(load_config_of(newest))
    model = build_model(stored.model, stored.data.num_classes)
    model.load_state_dict(exported)  # strict
    assert_bitwise_equal(exported, load_final(run_dir))  # the last snapshot holds the final weights
    capsys.readouterr()
    # An output that is a directory, or in a folder that does not exist, is a user error: exit 2, one line
    # naming it, and nothing written (no temp file left behind).
    (tmp_path / "outdir").mkdir()
    assert ckpt_main(["export", str(newest), str(tmp_path / "outdir")]) == 2
    assert f"{tmp_path / 'outdir'} is a directory" in capsys.readouterr().err
    assert list((tmp_path / "outdir").iterdir()) == [] and not list(tmp_path.glob(".*.tmp-*"))
    assert ckpt_main(["export", str(newest), str(tmp_path / "nowhere" / "m.pt")]) == 2
    assert "no such directory" in capsys.readouterr().err

    flip = largest_data_file(root / "epoch00003-step00000012", build_engine(engine).marker)
    flip.write_bytes(bytes(b ^ 1 for b in flip.read_bytes()[:10]) + flip.read_bytes()[10:])
    assert ckpt_main(["list", str(run_dir), "--verify"]) == 1
    assert f"DAMAGED: {flip}: checksum mismatch" in capsys.readouterr().out
    assert ckpt_main(["export", str(root / "epoch00003-step00000012"), str(tmp_path / "x.pt")]) == 1
    assert f"snapshot is damaged: {flip}" in capsys.readouterr().err

    (root / "epoch00003-step00000012").rename(root / "epoch00003-step00000012.damaged-1")
    before = tree_digest(root)
    assert ckpt_main(["clean", str(run_dir)]) == 0  # a dry run
    out = capsys.readouterr().out
    assert "dry run: would delete" in out and tree_digest(root) == before
    assert ckpt_main(["clean", str(run_dir), "--yes"]) == 0
    kept = {p.name for p in root.iterdir() if p.is_dir()}
    assert kept == {newest.name, "epoch00005-step00000020", best, "epoch00003-step00000012.damaged-1"}
    capsys.readouterr()
    assert ckpt_main(["clean", str(run_dir), "--yes", "--delete-damaged"]) == 0  # only when named
    assert {p.name for p in root.iterdir() if p.is_dir()} == kept - {"epoch00003-step00000012.damaged-1"}
    assert ckpt_main(["list", str(run_dir), "--verify"]) == 0  # what is left is intact


def load_config_of(snapshot: Path) -> dict[str, Any]:
    return read_snapshot_state(snapshot, open_snapshot(snapshot)).config


def test_ckpt_errors_name_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ckpt_main(["list", str(tmp_path / "absent")]) == 2
    assert str(tmp_path / "absent") in capsys.readouterr().err
    incomplete = tmp_path / "snapshots" / manifest.snapshot_name(1, 4)
    incomplete.mkdir(parents=True)
    assert ckpt_main(["inspect", str(incomplete)]) == 1
    assert f"{incomplete}: not a complete snapshot" in capsys.readouterr().err
    assert ckpt_main(["list", str(tmp_path)]) == 0
    assert "INCOMPLETE" in capsys.readouterr().out
    assert ckpt_main(["clean", str(tmp_path), "--yes"]) == 0  # the only snapshot may still be being written
    assert incomplete.exists()
    assert ckpt_main(["frobnicate"]) == 2


def test_ckpt_through_the_real_command_line(six_epoch_run: Callable[[str], Path]) -> None:
    result = run_cli(["ckpt", "list", str(six_epoch_run("torchsnapshot"))], check=True)
    assert "epoch00006-step00000024" in result.stdout and "not checked" in result.stdout

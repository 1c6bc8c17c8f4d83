"""The foundation end to end: the real CLI, plainly and under real torchrun (gloo), outcomes read from disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from elastictrain.config import load_config
from elastictrain.model import build_model
from helpers import TINY, assert_bitwise_equal, load_final, read_jsonl, run_cli, tiny_args


def check_run_outputs(run_dir: Path, world_size: int, epochs: int = 3) -> None:
    """final_model.pt loads weights-only into a fresh smp model; the metrics file has every epoch."""
    cfg = load_config(["--config", str(TINY)])
    model = build_model(cfg.model, cfg.data.num_classes)
    model.load_state_dict(load_final(run_dir))  # strict: every key, every shape
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, cfg.data.num_classes, 32, 32)
    vals = [r for r in read_jsonl(run_dir) if r["kind"] == "val"]
    assert [v["epoch"] for v in vals] == list(range(1, epochs + 1))
    for v in vals:
        assert {"step", "train_loss", "val_loss", "iou", "dice"} <= v.keys()
        assert v["world_size"] == world_size
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]  # it learns
    assert (run_dir / "train.log").read_text().count("epoch") >= epochs
    assert (run_dir / "summary.json").exists()


def test_world_size_1_run_without_process_group(reference_runs: dict[int, Path]) -> None:
    run_dir = reference_runs[1]
    check_run_outputs(run_dir, world_size=1)
    assert "starting fresh" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_torchrun_two_ranks(reference_runs: dict[int, Path]) -> None:
    check_run_outputs(reference_runs[2], world_size=2)
    # Only rank 0 writes the run's files; other ranks log only their own trouble.
    assert not (reference_runs[2] / "logs").exists() or not any((reference_runs[2] / "logs").iterdir())


def test_same_config_gives_bitwise_identical_weights(reference_runs: dict[int, Path], tmp_path: Path) -> None:
    run_cli(tiny_args(tmp_path / "again"), check=True)
    assert_bitwise_equal(load_final(reference_runs[1]), load_final(tmp_path / "again"))


@pytest.mark.slow
def test_same_config_bitwise_identical_under_torchrun(reference_runs: dict[int, Path], tmp_path: Path) -> None:
    run_cli(tiny_args(tmp_path / "again"), nproc=2, check=True)
    assert_bitwise_equal(load_final(reference_runs[2]), load_final(tmp_path / "again"))


def test_a_different_seed_gives_different_weights(reference_runs: dict[int, Path], tmp_path: Path) -> None:
    # Guards the determinism test against passing trivially (e.g. weights never changing).
    run_cli(tiny_args(tmp_path / "seed1", "--run.seed", "1", "--epochs", "1"), check=True)
    ref, other = load_final(reference_runs[1]), load_final(tmp_path / "seed1")
    assert any(not torch.equal(ref[k], other[k]) for k in ref)


def test_finished_run_extends_when_epochs_raised(reference_runs: dict[int, Path], tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "extend"
    shutil.copytree(reference_runs[1], run_dir)
    out = run_cli(tiny_args(run_dir, "--epochs", "4"), check=True)
    assert "resuming from epoch 3" in out.stdout
    assert [r["epoch"] for r in read_jsonl(run_dir) if r["kind"] == "val"] == [1, 2, 3, 4]


def test_config_yaml_is_the_one_the_final_weights_were_trained_with(tmp_path: Path) -> None:
    """config.yaml is what predict rebuilds final_model.pt's model from. A refused start (another number of
    classes: a changed model) leaves it alone; a finished run started again with another image size trains
    nothing and keeps it (predict's input size is the one the weights learnt); a run that trains on with
    the new size writes it beside its new final model."""
    import yaml

    from elastictrain.predict import load_trained_model

    run_dir = tmp_path / "run"
    small = ["--epochs", "1", "--data.train_samples", "16"]
    run_cli(tiny_args(run_dir, *small), check=True)
    written = (run_dir / "config.yaml").read_text()
    refused = run_cli(tiny_args(run_dir, *small, "--data.num_classes", "5"))
    assert refused.returncode == 2, refused.stdout[-3000:]
    assert (run_dir / "config.yaml").read_text() == written
    run_cli(tiny_args(run_dir, *small, "--data.image_size", "64"), check=True)
    assert (run_dir / "config.yaml").read_text() == written
    assert load_trained_model(run_dir)[1].data.image_size == 32
    run_cli(tiny_args(run_dir, "--epochs", "2", "--data.train_samples", "16", "--data.image_size", "64"), check=True)
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["data"]["image_size"] == 64 and stored["train"]["epochs"] == 2


def test_mid_epoch_resume_with_other_data_restarts_the_epoch(tmp_path: Path) -> None:
    """A snapshot 24 samples into an epoch of 64, resumed with 72: offset 24 of the new order holds other
    samples, so continuing there repeated 19 and skipped 16. The epoch starts over in its new order instead,
    with a warning naming the setting and a resume event that says so."""
    run_dir = tmp_path / "run"
    first = run_cli(tiny_args(run_dir, "--epochs", "1", "--data.train_samples", "64", "--debug.fault", "sigterm@step=3"))
    assert first.returncode == 75, first.stdout[-3000:]
    resumed = run_cli(tiny_args(run_dir, "--epochs", "1", "--data.train_samples", "72"), check=True)
    assert "--data.train_samples 64 -> 72" in resumed.stdout and "starts over" in resumed.stdout, resumed.stdout[-3000:]
    records = read_jsonl(run_dir)
    at = next(i for i, r in enumerate(records) if r.get("event") == "resume")
    assert records[at]["step"] == 3 and records[at]["sample_offset"] == 0
    assert records[at]["data_changed"] == "--data.train_samples 64 -> 72"
    after = [r for r in records[at:] if r["kind"] == "train"]
    assert [r["sample_offset"] for r in after] == list(range(8, 73, 8))  # all 72, none of them twice
    assert [r["step"] for r in after] == list(range(4, 13))

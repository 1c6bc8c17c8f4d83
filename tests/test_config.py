"""Config: precedence (defaults < YAML < dotted flags and aliases), errors that name the flag, shipped YAMLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from elastictrain.cli import help_text
from elastictrain.config import Config, from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_valid_and_documented() -> None:
    cfg = load_config([])
    assert cfg == Config()
    assert cfg.model.encoder_weights is None  # never downloads by default
    text = help_text()
    assert "--checkpoint.permanent_every" in text and "retention never deletes it" in text
    assert "--epochs" in text and "= --train.epochs" in text


def test_precedence_yaml_then_flags_then_aliases(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epochs: 7\n  batch_size: 4\noptim:\n  lr: 0.5\n")
    cfg = load_config(["--config", path, "--train.batch_size", "6", "--lr=0.25", "--device", "cpu"])
    assert cfg.train.epochs == 7  # from YAML
    assert cfg.train.batch_size == 6  # dotted flag beats YAML
    assert cfg.optim.lr == 0.25  # alias beats YAML
    assert cfg.train.device == "cpu"
    # order on the command line decides between a flag and its alias
    assert load_config(["--epochs", "3", "--train.epochs", "4"]).train.epochs == 4


def test_every_seed_alias_maps_to_a_setting(tmp_path: Path) -> None:
    cfg = load_config(["--epochs", "2", "--batch-size", "4", "--lr", "0.1", "--device", "cpu",
                       "--num-workers", "0", "--model-type", "FPN", "--checkpoint", str(tmp_path)])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (2, 4, 0.1)
    assert (cfg.train.device, cfg.data.num_workers, cfg.model.arch) == ("cpu", 0, "FPN")
    assert cfg.checkpoint.resume_from == str(tmp_path)


def test_types_lists_none_and_bools() -> None:
    cfg = load_config(["--model.decoder_channels", "8,8,8,8,8", "--model.encoder_weights", "none",
                       "--data.augment", "false", "--preemption.signals", "SIGTERM,SIGUSR1"])
    assert cfg.model.decoder_channels == [8, 8, 8, 8, 8]
    assert cfg.model.encoder_weights is None
    assert cfg.data.augment is False
    assert cfg.preemption.signals == ["SIGTERM", "SIGUSR1"]


def test_all_problems_reported_at_once_each_naming_its_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epochs: zero\n  bogus: 1\nnosuch:\n  x: 1\n")
    with pytest.raises(ValueError) as err:
        load_config(["--config", path, "--optim.lr", "fast", "--train.typo", "1", "stray"])
    msg = str(err.value)
    for expected in ("--train.epochs: expected an integer", "--train.bogus: unknown setting",
                     "--nosuch.x: unknown setting", "--optim.lr: expected a number",
                     "--train.typo: unknown setting", "stray: unexpected argument"):
        assert expected in msg


def test_impossible_values_name_the_flag() -> None:
    with pytest.raises(ValueError) as err:
        load_config(["--epochs", "0", "--checkpoint.keep", "1", "--train.device", "tpu",
                     "--data.image_size", "100", "--checkpoint.engine", "pickle", "--debug.fault", "explode"])
    msg = str(err.value)
    for expected in ("--train.epochs: must be > 0", "--checkpoint.keep: must be >= 2",
                     "--train.device: must be one of", "--data.image_size: must be divisible by 2**model.encoder_depth",
                     "--checkpoint.engine: must be one of", "--debug.fault:"):
        assert expected in msg


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--config: no such file"):
        load_config(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(["--config", write(tmp_path, "train: [unclosed\n")])
    with pytest.raises(ValueError, match="--epochs: missing value"):
        load_config(["--epochs"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path: Path) -> None:
    cfg = load_config(["--config", str(path)])
    assert from_dict(to_dict(cfg)) == cfg  # the copy stored in snapshots round-trips


def test_cli_reports_config_errors_with_exit_2() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "elastictrain", "--epochs", "-1", "--train.nope", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert "--train.epochs: must be > 0" in out.stderr and "--train.nope: unknown setting" in out.stderr


def test_data_settings_for_own_data_are_validated_together() -> None:
    cfg = load_config(["--data.class_names", "bg,road,car", "--data.num_classes", "3", "--data.ignore_index", "255"])
    assert cfg.data.class_names == ["bg", "road", "car"] and cfg.data.ignore_index == 255
    with pytest.raises(ValueError) as err:
        load_config(["--data.class_names", "bg,road", "--data.num_classes", "3", "--data.ignore_index", "2",
                     "--data.val_list", "val.txt", "--data.augment", "spin"])
    text = str(err.value)
    for expected in ("--data.class_names: needs one name per class (3", "--data.ignore_index: 2 is a class id",
                     "--data.val_list: only for --data.source folder", "--data.augment: unknown augmentation"):
        assert expected in text, text
    with pytest.raises(ValueError, match="unique, non-empty and free of '/'"):
        load_config(["--data.class_names", "a,a/b", "--data.num_classes", "2"])


def test_harmful_values_are_refused(tmp_path: Path) -> None:
    """Values that parse but would do harm: an infinite learning rate (NaN losses, exit 0), a preemption
    exit status the scripts read as 'finished' or another outcome, a run directory that is the working
    directory, and YAML null for a path (a directory named 'None')."""
    with pytest.raises(ValueError) as err:
        load_config(["--lr", "inf", "--optim.weight_decay", "nan", "--preemption.exit_code", "0",
                     "--run.dir", ""])
    msg = str(err.value)
    for expected in ("--optim.lr: expected a finite number, got 'inf'", "--optim.weight_decay: expected a finite",
                     "--preemption.exit_code: must be between 3 and 125, got 0", "--run.dir: must name a directory"):
        assert expected in msg
    for code in ("1", "2", "126", "137", "256"):
        with pytest.raises(ValueError, match="--preemption.exit_code: must be between 3 and 125"):
            load_config(["--preemption.exit_code", code])
    assert load_config(["--preemption.exit_code", "3"]).preemption.exit_code == 3
    with pytest.raises(ValueError, match=r"--run.dir: expected a string, got null \(YAML ~\)"):
        load_config(["--config", write(tmp_path, "run:\n  dir: ~\n")])
    with pytest.raises(ValueError, match="--optim.lr: expected a finite number"):
        load_config(["--config", write(tmp_path, "optim:\n  lr: .inf\n")])
    assert load_config(["--config", write(tmp_path, "model:\n  encoder_weights: ~\n")]).model.encoder_weights is None


def test_a_seed_torch_cannot_take_is_a_config_error(tmp_path: Path) -> None:
    """torch.manual_seed takes 64 bits: a larger seed was a traceback (exit 1) at start-up, after the
    process group; now it is refused with the other config problems (exit 2), from the flag or the YAML."""
    import subprocess
    import sys

    for seed in ("99999999999999999999", str(2**63), str(-2**63 - 1)):
        with pytest.raises(ValueError, match=r"--run.seed: must be a 64-bit signed integer .*got " + seed):
            load_config(["--run.seed", seed])
    with pytest.raises(ValueError, match="--run.seed: must be a 64-bit"):
        load_config(["--config", write(tmp_path, "run:\n  seed: 99999999999999999999\n")])
    assert load_config(["--run.seed", str(2**63 - 1)]).run.seed == 2**63 - 1
    assert load_config(["--run.seed", "-5"]).run.seed == -5
    out = subprocess.run([sys.executable, "-m", "elastictrain", "--config", str(ROOT / "configs" / "tiny.yaml"),
                          "--run.dir", str(tmp_path / "run"), "--run.seed", "99999999999999999999"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--run.seed: must be a 64-bit signed integer" in out.stderr and "Traceback" not in out.stderr

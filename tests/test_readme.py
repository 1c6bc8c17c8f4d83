"""README.md holds, tested: its set-up-and-train command works and its test command is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import ROOT, load_final, run_cli

README = (ROOT / "README.md").read_text()


def fenced_commands(section: str) -> list[str]:
    """The command lines of the first ```bash block after a heading line containing ``section``."""
    start = README.index(section)
    block = re.search(r"```bash\n(.*?)```", README[start:], re.S)
    assert block, f"no bash block after {section!r}"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    (test_command,) = fenced_commands("Run the tests")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_quick_start_trains_on_the_embedded_defaults(tmp_path: Path) -> None:
    (setup,) = fenced_commands("Set up and train")
    train = setup.split("&&")[-1].split()
    assert train == ["python", "-m", "elastictrain"], "the quick start trains on the embedded defaults"
    # The same command, with the defaults' model and data kept but the run shrunk to CI size.
    shrink = ["--run.dir", str(tmp_path / "run"), "--epochs", "1", "--data.train_samples", "4",
              "--data.val_samples", "2", "--data.image_size", "64", "--train.batch_size", "2",
              "--data.num_workers", "0"]
    out = run_cli(shrink, check=True)
    assert "encoder" in " ".join(load_final(tmp_path / "run"))
    assert "starting fresh" in out.stdout

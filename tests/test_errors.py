"""User errors after parsing: one message naming the setting or file, exit 2, no traceback, and nothing
written; a run whose loss is no longer finite stops the same way instead of training on garbage."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from elastictrain import cli
from elastictrain.errors import UserError, user_message
from helpers import ROOT, base_env, cli_cmd, read_jsonl, tiny_args


class _Raises(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        raise UserError("data/images/x.png: cannot read this image")


def test_user_message_unwraps_an_error_from_a_loader_worker() -> None:
    """torch re-raises a worker's exception with the worker's traceback as its message; the user sees the
    original message. If a torch release changes that wrapping, this test fails."""
    with pytest.raises(UserError) as err:
        next(iter(DataLoader(_Raises(), num_workers=1)))
    assert "Original Traceback" in str(err.value)
    assert user_message(err.value) == "data/images/x.png: cannot read this image"
    assert user_message(UserError("invalid configuration:\n  --a: b")) == "invalid configuration:\n  --a: b"


def test_a_missing_device_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The real command: stderr holds exactly one message, and the run directory stays empty."""
    out = subprocess.run(cli_cmd(tiny_args(tmp_path / "run", "--device", "mps")), cwd=ROOT, env=base_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].endswith("ERROR elastictrain: --device mps: MPS is not available here "
                                                 "(try --device auto or cpu)"), out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["--model.encoder", "tu-nosuch"], "--model.encoder: timm has no model 'nosuch'"),
    (["--model.arch", "Nope"], "--model.arch/--model.encoder/--model.encoder_weights: smp does not know"),
    (["--batch-size", "64"], "fewer than one global batch of 64: lower --train.batch_size"),
    (["--checkpoint", "/nonexistent/snap"], "--checkpoint.resume_from: /nonexistent/snap is not a complete snapshot"),
    (["--data.source", "folder", "--data.root", "/nonexistent"], "--data.root /nonexistent: 2 problem(s) with the data"),
    (["--lr", "1e30", "--optim.grad_clip", "0"], "training diverged: the loss is not finite at step 2"),
], ids=["encoder", "arch", "batch", "checkpoint", "data", "diverged"])
def test_user_errors_after_parsing_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           extra: list[str], message: str) -> None:
    """In-process (the same main() the console script runs, minus a torch import per case)."""
    run_dir = tmp_path / "run"
    assert cli.main(tiny_args(run_dir, *extra)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and message in errors[0], err[-3000:]
    assert "Traceback" not in err
    assert not (run_dir / ".lock").exists()
    assert not list((run_dir / "snapshots").iterdir())  # a diverged run snapshots nothing either
    assert not (run_dir / "final_model.pt").exists()


def test_a_run_dir_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("precious")
    assert cli.main(tiny_args(tmp_path / "file")) == 2
    path = tmp_path / "file"
    assert f"--run.dir {path}: {path} exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "precious"


def read_only(path: Path) -> list[str]:
    """A command prefix that runs a command with ``path`` read-only: a private read-only bind mount as
    root (root writes through file modes), plain file modes otherwise."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return []
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) to make a read-only mount as root")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"unshare --mount is not allowed here: {probe.stderr.decode().strip()}")
    return ["unshare", "--mount", "sh", "-c", f'mount --bind -o ro "{path}" "{path}" && exec "$0" "$@"']


@pytest.mark.parametrize("where", ["snapshots", "run"])
def test_read_only_run_dir_or_snapshots_are_refused_at_start_up(tmp_path: Path, where: str) -> None:
    """Before: a whole epoch of training, then a 99-line traceback (snapshots/), or a traceback (the run
    directory). Now: exit 2 before the first step, naming the directory."""
    run_dir = tmp_path / "run"
    (run_dir / "snapshots").mkdir(parents=True)
    frozen = run_dir / "snapshots" if where == "snapshots" else run_dir
    cmd = [*read_only(frozen), *cli_cmd(tiny_args(run_dir))]
    out = subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"--run.dir {run_dir}: {frozen} is not writable" in out.stderr and "Traceback" not in out.stderr
    assert not [r for r in read_jsonl(run_dir) if r["kind"] == "train"]


ERROR_FILE_SCRIPT = """
import json, os, sys
from elastictrain.errorfile import record_atomically

if sys.argv[1] == "dies-while-writing":  # another thread's os._exit lands while the error file is written
    json.dump = json.dumps = lambda *a, **k: os._exit(1)

@record_atomically
def main():
    raise RuntimeError("boom")

main()
"""


@pytest.mark.parametrize("how", ["raises", "dies-while-writing"])
def test_torchrun_can_always_read_a_workers_error_file(tmp_path: Path, how: str) -> None:
    """torch's own ErrorHandler truncates the error file, then writes it: a rank that exits in between left
    an empty file, and torchrun's agent died on it (JSONDecodeError) instead of restarting the workers. Ours
    is complete or absent; torchrun's reader (ProcessFailure) must parse it either way."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / "error.json"
    env = {**base_env(), "TORCHELASTIC_ERROR_FILE": str(error_file)}
    proc = subprocess.run([sys.executable, "-c", ERROR_FILE_SCRIPT, how], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))  # raises on a bad file
    if how == "raises":
        assert failure.message["message"] == "RuntimeError: boom"
    else:
        assert not error_file.exists() and not list(tmp_path.iterdir())  # no half file, no temporary left


def test_ranks_started_with_other_settings_are_refused_naming_the_setting(tmp_path: Path) -> None:
    """torchrun, two ranks, one of them given another --train.epochs (a node launched with other flags): every
    rank exits 2 with one message naming the setting, both values and the rank, before anything is trained or
    written (the engines would otherwise fail at the first snapshot, naming neither)."""
    wrapper = tmp_path / "other_flags.py"
    wrapper.write_text("import os, sys\nfrom elastictrain.cli import main\n"
                       "extra = ['--train.epochs', '5'] if os.environ['RANK'] == '1' else []\n"
                       "sys.exit(main(sys.argv[1:] + extra))\n")
    run_dir = tmp_path / "run"
    cmd = [*cli_cmd([], nproc=2)[:-2], str(wrapper), *tiny_args(run_dir)]
    result = subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=180)
    said = result.stdout + result.stderr
    assert result.returncode != 0
    expected = "rank 1 (host " + os.uname().nodename + ") was started with other settings than rank 0: " \
        "train.epochs is 5 there and 3 on rank 0"
    assert said.count(expected) == 2, said[-3000:]  # each rank says it once, the same
    assert "elastictrain/cli.py" not in said, said[-3000:]  # no worker traceback (torchrun prints its own)
    assert not run_dir.exists()

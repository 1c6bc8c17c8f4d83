"""wandb, the summary and the plot through the real CLI: a run SIGKILLed twice and resumed, offline, no network.

WANDB_MODE is unset and there is no WANDB_API_KEY, so the mode comes from ``--metrics.wandb`` alone; every
wandb directory points into the test's tmp_path. Who runs wandb is watched, not guessed: while a run is
going, /proc is polled for ``wandb-core`` processes carrying this test's tag in their environment (they
inherit it, and the RANK of the trainer that started them, from their parent).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from helpers import ROOT, base_env, cli_cmd, kill_group, read_jsonl, tiny_args, wait_for
from test_metrics import read_wandb_file, resume_marks, wandb_history

SIGKILLED = -9  # the trainer SIGKILLs itself (--debug.fault sigkill@...)


def wandb_env(home: Path, tag: str) -> dict[str, str]:
    env = base_env(ELASTICTRAIN_TEST_TAG=tag)
    env.pop("WANDB_MODE")  # base_env disables wandb; here only --metrics.wandb decides
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        env[var] = str(home / sub)
    return env


def tagged_wandb_processes(tag: str) -> dict[int, str]:
    """{pid: RANK of the trainer that started it} for live wandb-core processes of this test."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if Path(entry.path, "comm").read_text().strip() != "wandb-core":
                continue
            environ = dict(item.split("=", 1) for item in
                           Path(entry.path, "environ").read_bytes().decode(errors="replace").split("\0") if "=" in item)
        except OSError:  # gone, or not ours to read
            continue
        if environ.get("ELASTICTRAIN_TEST_TAG") == tag:  # a zombie's environ is empty: it is not counted
            found[int(entry.name)] = environ.get("RANK", "0")  # a plain (non-torchrun) run is rank 0 of 1
    return found


def run_watching(args: list[str], env: dict[str, str], out: Path, nproc: int = 0,
                 timeout: float = 240) -> tuple[subprocess.CompletedProcess[str], dict[int, str]]:
    """Run the CLI to completion, polling for this test's wandb-core processes; returns (result, {pid: RANK})."""
    cmd = cli_cmd(args, nproc)
    tag = env["ELASTICTRAIN_TEST_TAG"]
    seen: dict[int, str] = {}
    with open(out, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out.read_text()[-4000:]}")
                seen.update(tagged_wandb_processes(tag))
                time.sleep(0.2)
        finally:
            kill_group(proc)  # a no-op for a finished run; torchrun's workers if the test failed
            proc.wait()
    # A killed trainer's wandb-core must not outlive it (it would hold the run's files open).
    wait_for(lambda: not tagged_wandb_processes(tag), 15, "wandb-core to exit after its trainer")
    return subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), ""), seen


@pytest.fixture(scope="module")
def killed_twice(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny run (3 epochs, 12 steps, a snapshot every 4): SIGKILLed right after the epoch-1 snapshot was
    written (while epoch 2 trains), re-run and SIGKILLed right after the epoch-2 one, re-run to the end. The first attempt says ``--metrics.wandb auto`` (resolving to offline with
    no API key), the others ``offline``."""
    root = tmp_path_factory.mktemp("wandb_run")
    run_dir, tag = root / "run", uuid.uuid4().hex
    env = wandb_env(root / "wandb-home", tag)
    attempts = [("auto", ["--debug.fault", "sigkill@saved=4"]), ("offline", ["--debug.fault", "sigkill@saved=8"]),
                ("offline", [])]
    outputs, ranks = [], []
    for n, (mode, fault) in enumerate(attempts):
        result, seen = run_watching(tiny_args(run_dir, "--metrics.wandb", mode, *fault), env, root / f"out{n}.txt")
        assert result.returncode == (SIGKILLED if fault else 0), result.stdout[-4000:]
        outputs.append(result.stdout)
        ranks.append(sorted(seen.values()))
    return {"root": root, "run_dir": run_dir, "outputs": outputs, "wandb_ranks": ranks}


def run_id_of(output: str) -> str:
    (line,) = [line for line in output.splitlines() if "wandb offline run" in line]
    return line.split("wandb offline run ")[1].split()[0]


def test_auto_without_an_api_key_is_offline_and_one_wandb_process_per_attempt(killed_twice: dict[str, Any]) -> None:
    assert "wandb offline run" in killed_twice["outputs"][0], "auto, no WANDB_API_KEY: offline, never online"
    assert killed_twice["wandb_ranks"] == [["0"], ["0"], ["0"]]


def test_every_attempt_writes_into_the_same_run_with_steps_strictly_increasing(killed_twice: dict[str, Any]) -> None:
    run_dir = killed_twice["run_dir"]
    run_id = run_id_of(killed_twice["outputs"][0])
    assert [run_id_of(out) for out in killed_twice["outputs"]] == [run_id] * 3, "the id comes from the snapshot"
    dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [d.name.rsplit("-", 1)[1] for d in dirs] == [run_id] * 3, "one offline directory per attempt"
    attempts = wandb_history(run_dir, run_id)
    assert {file_id for file_id, _ in attempts} <= {run_id, None}, "None: a killed attempt's log can be empty"
    steps = [step for _, rows in attempts for step in sorted(rows)]
    assert steps == sorted(set(steps)), f"a step logged twice or going backwards across attempts: {steps}"
    assert steps == list(range(13)), "every step 0-12 reaches wandb once (lost ones from metrics.jsonl)"

    rows = {step: row for _, attempt in attempts for step, row in attempt.items()}
    last_train = {r["step"]: r["loss"] for r in read_jsonl(run_dir) if r["kind"] == "train"}
    assert {s: rows[s]["train/loss"] for s in range(1, 13)} == last_train
    assert [s for s, row in sorted(rows.items()) if "val/val_loss" in row] == [4, 8, 12]
    # The attempts resumed from steps 4 and 8. A resume event rides on its step, or on a later one when the
    # killed attempt had got further into wandb: the kill comes once the snapshot is committed, and a commit
    # slowed by a loaded machine lets that attempt train on (seen: [8, 12] under two test workers).
    resumes = [r["step"] for r in read_jsonl(run_dir) if r["kind"] == "event" and r.get("event") == "resume"]
    assert resumes == [4, 8], resumes
    resumed_at = [s for s, row in sorted(rows.items()) if "event/resume" in row]
    assert len(resumed_at) == 2 and 4 <= resumed_at[0] < resumed_at[1] and resumed_at[1] >= 8, resumed_at
    assert rows[12]["event/finished"] == 1

    last_log = read_wandb_file(dirs[-1] / f"run-{run_id}.wandb")
    (last_run,) = [r.run for r in last_log if r.HasField("run")]
    config = {item.key: json.loads(item.value_json) for item in last_run.config.update}
    assert config["train"]["epochs"] == 3 and config["metrics"]["wandb"] == "offline", "the config is logged"
    summary = {i.key: json.loads(i.value_json) for r in last_log if r.HasField("summary") for i in r.summary.update}
    assert summary["restarts_survived"] == 2 and summary["epochs_completed"] == 3, "the run summary reaches wandb"


def test_jsonl_records_each_resume_and_the_summary_counts_them(killed_twice: dict[str, Any]) -> None:
    run_dir = killed_twice["run_dir"]
    records = read_jsonl(run_dir)
    resumes = [r for r in records if r["kind"] == "event" and r["event"] == "resume"]
    # (step, attempt of this run, torchrun's restart count: 0 for a re-run command, world size)
    assert [(r["step"], r["run_attempt"], r["attempt"], r["world_size"]) for r in resumes] == [(4, 1, 0, 1),
                                                                                              (8, 2, 0, 1)]
    assert [Path(r["snapshot"]).name for r in resumes] == ["epoch00001-step00000004", "epoch00002-step00000008"]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts_survived"] == 2 and summary["epochs_completed"] == 3
    assert summary["time_lost_to_restarts_s"] > 0
    assert summary["best_val_loss"] == min(r["val_loss"] for r in records if r["kind"] == "val")
    assert Path(summary["final_model"]).is_file() and Path(summary["best_snapshot"]).is_dir()
    assert "survived 2 restart(s)" in killed_twice["outputs"][2], "the summary is printed too"
    assert "survived 2 restart(s)" in (run_dir / "train.log").read_text()


def test_plot_marks_the_resumes(killed_twice: dict[str, Any]) -> None:
    from PIL import Image

    out = killed_twice["root"] / "plot.png"
    result = subprocess.run(cli_cmd(["plot", str(killed_twice["run_dir"]), "--out", str(out)]), cwd=ROOT,
                            env=base_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1000, 1000)  # loss, IoU, IoU per class
    # What that PNG was drawn from: both resumes, dashed, on each of the three axes.
    from elastictrain.plot import figure

    records = read_jsonl(killed_twice["run_dir"])
    steps = [float(r["step"]) for r in records if r.get("event") == "resume"]
    marks = resume_marks(figure(records, "title"))
    assert len(steps) == 2 and len(marks) == 3
    assert all([step for step, _ in axis] == steps for axis in marks), (marks, steps)


def test_disabled_creates_no_wandb_files_or_process(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    result, seen = run_watching(tiny_args(run_dir, "--metrics.wandb", "disabled", "--epochs", "1"),
                                wandb_env(tmp_path / "wandb-home", tag), tmp_path / "out.txt")
    assert result.returncode == 0, result.stdout[-4000:]
    assert seen == {}
    assert not (run_dir / "wandb").exists() and not (tmp_path / "wandb-home").exists()
    assert "wandb" not in result.stdout.replace(str(tmp_path), "TMP").lower()


@pytest.mark.slow
def test_torchrun_only_rank0_runs_wandb(tmp_path: Path) -> None:
    """Two ranks, offline. Rank 1 starting wandb would show as a wandb-core process with RANK=1, a second
    offline directory (every wandb.init makes one) or a line in logs/rank1.log; none may appear."""
    tag = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    result, seen = run_watching(tiny_args(run_dir, "--metrics.wandb", "offline", "--epochs", "1"),
                                wandb_env(tmp_path / "wandb-home", tag), tmp_path / "out.txt", nproc=2)
    assert result.returncode == 0, result.stdout[-4000:]
    assert sorted(seen.values()) == ["0"]
    (offline_dir,) = (run_dir / "wandb").glob("offline-run-*")
    run_id = offline_dir.name.rsplit("-", 1)[1]
    ((file_id, rows),) = wandb_history(run_dir, run_id)
    assert file_id == run_id and sorted(rows) == [0, 1, 2, 3, 4]
    rank1_log = run_dir / "logs" / "rank1.log"
    assert not rank1_log.exists() or "wandb" not in rank1_log.read_text().lower()

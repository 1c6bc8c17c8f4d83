"""MetricsLogger, summaries and plots, against real wandb in offline mode (no mocks, no network)."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import time
from pathlib import Path

import pytest

from elastictrain.config import Config
from elastictrain.console import progress, setup_logging
from elastictrain.metrics import MetricsLogger, wandb_mode
from elastictrain.runlog import read_metrics
from elastictrain.summary import summarize, write_summary
from elastictrain.wandb_log import last_wandb_step, wandb_log_records
from elastictrain.plot import main as plot_main
from elastictrain.plot import figure, plot_run

RESUMED = {"epoch": 1, "step": 3, "snapshot": "snapshots/step_3", "world_size": 4, "attempt": 1}


def wandb_env(mp: pytest.MonkeyPatch, home: Path) -> None:
    """Offline wandb whose every file lands under ``home``; no API key, so nothing can go online."""
    mp.delenv("WANDB_API_KEY", raising=False)
    mp.setenv("WANDB_MODE", "offline")
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        mp.setenv(var, str(home / sub))


def make_cfg(mode: str) -> Config:
    cfg = Config()
    cfg.metrics.wandb = mode
    cfg.metrics.progress = "off"
    return cfg


def read_wandb_file(path: Path) -> list:
    """Records of an offline ``run-ID.wandb`` file: a LevelDB-style log of ``wandb.proto`` Record messages.

    Layout: a 7-byte header (':W&B', magic 0xBEE1, version), then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, block, buf, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a chunk header: the block is padded
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def wandb_history(run_dir: Path, run_id: str) -> list[tuple[str | None, dict[int, dict[str, float]]]]:
    """[(run id in the file, {step: {key: value}})] for each offline run directory of ``run_id``, oldest first
    (directories are named offline-run-YYYYMMDD_HHMMSS-ID). A killed attempt's file may hold no record at all."""
    runs = []
    for path in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        records = read_wandb_file(path)
        ids = [r.run.run_id for r in records if r.HasField("run")]
        steps = [r.history.step.num for r in records if r.HasField("history")]
        rows = {r.history.step.num: {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                for r in records if r.HasField("history")}
        assert len(rows) == len(steps), f"{path} has a step twice: {steps}"
        runs.append((ids[0] if ids else None, rows))
    return runs


def resume_attempt(run_dir: Path, run_id: str) -> None:
    """Attempt 2: resumed from step 3 at world size 4, replaying steps 4 and 5 with loss 100 + step."""
    second = MetricsLogger(make_cfg("offline"), run_dir, rank=0, world_size=4)
    assert second.start(run_id, dict(RESUMED)) == run_id
    for step in range(4, 9):
        second.log("train", step, epoch=1 + step // 6, loss=100.0 + step, lr=1e-3, sample_offset=0, world_size=4)
    second.log("val", 8, epoch=2, train_loss=1.0, val_loss=0.9, iou=0.6, dice=0.7, world_size=4)
    second.close({"best_val_loss": 0.9})
    second.close()  # idempotent
    settled(run_dir, run_id, 8)


def settled(run_dir: Path, run_id: str, last_step: int) -> None:
    """Wait until wandb-core has written an attempt's history (run.finish() may return before it has), and
    into the next second, so that the next attempt's offline directory (named by the second) is its own."""
    deadline = time.monotonic() + 30
    while last_wandb_step(run_dir / "wandb", run_id) < last_step and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.05 - time.time() % 1)


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """A run logged by two offline attempts: steps 1-5 at world size 2, then resumed from step 3 at 4.

    'clean': attempt 1 closed its wandb run. 'killed': the same, but attempt 1's transaction log is cut back
    to its header, as a SIGKILL leaves it (wandb-core dies with the trainer before writing its block).
    Built once: wandb start-up is the slow part of this file.
    """
    root = tmp_path_factory.mktemp("resumed")
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        wandb_env(mp, root / "wandb-home")
        first = MetricsLogger(make_cfg("offline"), run_dir, rank=0, world_size=2)
        run_id = first.start(None, None)
        for step in range(1, 6):
            first.log("train", step, epoch=step // 3, loss=float(step), lr=1e-3, sample_offset=0, world_size=2)
            if step == 3:
                first.log("event", step, event="snapshot", epoch=1, snapshot="snapshots/step_3")
        first.log("val", 5, epoch=1, train_loss=2.0, val_loss=1.5, iou=0.4, dice=0.5, world_size=2)
        first.close()
        settled(run_dir, run_id, 5)
        killed = root / "killed"
        shutil.copytree(run_dir, killed, symlinks=True)
        (log_file,) = killed.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
        log_file.write_bytes(log_file.read_bytes()[:7])
        resume_attempt(run_dir, run_id)
        resume_attempt(killed, run_id)
    return {"clean": (run_dir, run_id), "killed": (killed, run_id)}


@pytest.fixture(scope="module")
def resumed_run(resumed_runs: dict[str, tuple[Path, str]]) -> tuple[Path, str]:
    return resumed_runs["clean"]


def test_offline_resume_writes_into_the_same_run(resumed_run: tuple[Path, str]) -> None:
    run_dir, run_id = resumed_run
    attempts = wandb_history(run_dir, run_id)
    assert len(attempts) == 2, "each attempt has its own offline directory, both named after the run id"
    assert [file_id for file_id, _ in attempts] == [run_id, run_id]


def test_wandb_steps_strictly_increase_across_a_resume(resumed_run: tuple[Path, str]) -> None:
    run_dir, run_id = resumed_run
    (_, first), (_, second) = wandb_history(run_dir, run_id)
    steps = sorted(first) + sorted(second)
    assert steps == [0, 1, 2, 3, 4, 5, 6, 7, 8], "replayed steps 4 and 5 must not reach wandb again"
    assert all(row["_step"] == step for rows in (first, second) for step, row in rows.items())
    assert first[4]["train/loss"] == 4.0, "wandb keeps attempt 1's values for steps it had already seen"
    assert first[5]["train/loss"] == 5.0 and first[5]["val/val_loss"] == 1.5, "train and val at one step merge"
    assert first[3]["event/snapshot"] == 1
    assert second[6]["event/resume"] == 1 and second[6]["event/world_size"] == 4, "the resume event joins step 6"
    assert second[8]["val/iou"] == 0.6


def test_a_killed_attempts_lost_steps_reach_wandb_from_the_jsonl(resumed_runs: dict[str, tuple[Path, str]]) -> None:
    run_dir, run_id = resumed_runs["killed"]
    (_, first), (_, second) = wandb_history(run_dir, run_id)
    assert first == {}, "attempt 1's transaction log lost everything"
    assert sorted(second) == [0, 1, 2, 3, 4, 5, 6, 7, 8], "attempt 2 logs steps 0-3 from the JSONL, then its own"
    assert [second[s]["train/loss"] for s in (1, 2, 3)] == [1.0, 2.0, 3.0], "attempt 1's values, from the JSONL"
    assert second[3]["event/snapshot"] == 1 and second[3]["event/resume"] == 1
    assert second[0]["event/start"] == 1
    assert [second[s]["train/loss"] for s in (4, 5)] == [104.0, 105.0], "steps after the snapshot: the replay"
    assert "val/val_loss" not in second[5], "attempt 1's step 5 was after the snapshot: not back-filled"


def test_wandb_log_reader_stops_cleanly_at_a_torn_tail(resumed_run: tuple[Path, str]) -> None:
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir, run_id = resumed_run
    for path in (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"):
        data = path.read_bytes()
        full = list(wandb_log_records(data))
        assert [pb.Record.FromString(payload) for payload in full] == read_wandb_file(path)
        for cut in range(7, len(data), 97):
            assert full[:len(list(wandb_log_records(data[:cut])))] == list(wandb_log_records(data[:cut]))
        assert last_wandb_step(run_dir / "wandb", run_id) == 8
    assert last_wandb_step(run_dir / "wandb", "nosuchid") == -1


def test_jsonl_keeps_every_record_of_both_attempts(resumed_run: tuple[Path, str]) -> None:
    run_dir, _ = resumed_run
    records = read_metrics(run_dir)
    events = [r for r in records if r["kind"] == "event"]
    assert [e["event"] for e in events] == ["start", "snapshot", "resume"]
    assert events[0]["run_attempt"] == 0
    assert events[2] == {"kind": "event", "step": 3, "time": events[2]["time"], "event": "resume", "run_attempt": 1,
                         **{k: v for k, v in RESUMED.items() if k != "step"}}
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]
    assert all(r["time"] > 0 for r in records)


def test_disabled_mode_creates_no_wandb_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb_env(monkeypatch, tmp_path / "wandb-home")
    run_dir = tmp_path / "run"
    logger = MetricsLogger(make_cfg("disabled"), run_dir, rank=0, world_size=1)
    assert logger.start(None, None) is None
    logger.log("train", 1, epoch=0, loss=0.5, lr=1e-3, sample_offset=16, world_size=1)
    logger.close()
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    assert not (tmp_path / "wandb-home").exists()
    assert [r["kind"] for r in read_metrics(run_dir)] == ["event", "train"]


def test_rank1_logger_creates_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb_env(monkeypatch, tmp_path / "wandb-home")
    logger = MetricsLogger(make_cfg("offline"), tmp_path / "run", rank=1, world_size=2)
    assert logger.start("someid", dict(RESUMED)) is None
    logger.log("train", 4, epoch=1, loss=0.5, lr=1e-3, sample_offset=16, world_size=2)
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_read_metrics_skips_torn_lines_and_a_restart_appends_cleanly(tmp_path: Path) -> None:
    logger = MetricsLogger(make_cfg("disabled"), tmp_path, rank=0, world_size=1)
    logger.start(None, None)
    logger.log("train", 1, epoch=0, loss=0.5, lr=1e-3, sample_offset=16, world_size=1)
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 2, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]

    restarted = MetricsLogger(make_cfg("disabled"), tmp_path, rank=0, world_size=1)
    restarted.start(None, {"epoch": 0, "step": 1, "attempt": 1})
    restarted.close()
    records = read_metrics(tmp_path)
    assert [(r["kind"], r["step"]) for r in records] == [("event", 0), ("train", 1), ("event", 1)]
    assert records[-1]["event"] == "resume"


def test_summarize_counts_restarts_and_time_lost(tmp_path: Path) -> None:
    records = [
        {"kind": "event", "event": "start", "step": 0, "time": 100.0, "world_size": 2},
        {"kind": "train", "step": 10, "time": 110.0, "epoch": 0, "loss": 1.0, "world_size": 2},
        {"kind": "val", "step": 10, "time": 112.0, "epoch": 1, "val_loss": 0.8, "iou": 0.3, "world_size": 2},
        {"kind": "event", "event": "snapshot", "step": 10, "time": 113.0},
        {"kind": "train", "step": 15, "time": 120.0, "epoch": 1, "loss": 0.7, "world_size": 2},
        # crash; resumed from step 10: 20 s down + 7 s of steps 11-15 to redo
        {"kind": "event", "event": "resume", "step": 10, "time": 140.0, "world_size": 4, "attempt": 1},
        {"kind": "train", "step": 15, "time": 145.0, "epoch": 1, "loss": 0.7, "world_size": 4},
        {"kind": "val", "step": 20, "time": 150.0, "epoch": 2, "val_loss": 0.6, "iou": 0.5, "world_size": 4},
        {"kind": "val", "step": 30, "time": 160.0, "epoch": 3, "val_loss": 0.7, "iou": 0.5, "world_size": 4},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    s = summarize(tmp_path)
    assert s == {"epochs_completed": 3, "steps_completed": 30, "wall_time_s": 60.0, "restarts_survived": 1,
                 "time_lost_to_restarts_s": 27.0, "best_val_loss": 0.6, "best_val_epoch": 2, "world_sizes": [2, 4]}
    write_summary(tmp_path, {"final_model": "final/model.pt", "best_snapshot": "snapshots/step_20"})
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == {**s, "final_model": "final/model.pt", "best_snapshot": "snapshots/step_20"}


def test_plot_run_writes_a_png_with_the_resume_marked(resumed_run: tuple[Path, str], tmp_path: Path) -> None:
    from PIL import Image

    run_dir, _ = resumed_run
    out = plot_run(run_dir)
    assert out == run_dir / "metrics.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 0 and img.size[1] > 0
    assert plot_main([str(run_dir), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "empty")


def resume_marks(fig: object) -> list[list[tuple[float, str]]]:
    """Per axis of a plot: (step, colour) of every dashed vertical line drawn on it."""
    from matplotlib.colors import to_hex

    return [[(float(line.get_xdata()[0]), to_hex(line.get_color())) for line in ax.get_lines()
             if line.get_linestyle() == "--"] for ax in fig.axes]  # type: ignore[attr-defined]


def test_plot_marks_the_resume_on_every_axis_with_its_label(resumed_run: tuple[Path, str]) -> None:
    """The marks themselves, not just a PNG: a plot without them must fail here."""
    from matplotlib.colors import to_hex

    records = read_metrics(resumed_run[0])
    (resume,) = [r for r in records if r.get("event") == "resume"]
    fig = figure(records, "title")
    assert len(fig.axes) == 2 and resume_marks(fig) == [[(resume["step"], to_hex("tab:red"))]] * 2
    assert [t.get_text() for t in fig.axes[0].texts] == [f"resume 1 at step {resume['step']}, world size 2\u21924"]


def test_wandb_mode_goes_online_only_with_a_key() -> None:
    assert wandb_mode("auto", {}) == "offline"
    assert wandb_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}) == "disabled"
    assert wandb_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"


def test_progress_only_wraps_on_rank0_when_asked(tmp_path: Path) -> None:
    items = [1, 2, 3]
    cfg = make_cfg("disabled")
    assert progress(items, 3, "x", cfg, rank=0) is items
    cfg.metrics.progress = "on"
    assert progress(items, 3, "x", cfg, rank=1) is items
    bar = progress(items, 3, "x", cfg, rank=0)
    assert bar is not items and list(bar) == items


def test_setup_logging_is_idempotent_and_quiet_ranks_leave_no_file(tmp_path: Path) -> None:
    package = logging.getLogger("elastictrain")
    log = logging.getLogger("elastictrain.test")
    try:
        setup_logging(tmp_path, rank=0)
        setup_logging(tmp_path, rank=0)
        assert len([h for h in package.handlers if getattr(h, "_elastictrain", False)]) == 2
        log.info("hello from zero")
        assert "[rank 0] INFO elastictrain.test: hello from zero" in (tmp_path / "train.log").read_text()

        setup_logging(tmp_path, rank=1)
        log.info("not worth a file")
        assert not (tmp_path / "logs").exists()
        log.warning("trouble on one")
        assert "[rank 1] WARNING" in (tmp_path / "logs" / "rank1.log").read_text()
    finally:
        for handler in [h for h in package.handlers if getattr(h, "_elastictrain", False)]:
            package.removeHandler(handler)
            handler.close()


def test_rerunning_a_finished_run_is_no_restart(tmp_path: Path) -> None:
    """A finished run run again (or continued with more epochs) an hour later: no restart, no time lost;
    a crash after that continuation still counts."""
    records = [
        {"kind": "event", "event": "start", "step": 0, "time": 100.0},
        {"kind": "val", "step": 10, "time": 110.0, "epoch": 1, "val_loss": 0.8},
        {"kind": "event", "event": "finished", "step": 10, "time": 111.0},
        {"kind": "event", "event": "resume", "step": 10, "time": 3711.0},  # the same command, an hour later
        {"kind": "event", "event": "finished", "step": 10, "time": 3712.0},
        {"kind": "event", "event": "resume", "step": 10, "time": 7300.0},  # --train.epochs raised
        {"kind": "train", "step": 15, "time": 7310.0, "loss": 0.7},
        {"kind": "event", "event": "resume", "step": 10, "time": 7320.0},  # crashed: 10 s down + 10 s redone
        {"kind": "val", "step": 20, "time": 7330.0, "epoch": 2, "val_loss": 0.6},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    s = summarize(tmp_path)
    assert s["restarts_survived"] == 1 and s["time_lost_to_restarts_s"] == 20.0


def test_plot_out_names_what_it_writes(resumed_run: tuple[Path, str], tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """--out DIR writes DIR/metrics.png and says so; a name that is neither a .png nor a directory, and a run
    without metrics, are one-line errors with exit 2."""
    run_dir, _ = resumed_run
    out_dir = tmp_path / "plots"
    out_dir.mkdir()
    assert plot_main([str(run_dir), "--out", str(out_dir)]) == 0
    assert (out_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(out_dir.iterdir()) == [out_dir / "metrics.png"] and not (tmp_path / "plots.png").exists()
    assert f"wrote {out_dir / 'metrics.png'}" in caplog.text
    assert plot_main([str(run_dir), "--out", str(tmp_path / "picture")]) == 2
    assert not list(tmp_path.glob("picture*"))
    assert plot_main([str(tmp_path / "empty")]) == 2
    assert "no metrics file" in caplog.text

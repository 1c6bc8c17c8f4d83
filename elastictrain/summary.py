"""The run's outcome, derived from metrics.jsonl: RUN_DIR/summary.json and its log lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from elastictrain.console import duration
from elastictrain.osutil import write_atomic
from elastictrain.runlog import is_number, last_step, read_metrics

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def summarize(run_dir: Path) -> dict[str, Any]:
    """Derive the run's outcome from ``metrics.jsonl``.

    Returns a dict with:
        epochs_completed: the largest ``epoch`` in val records (epochs completed when the epoch ended).
        steps_completed: the largest ``step`` in any record.
        wall_time_s: time of the last record minus the first, downtime between attempts included.
        restarts_survived: the number of resume events, except those after a ``finished`` event: re-running
            a finished run (or raising ``train.epochs`` to continue it) is not a restart, and its idle gap
            is no time lost.
        time_lost_to_restarts_s: an approximation, summed over resume events, of downtime plus recomputed
            work. For a resume from the snapshot at step S, it is (resume time - time of the last record before
            it) + (that time - time of the last earlier record at a step <= S, i.e. when step S was done). The
            recomputation is timed at the old attempt's speed, and start-up before the resume event counts as
            downtime.
        best_val_loss, best_val_epoch: the lowest val_loss and its epoch (None without val records).
        val_iou/NAME, val_dice/NAME: per-class IoU and Dice of the last val record (None: class absent).
        world_sizes: the distinct world sizes seen, in order of first appearance.
    """
    records = read_metrics(run_dir)
    vals = [r for r in records if r.get("kind") == "val" and is_number(r.get("val_loss"))]
    best = min(vals, key=lambda r: r["val_loss"], default=None)
    world_sizes: list[int] = []
    for r in records:
        if "world_size" in r and r["world_size"] not in world_sizes:
            world_sizes.append(r["world_size"])
    times = [r["time"] for r in records if is_number(r.get("time"))]
    last = vals[-1] if vals else {}
    per_class = {f"val_{k}": v for k, v in last.items() if k.startswith(("iou/", "dice/"))}
    return {
        **per_class,
        "epochs_completed": max((int(r.get("epoch", 0)) for r in vals), default=0),
        "steps_completed": max(last_step(records), 0),
        "wall_time_s": (max(times) - min(times)) if times else 0.0,
        "restarts_survived": len(_restart_indices(records)),
        "time_lost_to_restarts_s": _time_lost_to_restarts(records),
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_epoch": best.get("epoch") if best else None,
        "world_sizes": world_sizes,
    }


def _is_resume(record: dict) -> bool:
    return record.get("kind") == "event" and record.get("event") == "resume"


def _restart_indices(records: list[dict]) -> list[int]:
    """Positions of the resume events that continue an attempt which did not finish."""
    restarts, finished = [], False
    for i, r in enumerate(records):
        if _is_resume(r) and not finished:
            restarts.append(i)
        if r.get("kind") == "event" and r.get("event") in ("start", "resume", "finished"):
            finished = r.get("event") == "finished"
    return restarts


def _time_lost_to_restarts(records: list[dict]) -> float:
    lost = 0.0
    for i in _restart_indices(records):
        resume = records[i]
        if i == 0:
            continue
        last_before = records[i - 1]
        # Walking back, the first record at or below the snapshot step marks when that step was done
        # (often the 'snapshot' event itself); everything after it was redone by this attempt.
        done = next((r for r in reversed(records[:i]) if r.get("step", 0) <= resume.get("step", 0)), last_before)
        downtime = resume["time"] - last_before["time"]
        recomputed = max(0.0, last_before["time"] - done["time"])
        lost += downtime + recomputed
    return lost


def write_summary(run_dir: Path, summary: dict) -> dict[str, Any]:
    """Write ``RUN_DIR/summary.json`` (:func:`summarize` overlaid with ``summary``) and log it for humans.

    Args:
        run_dir: the run directory holding metrics.jsonl.
        summary: what only the trainer knows, e.g. final_model and best_snapshot paths; wins over derived keys.

    Returns:
        The summary as written.
    """
    run_dir = Path(run_dir)
    full = {**summarize(run_dir), **summary}
    write_atomic(run_dir / SUMMARY_FILE, json.dumps(full, indent=2, default=str) + "\n")  # never half-written
    best = full.get("best_val_loss")
    log.info(
        "run summary: %s epochs (%s steps) in %s; survived %d restart(s), ~%s lost to them; best val loss %s%s; "
        "final model %s; best snapshot %s",
        full.get("epochs_completed"), full.get("steps_completed"), duration(full.get("wall_time_s", 0.0)),
        full.get("restarts_survived", 0), duration(full.get("time_lost_to_restarts_s", 0.0)),
        f"{best:.4f}" if is_number(best) else "n/a",
        f" (epoch {full['best_val_epoch']})" if full.get("best_val_epoch") is not None else "",
        full.get("final_model", "n/a"), full.get("best_snapshot", "n/a") or "n/a")
    per_class = [(k[len("val_iou/"):], v) for k, v in full.items() if k.startswith("val_iou/")]
    if per_class:
        log.info("last validation IoU per class: %s",
                 ", ".join(f"{name} {v:.3f}" if is_number(v) else f"{name} -" for name, v in per_class))
    return full

"""``elastictrain plot RUN_DIR``: loss and IoU curves of a run (overall and per class), with its restarts
marked, as a PNG."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from elastictrain.errors import EXIT_USER_ERROR, UserError
from elastictrain.console import setup_logging
from elastictrain.runlog import read_metrics

log = logging.getLogger(__name__)


def _surviving(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``kind`` records, the last record of each step winning.

    After a resume the replayed steps appear twice in the JSONL; the later record belongs to the attempt
    that carried on, so the curve shows the trajectory the final model actually took.
    """
    by_step = {r["step"]: r[key] for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _restarts(records: list[dict]) -> list[tuple[int, str, bool]]:
    """(step, label, world size changed) for every resume event, numbered in the order they happened."""
    marks = []
    world_size = None
    for r in records:
        if r.get("kind") == "event" and r.get("event") == "resume":
            new = r.get("world_size")
            changed = world_size is not None and new is not None and new != world_size
            size = f"world size {world_size}\u2192{new}" if changed else f"world size {new}"
            marks.append((r["step"], f"resume {len(marks) + 1} at step {r['step']}, {size}", changed))
        if "world_size" in r:
            world_size = r["world_size"]
    return marks


def class_keys(records: list[dict], prefix: str = "iou/") -> list[str]:
    """The per-class keys (``iou/NAME``) of the val records, in the order they first appear."""
    keys: dict[str, None] = {}
    for r in records:
        if r.get("kind") == "val":
            keys.update((k, None) for k in r if k.startswith(prefix))
    return list(keys)


def figure(records: list[dict], title: str) -> Any:
    """The matplotlib Figure: loss, overall val IoU, and (when the records have them) val IoU per class."""
    # The Figure/Agg canvas API leaves pyplot's global backend alone (safe inside a training process).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_class = class_keys(records)
    fig = Figure(figsize=(10, 10 if per_class else 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3 if per_class else 2, 1, sharex=True)
    loss_ax, iou_ax = axes[0], axes[1]
    loss_ax.plot(*_surviving(records, "train", "loss"), label="train loss", lw=1, alpha=0.8)
    loss_ax.plot(*_surviving(records, "val", "val_loss"), "o-", label="val loss")
    loss_ax.set_ylabel("loss")
    iou_ax.plot(*_surviving(records, "val", "iou"), "o-", color="tab:green", label="val IoU")
    iou_ax.set_ylabel("IoU")
    for key in per_class:
        axes[2].plot(*_surviving(records, "val", key), ".-", label=key[len("iou/"):])
    if per_class:
        axes[2].set_ylabel("val IoU per class")
    axes[-1].set_xlabel("optimizer step")
    for step, label, changed in _restarts(records):
        color = "tab:red" if changed else "tab:gray"
        for ax in axes:
            ax.axvline(step, ls="--", color=color, lw=1)
        loss_ax.annotate(label, (step, 1), xycoords=("data", "axes fraction"), xytext=(-2, -4),
                         textcoords="offset points", rotation=90, va="top", ha="right", fontsize=8, color=color,
                         bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.7})
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(loc="best", fontsize=8 if ax is not loss_ax else None)
    fig.suptitle(title)
    return fig


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Plot train/val loss and val IoU (overall and per class) against the optimizer step, restarts as
    dashed lines.

    Args:
        run_dir: a run directory holding metrics.jsonl.
        out: PNG to write (``*.png``), or an existing directory to write ``metrics.png`` into; default
            RUN_DIR/metrics.png.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: naming the metrics file when the run has none.
        UserError: ``out`` is neither a .png file nor a directory.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = _png_path(run_dir, out)
    fig = figure(records, f"{run_dir.name}: dashed = resumed (red: world size changed)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")  # the format given: matplotlib would add '.png' to a bare name
    return out


def _png_path(run_dir: Path, out: Path | None) -> Path:
    if out is None:
        return run_dir / "metrics.png"
    out = Path(out)
    if out.is_dir():
        return out / "metrics.png"
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: name a .png file or an existing directory (metrics.png is written into it)")
    return out


def main(argv: list[str]) -> int:
    """``elastictrain plot RUN_DIR [--out FILE]``."""
    parser = argparse.ArgumentParser(prog="elastictrain plot", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    setup_logging(None, rank=0)
    try:
        log.info("wrote %s", plot_run(args.run_dir, args.out))
    except (UserError, FileNotFoundError) as e:  # a mistake to fix: one line, no traceback
        log.error("elastictrain plot: %s", e)
        return EXIT_USER_ERROR
    return 0

"""The console: logging set-up for every rank, a progress bar on rank 0, and durations for humans."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from pathlib import Path

from elastictrain.config import Config


def rank_log(run_dir: Path, rank: int) -> Path:
    """Where a rank logs in the run directory: train.log for rank 0, logs/rankN.log for the others."""
    return run_dir / ("train.log" if rank == 0 else f"logs/rank{rank}.log")


def duration(seconds: float) -> str:
    """``1h05m00s`` or ``4m30s``."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class _TqdmAwareHandler(logging.StreamHandler):
    """Writes through tqdm so log lines do not break a progress bar on the same terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own convention for handler failures
            self.handleError(record)


def setup_logging(run_dir: Path | None, rank: int) -> None:
    """Configure the ``elastictrain`` loggers for this rank. Idempotent: a second call replaces the first.

    Every line carries the time and ``[rank N]``. Rank 0 logs INFO to stderr and to ``RUN_DIR/train.log``;
    other ranks log only WARNING and above, to stderr and to ``RUN_DIR/logs/rank{N}.log``. Files are
    created at their first line, so a quiet rank leaves no file behind.
    """
    root = logging.getLogger("elastictrain")
    for handler in [h for h in root.handlers if getattr(h, "_elastictrain", False)]:
        root.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    level = logging.INFO if rank == 0 else logging.WARNING
    handlers: list[logging.Handler] = [_TqdmAwareHandler(sys.stderr)]
    if run_dir is not None:
        handlers.append(_LazyDirFileHandler(rank_log(Path(run_dir), rank)))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.setLevel(level)
        handler._elastictrain = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)


class _LazyDirFileHandler(logging.FileHandler):
    """Appends to ``path``, creating it (and its directory) only when the first record arrives."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)

    def _open(self):  # type: ignore[no-untyped-def]
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def progress(iterable: Iterable, total: int, desc: str, cfg: Config, rank: int) -> Iterable:
    """Wrap ``iterable`` in a tqdm bar on rank 0 when metrics.progress is 'on', or 'auto' on a terminal."""
    setting = cfg.metrics.progress
    if rank != 0 or setting == "off" or (setting == "auto" and not sys.stderr.isatty()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False)

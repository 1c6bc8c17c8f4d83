"""The run's own record, RUN_DIR/metrics.jsonl, read back: its records in file order, and its attempts.

What is written there, and what every field means, is in metrics.py (the writer) and the README.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict]:
    """Parse ``RUN_DIR/metrics.jsonl`` in file order, skipping lines torn by a crash mid-write.

    Raises:
        FileNotFoundError: naming the metrics file when the run has none.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file: {path}")
    records = []
    # Bytes, line by line: one line that is not UTF-8 (a torn multi-byte character, a stray write) must cost
    # that line only, not the whole file.
    lines = path.read_bytes().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # not JSON, or not UTF-8
            # The last line is torn by any crash mid-write; an earlier one was torn by an earlier attempt.
            (log.debug if n == len(lines) else log.warning)("%s line %d is torn or not UTF-8 JSON, skipped",
                                                            path, n)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            log.warning("%s line %d is not a JSON object, skipped", path, n)
    return records


def attempts(records: list[dict]) -> list[list[dict]]:
    """The records split into attempts: each starts at a start or resume event; records before the first
    (none in a file this package wrote) belong to no attempt."""
    out: list[list[dict]] = []
    for r in records:
        if is_attempt_start(r):
            out.append([])
        if out:
            out[-1].append(r)
    return out


def is_attempt_start(record: dict) -> bool:
    return record.get("kind") == "event" and record.get("event") in ("start", "resume")


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def last_step(records: list[dict]) -> int:
    """The highest ``step`` of any record (-1: none)."""
    return max((int(r["step"]) for r in records if "step" in r), default=-1)

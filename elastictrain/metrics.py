"""One logging interface for the run: console (``logging``), JSONL on disk, and wandb on global rank 0.

``RUN_DIR/metrics.jsonl`` is the record tests and tools read: one JSON object per line, appended by
every attempt of the run, so after a restart the file holds the replayed steps twice (the resume event
in between says where the new attempt started). Record kinds:

- ``train``: epoch, step, loss, lr, sample_offset, world_size
- ``val``: epoch, step, train_loss, val_loss, iou, dice (micro-averaged over pixels), ``iou/NAME`` and
  ``dice/NAME`` per class (``data.class_names``; null for a class in neither truth nor prediction), world_size
- ``event``: event in {start, resume, preempted, snapshot, finished, world_size_change} plus its fields;
  start and resume carry ``run_attempt`` (0 for the first attempt of the run, counting every earlier start or
  resume in the file) next to torchrun's ``attempt`` (its restart count, 0 again for every re-run command)

Every record also has ``kind``, ``step`` (optimizer steps completed) and ``time`` (unix seconds).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from elastictrain.config import Config, to_dict

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def wandb_mode(setting: str, environ: Mapping[str, str] | None = None) -> str:
    """Resolve ``metrics.wandb`` to a wandb mode: 'online', 'offline' or 'disabled'.

    'auto' defers to an explicit ``WANDB_MODE`` in the environment, then goes online only when
    ``WANDB_API_KEY`` is set: a run must never reach for the network unless asked to.
    """
    if setting != "auto":
        return setting
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return environ["WANDB_MODE"]
    return "online" if environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    """One logging interface: console (logging module), JSONL on disk (what tests read), wandb on global rank 0.

    Only rank 0 does I/O; on other ranks every method is a no-op, so callers need no rank checks.

    wandb's step axis must be strictly increasing, but a resumed attempt replays the steps between its
    snapshot and the crash. So the logger keeps ``_next_wandb_step``, the lowest step wandb still accepts:
    train/val records below it stay out of wandb (they are still in the JSONL), events below it join the
    next row that goes out, and records sharing a step merge into one wandb row (explicit ``step``, no
    ``commit``). When resuming into a run, that floor is one past the highest step in the run's wandb
    transaction logs (offline wandb cannot say where the run stopped, and a killed attempt's last steps never
    reached the disk); what the JSONL has beyond it, up to the snapshot resumed from, is logged first.
    """

    def __init__(self, cfg: Config, run_dir: Path, rank: int, world_size: int) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self._file: Any = None
        self._wandb_run: Any = None
        self._next_wandb_step = 0
        self._pending_events: dict[str, Any] = {}
        self._lock = threading.Lock()  # the async checkpoint thread logs snapshot events too

    def start(self, run_id: str | None, resumed: dict | None) -> str | None:
        """Open the metrics file, start (or resume into) the wandb run, and log a start/resume event.

        Args:
            run_id: the wandb run id stored in the snapshot; None or '' on a fresh run.
            resumed: None on a fresh run, else what was restored (epoch, step, snapshot, world_size, attempt).

        Returns:
            The wandb run id to store in the train state (None when wandb is disabled or rank != 0).
        """
        if self.rank != 0:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        earlier = read_metrics(self.run_dir) if (self.run_dir / METRICS_FILE).exists() else []
        fields = dict(resumed or {})
        step = int(fields.pop("step", 0))
        fields.setdefault("world_size", self.world_size)
        # torchrun's 'attempt' restarts at 0 for every re-run command: this counts attempts of the run itself.
        fields["run_attempt"] = sum(_is_attempt_start(r) for r in earlier)
        new_id = self._start_wandb(run_id, earlier, step if resumed else -1)
        self.log("event", step, event="resume" if resumed else "start", **fields)
        return new_id

    def _start_wandb(self, run_id: str | None, earlier: list[dict], resumed_step: int) -> str | None:
        mode = wandb_mode(self.cfg.metrics.wandb)
        if mode == "disabled":
            return None  # no import, no wandb directory, nothing
        import wandb

        new_id = run_id or _new_run_id()
        try:
            self._wandb_run = wandb.init(
                project=self.cfg.metrics.project, name=self.cfg.run.name or self.run_dir.name,
                dir=self.run_dir, id=new_id, resume="allow", config=to_dict(self.cfg), mode=mode)
            self._next_wandb_step = int(self._wandb_run.step)
            if run_id:
                self._next_wandb_step = max(self._next_wandb_step, self._wandb_has_seen(run_id, earlier) + 1)
                self._backfill(earlier, resumed_step)
        except Exception as e:  # noqa: BLE001 - metrics must never take the training job down
            # Other ranks are already heading for a collective: rank 0 must not raise alone.
            log.error("wandb (%s) failed to start, going on without it: %s", mode, e)
            self._abandon_wandb()
            return run_id or None
        log.info("wandb %s run %s (next wandb step %d) in %s", mode, new_id, self._next_wandb_step,
                 self.run_dir / "wandb")
        return new_id

    def _wandb_has_seen(self, run_id: str, earlier: list[dict]) -> int:
        """The last step earlier attempts got into this run's wandb transaction logs (-1: none).

        Offline, ``run.step`` of a resumed run is always 0; and a killed attempt's wandb-core dies with it,
        losing whatever it had not yet written (it writes 32 KiB blocks), so the JSONL overstates what wandb
        has. The transaction logs under RUN_DIR/wandb are the record. If they cannot be read, fall back to the
        JSONL: a gap in the wandb curves is better than a step logged twice.
        """
        try:
            return last_wandb_step(self.run_dir / "wandb", run_id)
        except Exception as e:  # noqa: BLE001 - e.g. a wandb release that moved its protobuf module
            log.warning("could not read the wandb transaction logs of run %s (%s); assuming wandb has every "
                        "step in %s", run_id, e, METRICS_FILE)
            return _last_step(earlier)

    def _backfill(self, earlier: list[dict], resumed_step: int) -> None:
        """Log to wandb what the JSONL has and wandb lost, up to the snapshot this attempt resumed from.

        Steps after the snapshot are replayed by this attempt and logged live. Of a step logged by several
        attempts, the last record of each kind wins (as in ``elastictrain plot``); events at a step all go out.
        """
        rows: dict[int, dict[str, Any]] = {}
        for record in earlier:
            step = record.get("step")
            if isinstance(step, int) and self._next_wandb_step <= step <= resumed_step and "kind" in record:
                values = {k: v for k, v in record.items() if k not in ("kind", "step", "time")}
                rows.setdefault(step, {}).update(_wandb_row(record["kind"], values))
        for step in sorted(rows):
            self._wandb_run.log(rows[step], step=step)
            self._next_wandb_step = step
        if rows:
            log.info("wandb: logged %d step(s) (%d-%d) from %s that earlier attempts could not", len(rows),
                     min(rows), max(rows), METRICS_FILE)

    def log(self, kind: str, step: int, **values: float | int | str) -> None:
        """Record ``values`` at optimizer step ``step``: JSONL line, console line, and wandb on rank 0.

        Args:
            kind: 'train', 'val' or 'event'.
            step: optimizer steps completed when the record was made.
            values: the record's fields (see the module docstring); numeric ones go to wandb as 'kind/key'.
        """
        assert kind in ("train", "val", "event"), kind
        if self.rank != 0:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        with self._lock:
            self._write_line(json.dumps(record))
            self._log_console(kind, step, values)
            if self._wandb_run is not None:
                self._log_wandb(kind, step, values)

    def _write_line(self, line: str) -> None:
        if self._file is None:
            path = self.run_dir / METRICS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            torn = path.exists() and path.stat().st_size > 0 and not _ends_with_newline(path)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the whole run
            if torn:  # an earlier attempt died mid-line: end that line so ours starts on its own
                self._file.write("\n")
        self._file.write(line + "\n")
        self._file.flush()

    @staticmethod
    def _log_console(kind: str, step: int, values: dict[str, Any]) -> None:
        # Per-class values ('iou/NAME') stay out of the console line: the trainer logs them as one line of their own.
        shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in values.items() if k != "event" and "/" not in k)
        if kind == "event":
            log.info("event %s at step %d: %s", values.get("event", "?"), step, shown)
        else:
            log.info("%s step %d: %s", kind, step, shown)

    def _log_wandb(self, kind: str, step: int, values: dict[str, Any]) -> None:
        data = _wandb_row(kind, values)
        try:
            if kind == "event":
                self._wandb_run.summary[f"event/last_{values.get('event', 'unknown')}"] = json.dumps(values)
            if step < self._next_wandb_step:
                # Replayed after a resume: wandb has this step already. An event (the resume itself) rides
                # along with the next new step instead, so wandb only ever sees steps the JSONL has.
                if kind == "event":
                    self._pending_events.update(data)
                return
            data.update(self._pending_events)
            self._pending_events = {}
            # An explicit step without commit merges all records of one step into one row; the row is
            # committed when a later step arrives or the run finishes.
            self._wandb_run.log(data, step=step)
        except Exception as e:  # noqa: BLE001 - e.g. wandb-core killed by the preemption signal
            log.warning("wandb.log failed at step %d, no more wandb logging for this attempt: %s", step, e)
            self._wandb_run = None
            return
        self._next_wandb_step = step

    def log_predictions(self, step: int, examples: list[Any], class_names: list[str],
                        ignore_index: int | None) -> None:
        """wandb on rank 0: the prediction samples as ``val/predictions``, one ``wandb.Image`` each with its
        truth and prediction as masks (toggled and coloured in wandb's UI), in the row of the val record."""
        if self.rank != 0:
            return
        with self._lock:
            if self._wandb_run is None or step < self._next_wandb_step:
                return  # no wandb, or a step wandb already has (replayed after a resume)
            try:
                import wandb

                labels = dict(enumerate(class_names))
                if ignore_index is not None:
                    labels[ignore_index] = "ignored"
                images = [wandb.Image(e.image, caption=f"val {e.index}", masks={
                    "prediction": {"mask_data": e.prediction, "class_labels": labels},
                    "ground_truth": {"mask_data": e.truth, "class_labels": labels}}) for e in examples]
                self._wandb_run.log({"val/predictions": images}, step=step)
            except Exception as e:  # noqa: BLE001 - pictures must never take the training job down
                log.warning("wandb: could not log the prediction images at step %d: %s", step, e)

    def _abandon_wandb(self) -> None:
        run, self._wandb_run = self._wandb_run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already failing; the first error was logged
                pass

    def close(self, summary: dict | None = None) -> None:
        """Finish the wandb run (exit code 0) with ``summary`` in its summary, close the file. Idempotent."""
        with self._lock:
            run, self._wandb_run = self._wandb_run, None
            if run is not None:
                try:
                    if summary:
                        run.summary.update({k: v for k, v in summary.items() if _is_number(v) or isinstance(v, str)})
                    run.finish(exit_code=0)
                except Exception as e:  # noqa: BLE001 - closing must not hide the real outcome of the run
                    log.warning("wandb did not finish cleanly: %s", e)
            if self._file is not None:
                self._file.close()
                self._file = None


def _new_run_id() -> str:
    # wandb's own id shape (8 lowercase letters and digits); chosen here so it can be returned and stored.
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _wandb_row(kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """A record as wandb keys: numeric fields as 'kind/key'; an event also as 'event/NAME' = 1."""
    data = {f"{kind}/{k}": v for k, v in values.items() if _is_number(v)}
    if kind == "event":
        data[f"event/{values.get('event', 'unknown')}"] = 1
    return data


def last_wandb_step(wandb_dir: Path, run_id: str) -> int:
    """The highest history step in run ``run_id``'s transaction logs under ``wandb_dir`` (-1: none).

    Every attempt of a run writes its own ``offline-run-TIME-ID/run-ID.wandb`` (``run-TIME-ID`` online);
    what ``wandb sync`` would upload from them is what wandb has.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    last = -1
    for path in Path(wandb_dir).glob(f"*run-*-{run_id}/run-{run_id}.wandb"):
        for payload in wandb_log_records(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            if record.HasField("history"):
                last = max(last, record.history.step.num)
    return last


_WANDB_LOG_BLOCK = 32768
_WANDB_CHUNK_HEADER = 7  # crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last)


def wandb_log_records(data: bytes) -> Iterator[bytes]:
    """The record payloads of a wandb transaction log (``run-ID.wandb``), up to the first bad chunk.

    Layout (LevelDB's log format): a 7-byte header (':W&B', magic 0xBEE1, version), then 32 KiB blocks of
    chunks, each a 7-byte chunk header and its bytes; the crc covers the type byte and the bytes. A process
    killed mid-write leaves a short or unwritten tail, which ends the scan.
    """
    if data[:4] != b":W&B":
        return
    pos, payload = 7, b""
    while pos + _WANDB_CHUNK_HEADER <= len(data):
        room = _WANDB_LOG_BLOCK - pos % _WANDB_LOG_BLOCK
        if room < _WANDB_CHUNK_HEADER:  # no room for a chunk header: the block is padded with zeroes
            pos += room
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        end = pos + _WANDB_CHUNK_HEADER + length
        if kind not in (1, 2, 3, 4) or end > len(data) or zlib.crc32(data[pos + 6:end]) != crc:
            return
        chunk = data[pos + _WANDB_CHUNK_HEADER:end]
        pos = end
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            yield payload


def _is_attempt_start(record: dict) -> bool:
    return record.get("kind") == "event" and record.get("event") in ("start", "resume")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _last_step(records: list[dict]) -> int:
    return max((int(r["step"]) for r in records if "step" in r), default=-1)


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
    vals = [r for r in records if r.get("kind") == "val" and _is_number(r.get("val_loss"))]
    best = min(vals, key=lambda r: r["val_loss"], default=None)
    world_sizes: list[int] = []
    for r in records:
        if "world_size" in r and r["world_size"] not in world_sizes:
            world_sizes.append(r["world_size"])
    times = [r["time"] for r in records if _is_number(r.get("time"))]
    last = vals[-1] if vals else {}
    per_class = {f"val_{k}": v for k, v in last.items() if k.startswith(("iou/", "dice/"))}
    return {
        **per_class,
        "epochs_completed": max((int(r.get("epoch", 0)) for r in vals), default=0),
        "steps_completed": max(_last_step(records), 0),
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
    tmp = run_dir / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / SUMMARY_FILE)  # never a half-written summary
    best = full.get("best_val_loss")
    log.info(
        "run summary: %s epochs (%s steps) in %s; survived %d restart(s), ~%s lost to them; best val loss %s%s; "
        "final model %s; best snapshot %s",
        full.get("epochs_completed"), full.get("steps_completed"), duration(full.get("wall_time_s", 0.0)),
        full.get("restarts_survived", 0), duration(full.get("time_lost_to_restarts_s", 0.0)),
        f"{best:.4f}" if _is_number(best) else "n/a",
        f" (epoch {full['best_val_epoch']})" if full.get("best_val_epoch") is not None else "",
        full.get("final_model", "n/a"), full.get("best_snapshot", "n/a") or "n/a")
    per_class = [(k[len("val_iou/"):], v) for k, v in full.items() if k.startswith("val_iou/")]
    if per_class:
        log.info("last validation IoU per class: %s",
                 ", ".join(f"{name} {v:.3f}" if _is_number(v) else f"{name} -" for name, v in per_class))
    return full


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
        path = Path(run_dir) / ("train.log" if rank == 0 else f"logs/rank{rank}.log")
        handlers.append(_LazyDirFileHandler(path))
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

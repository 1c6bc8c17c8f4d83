"""One logging interface for the run: console (``logging``), JSONL on disk, and wandb on global rank 0.

``RUN_DIR/metrics.jsonl`` is the record tests and tools read: one JSON object per line, appended by
every attempt of the run, so after a restart the file holds the replayed steps twice (the resume event
in between says where the new attempt started). Record kinds:

- ``train``: epoch, step, loss, lr, sample_offset, world_size
- ``val``: epoch, step, train_loss, val_loss, iou, dice (micro-averaged over pixels), ``iou/NAME`` and
  ``dice/NAME`` per class (``data.class_names``; null for a class in neither truth nor prediction), world_size
- ``event``: event in {start, resume, preempted, first_step, snapshot_interval, finished} plus its fields

Every record has ``kind``, ``step`` and ``time`` (unix seconds). Each counter means one thing in every record:
``step`` = optimizer steps completed; ``epoch`` = epochs completed (so a train record in the first epoch says
0, the val record at its end 1); ``sample_offset`` = samples of the epoch in progress already used. Of the
three attempt counters, ``run_attempt`` (start and resume events) counts this run directory's earlier
attempts (every start or resume before it in the file); on resume events ``attempt`` is torchrun's restart
count within one command (0 again for every re-run command) and ``restart_count`` SLURM's requeue count.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from elastictrain.config import Config, to_dict
from elastictrain.runlog import METRICS_FILE, attempts, is_number, last_step, read_metrics
from elastictrain.wandb_log import last_wandb_step

log = logging.getLogger(__name__)

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
        fields["run_attempt"] = len(attempts(earlier))
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
            return last_step(earlier)

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
                        run.summary.update({k: v for k, v in summary.items() if is_number(v) or isinstance(v, str)})
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
    data = {f"{kind}/{k}": v for k, v in values.items() if is_number(v)}
    if kind == "event":
        data[f"event/{values.get('event', 'unknown')}"] = 1
    return data


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


"""The snapshot manager: it owns the whole lifecycle of a run's snapshots.

At start-up the trainer asks one question, :meth:`SnapshotManager.restore_latest`: discover the newest
complete snapshot, verify it, refuse a changed model, restore it, prove that every entry was read, and fall
back to the previous snapshot when any of that fails (restorer.py, discovery.py). At a boundary it calls
:meth:`maybe_save` (epoch end), :meth:`wants_snapshot` / :meth:`save_mid_epoch` (inside an epoch: the
interval clock, interval.py) or :meth:`save_now` (preemption). A save copies the state into reused CPU
buffers (the only part the training loop waits for), then a writer thread has the engine write the copy,
fingerprints it, and rank 0 commits it (saver.py). Every failure is decided on all ranks at once, with the
same message. The manager itself holds the policy: which snapshot is due, its tier, the best one, and the
automatic interval, whose failure history it reads from metrics.jsonl when it restores.

Layout (RUN_DIR/snapshots/):
    epoch00003-step00000120/   one snapshot: the engine's files, then COMMIT.json (written last, atomically)
    BEST.json                  pointer to the snapshot with the best validation loss (rewritten from the
                               commit records, which say whether each snapshot was the best so far)
    NAME.damaged-TIME/         a snapshot that failed verification or its restore, moved aside for a human
    NAME.superseded-TIME/      a complete snapshot of an abandoned branch (resumed from an older one)
Tiers live in each commit record: 'rolling' (the newest ``checkpoint.keep`` are kept) or 'permanent'
(every ``checkpoint.permanent_every`` epochs; retention never deletes them). Promotion is decided when
the snapshot is committed, so no data is ever rewritten.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from elastictrain.config import CheckpointConfig
from elastictrain.dist import DistContext, on_main_together
from elastictrain.faults import FaultInjector
from elastictrain.runlog import METRICS_FILE, read_metrics
from elastictrain.snapshot import manifest
from elastictrain.snapshot.appstate import build_app_state
from elastictrain.snapshot.engines import AppState, Engine, build_engine
from elastictrain.snapshot.interval import SnapshotClock, failure_history
from elastictrain.snapshot.restorer import Restorer, ResumeInfo
from elastictrain.snapshot.saver import Saver
from elastictrain.state import TrainState

log = logging.getLogger(__name__)


def best_snapshot_loss(state: TrainState) -> float:
    """Validation loss of ``state.best_snapshot`` (from the history), inf when there is none yet."""
    if not state.best_snapshot:
        return math.inf
    epoch, _ = manifest.parse_name(state.best_snapshot)
    return next((h["val_loss"] for h in state.history if h.get("epoch") == epoch), math.inf)


class SnapshotManager:
    """Takes, commits, retains, discovers, restores and proves snapshots.

    Args:
        cfg: the ``checkpoint`` settings.
        ctx: this rank's distributed context.
        run_dir: the run directory (snapshots live in RUN_DIR/snapshots).
        total_epochs: ``train.epochs``: the last epoch always gets a snapshot.
        run_config: the resolved config of this run, to refuse a snapshot of another model.
        prepare: called on every rank right before the state is copied (the trainer makes replicated state
            identical across ranks and gathers RNG states there); only when a snapshot is really taken.
        faults: test-only fault injection.
        on_event: called on rank 0 with (event name, step, fields) for metrics.jsonl (the snapshot interval).
    """

    def __init__(self, cfg: CheckpointConfig, ctx: DistContext, run_dir: Path, total_epochs: int,
                 run_config: dict[str, Any] | None = None, prepare: Callable[[], None] | None = None,
                 faults: FaultInjector | None = None,
                 on_event: Callable[[str, int, dict[str, Any]], None] | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.run_dir = run_dir
        self.root = run_dir / "snapshots"
        self.total_epochs = total_epochs
        self.engine: Engine = build_engine(cfg.engine)
        self.on_event = on_event
        self.saver = Saver(cfg, ctx, self.root, self.engine, prepare, faults)
        self.restorer = Restorer(cfg, ctx, self.root, self.engine, run_config, faults)
        self.clock = SnapshotClock(cfg.every_steps, cfg.every_minutes, cfg.mtbf_hours)
        self._interval_logged: float | None = None
        self._announce_interval = False
        """Log the automatic interval at the next step boundary (the first after a restore)."""
        self._lineage: tuple[str, str] = ("", "")
        """The snapshot this lineage started from with --checkpoint.resume_from: (identity, resolved path, so
        the lineage is still found once retention has deleted it); ('', '') for none."""
        self.blocked_seconds: list[float] = []
        """Time the training loop spent inside each save call (what async is meant to shrink)."""

    @staticmethod
    def app_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                  state: TrainState) -> AppState:
        """Everything a snapshot holds, as the statefuls every other method takes (appstate.py)."""
        return build_app_state(model, optimizer, scheduler, scaler, state)

    # ---------- policy ----------
    def due(self, epoch: int) -> bool:
        """A snapshot after this epoch? Every ``interval``, every permanent epoch, and the last one."""
        if self.cfg.mode == "off":
            return False
        return epoch % self.cfg.interval == 0 or self._permanent_epoch(epoch) or epoch >= self.total_epochs

    def _permanent_epoch(self, epoch: int) -> bool:
        every = self.cfg.permanent_every
        return every > 0 and epoch > 0 and epoch % every == 0

    def tier(self, epoch: int, end_of_epoch: bool) -> str:
        """'permanent' for the snapshot at the end of every ``permanent_every``-th epoch, else 'rolling'."""
        return "permanent" if end_of_epoch and self._permanent_epoch(epoch) else "rolling"

    # ---------- at boundaries ----------
    def maybe_save(self, app_state: AppState, state: TrainState, val_loss: float) -> bool:
        """At an epoch boundary: track the best validation loss, and start a snapshot if one is due
        (in the background in async mode)."""
        state.best_val_loss = min(state.best_val_loss, val_loss)
        if not self.due(state.epoch):
            return False
        # Best among snapshots (an epoch between snapshots may have been better still, but it has none).
        is_best = val_loss < best_snapshot_loss(state)
        if is_best:
            state.best_snapshot = manifest.snapshot_name(state.epoch, state.step)
        return self._save(app_state, state, val_loss, is_best, background=self.cfg.mode == "async",
                          end_of_epoch=True) is not None

    def wants_snapshot(self, state: TrainState) -> bool:
        """At a step boundary inside an epoch: is a mid-epoch snapshot due, in this rank's view? (Steps are
        the same on every rank; clocks are not: the trainer agrees on the answer in its boundary collective.)"""
        if self._announce_interval:
            self._announce_interval = False
            self._report_interval(state.step, force=True)
        now = time.monotonic()
        writer_done = self.saver.written
        self.clock.boundary(now, writing=self.saver.writing)
        if writer_done and self.clock.written() is not None and self.clock.auto:
            self._report_interval(state.step)
        if self.cfg.mode == "off" or state.step == self.saver.held_step:
            return False
        return self.clock.due(state.step, now)

    def save_mid_epoch(self, app_state: AppState, state: TrainState) -> str | None:
        """A rolling snapshot at this step boundary (every_steps / every_minutes), in the background in async mode."""
        return self._save(app_state, state, None, False, background=self.cfg.mode == "async", end_of_epoch=False)

    def before_optimizer_step(self) -> None:
        """Wait until the snapshot being staged has copied what the optimizer step is about to change."""
        waited = self.saver.wait_for_staging()
        if waited is not None:
            self.clock.add_blocked(waited)
            if self.blocked_seconds:
                self.blocked_seconds[-1] += waited

    def save_now(self, app_state: AppState, state: TrainState) -> str | None:
        """A snapshot at the current step (preemption), returned once committed: its name, or None when there
        is nothing to save. A no-op for a step this run already holds (restored from it, or saved it)."""
        if self.cfg.mode == "off":
            log.warning("--checkpoint.mode off: no snapshot is taken; a re-run starts from the latest snapshot "
                        "in %s, if any", self.root)
            return None
        if state.step == self.saver.held_step:
            self.wait()
            return manifest.snapshot_name(state.epoch, state.step)
        return self._save(app_state, state, None, False, background=False, end_of_epoch=state.sample_offset == 0)

    def _save(self, app_state: AppState, state: TrainState, val_loss: float | None, is_best: bool,
              background: bool, end_of_epoch: bool) -> str | None:
        if state.step == 0:
            # Nothing learned yet: a fresh start reproduces this state exactly. (Taking the optimizer's
            # state dict now would also initialise its state, step = 1, and change the run.)
            log.info("no optimizer step taken yet: nothing to snapshot")
            return None
        start = time.perf_counter()
        record = {"branch_from": self._lineage[0], "branch_from_path": self._lineage[1],
                  "tier": self.tier(state.epoch, end_of_epoch), "val_loss": val_loss, "is_best": is_best}
        name = self.saver.take(app_state, state, record, background)
        blocked = time.perf_counter() - start
        self.blocked_seconds.append(blocked)
        self.clock.started(time.monotonic(), blocked)
        return name

    def wait(self) -> None:
        """Block until the snapshot in flight (if any) is committed on every rank; a failure on any rank is
        raised on every rank, with the same message."""
        self.saver.wait()

    def close(self, timeout: float = 30.0) -> None:
        """Give a snapshot in flight ``timeout`` seconds to finish, without any collective (see Saver.close)."""
        self.saver.close(timeout)

    # ---------- start-up ----------
    def restore_latest(self, app_state: AppState) -> ResumeInfo | None:
        """Restore the newest snapshot that is complete, intact and of this model; None for a fresh start
        (see Restorer.restore_latest for what fails how). Under ``every_minutes auto`` it also reads the
        failures this run directory has seen."""
        found = self.restorer.restore_latest(app_state)
        if self.clock.auto:
            self._read_failure_history()
        if found is None:
            return None
        resumed, self._lineage = found
        self.saver.held_step = resumed.step
        return resumed

    def _read_failure_history(self) -> None:
        """Rank 0 reads metrics.jsonl (this attempt has not logged yet: every attempt in it has ended), and
        every rank's clock gets the same history."""

        def read() -> tuple[int, float]:
            if not (self.run_dir / METRICS_FILE).exists():
                return 0, 0.0
            return failure_history(read_metrics(self.run_dir), ongoing=False)

        self.clock.failures, self.clock.hours_observed = on_main_together(self.ctx, read)
        self._announce_interval = self.cfg.mode != "off"

    def _report_interval(self, step: int, force: bool = False) -> None:
        interval = self.clock.interval_s()
        if interval is None or not self.ctx.is_main:
            return
        if not force and self._interval_logged and abs(interval - self._interval_logged) < 0.1 * self._interval_logged:
            return
        self._interval_logged = interval
        log.info("%s", self.clock.describe())
        if self.on_event is not None:
            self.on_event("snapshot_interval", step, {
                "interval_s": round(interval, 3), "cost_s": self.clock.cost_s if self.clock.cost_s is not None else -1.0,
                "mtbf_h": round(self.clock.mtbf_s / 3600, 3), "failures_seen": self.clock.failures,
                "reason": self.clock.describe()})

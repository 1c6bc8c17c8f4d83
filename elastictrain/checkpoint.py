"""The snapshot manager: when to take a snapshot, commit it, keep it, find it again and restore it.

Layout (RUN_DIR/snapshots/):
    epoch00003-step00000120/   one snapshot: the engine's files, then COMMIT.json (written last, atomically)
    BEST.json                  pointer to the snapshot with the best validation loss
Tiers live in each commit record: 'rolling' (the newest ``checkpoint.keep`` are kept) or 'permanent'
(every ``checkpoint.permanent_every`` epochs; retention never deletes them). Promotion is decided when
the snapshot is committed, so no data is ever rewritten.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from elastictrain import manifest
from elastictrain.config import CheckpointConfig
from elastictrain.dist import DistContext, broadcast_object, raise_together
from elastictrain.engines import AppState, Engine, PendingWrite, build_engine
from elastictrain.faults import FaultInjector
from elastictrain.state import TrainState

log = logging.getLogger(__name__)


class ModelState:
    """Model weights keyed by parameter name, the same for a plain module, DDP and FSDP2."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_model_state_dict(self.model, sd)


class OptimizerState:
    """Optimizer state keyed by parameter name (not position), so it survives a change of wrapper."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, sd)


class JsonState:
    """TrainState as one JSON string: engines store strings as plain objects whatever their length,
    and JSON cannot smuggle numpy or class instances into a weights-only restore."""

    def __init__(self, state: TrainState) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(self.state.state_dict())}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.state.load_state_dict(json.loads(sd["json"]))


def build_app_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any, state: TrainState) -> AppState:
    """Everything a resume needs; RNG states travel inside TrainState."""
    app: AppState = {
        "model": ModelState(model),
        "optim": OptimizerState(model, optimizer),
        "sched": scheduler,
        "train": JsonState(state),
    }
    if scaler is not None:
        app["scaler"] = scaler
    return app


class CheckpointManager:
    """Takes, commits, retains, discovers and restores snapshots; the training loop only calls
    ``maybe_save``, ``save_now``, ``restore_latest``, ``wait`` and ``close``."""

    def __init__(self, cfg: CheckpointConfig, ctx: DistContext, run_dir: Path, total_epochs: int,
                 faults: FaultInjector | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.root = run_dir / "snapshots"
        self.total_epochs = total_epochs
        self.engine: Engine = build_engine(cfg.engine)
        self.faults = faults
        self._pending: tuple[int, PendingWrite, threading.Thread] | None = None
        self._error: BaseException | None = None
        self.blocked_seconds: list[float] = []
        """Time the training loop spent inside each save call (what async is meant to shrink)."""
        if ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)

    # ---------- policy ----------
    def due(self, epoch: int) -> bool:
        """A snapshot after this epoch? Every ``interval``, every permanent epoch, and the last one."""
        if self.cfg.mode == "off":
            return False
        every = self.cfg.permanent_every
        return epoch % self.cfg.interval == 0 or (every > 0 and epoch % every == 0) or epoch >= self.total_epochs

    def tier(self, epoch: int, end_of_epoch: bool) -> str:
        every = self.cfg.permanent_every
        return "permanent" if end_of_epoch and every > 0 and epoch % every == 0 else "rolling"

    def maybe_save(self, app_state: AppState, state: TrainState, val_loss: float) -> bool:
        """At an epoch boundary: track the best validation loss, and start a snapshot if one is due
        (in the background in async mode)."""
        improved = val_loss < state.best_val_loss
        if improved:
            state.best_val_loss = val_loss
        if not self.due(state.epoch):
            return False
        if improved:
            state.best_snapshot = manifest.snapshot_name(state.epoch, state.step)
        self._save(app_state, state, val_loss, improved, background=self.cfg.mode == "async", end_of_epoch=True)
        return True

    def save_now(self, app_state: AppState, state: TrainState) -> str:
        """A synchronous snapshot at the current step (preemption); returns once it is committed."""
        return self._save(app_state, state, None, False, background=False, end_of_epoch=state.sample_offset == 0)

    # ---------- taking ----------
    def _save(self, app_state: AppState, state: TrainState, val_loss: float | None, is_best: bool,
              background: bool, end_of_epoch: bool) -> str:
        start = time.perf_counter()
        self.wait()  # one snapshot in flight at most: the previous one must be committed first
        name = manifest.snapshot_name(state.epoch, state.step)
        path = self.root / name
        error = self._clear_target(path) if self.ctx.is_main else None
        raise_together(self.ctx, error)
        info = {"name": name, "engine": self.engine.name, "epoch": state.epoch, "step": state.step,
                "sample_offset": state.sample_offset, "world_size": self.ctx.world_size,
                "tier": self.tier(state.epoch, end_of_epoch), "val_loss": val_loss,
                "is_best": is_best}
        pending = self.engine.save(path, app_state, self.ctx, background=background)
        thread = threading.Thread(target=self._commit, args=(path, pending, info), name=f"commit-{name}",
                                  daemon=True)
        thread.start()
        self._pending = (state.epoch, pending, thread)
        if self.faults:
            self.faults.maybe_fire("saving", state.epoch)
        if not background:
            self.wait()
        self.blocked_seconds.append(time.perf_counter() - start)
        return name

    def _clear_target(self, path: Path) -> str | None:
        """A directory of the same name left by an earlier attempt: an incomplete one is debris and is
        removed; a complete one (we resumed from an older snapshot on purpose) is moved aside, never deleted."""
        if not path.exists():
            return None
        if manifest.read_commit(path) is None:
            shutil.rmtree(path, ignore_errors=True)
            return None
        aside = path.with_name(f"{path.name}.superseded-{int(time.time())}")
        log.warning("snapshot %s exists from an earlier branch of this run; moved aside to %s", path, aside)
        try:
            path.rename(aside)
        except OSError as e:
            return f"cannot move aside existing snapshot {path}: {e}"
        return None

    def _commit(self, path: Path, pending: PendingWrite, info: dict[str, Any]) -> None:
        """Background: wait for every rank's write, then (rank 0) checksum and commit, best, retention."""
        try:
            pending.wait()
            if not self.ctx.is_main:
                return
            record = manifest.write_commit(path, info)
            if info["is_best"]:
                manifest.atomic_write_json(self.root / manifest.BEST, {"name": info["name"],
                                                                       "val_loss": info["val_loss"]})
            self._apply_retention()
            log.info("snapshot %s committed (%s, %d files, checksums %.2fs)", path.name, info["tier"],
                     len(record["files"]), record["checksum_seconds"])
        except BaseException as e:  # surfaced by wait() on the training thread
            self._error = e

    def _apply_retention(self) -> None:
        best = manifest.read_best(self.root)
        for victim in manifest.retention_victims(manifest.list_snapshots(self.root), self.cfg.keep,
                                                 best["name"] if best else None):
            shutil.rmtree(victim.path, ignore_errors=True)
            log.info("retention: removed rolling snapshot %s", victim.name)

    def wait(self) -> None:
        """Block until the snapshot in flight (if any) is committed; re-raise its failure."""
        if self._pending is not None:
            epoch, _, thread = self._pending
            thread.join()
            self._pending = None
            if self._error is not None:
                error, self._error = self._error, None
                raise RuntimeError(f"snapshot after epoch {epoch} in {self.root} failed: {error}") from error
            if self.faults:
                self.faults.maybe_fire("saved", epoch)

    def close(self) -> None:
        self.wait()

    # ---------- finding and restoring ----------
    def latest_complete_snapshot(self) -> Path | None:
        """Rank 0 picks the newest complete snapshot that verifies; every rank gets the same answer."""
        choice: str | None = None
        error: str | None = None
        if self.ctx.is_main:
            try:
                choice = self._choose()
            except (FileNotFoundError, ValueError) as e:
                error = str(e)
        raise_together(self.ctx, error)
        choice = broadcast_object(self.ctx, choice)
        return Path(choice) if choice else None

    def _choose(self) -> str | None:
        if self.cfg.resume_from:
            path = Path(self.cfg.resume_from)
            commit = manifest.read_commit(path)
            if commit is None:
                raise FileNotFoundError(f"--checkpoint.resume_from: {path} is not a complete snapshot "
                                        f"(no readable {manifest.COMMIT})")
            problem = manifest.verify(path, commit, self._marker(commit)) if self.cfg.verify else None
            if problem:
                raise ValueError(f"--checkpoint.resume_from: snapshot is damaged: {problem}")
            return str(path)
        for snap in manifest.list_snapshots(self.root):
            if not snap.complete:
                log.warning("ignoring incomplete snapshot %s (no commit record); removing it", snap.path)
                shutil.rmtree(snap.path, ignore_errors=True)
                continue
            problem = manifest.verify(snap.path, snap.commit, self._marker(snap.commit)) if self.cfg.verify else None
            if problem is None:
                return str(snap.path)
            aside = snap.path.with_name(f"{snap.name}.damaged-{int(time.time())}")
            log.error("snapshot %s is damaged: %s; moved to %s and falling back to the previous one",
                      snap.name, problem, aside.name)
            snap.path.rename(aside)
        return None

    @staticmethod
    def _marker(commit: dict[str, Any]) -> str:
        return build_engine(commit["engine"]).marker

    def read_train_state(self, path: Path) -> TrainState:
        """Only the small TrainState of a snapshot (config, counters), without touching the model."""
        state = TrainState()
        self._engine_for(path).load(path, {"train": JsonState(state)}, self.ctx)
        return state

    def restore(self, path: Path, app_state: AppState) -> None:
        if self.faults:
            self.faults.maybe_fire("restore", 0)
        self._engine_for(path).load(path, app_state, self.ctx)

    def _engine_for(self, path: Path) -> Engine:
        commit = manifest.read_commit(path)
        name = commit["engine"] if commit else self.engine.name
        if name != self.engine.name:
            log.warning("snapshot %s was written by engine %s; reading it with that engine", path.name, name)
        return build_engine(name)

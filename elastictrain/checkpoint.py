"""The snapshot manager: when to take a snapshot, commit it, keep it, find it again and restore it.

Layout (RUN_DIR/snapshots/):
    epoch00003-step00000120/   one snapshot: the engine's files, then COMMIT.json (written last, atomically)
    BEST.json                  pointer to the snapshot with the best validation loss (rewritten from the
                               commit records, which say whether each snapshot was the best so far)
    NAME.damaged-TIME/         a snapshot that failed verification at start-up, moved aside for a human
    NAME.superseded-TIME/      a complete snapshot of an abandoned branch (resumed from an older one)
Tiers live in each commit record: 'rolling' (the newest ``checkpoint.keep`` are kept) or 'permanent'
(every ``checkpoint.permanent_every`` epochs; retention never deletes them). Promotion is decided when
the snapshot is committed, so no data is ever rewritten. The functions at the end read snapshots with
no training job (world size 1, no process group) for ``elastictrain ckpt``.
"""

from __future__ import annotations

import json
import logging
import math
import os
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


def best_snapshot_loss(state: TrainState) -> float:
    """Validation loss of ``state.best_snapshot`` (from the history), inf when there is none yet."""
    if not state.best_snapshot:
        return math.inf
    epoch, _ = manifest.parse_name(state.best_snapshot)
    return next((h["val_loss"] for h in state.history if h.get("epoch") == epoch), math.inf)


class CheckpointManager:
    """Takes, commits, retains, discovers and restores snapshots; the trainer only calls ``maybe_save``,
    ``save_now``, ``latest_complete_snapshot``, ``read_train_state``, ``restore``, ``wait`` and ``close``."""

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
        state.best_val_loss = min(state.best_val_loss, val_loss)
        if not self.due(state.epoch):
            return False
        # Best among snapshots (an epoch between snapshots may have been better still, but it has none).
        is_best = val_loss < best_snapshot_loss(state)
        if is_best:
            state.best_snapshot = manifest.snapshot_name(state.epoch, state.step)
        self._save(app_state, state, val_loss, is_best, background=self.cfg.mode == "async", end_of_epoch=True)
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
                "is_best": is_best, "started_at": time.time()}
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
        """Background: wait for every rank's write, then (rank 0) checksum and commit, best, retention.

        Rank 0's write finishing implies every rank's did: both engines gather all ranks' results
        before the library's own metadata is written on rank 0."""
        try:
            pending.wait()
            if self.ctx.is_main:
                # What the benchmark reads back: from the save call to the engine's last byte written.
                info["write_seconds"] = round(time.time() - info["started_at"], 4)
                record = manifest.write_commit(path, info)
                log.info("snapshot %s committed (%s, %d files, %s, checksums %.2fs)", path.name, info["tier"],
                         len(record["files"]), manifest.human_size(sum(f["size"] for f in record["files"].values())),
                         record["checksum_seconds"])
                self._apply_retention()
            if self.faults:  # here, not on the training thread, so that it is right after the commit
                self.faults.maybe_fire("saved", info["epoch"])
        except BaseException as e:  # surfaced by wait() on the training thread
            self._error = e

    def _apply_retention(self) -> None:
        """Point BEST.json at the best snapshot (from the commit records), then delete rolling snapshots
        beyond ``keep``. Snapshots newer than the one just committed belong to an abandoned branch."""
        snapshots = manifest.list_snapshots(self.root)
        best = manifest.best_snapshot(snapshots)
        if best is not None and (manifest.read_best(self.root) or {}).get("name") != best.name:
            manifest.atomic_write_json(self.root / manifest.BEST, {"name": best.name,
                                                                   "val_loss": best.commit["val_loss"]})  # type: ignore[index]
        for victim in manifest.retention_victims(snapshots, self.cfg.keep, best.name if best else None):
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
            return self._choose_given(Path(self.cfg.resume_from))
        for snap in manifest.list_snapshots(self.root):
            if not snap.complete:
                log.warning("ignoring incomplete snapshot %s (no commit record); removing it", snap.path)
                shutil.rmtree(snap.path, ignore_errors=True)
                continue
            problem = self._verify(snap.path, snap.commit)  # type: ignore[arg-type]
            if problem is None:
                return str(snap.path)
            aside = snap.path.with_name(f"{snap.name}.damaged-{int(time.time())}")
            log.error("snapshot %s is damaged: %s; moved to %s and falling back to the previous one",
                      snap.name, problem, aside.name)
            snap.path.rename(aside)
        return None

    def _choose_given(self, path: Path) -> str:
        """``--checkpoint PATH``: that snapshot or an error, never a silent fallback. Newer snapshots in the
        run directory belong to the branch being abandoned: they are moved aside (not deleted), or
        discovery and retention would mistake them for this run's newest."""
        commit = manifest.read_commit(path)
        if commit is None:
            raise FileNotFoundError(f"--checkpoint.resume_from: {path} is not a complete snapshot "
                                    f"(no readable {manifest.COMMIT})")
        problem = self._verify(path, commit)
        if problem:
            raise ValueError(f"--checkpoint.resume_from: snapshot is damaged: {problem}")
        order = (commit["step"], commit["epoch"])
        for snap in manifest.list_snapshots(self.root):
            if snap.order > order and snap.path.resolve() != path.resolve():
                aside = snap.path.with_name(f"{snap.name}.superseded-{int(time.time())}")
                log.warning("resuming from the older %s: moved the newer snapshot %s aside to %s",
                            path, snap.name, aside.name)
                snap.path.rename(aside)
        return str(path)

    def _verify(self, path: Path, commit: dict[str, Any]) -> str | None:
        """The manifest check (on by default: ~1.3 GB/s here, see bench/bench_snapshots.py)."""
        if not self.cfg.verify:
            return None
        start = time.perf_counter()
        problem = manifest.verify(path, commit, build_engine(commit["engine"]).marker)
        if problem is None:
            size = sum(f["size"] for f in commit["files"].values())
            log.info("verified snapshot %s: %d files, %s in %.2fs", path.name, len(commit["files"]),
                     manifest.human_size(size), time.perf_counter() - start)
        return problem

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


# ---------- offline: snapshots read without a training job (the ckpt CLI) ----------
def standalone_context() -> DistContext:
    """World size 1 on CPU with no process group: both engines read any snapshot this way."""
    return DistContext(0, 1, 0, torch.device("cpu"), None)


def snapshots_root(run_dir: Path) -> Path:
    """RUN_DIR/snapshots, or RUN_DIR itself when it is already a snapshots directory."""
    if (run_dir / "snapshots").is_dir():
        return run_dir / "snapshots"
    if run_dir.is_dir() and (any(manifest.is_snapshot_name(p.name) for p in run_dir.iterdir())
                             or (run_dir / manifest.BEST).exists()):
        return run_dir
    raise FileNotFoundError(f"{run_dir}: no snapshots directory (expected {run_dir / 'snapshots'})")


def open_snapshot(path: Path, verify: bool = True) -> dict[str, Any]:
    """The commit record of a complete snapshot, checked against its manifest when ``verify``.

    Raises:
        FileNotFoundError: no such directory.
        ValueError: incomplete (no commit record) or damaged; the message names the file.
    """
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such snapshot directory")
    commit = manifest.read_commit(path)
    if commit is None:
        raise ValueError(f"{path}: not a complete snapshot (no readable {manifest.COMMIT}); refusing to read it")
    if verify:
        problem = manifest.verify(path, commit, build_engine(commit["engine"]).marker)
        if problem:
            raise ValueError(f"{path}: snapshot is damaged: {problem}")
    return commit


def read_snapshot_state(path: Path, commit: dict[str, Any]) -> TrainState:
    """Only the TrainState (counters, history, config) of a snapshot, through its own engine."""
    state = TrainState()
    build_engine(commit["engine"]).load(path, {"train": JsonState(state)}, standalone_context())
    return state


def export_model(path: Path, out: Path, verify: bool = True) -> TrainState:
    """Write a snapshot's model as a plain full state dict for inference: ``torch.load(out,
    weights_only=True)`` loads into the model its stored config builds. Returns the snapshot's TrainState."""
    from elastictrain.config import from_dict
    from elastictrain.model import build_model

    commit = open_snapshot(path, verify)
    state = read_snapshot_state(path, commit)
    cfg = from_dict(state.config)
    cfg.model.encoder_weights = None  # the snapshot holds the weights; never download any
    model = build_model(cfg.model, cfg.data.num_classes)
    build_engine(commit["engine"]).load(path, {"model": ModelState(model)}, standalone_context())
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    torch.save(weights, tmp)
    os.replace(tmp, out)  # never a torn export
    return state


def clean_plan(root: Path) -> list[tuple[Path, bool, str]]:
    """What ``ckpt clean`` would do, as (path, delete?, why), newest first.

    Kept: the newest complete snapshot that verifies (a resume starts there; newer damaged ones are left
    for the resume to move aside), permanent ones, the best one, and incomplete ones newer than every
    complete one (a running job may be writing them). Deleted: other rolling snapshots, older incomplete
    ones and snapshots a resume moved aside (damaged or superseded)."""
    snapshots = manifest.list_snapshots(root)
    best = manifest.best_snapshot(snapshots)
    newest_complete = next((s.order for s in snapshots if s.complete), None)
    resume_point = False
    plan: list[tuple[Path, bool, str]] = []
    for snap in snapshots:
        if not snap.complete:
            in_flight = newest_complete is None or snap.order > newest_complete
            plan.append((snap.path, not in_flight, "incomplete: may still be being written" if in_flight
                         else "incomplete (no commit record)"))
        elif not resume_point:
            problem = manifest.verify(snap.path, snap.commit, build_engine(snap.commit["engine"]).marker)
            resume_point = problem is None
            plan.append((snap.path, False, "newest complete: a resume starts here" if resume_point
                         else f"damaged, left for a resume to move aside: {problem}"))
        elif snap.tier == "permanent":
            plan.append((snap.path, False, "permanent"))
        elif best is not None and snap.name == best.name:
            plan.append((snap.path, False, f"best (val loss {snap.commit['val_loss']:.4f})"))
        else:
            plan.append((snap.path, True, "rolling"))
    plan += [(path, True, f"moved aside by a resume ({why})") for path, why in manifest.aside_dirs(root)]
    return plan

"""The snapshot manager: it owns the whole lifecycle of a run's snapshots.

At start-up the trainer asks one question, :meth:`CheckpointManager.restore_latest`: discover the newest
complete snapshot, verify it, refuse a changed model, restore it, prove that every entry was read, and fall
back to the previous snapshot when any of that fails. At a boundary it calls :meth:`maybe_save` (epoch end)
or :meth:`save_now` (preemption). A save copies the state into reused CPU buffers (the only part the
training loop waits for), then a writer thread has the engine write the copy, fingerprints it, and rank 0
commits it. Every failure is decided on all ranks at once, with the same message.

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

import errno
import json
import logging
import math
import shutil
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from elastictrain import device as devices
from elastictrain import manifest, proof
from elastictrain.config import CheckpointConfig
from elastictrain.dist import DistContext, all_gather_object, on_main_together, raise_together
from elastictrain.engines import AppState, Engine, EngineReadError, ForeignContentError, StateDicts, build_engine
from elastictrain.errors import UserError
from elastictrain.faults import FaultInjector
from elastictrain.interval import SnapshotClock
from elastictrain.state import TrainState

log = logging.getLogger(__name__)


class ModelState:
    """Model weights keyed by parameter name, the same for a plain module, DDP and FSDP2."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def snapshot_state_dict(self) -> dict[str, Any]:
        """The state dict to stage in the background: buffers (batch-norm statistics) are copied now, because
        the next forward changes them in place; parameters only change at the next optimizer step, which waits
        for the staging (:meth:`CheckpointManager.before_optimizer_step`)."""
        from elastictrain.parallelize import unwrap

        buffers = {name for name, _ in unwrap(self.model).named_buffers()}
        return {k: v.clone() if k in buffers else v for k, v in self.state_dict().items()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_model_state_dict(self.model, sd)


class OptimizerState:
    """Optimizer state keyed by parameter name (not position), so it survives a change of wrapper."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    @property
    def _sharded(self) -> bool:
        return any(isinstance(p, DTensor) for g in self.optimizer.param_groups for p in g["params"])

    @property
    def wants_template(self) -> bool:
        """True when the optimizer has no state yet and is not sharded: an engine then builds the tensors to
        read into from the snapshot itself. (Asking for a state dict now would initialise the state with a
        fake optimizer step on zero gradients: ~0.7 s for a resnet34 Unet, on every restart.)"""
        return not self.optimizer.state and not self._sharded

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self._sharded:
            set_optimizer_state_dict(self.model, self.optimizer, sd)
            return
        # Unsharded: the optimizer's own load, with parameter names mapped to its positions (what
        # set_optimizer_state_dict does too, after the same fake step as above).
        from elastictrain.parallelize import unwrap

        names = {id(p): n for n, p in unwrap(self.model).named_parameters()}
        order = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        index = {n: i for i, n in enumerate(order)}
        unknown = [n for n in sd["state"] if n not in index]
        if unknown:
            raise ValueError(f"optimizer state for parameters this model does not have: {unknown[:3]}")
        self.optimizer.load_state_dict({
            "state": {index[n]: v for n, v in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]})


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


def model_changes(stored: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings that change the model's tensors, as {setting: (in the snapshot, now)}; empty if none."""
    changed = {f"model.{k}": (stored.get("model", {}).get(k), v) for k, v in now["model"].items()
               if k != "encoder_weights" and stored.get("model", {}).get(k) != v}
    if stored.get("data", {}).get("num_classes") != now["data"]["num_classes"]:
        changed["data.num_classes"] = (stored.get("data", {}).get("num_classes"), now["data"]["num_classes"])
    return changed


@dataclass
class ResumeInfo:
    """Where a restored run continues (the trainer's TrainState holds the same counters)."""

    path: Path
    epoch: int
    step: int
    sample_offset: int
    world_size: int
    """World size when the snapshot was taken."""
    config: dict[str, Any]
    """The config stored in the snapshot."""


class _Damaged(Exception):
    """A snapshot that cannot be restored although it is complete: moved aside, the previous one tried."""


class CheckpointManager:
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
        self.root = run_dir / "snapshots"
        self.total_epochs = total_epochs
        self.run_config = run_config
        self.prepare = prepare
        self.engine: Engine = build_engine(cfg.engine)
        self.faults = faults
        self.on_event = on_event
        self.clock = SnapshotClock(cfg.every_steps, cfg.every_minutes, cfg.mtbf_hours)
        self._interval_logged: float | None = None
        self._stager: Any = None
        self._staging: Future | None = None
        self._writer: threading.Thread | None = None
        self._writing = ""
        self._error: BaseException | None = None
        self._held_step = -1
        """Step of the newest snapshot this run holds (restored from, or started); a save there is a no-op."""
        self._branch_from = ""
        """Identity of the snapshot this lineage started from with --checkpoint.resume_from ('' for none)."""
        self._branch_from_path = ""
        """Where that snapshot was (resolved), so the lineage is still found once retention has deleted it."""
        self.blocked_seconds: list[float] = []
        """Time the training loop spent inside each save call (what async is meant to shrink)."""

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

    def set_failure_history(self, failures: int, hours_observed: float, step: int) -> None:
        """What this run directory has seen (interval.failure_history), for the automatic interval."""
        self.clock.failures, self.clock.hours_observed = failures, hours_observed
        if self.clock.interval_s() is not None and self.cfg.mode != "off":
            self._report_interval(step, force=True)

    def wants_snapshot(self, state: TrainState) -> bool:
        """At a step boundary inside an epoch: is a mid-epoch snapshot due, in this rank's view? (Steps are
        the same on every rank; clocks are not: the trainer agrees on the answer in its boundary collective.)"""
        now = time.monotonic()
        writer_done = self._writer is not None and not self._writer.is_alive()
        self.clock.boundary(now, writing=self._writer is not None)
        if writer_done and self.clock.written() is not None and self.clock.auto:
            self._report_interval(state.step)
        if self.cfg.mode == "off" or state.step == self._held_step:
            return False
        return self.clock.due(state.step, now)

    def save_mid_epoch(self, app_state: AppState, state: TrainState) -> str | None:
        """A rolling snapshot at this step boundary (every_steps / every_minutes), in the background in async mode."""
        return self._save(app_state, state, None, False, background=self.cfg.mode == "async", end_of_epoch=False)

    def before_optimizer_step(self) -> None:
        """Wait until the snapshot being staged has copied the parameters and optimizer state, which the
        optimizer step is about to change (torchtitan's maybe_wait_for_staging)."""
        if self._staging is not None:
            start = time.perf_counter()
            try:
                self._staging.result()
            except Exception:  # noqa: BLE001 - the writer reports it, on every rank at once (wait())
                pass
            self._staging = None
            waited = time.perf_counter() - start
            self.clock.add_blocked(waited)
            if self.blocked_seconds:
                self.blocked_seconds[-1] += waited

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

    def save_now(self, app_state: AppState, state: TrainState) -> str | None:
        """A snapshot at the current step (preemption), returned once committed: its name, or None when there
        is nothing to save. A no-op for a step this run already holds (restored from it, or saved it)."""
        if self.cfg.mode == "off":
            log.warning("--checkpoint.mode off: no snapshot is taken; a re-run starts from the latest snapshot "
                        "in %s, if any", self.root)
            return None
        if state.step == self._held_step:
            self.wait()
            return manifest.snapshot_name(state.epoch, state.step)
        return self._save(app_state, state, None, False, background=False, end_of_epoch=state.sample_offset == 0)

    # ---------- taking ----------
    def _save(self, app_state: AppState, state: TrainState, val_loss: float | None, is_best: bool,
              background: bool, end_of_epoch: bool) -> str | None:
        if state.step == 0:
            # Nothing learned yet: a fresh start reproduces this state exactly. (Taking the optimizer's
            # state dict now would also initialise its state, step = 1, and change the run.)
            log.info("no optimizer step taken yet: nothing to snapshot")
            return None
        start = time.perf_counter()
        self.wait()  # one snapshot in flight at most: the previous one must be committed first
        name = manifest.snapshot_name(state.epoch, state.step)
        path = self.root / name
        on_main_together(self.ctx, lambda: self._clear_target(path))
        if self.prepare is not None:
            self.prepare()
        info = {"name": name, "id": uuid.uuid4().hex, "branch_from": self._branch_from,
                "branch_from_path": self._branch_from_path, "engine": self.engine.name,
                "epoch": state.epoch, "step": state.step, "sample_offset": state.sample_offset,
                "world_size": self.ctx.world_size, "tier": self.tier(state.epoch, end_of_epoch),
                "val_loss": val_loss, "is_best": is_best, "started_at": time.time()}
        staged = self._stage(app_state)
        self._staging = staged if isinstance(staged, Future) else None
        self._writing, self._held_step = name, state.step
        self._writer = threading.Thread(target=self._write, args=(path, staged, info), name=f"snapshot-{name}",
                                        daemon=True)
        self._writer.start()
        if self.faults:
            self.faults.maybe_fire("saving", state.step)
        if not background:
            self.wait()
        blocked = time.perf_counter() - start
        self.blocked_seconds.append(blocked)
        self.clock.started(time.monotonic(), blocked)
        return name

    def _stage(self, app_state: AppState) -> StateDicts | Future:
        """Copy the state into CPU buffers kept from one snapshot to the next (reallocating and page-faulting
        280 MB each time costs ~8x the copy). In async mode the copy runs on the stager's thread while the next
        step's forward and backward run: what a forward changes (buffers) is copied here first, and the next
        optimizer step waits for the rest (:meth:`before_optimizer_step`)."""
        background = self.cfg.mode == "async"
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = self.ctx.device.type == "cuda"
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=background, use_non_blocking_copy=cuda))
        live = self.engine.prepare_for_save({k: getattr(v, "snapshot_state_dict", v.state_dict)()
                                             for k, v in app_state.items()}, self.ctx)
        devices.wait_for_queued_work(self.ctx.device)  # the stager's own stream does not wait for the optimizer step
        return self._stager.stage(live)

    def _clear_target(self, path: Path) -> None:
        """Rank 0: make room for a new snapshot at ``path``. A directory of that name left by an earlier
        attempt: an incomplete one is debris and is removed; a complete or damaged one (we resumed from an
        older snapshot on purpose) is moved aside, never deleted."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            return
        if manifest.read_commit(path) is None and manifest.commit_problem(path) is None:
            shutil.rmtree(path)
            return
        aside = path.with_name(f"{path.name}.superseded-{int(time.time())}")
        log.warning("snapshot %s exists from an earlier branch of this run; moved aside to %s", path, aside)
        path.rename(aside)

    def _write(self, path: Path, staged: StateDicts | Future, info: dict[str, Any]) -> None:
        """Writer thread, every rank: the engine writes this rank's part, then rank 0 records every entry's
        fingerprint and the files' checksums in the commit record, then best and retention."""
        try:
            if isinstance(staged, Future):
                staged = staged.result()
            self.engine.write(path, staged, self.ctx)
            complete, partial = proof.local_record(staged)
            # Also the proof that every rank wrote this same snapshot (a rank that decided otherwise would have
            # written another one): the gather has every rank's step.
            gathered = all_gather_object(self.ctx, (info["step"], partial), group=self.ctx.ckpt_group)
            steps, partials = [g[0] for g in gathered], [g[1] for g in gathered]
            if len(set(steps)) != 1:
                raise RuntimeError(f"ranks disagree on the snapshot step: {steps}")
            if self.faults:
                self.faults.maybe_fire("commit", info["step"])
            if self.ctx.is_main:
                # What the benchmark reads back: from the save call to the engine's last byte written.
                info["write_seconds"] = round(time.time() - info["started_at"], 4)
                record = manifest.write_commit(path, {**info, "rank_steps": steps,
                                                      "entries": proof.combine(complete, partials)})
                log.info("snapshot %s committed (%s, %d files, %s, checksums %.2fs)", path.name, info["tier"],
                         len(record["files"]), manifest.human_size(sum(f["size"] for f in record["files"].values())),
                         record["checksum_seconds"])
                self._apply_retention()
            if self.faults:  # here, not on the training thread, so that it is right after the commit
                self.faults.maybe_fire("saved", info["step"])
        except BaseException as e:  # surfaced by wait() on the training thread, on every rank
            self._error = self._disk_full(path, e) or e

    def _disk_full(self, path: Path, error: BaseException) -> UserError | None:
        """The user's error for a write that failed on a full disk, else None. torchrun would restart into the
        same full disk (exit 1), so it is exit 2. DCP loses the errno (its zip writer reports "unexpected pos"),
        hence also a filesystem with (almost) nothing left at the moment of the failure counts as full."""
        try:
            free: int | None = shutil.disk_usage(self.root).free
        except OSError:
            free = None
        if not _has_errno(error, errno.ENOSPC) and (free is None or free >= _FULL_BELOW_BYTES):
            return None
        shown = "unknown" if free is None else manifest.human_size(free)
        return UserError(f"snapshot {path}: no space left on device ({shown} free in {self.root}); the "
                         "incomplete snapshot is removed, earlier snapshots are kept. Free space there (or lower "
                         "--checkpoint.keep) and start again")

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
        """Block until the snapshot in flight (if any) is committed on every rank; a failure on any rank is
        raised on every rank, with the same message."""
        if self._writer is None:
            return
        self._writer.join()
        self._writer, self._staging = None, None
        error, self._error = self._error, None
        if error is not None and not isinstance(error, UserError):
            error = RuntimeError(f"snapshot {self.root / self._writing} failed: {type(error).__name__}: {error}")
        try:
            raise_together(self.ctx, error)
        except UserError:  # a full disk on some rank: give its space back (every writer has ended)
            path = self.root / self._writing
            if self.ctx.is_main and manifest.read_commit(path) is None and manifest.commit_problem(path) is None:
                shutil.rmtree(path, ignore_errors=True)
            raise

    def close(self, timeout: float = 30.0) -> None:
        """Give a snapshot in flight ``timeout`` seconds to finish, without any collective: close also runs
        when the run is failing, and a peer may be gone. An unfinished snapshot is never committed."""
        if self._writer is not None:
            self._writer.join(timeout)
            if self._writer.is_alive():
                log.warning("snapshot %s still being written at exit; it stays incomplete", self._writing)
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    # ---------- finding and restoring ----------
    def restore_latest(self, app_state: AppState) -> ResumeInfo | None:
        """Restore the newest snapshot that is complete, intact and of this model; None for a fresh start.

        A snapshot that fails verification or whose restore cannot be proven complete is moved aside as
        damaged and the previous one is tried. Raises UserError (every rank) for a changed model or a bad
        ``--checkpoint.resume_from``; RuntimeError when a failed restore left the state half-loaded and no
        older snapshot restores (the next attempt starts fresh: the damaged ones were moved aside)."""
        touched = ""
        while True:
            found = on_main_together(self.ctx, self._choose)
            if found is None:
                if touched:
                    raise RuntimeError(f"no snapshot in {self.root} could be restored (the last tried: {touched}); "
                                       f"the damaged ones were moved aside. Run the same command again to start "
                                       f"from scratch.")
                log.info("no snapshot in %s: starting fresh", self.root)
                return None
            path, commit, (branch_from, branch_from_path) = Path(found[0]), found[1], found[2]
            try:
                info = self._restore(path, commit, app_state)
            except _Damaged as e:
                if self.cfg.resume_from and path.resolve() == Path(self.cfg.resume_from).resolve():
                    raise UserError(f"--checkpoint.resume_from: {path}: {e}") from None  # the user's: not moved
                touched, reason = str(path), str(e)
                on_main_together(self.ctx, lambda: self._move_aside(path, "damaged", reason))
                continue
            self._held_step, self._branch_from, self._branch_from_path = info.step, branch_from, branch_from_path
            return info

    def _restore(self, path: Path, commit: dict[str, Any], app_state: AppState) -> ResumeInfo:
        """Every rank: read the TrainState alone, refuse another model, read everything, prove the read;
        meanwhile rank 0 checks the files' checksums (when ``checkpoint.verify``) on other threads."""
        engine = self._engine_for(commit, path)
        checksums = self._start_checksums(path, commit)
        stored = TrainState()
        foreign = False
        try:
            engine.read(path, {"train": JsonState(stored)}, self.ctx)
            problems: list[str] = []
        except (EngineReadError, ValueError) as e:  # ValueError: a TrainState that is not JSON
            problems, foreign = [str(e)], isinstance(e, ForeignContentError)
        self._agree_on_damage(path, problems, commit, checksums, foreign)
        self._check_compatible(stored.config, path)  # every rank read the same config: no collective needed
        if self.faults:
            self.faults.maybe_fire("restore", 0)
        try:
            engine.read(path, app_state, self.ctx)
        except EngineReadError as e:
            problems = [str(e)]
        if not problems and "entries" in commit:
            problems = self._prove_read(commit["entries"], app_state)
        if checksums is not None and not problems:
            problem = checksums.result()
            problems = [problem] if problem else []
            if problem is None:
                size = sum(f["size"] for f in commit["files"].values())
                log.info("verified snapshot %s: %d files, %s", path.name, len(commit["files"]), manifest.human_size(size))
        self._agree_on_damage(path, problems, commit, checksums)
        state = app_state["train"].state if "train" in app_state else stored
        return ResumeInfo(path, state.epoch, state.step, state.sample_offset, stored.world_size, stored.config)

    def _start_checksums(self, path: Path, commit: dict[str, Any]) -> Future | None:
        """Rank 0, with ``checkpoint.verify``: hash every file against the commit record in the background."""
        if not (self.cfg.verify and self.ctx.is_main):
            return None
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        future = pool.submit(manifest.verify, path, commit, build_engine(commit["engine"]).marker)
        pool.shutdown(wait=False)
        return future

    def _agree_on_damage(self, path: Path, problems: list[str], commit: dict[str, Any],
                         checksums: Future | None, foreign: bool = False) -> None:
        """If any rank could not read its part: with the first rank's reasons, raise _Damaged on every rank when
        the files are not the ones committed (their checksums, hashed now if they were not being hashed) or
        hold what the engine never writes (``foreign``: whatever their checksums say), else RuntimeError:
        intact files that do not restore are not the snapshot's fault (nothing is moved aside)."""
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        gathered = all_gather_object(self.ctx, (shown, foreign) if problems else None)
        reasons = [g[0] for g in gathered if g]
        if not reasons:
            return
        if any(g[1] for g in gathered if g):
            log.error("restoring snapshot %s failed: %s", path.name, reasons[0])
            raise _Damaged(reasons[0])
        log.error("restoring snapshot %s failed: %s", path.name, reasons[0])

        def files_problem() -> str | None:
            if checksums is not None:
                return checksums.result()
            return manifest.verify(path, commit, build_engine(commit["engine"]).marker)

        damage = on_main_together(self.ctx, files_problem) or ""
        if not damage:
            raise RuntimeError(f"snapshot {path} is intact (its files match their checksums) but could not be "
                               f"restored: {reasons[0]}")
        raise _Damaged(damage if damage == reasons[0] else f"{damage} (the restore: {reasons[0]})")

    def _prove_read(self, expected: proof.Record, app_state: AppState) -> list[str]:
        """Compare every entry's fingerprint after the read with the one recorded at save time."""
        live = {k: v.state_dict() for k, v in app_state.items()}
        complete, partial = proof.local_record(live)
        actual = proof.combine(complete, all_gather_object(self.ctx, partial))
        return proof.differences(expected, actual, only=tuple(f"{k}/" for k in app_state))

    def _check_compatible(self, stored: dict[str, Any], path: Path) -> None:
        """Refuse a changed model before anything is loaded or overwritten; warn on changed hyper-parameters."""
        if self.run_config is None:
            return
        changed = model_changes(stored, self.run_config)
        if changed:
            shown = ", ".join(f"--{k} {now!r} (snapshot: {was!r})" for k, (was, now) in changed.items())
            raise UserError(f"the model differs from the one in snapshot {path}: {shown}. Use a new --run.dir to "
                            f"train a different model, or restore those settings.")
        for section, key in (("train", "batch_size"), ("optim", "lr")):
            was, now = stored.get(section, {}).get(key), self.run_config[section][key]
            if was != now:
                log.warning("--%s.%s changed on resume: %s in the snapshot, %s now", section, key, was, now)

    def _engine_for(self, commit: dict[str, Any], path: Path) -> Engine:
        name = commit.get("engine", self.engine.name)
        if name == self.engine.name:
            return self.engine
        log.warning("snapshot %s was written by engine %s; reading it with that engine", path.name, name)
        return build_engine(name)

    def _choose(self) -> tuple[str, dict[str, Any], tuple[str, str]] | None:
        """Rank 0: (path, commit record, lineage: (origin id, origin path)) of the snapshot to restore, or None
        for a fresh start."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.cfg.resume_from:
            return self._choose_given(Path(self.cfg.resume_from))
        snap = self._newest_intact()
        return None if snap is None else (str(snap.path), snap.commit, _lineage(snap.commit))  # type: ignore[arg-type]

    def _newest_intact(self) -> manifest.SnapshotInfo | None:
        """The newest complete snapshot that verifies; on the way, incomplete ones are removed (debris of a
        cut-off write) and damaged ones moved aside."""
        for snap in manifest.list_snapshots(self.root):
            if snap.damaged:
                self._move_aside(snap.path, "damaged", snap.problem or "")
                continue
            if not snap.complete:
                log.warning("ignoring incomplete snapshot %s (no commit record); removing it", snap.path)
                shutil.rmtree(snap.path, ignore_errors=True)
                continue
            # Sizes and the file list now (truncation is the usual damage); the checksums are hashed while the
            # engine reads, on other threads (see _restore).
            problem = manifest.verify(snap.path, snap.commit, build_engine(snap.commit["engine"]).marker,  # type: ignore[index]
                                      checksums=False)
            if problem is None:
                return snap
            self._move_aside(snap.path, "damaged", problem)
        return None

    def _move_aside(self, path: Path, why: str, problem: str) -> None:
        aside = path.with_name(f"{path.name}.{why}-{int(time.time())}")
        if why == "damaged":
            log.error("snapshot %s is damaged: %s; moved to %s and falling back to the previous one",
                      path.name, problem, aside.name)
        path.rename(aside)

    def _choose_given(self, path: Path) -> tuple[str, dict[str, Any], str]:
        """``--checkpoint PATH``: the starting point of a lineage, once. Kept in an sbatch script or a torchrun
        command, it must not rewind every restart: when the run directory's newest intact snapshot descends
        from PATH, continue from that one. Otherwise PATH it is (or an error, never a silent fallback), and
        newer snapshots of the branch being abandoned are moved aside (not deleted), or discovery and retention
        would mistake them for this run's newest."""
        # The lineage first: retention may have deleted PATH since this run continued from it.
        commit, given = manifest.read_commit(path), str(path.resolve())
        newest = self._newest_intact()
        if newest is not None and newest.path.resolve() != path.resolve() and _descends(newest.commit, commit, given):  # type: ignore[arg-type]
            log.info("--checkpoint.resume_from %s: this run already continued from it; continuing from its newest "
                     "snapshot %s", path, newest.name)
            return str(newest.path), newest.commit, _lineage(newest.commit)  # type: ignore[return-value, arg-type]
        if commit is None:
            raise UserError(f"--checkpoint.resume_from: {path} is not a complete snapshot "
                            f"({manifest.commit_problem(path) or f'no {manifest.COMMIT}'})")
        origin = manifest.snapshot_id(commit)
        problem = self._verify(path, commit)
        if problem:
            raise UserError(f"--checkpoint.resume_from: snapshot is damaged: {problem}")
        order = (commit["step"], commit["epoch"])
        for snap in manifest.list_snapshots(self.root):
            if snap.order > order and snap.path.resolve() != path.resolve():
                log.warning("resuming from the older %s: moving the newer snapshot %s aside", path, snap.name)
                self._move_aside(snap.path, "superseded", "")
        return str(path), commit, (origin, given)

    def _verify(self, path: Path, commit: dict[str, Any]) -> str | None:
        """The manifest check (on by default: ~1.2 GB/s here, see bench/bench_snapshots.py)."""
        if not self.cfg.verify:
            return None
        start = time.perf_counter()
        problem = manifest.verify(path, commit, build_engine(commit["engine"]).marker)
        if problem is None:
            size = sum(f["size"] for f in commit["files"].values())
            log.info("verified snapshot %s: %d files, %s in %.2fs", path.name, len(commit["files"]),
                     manifest.human_size(size), time.perf_counter() - start)
        return problem


_FULL_BELOW_BYTES = 1 << 20
"""Free space under which a failed snapshot write is taken for a full disk."""


def _has_errno(error: BaseException, number: int) -> bool:
    """Whether ``error``, its causes, or a DCP CheckpointException's per-rank failures carry ``number``."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == number:
            return True
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
    return False


def _lineage(commit: dict[str, Any]) -> tuple[str, str]:
    """(identity, resolved path) of the snapshot a lineage started from with --checkpoint ('' for none)."""
    return commit.get("branch_from", ""), commit.get("branch_from_path", "")


def _descends(newest: dict[str, Any], given: dict[str, Any] | None, given_path: str) -> bool:
    """Does the snapshot ``newest`` continue a lineage started from ``--checkpoint`` PATH? By PATH's identity
    while PATH is there, by where it was once retention has deleted it."""
    if given is not None:
        return newest.get("branch_from") == manifest.snapshot_id(given)
    return bool(newest.get("branch_from_path")) and newest.get("branch_from_path") == given_path

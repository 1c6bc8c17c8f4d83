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

The local tier (localtier.py): the same snapshots, in node-local memory (BASE/RUN_ID/snapshots), every
``checkpoint.local_every_steps`` steps, by a second saver on its own process group (its writer thread's
collectives never meet the durable writer's), at most two generations (keep 1, plus the one in flight). A
local snapshot taken at a step boundary holds up the next step only for its staging copy (before the optimizer
step); its write, fingerprints, checksums and commit run during that step, and it is committed before the
step counts as done, so a kill redoes at most one step. On several nodes each node holds its own ranks'
files of each local snapshot and its predecessor's in a ring (nodecopy.py), and at a restore the nodes
complete the newest one from their parts and send it to a node that lacks it. A restore
takes the newest snapshot every rank can read, local or durable. With the local tier on (one node, or several
in a ring), a durable snapshot is that step's local snapshot, copied into the run directory by separate
writer processes (copier.py, writer.py: rank 0's, or every node leader's its share) instead of the in-process
writer thread.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from elastictrain.config import CheckpointConfig
from elastictrain.dist import DistContext, all_gather_object, on_main_together, raise_together
from elastictrain.faults import FaultInjector
from elastictrain.runlog import METRICS_FILE, read_metrics
from elastictrain.snapshot import localtier, manifest, nodecopy
from elastictrain.snapshot.appstate import build_app_state
from elastictrain.snapshot.copier import DurableCopier
from elastictrain.snapshot.engines import AppState, Engine, build_engine
from elastictrain.snapshot.interval import SnapshotClock, failure_history
from elastictrain.snapshot.restorer import Restorer, ResumeInfo
from elastictrain.snapshot.saver import KEEP_TIMINGS, Saver
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
        self.faults = faults
        self.copier: DurableCopier | None = None
        """Durable snapshots copied from the local tier by a writer process (set up by restore_latest)."""
        self.restorer = Restorer(cfg, ctx, self.root, self.engine, run_config, faults)
        self.clock = SnapshotClock(cfg.every_steps, cfg.every_minutes, cfg.mtbf_hours)
        self._interval_logged: dict[str, float] = {}
        """The interval last logged, per event (snapshot_interval, local_snapshot_interval)."""
        self._announce_interval = False
        """Log the automatic interval at the next step boundary (the first after a restore)."""
        self._lineage: tuple[str, str] = ("", "")
        """The snapshot this lineage started from with --checkpoint.resume_from: (identity, resolved path, so
        the lineage is still found once retention has deleted it); ('', '') for none."""
        self.blocked_seconds: list[float] = []
        """Time the training loop spent inside each save call (what async is meant to shrink)."""
        self.local: Saver | None = None
        """The local tier's saver (None when the tier is off); set up by restore_latest."""
        self.local_clock = SnapshotClock(**_local_interval(cfg))
        self.local_blocked_seconds: deque[float] = deque(maxlen=KEEP_TIMINGS)
        """Per local snapshot (the last KEEP_TIMINGS), the time the training loop waited for it: its start, its
        staging copy (before the optimizer step) and what was left of its write when the step was done."""
        self.local_part_seconds: deque[dict[str, float]] = deque()
        """Per local snapshot, the seconds of each part of its write, off the loop (Saver.part_seconds)."""
        self._local_bytes = 0
        self._room_warned = False
        self._local_created = False
        self._local_in_step = False
        """A local snapshot was taken at the last step boundary: the step since then is the one it slowed."""

    @property
    def durable(self) -> Saver | DurableCopier:
        """Who writes durable snapshots: the writer process (from the local tier) or the writer thread."""
        return self.copier if self.copier is not None else self.saver

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
        for clock in (self.clock, self.local_clock):  # since the last boundary: a step and the validation
            clock.gap()
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
        writer_done = self.durable.written
        self.clock.boundary(now, writing=self.durable.writing)
        if writer_done and self.clock.written() is not None and self.clock.auto:
            self._report_interval(state.step)
        if self.cfg.mode == "off" or state.step == self.durable.held_step:
            return False
        return self.clock.due(state.step, now)

    def save_mid_epoch(self, app_state: AppState, state: TrainState) -> str | None:
        """A rolling snapshot at this step boundary (every_steps / every_minutes), in the background in async mode."""
        return self._save(app_state, state, None, False, background=self.cfg.mode == "async", end_of_epoch=False)

    def before_optimizer_step(self) -> None:
        """Wait until the snapshots being staged (durable, local) have copied what the optimizer step is about
        to change; their writes go on during the step."""
        waited = self.saver.wait_for_staging()
        if waited is not None:
            self.clock.add_blocked(waited)
            if self.blocked_seconds:
                self.blocked_seconds[-1] += waited
        waited = self.local.wait_for_staging() if self.local is not None else None
        if waited is not None:
            self._local_blocked(waited)

    def after_optimizer_step(self) -> None:
        """Before the step counts as done: the local snapshot taken at its start must be committed, so a kill
        from here on redoes at most this step. Its write ran during the forward, backward and optimizer step;
        the loop waits only for what is left of it (nothing, when a write is shorter than a step)."""
        if self.local is not None and self.local.writing:
            start = time.perf_counter()
            self.local.wait()
            self._local_blocked(time.perf_counter() - start)
        if self.copier is not None:
            self.copier.hand_over()  # a durable snapshot waiting for this local commit goes to the writer

    def _local_blocked(self, seconds: float) -> None:
        self.local_clock.add_blocked(seconds)
        if self.local_blocked_seconds:
            self.local_blocked_seconds[-1] += seconds

    def save_now(self, app_state: AppState, state: TrainState) -> str | None:
        """A snapshot at the current step (preemption), returned once committed: its name, or None when there
        is nothing to save. A no-op for a step this run already holds (restored from it, or saved it)."""
        if self.cfg.mode == "off":
            log.warning("--checkpoint.mode off: no snapshot is taken; a re-run starts from the latest snapshot "
                        "in %s, if any", self.root)
            return None
        if state.step == self.durable.held_step:
            self.wait()
            return manifest.snapshot_name(state.epoch, state.step)
        for attempt in (1, 2):
            name = self._save(app_state, state, None, False, background=False, end_of_epoch=state.sample_offset == 0)
            if name is None or on_main_together(self.ctx, lambda: manifest.read_commit(self.root / name) is not None):
                return name
            # Its engine or writer process died alone (a warning said so): new ones take it again, once.
            self.durable.held_step = -1
            if self.ctx.is_main:
                log.warning("snapshot %s was lost; %s", name, "taking it again" if attempt == 1 else
                            "none taken: a re-run resumes from the newest complete snapshot")
        return None

    def _save(self, app_state: AppState, state: TrainState, val_loss: float | None, is_best: bool,
              background: bool, end_of_epoch: bool) -> str | None:
        if state.step == 0:
            # Nothing learned yet: a fresh start reproduces this state exactly. (Taking the optimizer's
            # state dict now would also initialise its state, step = 1, and change the run.)
            log.info("no optimizer step taken yet: nothing to snapshot")
            return None
        waited = 0.0
        if self.durable.writing:  # the previous snapshot first (take would wait for it too; on every rank alike)
            start = time.perf_counter()
            self.durable.wait()
            waited = time.perf_counter() - start
            # Part of its cost: a snapshot that outlasts its interval would otherwise never be measured, and
            # auto would never learn that it snapshots too often (a starved writer, a slow disk).
            if self.clock.measuring:
                self.clock.add_blocked(waited, outside=True)
                if self.clock.written() is not None and self.clock.auto:
                    self._report_interval(state.step)
        start = time.perf_counter()
        record = {"branch_from": self._lineage[0], "branch_from_path": self._lineage[1],
                  "tier": self.tier(state.epoch, end_of_epoch), "val_loss": val_loss, "is_best": is_best}
        name = self.durable.take(app_state, state, record, background)
        blocked = time.perf_counter() - start
        self.blocked_seconds.append(waited + blocked)  # the loop waited for snapshotting here, both parts
        self.clock.started(time.monotonic(), blocked)
        return name

    def wait(self) -> None:
        """Block until the snapshot in flight (if any) is committed on every rank; a failure on any rank is
        raised on every rank, with the same message."""
        self.saver.wait()
        if self.copier is not None:
            self.copier.wait()
        if self.local is not None:
            self.local.wait()

    def close(self, timeout: float = 30.0) -> None:
        """Give a snapshot in flight ``timeout`` seconds to finish, without any collective (see Saver.close)."""
        self.saver.close(timeout)
        if self.copier is not None:
            self.copier.close(timeout)
        if self.local is not None:
            self.local.close(timeout)

    # ---------- the local tier ----------
    def wants_local_snapshot(self, state: TrainState) -> tuple[bool, bool]:
        """At a step boundary: (is a local snapshot due, would it leave too little memory free), this rank's
        view; the trainer agrees on both across ranks (any rank short of room skips it everywhere)."""
        if self.local is None:
            return False, False
        now = time.monotonic()
        # A local write never outlives its step: the step just done is the one the last local snapshot slowed
        # (its start, staging and commit waits included), and its cost is known now.
        measured, self._local_in_step = self._local_in_step, False
        self.local_clock.boundary(now, writing=measured)
        if measured and self.local_clock.written() is not None and self.local_clock.auto:
            self._report_interval(state.step, local=True)
        if state.step in (0, self.local.held_step, self.durable.held_step):
            return False, False
        due = self.local_clock.due(state.step, now)
        return due, due and not localtier.has_room(self.local.root, self._local_bytes)

    def save_local(self, app_state: AppState, state: TrainState, no_room: bool) -> str | None:
        """A local snapshot at this step boundary: the next optimizer step waits for its staging copy, and it
        is committed before that step counts as done (before_/after_optimizer_step); skipped with a warning
        when some rank's file system is too full."""
        assert self.local is not None
        if no_room:
            if not self._room_warned and self.ctx.is_main:
                log.warning("local snapshot at step %d skipped: it would leave less than %s free in %s (durable "
                            "snapshots go on)", state.step, manifest.human_size(localtier.SAFE_MARGIN_BYTES),
                            self.local.root)
            self._room_warned = True
            return None
        self.saver.wait()  # one writer thread at a time: the durable snapshot in flight first
        if self.copier is not None:
            self.copier.before_local_snapshot(lambda: localtier.has_room(self.local.root,  # type: ignore[union-attr]
                                                                         self._local_bytes))
        self._create_local()
        start = time.perf_counter()
        record = {"branch_from": self._lineage[0], "branch_from_path": self._lineage[1], "tier": "rolling",
                  "val_loss": None, "is_best": False,
                  "where": "local"}
        name = self.local.take(app_state, state, record, background=True)
        blocked = time.perf_counter() - start
        self.local_blocked_seconds.append(blocked)
        self.local_clock.started(time.monotonic(), blocked)
        self._local_in_step = True
        return name

    def _create_local(self) -> None:
        """Before the first local snapshot, every rank: the tier's directories (each node has its own; racing
        ranks of one node are harmless: exist_ok, renames)."""
        if self._local_created:
            return
        assert self.local is not None
        error = None
        try:
            localtier.create(self.local.root, self.run_dir)
        except (OSError, RuntimeError) as e:
            error = e
        raise_together(self.ctx, error)
        self._local_created = True

    def finish(self) -> None:
        """The run finished: wait for every snapshot, then remove this run's local tier (each node's first rank)."""
        self.wait()
        if self.local is not None:
            root, self.local = self.local.root, None
            all_gather_object(self.ctx, None)  # every rank is done with it
            if self.ctx.local_rank == 0:
                localtier.remove_tier(root)

    def _setup_local(self, app_state: AppState) -> None:
        """Every rank: place the local tier, or agree that it is off and log why once."""
        why = ("--checkpoint.mode off" if self.cfg.mode == "off" else
               "--checkpoint.local_every_steps 0" if self.cfg.local_every_steps == "0" else
               "--checkpoint.local_dir none" if self.cfg.local_dir == "none" else "")
        placement = localtier.Placement(None, why)
        nodes = None
        if not why:
            tier_id = on_main_together(self.ctx, lambda: localtier.run_id(self.run_dir))
            self._local_bytes = state_bytes(app_state)
            nodes = nodecopy.learn(self.ctx) if self.ctx.distributed else None
            # On several nodes every node holds its own ranks' files and its predecessor's (nodecopy.py).
            ranks_held = nodes.ranks_held if nodes is not None and nodes.several else \
                int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            placement = localtier.place(self.cfg.local_dir, self.run_dir, tier_id, self._local_bytes, ranks_held)
            why = next((w for w in all_gather_object(self.ctx, placement.why_off) if w), "")
            if self.ctx.is_main and placement.root is not None:
                for tier, whose, _ in localtier.other_tiers(placement.root.parent.parent, tier_id):
                    log.info("ignoring the local snapshot tier %s (%s); `elastictrain ckpt clean` names it", tier,
                             whose)
        if why:
            if self.ctx.is_main:
                log.info("local snapshot tier off: %s; snapshots go to the run directory only", why)
            return
        assert placement.root is not None
        ctx = self.ctx
        if ctx.distributed:
            import torch.distributed as dist

            ctx = dataclasses.replace(ctx, ckpt_group=dist.new_group(backend="gloo"))
        self.local = Saver(dataclasses.replace(self.cfg, keep=1, mode="async"), ctx, placement.root, self.engine,
                           self.saver.prepare, None, log_level=logging.DEBUG)
        if nodes is not None and nodes.several:
            self.local.nodes = self.restorer.nodes = nodes
        self.local_part_seconds = self.local.part_seconds
        # One node, or several in a ring (copier.py). Not where torchrun's nodes share a host name: which files
        # each node's memory holds is not known there, so the writer thread writes durable snapshots.
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == self.ctx.world_size or self.local.nodes is not None:
            self.copier = DurableCopier(self.ctx, self.root, self.cfg.keep, self.local, self._create_local, self.faults,
                                        self.local.nodes)
        if self.ctx.is_main:
            log.info("local snapshot tier: %s, %s", placement.root,
                     f"every {self.local_clock.every_steps} step(s)" if self.local_clock.every_steps else
                     "interval auto (Young/Daly with its own measured cost)")

    # ---------- start-up ----------
    def restore_latest(self, app_state: AppState) -> ResumeInfo | None:
        """Restore the newest snapshot that is complete, intact and of this model; None for a fresh start
        (see Restorer.restore_latest for what fails how). Under ``every_minutes auto`` it also reads the
        failures this run directory has seen."""
        self._setup_local(app_state)
        if self.cfg.mode != "off":  # started now, so that its import of torch overlaps the restore
            # In /dev/shm: every rank's staging buffers on this node, and the local tier's two generations (a
            # third while copied).
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            shm_needed = state_bytes(app_state) * (local_ranks + (3 if self.local else 0)) + localtier.SAFE_MARGIN_BYTES
            (self.local or self.saver).use_engine_process(self.faults, shm_needed)
        found = self.restorer.restore_latest(app_state, self.local.root if self.local is not None else None)
        if self.clock.auto or (self.local is not None and self.local_clock.auto):
            self._read_failure_history()
        if found is None:
            return None
        resumed, self._lineage = found
        if resumed.tier == "local":
            self.local.held_step = resumed.step  # type: ignore[union-attr]
            if self.copier is not None:
                self.copier.resume_copy(manifest.read_commit(resumed.path) or {})
        else:
            self.durable.held_step = resumed.step
        return resumed

    def _read_failure_history(self) -> None:
        """Rank 0 reads metrics.jsonl (this attempt has not logged yet: every attempt in it has ended), and
        every rank's clock gets the same history."""

        def read() -> tuple[int, float]:
            if not (self.run_dir / METRICS_FILE).exists():
                return 0, 0.0
            return failure_history(read_metrics(self.run_dir), ongoing=False)

        self.clock.failures, self.clock.hours_observed = on_main_together(self.ctx, read)
        self.local_clock.failures, self.local_clock.hours_observed = self.clock.failures, self.clock.hours_observed
        self._announce_interval = self.cfg.mode != "off"

    def _report_interval(self, step: int, force: bool = False, local: bool = False) -> None:
        """Rank 0: an automatic interval (the durable tier's, or the ``local`` tier's) in the log and as a
        ``snapshot_interval`` / ``local_snapshot_interval`` event, when ``force``d, and whenever the measured cost
        or the history moves it by 10% or more."""
        clock, event = (self.local_clock, "local_snapshot_interval") if local else (self.clock, "snapshot_interval")
        interval, logged = clock.interval_s(), self._interval_logged.get(event)
        if interval is None or not self.ctx.is_main:
            return
        if not force and logged and abs(interval - logged) < 0.1 * logged:
            return
        self._interval_logged[event] = interval
        reason = clock.describe().replace("snapshot every", "local snapshot every", 1) if local else clock.describe()
        log.info("%s", reason)
        if self.on_event is not None:
            self.on_event(event, step, {
                "interval_s": round(interval, 3), "cost_s": clock.cost_s if clock.cost_s is not None else -1.0,
                "mtbf_h": round(clock.mtbf_s / 3600, 3), "failures_seen": clock.failures, "reason": reason})


def _local_interval(cfg: CheckpointConfig) -> dict[str, Any]:
    """The local tier's clock settings: every N steps, or the automatic interval."""
    every = cfg.local_every_steps
    if every == "auto":
        return {"every_minutes": "auto", "mtbf_hours": cfg.mtbf_hours}
    return {"every_steps": int(every) if every.isdigit() else 0}


def state_bytes(app_state: AppState) -> int:
    """This rank's snapshot size, estimated before the first step: the model's tensors (its local shards)
    three times over (AdamW keeps two moments per parameter), plus 1 MiB for the rest."""
    total = 0
    for value in app_state["model"].state_dict().values():
        if isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            total += local.numel() * local.element_size()
    return 3 * total + 2**20

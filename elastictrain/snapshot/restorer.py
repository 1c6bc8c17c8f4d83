"""The restore side: restore the newest snapshot that is complete, intact and of this model, prove that
every entry was read, and fall back to the previous snapshot when any of that fails.

Every rank reads; rank 0 alone discovers (discovery.py) and checks the files' checksums, on other threads
while the engine reads. Whether a snapshot is damaged is voted on by every rank at once, with the first
failing rank's reasons, so no rank falls back alone.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastictrain.config import CheckpointConfig
from elastictrain.dist import DistContext, all_gather_object, on_main_together
from elastictrain.errors import UserError
from elastictrain.faults import FaultInjector
from elastictrain.snapshot import discovery, localtier, manifest, nodecopy, proof
from elastictrain.snapshot.appstate import JsonState
from elastictrain.snapshot.engines import AppState, Engine, EngineReadError, ForeignContentError, build_engine
from elastictrain.snapshot.manifest import Snapshot, SnapshotDamaged
from elastictrain.state import TrainState

log = logging.getLogger(__name__)


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
    tier: str = "durable"
    """'local' (node-local memory) or 'durable' (the run directory)."""
    transfer: dict[str, Any] | None = None
    """A local snapshot some node received from another at this restore: from_rank, from_host, bytes, seconds."""


def model_changes(stored: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Settings that change the model's tensors, as {setting: (in the snapshot, now)}; empty if none."""
    changed = {f"model.{k}": (stored.get("model", {}).get(k), v) for k, v in now["model"].items()
               if k != "encoder_weights" and stored.get("model", {}).get(k) != v}
    if stored.get("data", {}).get("num_classes") != now["data"]["num_classes"]:
        changed["data.num_classes"] = (stored.get("data", {}).get("num_classes"), now["data"]["num_classes"])
    return changed


class Restorer:
    """Restores the newest good snapshot of RUN_DIR/snapshots into the live objects (see the module doc)."""

    def __init__(self, cfg: CheckpointConfig, ctx: DistContext, root: Path, engine: Engine,
                 run_config: dict[str, Any] | None, faults: FaultInjector | None) -> None:
        self.cfg, self.ctx, self.root, self.engine = cfg, ctx, root, engine
        self.run_config = run_config
        self.faults = faults
        self.nodes: nodecopy.Nodes | None = None
        """Set on several nodes with the local tier on: a node lacking a local snapshot receives it."""
        self.transfer: dict[str, Any] | None = None
        """The local snapshot restored came from another node: from where, how many bytes, how long."""

    def restore_latest(self, app_state: AppState,
                       local_root: Path | None = None) -> tuple[ResumeInfo, discovery.Lineage] | None:
        """The restored snapshot's ResumeInfo and lineage (see discovery.Choice); None for a fresh start.
        With ``local_root``, a local snapshot that every rank can read is taken when it is as new as the
        durable one or newer.

        A snapshot that fails verification or whose restore cannot be proven complete is moved aside as
        damaged and the previous one is tried. Raises UserError (every rank) for a changed model or a bad
        ``--checkpoint.resume_from``; RuntimeError when a failed restore left the state half-loaded and no
        older snapshot restores (the next attempt starts fresh: the damaged ones were moved aside)."""
        touched = ""
        while True:
            found = on_main_together(self.ctx, lambda: discovery.choose(self.root, self.cfg.resume_from,
                                                                        self.cfg.verify))
            local = self._agreed_local(local_root, found) if local_root is not None else None
            if local is not None:
                found = (local, discovery.lineage(local.commit))  # type: ignore[arg-type]
            if found is None:
                if touched:
                    raise RuntimeError(f"no snapshot in {self.root} could be restored (the last tried: {touched}); "
                                       f"the damaged ones were moved aside. Run the same command again to start "
                                       f"from scratch.")
                log.info("no snapshot in %s: starting fresh", self.root)
                return None
            snap, lineage = found
            try:
                resumed = self._restore(snap, app_state)
                resumed.tier = "local" if local is not None else "durable"
                resumed.transfer = self.transfer if local is not None else None
                return resumed, lineage
            except SnapshotDamaged as e:
                if self.cfg.resume_from and snap.path.resolve() == Path(self.cfg.resume_from).resolve():
                    raise UserError(f"--checkpoint.resume_from: {snap.path}: {e}") from None  # the user's: not moved
                touched, reason = str(snap.path), str(e)
                if local is not None and self.nodes is not None:  # every node's copy, or it would be sent back
                    nodecopy.on_leaders_together(self.ctx, self.nodes, lambda: snap.path.exists() and
                                                 discovery.move_aside(snap.path, "damaged", reason))
                else:
                    on_main_together(self.ctx, lambda: discovery.move_aside(snap.path, "damaged", reason))

    def _agreed_local(self, root: Path, durable: discovery.Choice | None) -> Snapshot | None:
        """The newest local snapshot that every rank sees complete, if it is at least as new as the durable
        choice and (under ``--checkpoint.resume_from``) of the same lineage; else None."""
        # As in the run directory: debris removed, a damaged newest one (its record or a file hurt in memory)
        # moved aside with an error line, never silently skipped.
        if self.nodes is not None:  # every node's copy
            nodecopy.on_leaders_together(self.ctx, self.nodes, lambda: discovery.newest_intact(root))
            self._assemble(root, durable[0].order if durable is not None else None)
        else:
            on_main_together(self.ctx, lambda: discovery.newest_intact(root))
        views = all_gather_object(self.ctx, localtier.complete_ids(root))
        if self.nodes is not None:
            views = self._share_newest(root, views, durable[0].order if durable is not None else None)
        snap = localtier.agreed_newest(root, views)
        if snap is None or (durable is not None and durable[0].order > snap.order):
            return None
        if self.cfg.resume_from and (durable is None or
                                     snap.commit.get("branch_from") != durable[1][0]):  # type: ignore[union-attr]
            return None
        return snap

    def _assemble(self, root: Path, durable: tuple[int, int] | None) -> None:
        """Three nodes or more: the leaders complete the newest local snapshot their parts hold together
        (nodecopy.assemble); rank 0 says so, or why not (a warning: the restore then takes an older snapshot)."""
        nodes = self.nodes
        assert nodes is not None
        self.transfer = None
        if not nodes.is_leader:
            return
        done = nodecopy.assemble(root, nodes, durable, lambda: localtier.create(root, self.root.parent))
        if done is None or not self.ctx.is_main:
            return
        problem = done.pop("problem")
        if problem:
            log.warning("local snapshot %s could not be completed from the nodes' parts: %s", done["assembled"],
                        problem)
            return
        self.transfer = done
        log.info("local snapshot %s completed on every node from the parts held on %s: %s in %.2fs",
                 done["assembled"], ", ".join(done["from_hosts"]), manifest.human_size(done["bytes"]),
                 done["seconds"])

    def _share_newest(self, root: Path, views: list[dict[str, tuple[int, int]]],
                      durable: tuple[int, int] | None) -> list[dict[str, tuple[int, int]]]:
        """Several nodes: the newest local snapshot that some node holds complete (and not older than the durable
        choice) is sent by its node to the nodes that lack it (nodecopy.send_snapshot); every rank's view
        afterwards. A failed transfer is a warning: the views then lead to an older snapshot."""
        nodes = self.nodes
        assert nodes is not None
        held = {i: order for view in views for i, order in view.items()}
        if not held:
            return views
        best = max(held, key=lambda i: (held[i], i))
        lacking = [r for r, view in enumerate(views) if best not in view]
        if not lacking or (durable is not None and durable > held[best]):
            return views
        src = nodes.leader_of(next(r for r, view in enumerate(views) if best in view))
        name = manifest.snapshot_name(held[best][1], held[best][0])
        if nodes.is_leader:
            # A replaced node's memory holds no tier yet: made as before a first snapshot (owner-only, owned).
            transfer = nodecopy.timed_send(root, name, src, nodes, lambda: localtier.create(root, self.root.parent))
            if self.ctx.is_main:
                to = sorted({nodes.hosts[r] for r in lacking})
                problem = transfer.pop("problem")
                self.transfer = None if problem else transfer
                if problem:
                    log.warning("local snapshot %s could not be copied from rank %d on host %s to %s: %s", name,
                                src, transfer["from_host"], ", ".join(to), problem)
                else:
                    log.info("local snapshot %s copied from rank %d on host %s to %s: %s in %.2fs", name, src,
                             transfer["from_host"], ", ".join(to), manifest.human_size(transfer["bytes"]),
                             transfer["seconds"])
        return all_gather_object(self.ctx, localtier.complete_ids(root))

    def _restore(self, snap: Snapshot, app_state: AppState) -> ResumeInfo:
        """Every rank: read the TrainState alone, refuse another model, read everything, prove the read;
        meanwhile rank 0 checks the files' checksums (when ``checkpoint.verify``) on other threads."""
        engine = self._engine_for(snap)
        checksums = self._start_checksums(snap)
        stored = TrainState()
        foreign = False
        try:
            engine.read(snap.path, {"train": JsonState(stored)}, self.ctx)
            problems: list[str] = []
        except (EngineReadError, ValueError) as e:  # ValueError: a TrainState that is not JSON
            problems, foreign = [str(e)], isinstance(e, ForeignContentError)
        self._agree_on_damage(snap, problems, checksums, foreign)
        self._check_compatible(stored.config, snap.path)  # every rank read the same config: no collective needed
        if self.faults:
            self.faults.maybe_fire("restore", 0)
        try:
            engine.read(snap.path, app_state, self.ctx)
        except EngineReadError as e:
            problems = [str(e)]
        if not problems and "entries" in snap.commit:  # type: ignore[operator]
            problems = self._prove_read(snap.commit["entries"], app_state)  # type: ignore[index]
        if checksums is not None and not problems:
            problem = checksums.result()
            problems = [problem] if problem else []
            if problem is None:
                log.info("verified snapshot %s: %d files, %s", snap.name, len(snap.commit["files"]),  # type: ignore[index]
                         manifest.human_size(snap.size))
        self._agree_on_damage(snap, problems, checksums)
        state = app_state["train"].state if "train" in app_state else stored
        return ResumeInfo(snap.path, state.epoch, state.step, state.sample_offset, stored.world_size, stored.config)

    def _start_checksums(self, snap: Snapshot) -> Future | None:
        """Rank 0, with ``checkpoint.verify``: hash every file against the commit record in the background."""
        if not (self.cfg.verify and self.ctx.is_main):
            return None
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        future = pool.submit(snap.verify)
        pool.shutdown(wait=False)
        return future

    def _agree_on_damage(self, snap: Snapshot, problems: list[str], checksums: Future | None,
                         foreign: bool = False) -> None:
        """If any rank could not read its part: with the first rank's reasons, raise SnapshotDamaged on every
        rank when the files are not the ones committed (their checksums, hashed now if they were not being
        hashed) or hold what the engine never writes (``foreign``: whatever their checksums say), else
        RuntimeError: intact files that do not restore are not the snapshot's fault (nothing is moved aside)."""
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        gathered = all_gather_object(self.ctx, (shown, foreign) if problems else None)
        reasons = [g[0] for g in gathered if g]
        if not reasons:
            return
        log.error("restoring snapshot %s failed: %s", snap.name, reasons[0])
        if any(g[1] for g in gathered if g):
            raise SnapshotDamaged(reasons[0])

        def files_problem() -> str | None:
            return checksums.result() if checksums is not None else snap.verify()

        damage = on_main_together(self.ctx, files_problem) or ""
        if not damage:
            raise RuntimeError(f"snapshot {snap.path} is intact (its files match their checksums) but could not be "
                               f"restored: {reasons[0]}")
        raise SnapshotDamaged(damage if damage == reasons[0] else f"{damage} (the restore: {reasons[0]})")

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

    def _engine_for(self, snap: Snapshot) -> Engine:
        name = snap.commit.get("engine", self.engine.name)  # type: ignore[union-attr]
        if name == self.engine.name:
            return self.engine
        log.warning("snapshot %s was written by engine %s; reading it with that engine", snap.name, name)
        return build_engine(name)

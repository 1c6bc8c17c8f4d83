"""The save side: copy the state into reused CPU buffers (the only part the training loop waits for), then a
writer thread has the engine write the copy, fingerprints it, and rank 0 commits it (COMMIT.json, written
last) and applies retention. One snapshot is in flight at most; its failure is raised on every rank at once.
Where it can (CPU: engine_process.py) the buffers are in shared memory and the engine write, fingerprints
and checksums run in a process of their own (with several ranks, the ranks' engine processes form a group of
their own); the writer thread waits for it and commits.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterator

from elastictrain import device as devices
from elastictrain.config import CheckpointConfig
from elastictrain.dist import DistContext, all_gather_object, on_main_together, raise_together
from elastictrain.errors import UserError
from elastictrain.faults import FaultInjector
from elastictrain.osutil import has_errno
from elastictrain.snapshot import manifest, nodecopy, proof
from elastictrain.snapshot.engine_process import (EngineGroup, EngineProcess, EngineProcessDied, SharedStager, Staged,
                                                  join)
from elastictrain.snapshot.engines import AppState, Engine, StateDicts
from elastictrain.snapshot.manifest import Snapshot
from elastictrain.snapshot.writer import cores, spare_cores
from elastictrain.state import TrainState

log = logging.getLogger(__name__)


class Saver:
    """Takes snapshots into RUN_DIR/snapshots and commits them (see the module doc).

    Args:
        prepare: called on every rank right before the state is copied (see the manager).
    """

    def __init__(self, cfg: CheckpointConfig, ctx: DistContext, root: Path, engine: Engine,
                 prepare: Callable[[], None] | None, faults: FaultInjector | None,
                 log_level: int = logging.INFO) -> None:
        self.cfg, self.ctx, self.root, self.engine = cfg, ctx, root, engine
        self.log_level = log_level
        """Of the commit and retention lines (the local tier commits every few steps: DEBUG)."""
        self.prepare = prepare
        self.faults = faults
        self.held_step = -1
        """Step of the newest snapshot this run holds (restored from, or started); a save there is a no-op."""
        self._stager: Any = None
        self._staging: Future | None = None
        self._writer: threading.Thread | None = None
        self._writing = ""
        self._error: BaseException | None = None
        self.pinned = ""
        """A snapshot retention must keep for now (the local tier's, while the durable writer copies it)."""
        self.part_seconds: deque[dict[str, float]] = deque(maxlen=KEEP_TIMINGS)
        """Per snapshot written by this rank (the last KEEP_TIMINGS): the seconds of each part of its write."""
        self._process: EngineProcess | None = None
        self._process_faults: FaultInjector | None = None
        self.lost = ""
        """The snapshot lost last because its engine process died alone (it was never committed)."""
        self.nodes: nodecopy.Nodes | None = None
        """The local tier's saver on several nodes: a ring of node copies (nodecopy.py)."""
        self._restart_engines = False
        """Some rank's engine process died: every rank starts a new one at the next snapshot."""

    def use_engine_process(self, faults: FaultInjector | None, shm_needed: int) -> None:
        """Every rank (collective): write from now on in engine processes (engine_process.py), started now,
        where every rank can; else say why once. ``faults``: for their test-only fault point
        (``sigkill@engine=N``). ``shm_needed``: the bytes /dev/shm must have free for this node's shared
        staging buffers beside whatever else goes there (a container's 64 MB /dev/shm would fail the first
        snapshot with a bus error)."""
        shm = Path("/dev/shm")
        free = shutil.disk_usage(shm).free if shm.is_dir() else None
        store = (os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        setting = self.cfg.engine_process
        why = ("--checkpoint.engine_process off" if setting == "off"
               else f"no core to spare beside each of this node's {ranks_here} rank(s) ({cores()} cores): a process "
                    "would compete with training for them; --checkpoint.engine_process on to use one anyway"
               if setting == "auto" and not spare_cores(ranks_here)
               else f"the state is on {self.ctx.device.type}, staged into pinned memory" if self.ctx.device.type != "cpu"
               else f"{shm} has {manifest.human_size(free)} free, the shared staging buffers and what else "
                    f"goes there need {manifest.human_size(shm_needed)}" if free is not None and free < shm_needed
               else "no MASTER_ADDR and MASTER_PORT: the engine processes of the ranks cannot meet"
               if self.ctx.distributed and None in store else "")
        views = all_gather_object(self.ctx, (why, uuid.uuid4().hex))
        why = next((w for w, _ in views if w), "")
        if why:
            if self.ctx.is_main:
                log.info("snapshots of %s written by a thread of the training process (%s)", self.root, why)
            return
        group = None
        if self.ctx.distributed:
            # The training group's timeout: a rank slower to write waits in the engines' last collective.
            group = EngineGroup(str(store[0]), int(str(store[1])), f"elastictrain-engines/{views[0][1]}",
                                self.ctx.rank, self.ctx.world_size, self.ctx.timeout_s)
        self._process, self._process_faults = EngineProcess(self.engine.name, group), faults
        self._process.ensure_started()

    @property
    def writing(self) -> bool:
        """A snapshot was started and not yet waited for (it may have been written meanwhile)."""
        return self._writer is not None

    @property
    def written(self) -> bool:
        """The snapshot started last has been written (or failed), and not yet waited for."""
        return self._writer is not None and not self._writer.is_alive()

    def take(self, app_state: AppState, state: TrainState, record: dict[str, Any], background: bool) -> str:
        """Snapshot ``state`` at its step, with ``record`` (tier, best, lineage) in its commit record; returns
        its name once staging started (``background``) or once committed."""
        self.wait()  # one snapshot in flight at most: the previous one must be committed first
        name = manifest.snapshot_name(state.epoch, state.step)
        path = self.root / name
        if self.nodes is not None and self.nodes.several:  # every node clears its own copy
            nodecopy.on_leaders_together(self.ctx, self.nodes, lambda: self._clear_target(path))
        else:
            on_main_together(self.ctx, lambda: self._clear_target(path))
        if self.prepare is not None:
            self.prepare()
        in_process = False
        if self._process is not None:
            if self._restart_engines:  # every rank alike (agreed in _write): a new group of engine processes
                self._restart_engines = False
                self._process.restart()
            self._process.ensure_started()  # a new one after one died alone
            in_process = self._engines_ready()
        info = {"name": name, "id": uuid.uuid4().hex, "engine": self.engine.name, "epoch": state.epoch,
                "step": state.step, "sample_offset": state.sample_offset, "world_size": self.ctx.world_size,
                **record, "started_at": time.time()}
        staged = self._stage(app_state)
        self._staging = staged if isinstance(staged, Future) else None
        self._writing, self.held_step = name, state.step
        self._writer = threading.Thread(target=self._write_beside_training, args=(path, staged, info, in_process),
                                        name=f"snapshot-{name}", daemon=True)
        self._writer.start()
        if self.faults:
            self.faults.maybe_fire("saving", state.step)
        if not background:
            self.wait()
        return name

    def wait_for_staging(self) -> float | None:
        """Wait until the snapshot being staged has copied the parameters and optimizer state, which the
        optimizer step is about to change (torchtitan's maybe_wait_for_staging); the seconds waited, or None
        when nothing was being staged."""
        if self._staging is None:
            return None
        start = time.perf_counter()
        try:
            self._staging.result()
        except Exception:  # noqa: BLE001 - the writer reports it, on every rank at once (wait())
            pass
        self._staging = None
        return time.perf_counter() - start

    def _stage(self, app_state: AppState) -> StateDicts | Future:
        """Copy the state into CPU buffers kept from one snapshot to the next (reallocating and page-faulting
        280 MB each time costs ~8x the copy). In async mode the copy runs on the stager's thread while the next
        step's forward and backward run: what a forward changes (buffers) is copied here first, and the next
        optimizer step waits for the rest (:meth:`wait_for_staging`)."""
        background = self.cfg.mode == "async"
        if self._stager is None and self._process is not None:
            self._stager = SharedStager(background)
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
        aside = manifest.make_room(path)
        if aside is not None:
            log.warning("snapshot %s exists from an earlier branch of this run; moved aside to %s", path, aside)

    def _engines_ready(self) -> bool:
        """Whether this snapshot goes to the engine processes: once every rank's has started (imported torch,
        joined its group), which takes seconds after start-up or a restart; until then the writer thread
        writes, so that an early snapshot is not held up. Every rank alike (one small collective, until they
        all are)."""
        assert self._process is not None
        if self._process.ready_everywhere:
            return True
        if self._process_faults is not None and self._process_faults.aims_at("engine"):
            self._process.wait_ready()  # a test of the engine process (sigkill@engine=N): it writes them all
        ready = all(all_gather_object(self.ctx, self._process.ready))
        self._process.ready_everywhere = ready
        return ready

    def _write_beside_training(self, path: Path, staged: StateDicts | Future, info: dict[str, Any],
                               in_process: bool) -> None:
        with gil_shared():
            self._write(path, staged, info, in_process)

    def _write(self, path: Path, staged: StateDicts | Future, info: dict[str, Any], in_process: bool) -> None:
        """Writer thread, every rank: the engine writes this rank's part, then rank 0 records every entry's
        fingerprint and the files' checksums in the commit record, then best and retention."""
        parts: dict[str, float] = {}
        lap = time.perf_counter()

        def timed(part: str) -> None:
            nonlocal lap
            now = time.perf_counter()
            parts[part], lap = round(now - lap, 4), now

        try:
            if isinstance(staged, Future):
                staged = staged.result()
            timed("staging")
            files: dict[str, Any] | None = None
            if isinstance(staged, Staged) and not in_process:  # staged for the engine processes, not ready yet
                staged = join(*staged)
            if in_process:
                done = self._write_in_process(path, staged, info["step"])
                if done is None:
                    return
                complete, partial, files = done["complete"], done["partial"], done["files"]
                parts.update(engine=done["parts"]["engine"], fingerprints=done["parts"]["fingerprints"])
                info["checksum_seconds"] = done["parts"]["checksums"]
                timed("process")
            else:
                self.engine.write(path, staged, self.ctx)
                timed("engine")
                complete, partial = proof.local_record(staged)
                timed("fingerprints")
            # Also the proof that every rank wrote this same snapshot (a rank that decided otherwise would have
            # written another one): the gather has every rank's step.
            gathered = all_gather_object(self.ctx, (info["step"], partial), group=self.ctx.ckpt_group)
            steps, partials = [g[0] for g in gathered], [g[1] for g in gathered]
            failed = [(rank, p) for rank, (s, p) in enumerate(zip(steps, partials)) if s is None]
            if failed:  # some rank's engine process failed (it raises its own error; the others say which)
                raise RuntimeError(f"on rank {failed[0][0]}: {failed[0][1]}")
            if len(set(steps)) != 1:
                raise RuntimeError(f"ranks disagree on the snapshot step: {steps}")
            if self.faults:
                self.faults.maybe_fire("commit", info["step"])
            if self.nodes is not None and self.nodes.several:
                self._commit_on_every_node(path, info, steps, proof.combine(complete, partials))
                timed("commit")
            elif self.ctx.is_main:
                # What the benchmark reads back: from the save call to the engine's last byte written.
                info["write_seconds"] = round(time.time() - info["started_at"], 4)
                seconds = info.pop("checksum_seconds", None)
                record = manifest.write_commit(path, {**info, "rank_steps": steps,
                                                      "entries": proof.combine(complete, partials)}, files, seconds)
                timed("commit")
                log.log(self.log_level, "snapshot %s committed (%s, %d files, %s, checksums %.2fs)", path.name, info["tier"],
                         len(record["files"]), manifest.human_size(Snapshot(path, record).size),
                         record["checksum_seconds"])
                self._apply_retention()
                timed("retention")
            self.part_seconds.append(parts)
            if self.faults:  # here, not on the training thread, so that it is right after the commit
                self.faults.maybe_fire("saved", info["step"])
        except BaseException as e:  # surfaced by wait() on the training thread, on every rank
            self._error = self._disk_full(path, e) or e

    def _write_in_process(self, path: Path, staged: Any, step: int) -> dict[str, Any] | None:
        """The engine process's answer; None when some rank's engine process died alone: this snapshot is
        lost (on every rank alike), its debris removed, and the next one starts new engine processes. With
        several ranks the ranks agree on it first; a rank whose process failed otherwise gathers a step of
        None (the others raise too) and raises its error."""
        assert self._process is not None
        fault = self._process_faults.claim("engine", step) if self._process_faults else None
        died, error, answer = "", None, None
        try:
            answer = self._process.write(path, staged, fault)
        except EngineProcessDied as e:
            died = str(e)
        except BaseException as e:  # noqa: BLE001 - raised below, once the ranks have agreed
            error = e
        if self.ctx.distributed:
            deaths = [d for d in all_gather_object(self.ctx, (self.ctx.rank, died), group=self.ctx.ckpt_group)
                      if d[1]]
            if deaths:
                rank, died = deaths[0]
                died = f"{died.replace('process died', f'process of rank {rank} died', 1)}"
                self._restart_engines = True
            elif error is not None:
                all_gather_object(self.ctx, (None, f"{type(error).__name__}: {error}"),  # the others' step gather
                                  group=self.ctx.ckpt_group)
                raise error
        elif error is not None:
            raise error
        if died:
            if self.ctx.is_main:
                log.warning("snapshot %s not written: %s; it stays incomplete (removed), a new engine process "
                            "takes the next one", path, died)
                manifest.remove_if_uncommitted(path)
            self.lost, self.held_step = path.name, -1
            return None
        return answer

    def _commit_on_every_node(self, path: Path, info: dict[str, Any], steps: list[int],
                              entries: proof.Record) -> None:
        """Writer thread, node leaders: pass the nodes' files along the ring (nodecopy.share), then every
        leader writes rank 0's commit record of the whole snapshot into its node's copy (a part of it, on three
        nodes or more), and applies retention there."""
        nodes = self.nodes
        assert nodes is not None
        if not nodes.is_leader:
            return
        start = time.time()
        files, held, problem = nodecopy.share(path, nodes)
        if problem is not None:
            raise RuntimeError(f"copying the local snapshot between nodes: {problem}")
        record = None
        if self.ctx.is_main:
            info["write_seconds"] = round(time.time() - info["started_at"], 4)
            record = manifest.commit_record({**info, "rank_steps": steps, "entries": entries}, files,
                                            time.time() - start)
        record = nodecopy.broadcast_record(record, nodes)
        nodecopy.commit_copy(path, record, held)
        if self.ctx.is_main:
            log.log(self.log_level, "snapshot %s committed on %d nodes (%s, %d files, %s, %d of them on this node, "
                    "exchange and checksums %.2fs)", path.name, len(nodes.leaders), info["tier"], len(files),
                    manifest.human_size(Snapshot(path, record).size), len(held), record["checksum_seconds"])
        self._apply_retention()

    def _disk_full(self, path: Path, error: BaseException) -> UserError | None:
        """The user's error for a write that failed on a full disk, else None. torchrun would restart into the
        same full disk (exit 1), so it is exit 2. DCP loses the errno (its zip writer reports "unexpected pos"),
        hence also a filesystem with (almost) nothing left at the moment of the failure counts as full."""
        try:
            free: int | None = shutil.disk_usage(self.root).free
        except OSError:
            free = None
        if not has_errno(error, errno.ENOSPC) and (free is None or free >= _FULL_BELOW_BYTES):
            return None
        shown = "unknown" if free is None else manifest.human_size(free)
        return UserError(f"snapshot {path}: no space left on device ({shown} free in {self.root}); the "
                         "incomplete snapshot is removed, earlier snapshots are kept. Free space there (or lower "
                         "--checkpoint.keep) and start again")

    def _apply_retention(self) -> None:
        """BEST.json and retention (manifest.apply_retention), never deleting the pinned snapshot."""
        for name in manifest.apply_retention(self.root, self.cfg.keep, self.pinned):
            log.log(self.log_level, "retention: removed rolling snapshot %s", name)

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
            if self.ctx.is_main:
                manifest.remove_if_uncommitted(path)
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
        if self._process is not None:
            self._process.close()


KEEP_TIMINGS = 1000
"""Timings kept per saver (a local snapshot every step would otherwise grow them without end)."""
SHARED_SWITCH_INTERVAL_S = 0.0002
"""Python's GIL switch interval while a writer thread runs beside training (the default is 5 ms)."""
_sharing = 0
_sharing_lock = threading.Lock()
_default_interval = sys.getswitchinterval()


@contextlib.contextmanager
def gil_shared() -> Iterator[None]:
    """A short GIL switch interval while a snapshot is written beside training (nested writers share it).
    Each time the training thread gives up the GIL for an operator, a Python-heavy writer keeps it for up to
    the switch interval before the training thread gets it back, hundreds of times a step. Measured here
    (bench/profile_local_snapshot.py --beside: resnet34 Unet, 64 px, batch 16, a write running throughout the
    step): a step beside DCP's write took 2.16x its time alone at 5 ms and 1.41x at 0.2 ms, beside
    torchsnapshot's 3.66x and 2.37x."""
    global _sharing, _default_interval
    with _sharing_lock:
        if _sharing == 0:
            _default_interval = sys.getswitchinterval()
            sys.setswitchinterval(SHARED_SWITCH_INTERVAL_S)
        _sharing += 1
    try:
        yield
    finally:
        with _sharing_lock:
            _sharing -= 1
            if _sharing == 0:
                sys.setswitchinterval(_default_interval)


_FULL_BELOW_BYTES = 1 << 20
"""Free space under which a failed snapshot write is taken for a full disk."""

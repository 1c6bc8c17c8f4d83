"""Durable snapshots made from the local tier by a separate process (writer.py), not by a thread of the
training process: at a durable boundary the state goes to the local tier as usual (staging, an engine write
to memory, the commit), and once that local snapshot is committed, rank 0's writer process copies it into
RUN_DIR/snapshots, verifying every byte against the local commit record, and commits it there.

What the training process still does for a durable snapshot is what a local one costs; the copy, its fsyncs
and hashing run in the writer at low priority. On one node, rank 0's writer copies the whole snapshot (the
node's local directory holds every rank's files). On several nodes (a ring of node copies, nodecopy.py) every
node leader has a writer: the leaders agree which of them copies which file (each file from a node whose
memory holds it, the bytes spread evenly: with two nodes each copies about half), each copies its share into
the run directory on the shared file system, and once every share is copied and verified, rank 0 writes the
commit record (after checking every file's size) and applies retention. Without a local tier the in-process
writer thread of saver.py writes durable snapshots.

Memory: the local snapshot being copied is pinned (retention keeps it), so while a copy runs the tier may
hold a third generation, when the file system has room for it (else the local snapshot waits for the copy). A writer that died (killed alone, out of memory)
loses that durable snapshot only: its debris is removed, a new writer takes the next one.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from elastictrain.dist import DistContext, all_gather_object, on_main_together, raise_together
from elastictrain.errors import UserError
from elastictrain.faults import FaultInjector
from elastictrain.snapshot import manifest
from elastictrain.snapshot.engines import AppState
from elastictrain.snapshot.nodecopy import Files, Nodes
from elastictrain.snapshot.saver import Saver
from elastictrain.snapshot.writer import WriterProcess, commit_copy
from elastictrain.state import TrainState

log = logging.getLogger(__name__)


class DurableCopier:
    """The durable tier's saver when the local tier is on (see the module doc); the same interface as Saver
    where the manager uses it (take, wait, writing, written, held_step, close).

    Args:
        keep: ``checkpoint.keep`` of the durable tier (retention runs in the writer, after its commit).
        ensure_local: creates the local tier before its first snapshot (the manager's, collective).
        nodes: the ranks' nodes, when there are several (a writer on every node leader; see the module doc).
    """

    def __init__(self, ctx: DistContext, root: Path, keep: int, local: Saver, ensure_local: Callable[[], None],
                 faults: FaultInjector | None, nodes: Nodes | None = None) -> None:
        self.ctx, self.root, self.keep, self.local = ctx, root, keep, local
        self.nodes = nodes if nodes is not None and nodes.several else None
        self.ensure_local = ensure_local
        self.faults = faults
        self.held_step = -1
        self._pending: dict[str, Any] | None = None
        """The durable snapshot whose local snapshot is not committed yet: handed over once it is."""
        self._copying = ""
        """Name of the snapshot handed to the writer and not yet waited for ('' for none), on every rank."""
        self._deaths = 0
        """Writers that died on consecutive jobs (one is a warning, two an error)."""
        self._record: dict[str, Any] | None = None
        """Rank 0, several nodes: the commit record of the copy in flight, written once every share is copied."""
        writes = ctx.is_main if self.nodes is None else self.nodes.is_leader
        self._writer = WriterProcess() if writes else None
        if self._writer is not None:
            self._writer.start()  # now, on the main thread (see WriterProcess.start), and off the first save

    @property
    def writing(self) -> bool:
        return self._pending is not None or bool(self._copying)

    @property
    def written(self) -> bool:
        """Handed over and copied (other ranks have nothing to wait for once it is handed over)."""
        return bool(self._copying) and (self._writer is None or not self._writer.busy)

    def take(self, app_state: AppState, state: TrainState, record: dict[str, Any], background: bool) -> str:
        """A durable snapshot of ``state``: the local snapshot of this step (taken now unless there is one),
        copied once it is committed; returns its name (once copied, unless ``background``)."""
        self.wait()
        name = manifest.snapshot_name(state.epoch, state.step)
        if self.local.held_step != state.step:
            self.ensure_local()
            # The durable record rides along: a rank killed before the copy finds it in what it restores.
            self.local.take(app_state, state, {**record, "tier": "rolling", "val_loss": None, "is_best": False,
                                               "where": "local", "durable": record}, background=True)
        self._pending = {"name": name, "step": state.step, "record": record, "started_at": time.time()}
        self.held_step = state.step
        if self.faults:
            self.faults.maybe_fire("saving", state.step)
        if not background:
            self.wait()
        return name

    def resume_copy(self, commit: dict[str, Any]) -> None:
        """After a restore from the local tier: a local snapshot that was to become durable and has no durable
        copy yet (the rank was killed between the two) is copied now."""
        name, record = commit.get("name"), commit.get("durable")
        if not isinstance(record, dict) or not isinstance(name, str):
            return
        if on_main_together(self.ctx, lambda: manifest.read_commit(self.root / name) is not None):
            return
        if self.ctx.is_main:
            log.info("snapshot %s: making the durable copy the last attempt did not finish", name)
        self._pending = {"name": name, "step": commit["step"], "record": record, "started_at": time.time()}
        self.held_step = commit["step"]
        self.hand_over()

    def before_local_snapshot(self, room_for_another: Callable[[], bool]) -> None:
        """Every rank, before a local snapshot: a copy that has finished is collected (its pinned local
        snapshot goes). One still running makes this a third generation in memory (the one being copied, the
        newest, this one): allowed while ``room_for_another`` (rank 0's file system keeps its safe margin),
        else this local snapshot waits for the copy. (Waiting always cost a step's worth of blocked loop per
        durable snapshot here: the copy takes about two steps.)"""
        if not self._copying or self.local.held_step <= manifest.parse_name(self._copying)[1]:
            return
        busy = self._writer is not None and self._writer.busy
        if self.nodes is None:
            if on_main_together(self.ctx, lambda: not busy or not room_for_another()):
                self.wait()
            return
        # Several nodes: collect once every copy is done, or wait where a busy copy leaves too little room.
        views = all_gather_object(self.ctx, (busy, busy and not room_for_another()))
        if not any(b for b, _ in views) or any(short for _, short in views):
            self.wait()

    def hand_over(self) -> None:
        """After the local snapshot of the pending step is committed (every rank): rank 0 gives the writer
        the job. Called right after the local tier's wait."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if self.local.lost == pending["name"]:  # its engine process died alone (saver.py said so)
            log.warning("durable snapshot %s not written: its local snapshot was lost", pending["name"])
            return
        assert self.local.held_step == pending["step"], (self.local.held_step, pending)
        self._copying = pending["name"]
        src, dst = self.local.root / pending["name"], self.root / pending["name"]
        share: list[str] | None = None
        local, held = _local_record(src) if self._writer is not None else (None, None)
        if self.nodes is not None:
            on_main_together(self.ctx, lambda: _make_room(dst))  # before any leader writes into it
            share = self._share_of(local, held)
        if self._writer is not None:
            assert local is not None, f"{src}: the local snapshot to copy is not committed"
            record = {k: v for k, v in local.items() if k not in ("record_sha256", "where", "durable")}
            record.update(pending["record"], started_at=pending["started_at"], copied_from="local")
            self._record = record if self.nodes is not None and self.ctx.is_main else None
            fault = self.faults.claim("writer", pending["step"]) if self.faults else None
            self.local.pinned = pending["name"]
            self._writer.submit({"src": str(src), "dst": str(dst), "record": record, "keep": self.keep,
                                 "fault": fault, "files": share, "commit": self.nodes is None})
        if self.faults:
            self.faults.maybe_fire("copy", pending["step"])

    def wait(self) -> None:
        """Block until the durable snapshot in flight (if any) is committed; its failure is raised on every
        rank (a full disk as the user's error); a writer that died loses this snapshot only (a warning)."""
        if self._pending is not None:
            self.local.wait()
            self.hand_over()
        if not self._copying:
            return
        name, self._copying = self._copying, ""
        error: BaseException | None = None
        answer = None
        if self._writer is not None:
            answer = self._writer.collect() or {"ok": False, "error": "no answer"}
            self.local.pinned = ""
        if self.nodes is not None:
            answer = self._all_copied(name, all_gather_object(self.ctx, answer))
        if self.ctx.is_main:
            assert answer is not None
            self._deaths = self._deaths + 1 if answer.get("died") else 0
            if self._deaths >= 2:  # not a stray kill: without durable snapshots the run must not go on silently
                manifest.remove_if_uncommitted(self.root / name)
                error = RuntimeError(f"snapshot {self.root / name} failed: {answer['error']}, the second writer "
                                     f"in a row")
            elif answer.get("died"):
                log.warning("durable snapshot %s not written: %s; it stays incomplete (removed), a new writer "
                            "process takes the next one", name, answer["error"])
                manifest.remove_if_uncommitted(self.root / name)
            elif not answer["ok"]:
                error = self._failure(name, answer)
            else:
                by = "the writer process" if self.nodes is None else \
                    f"the writer processes of {len(self.nodes.leaders)} nodes"
                log.info("snapshot %s committed (copied from the local tier by %s in %.2fs)", name, by,
                         answer["seconds"])
                for removed in answer["removed"]:
                    log.info("retention: removed rolling snapshot %s", removed)
        if self._writer is not None:
            # The copy is done: the older local snapshot it kept from retention goes now (two generations).
            manifest.apply_retention(self.local.root, 1)
        raise_together(self.ctx, error)
        if self.faults:
            self.faults.maybe_fire("saved", manifest.parse_name(name)[1])

    def _share_of(self, local: dict[str, Any] | None, held: list[str] | None) -> list[str] | None:
        """Every rank (collective): the files of the local snapshot (on a leader: its record and the files its
        node holds) this node leader's writer copies (None elsewhere). Each file goes to a leader whose memory
        holds it, the largest first to the least loaded."""
        assert self.nodes is not None
        mine = (local["files"] if local is not None else None, held) if self.nodes.is_leader else None
        views: list[tuple[Files | None, list[str] | None] | None] = all_gather_object(self.ctx, mine)
        leaders = [v for v in views if v is not None]
        if any(v[0] is None for v in leaders):  # a node lost its copy: every share is empty, the commit fails
            return [] if self.nodes.is_leader else None
        shares = split_shares(leaders[0][0], [set(v[1] or ()) for v in leaders])  # type: ignore[arg-type]
        return shares[self.nodes.leaders.index(self.nodes.rank)] if self.nodes.is_leader else None

    def _all_copied(self, name: str, answers: list[dict[str, Any] | None]) -> dict[str, Any]:
        """Several nodes, every rank: the leaders' answers as one (the first death or failure, on every rank
        alike); when every share was copied, rank 0 commits it (commit_copy: sizes checked, record last)."""
        given = [a for a in answers if a is not None]
        bad = next((a for a in given if a.get("died")), None) or next((a for a in given if not a["ok"]), None)
        if bad is not None:
            return bad
        if not self.ctx.is_main:
            return {"ok": True}
        record, self._record = self._record, None
        assert record is not None
        start = time.time()
        try:
            if not set().union(*(a.get("copied", ()) for a in given)) >= set(record["files"]):
                raise ValueError(f"{self.root / name}: some of its files were copied by no node (a node lost its "
                                 "local copy); not committed")
            done = commit_copy(self.root / name, record, start, self.keep)
        except (OSError, ValueError, KeyError) as e:
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return {**done, "seconds": round(max(a["seconds"] for a in given) + done["seconds"], 4)}

    def _failure(self, name: str, answer: dict[str, Any]) -> BaseException:
        manifest.remove_if_uncommitted(self.root / name)
        if answer.get("enospc"):
            free = shutil.disk_usage(self.root).free
            return UserError(f"snapshot {self.root / name}: no space left on device ({manifest.human_size(free)} "
                             f"free in {self.root}); the incomplete snapshot is removed, earlier snapshots are kept. "
                             "Free space there (or lower --checkpoint.keep) and start again")
        return RuntimeError(f"snapshot {self.root / name} failed: {answer['error']}")

    def close(self, timeout: float = 30.0) -> None:
        """Give a copy in flight ``timeout`` seconds (no collective: close also runs when the run fails); an
        unfinished copy is never committed (the writer is killed, its debris has no commit record)."""
        if self._writer is None:
            return
        if self._copying and self._writer.collect(timeout) is None and self._writer.busy:
            log.warning("snapshot %s still being copied at exit; it stays incomplete", self._copying)
        self._writer.stop(timeout=1.0 if self._writer.busy else timeout)
        self._writer = None


def split_shares(files: Files, held: list[set[str]]) -> list[list[str]]:
    """Which files each of the nodes (their ``held`` file names, in leader order) copies: each file to a node
    that holds it, the largest first, each to the holder with the fewest bytes so far (ties: the first). A
    file no node holds goes to none (the commit then fails)."""
    load = [0] * len(held)
    shares: list[list[str]] = [[] for _ in held]
    for rel, entry in sorted(files.items(), key=lambda e: (-e[1]["size"], e[0])):
        holders = [i for i, h in enumerate(held) if rel in h]
        if holders:
            i = min(holders, key=lambda j: (load[j], j))
            shares[i].append(rel)
            load[i] += entry["size"]
    return shares


def _local_record(path: Path) -> tuple[dict[str, Any] | None, list[str] | None]:
    """A local snapshot's commit record and the files this node holds: every file of a complete one, those of
    a part (PART.json); (None, None) when it has neither."""
    record = manifest.read_commit(path)
    if record is not None:
        return record, list(record["files"])
    part, _ = manifest.load_part(path)
    return (part["record"], list(part["held"])) if part is not None else (None, None)


def _make_room(dst: Path) -> None:
    """Rank 0, several nodes: DST, empty, for the leaders' shares (debris of a cut-off copy goes; a complete
    or damaged snapshot there is moved aside, never deleted)."""
    manifest.make_room(dst)
    dst.mkdir(parents=True)

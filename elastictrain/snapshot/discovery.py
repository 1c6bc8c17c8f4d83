"""Which snapshot a start-up restores: discovery of the newest intact one, the lineage of
``--checkpoint.resume_from``, and moving snapshots aside (damaged, or of an abandoned branch).

Rank 0's file operations on RUN_DIR/snapshots, with no collectives: the restorer runs them on rank 0 and
shares the outcome (``dist.on_main_together``), so a failure here is raised on every rank at once.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from elastictrain.errors import UserError
from elastictrain.snapshot import manifest
from elastictrain.snapshot.manifest import Snapshot

log = logging.getLogger(__name__)

Lineage = tuple[str, str]
"""(identity, resolved path) of the snapshot a lineage started from with ``--checkpoint`` ('' for none)."""
Choice = tuple[Snapshot, Lineage]
"""The snapshot to restore and its lineage."""


def choose(root: Path, resume_from: str, verify: bool) -> Choice | None:
    """The snapshot to restore, or None for a fresh start."""
    root.mkdir(parents=True, exist_ok=True)
    if resume_from:
        return choose_given(root, Path(resume_from), verify)
    snap = newest_intact(root)
    return None if snap is None else (snap, lineage(snap.commit))  # type: ignore[arg-type]


def newest_intact(root: Path) -> Snapshot | None:
    """The newest complete snapshot that verifies; on the way, incomplete ones are removed (debris of a
    cut-off write; a node's partial copy is not debris) and damaged ones moved aside."""
    for snap in manifest.list_snapshots(root):
        if snap.damaged:
            move_aside(snap.path, "damaged", snap.problem or "")
            continue
        if snap.part is not None:  # a node's partial copy: completed at a restore (nodecopy.assemble)
            continue
        if not snap.complete:
            log.warning("ignoring incomplete snapshot %s (no commit record); removing it", snap.path)
            shutil.rmtree(snap.path, ignore_errors=True)
            continue
        # Sizes and the file list now (truncation is the usual damage); the checksums are hashed while the
        # engine reads, on other threads (see restorer.py).
        problem = snap.verify(checksums=False)
        if problem is None:
            return snap
        move_aside(snap.path, "damaged", problem)
    return None


def move_aside(path: Path, why: str, problem: str) -> None:
    """Rename a snapshot to NAME.WHY-TIME, kept for a human to look at (never deleted here)."""
    aside = path.with_name(f"{path.name}.{why}-{int(time.time())}")
    if why == "damaged":
        log.error("snapshot %s is damaged: %s; moved to %s and falling back to the previous one",
                  path.name, problem, aside.name)
    path.rename(aside)


def choose_given(root: Path, path: Path, verify: bool) -> Choice:
    """``--checkpoint PATH``: the starting point of a lineage, once. Kept in an sbatch script or a torchrun
    command, it must not rewind every restart: when the run directory's newest intact snapshot descends
    from PATH, continue from that one. Otherwise PATH it is (or an error, never a silent fallback), and
    newer snapshots of the branch being abandoned are moved aside (not deleted), or discovery and retention
    would mistake them for this run's newest."""
    # The lineage first: retention may have deleted PATH since this run continued from it.
    given, given_path = Snapshot.at(path), str(path.resolve())
    newest = newest_intact(root)
    if newest is not None and newest.path.resolve() != path.resolve() \
            and descends(newest.commit, given.commit, given_path):  # type: ignore[arg-type]
        log.info("--checkpoint.resume_from %s: this run already continued from it; continuing from its newest "
                 "snapshot %s", path, newest.name)
        return newest, lineage(newest.commit)  # type: ignore[arg-type]
    if given.commit is None:
        raise UserError(f"--checkpoint.resume_from: {path} is not a complete snapshot "
                        f"({given.problem or f'no {manifest.COMMIT}'})")
    origin = manifest.snapshot_id(given.commit)
    problem = verified(given, verify)
    if problem:
        raise UserError(f"--checkpoint.resume_from: snapshot is damaged: {problem}")
    order = (given.commit["step"], given.commit["epoch"])
    for snap in manifest.list_snapshots(root):
        if snap.order > order and snap.path.resolve() != path.resolve():
            log.warning("resuming from the older %s: moving the newer snapshot %s aside", path, snap.name)
            move_aside(snap.path, "superseded", "")
    return given, (origin, given_path)


def lineage(commit: dict[str, Any]) -> Lineage:
    """The lineage a committed snapshot continues (see :data:`Lineage`)."""
    return commit.get("branch_from", ""), commit.get("branch_from_path", "")


def descends(newest: dict[str, Any], given: dict[str, Any] | None, given_path: str) -> bool:
    """Does the snapshot ``newest`` continue a lineage started from ``--checkpoint`` PATH? By PATH's identity
    while PATH is there, by where it was once retention has deleted it."""
    if given is not None:
        return newest.get("branch_from") == manifest.snapshot_id(given)
    return bool(newest.get("branch_from_path")) and newest.get("branch_from_path") == given_path


def verified(snap: Snapshot, verify: bool) -> str | None:
    """The manifest check of ``snap`` when ``verify`` (on by default: ~1.2 GB/s here, see
    bench/bench_snapshots.py): None when intact, else what is wrong."""
    if not verify:
        return None
    start = time.perf_counter()
    problem = snap.verify()
    if problem is None:
        log.info("verified snapshot %s: %d files, %s in %.2fs", snap.name, len(snap.commit["files"]),  # type: ignore[index]
                 manifest.human_size(snap.size), time.perf_counter() - start)
    return problem

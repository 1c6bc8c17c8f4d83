"""Snapshots read with no training job, for ``elastictrain ckpt``: world size 1 on CPU, no process group,
whatever world size and engine wrote them. Reads are proven like a training restore (proof.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from elastictrain.snapshot import manifest, proof
from elastictrain.snapshot.appstate import JsonState, ModelState
from elastictrain.dist import DistContext, world_of_one
from elastictrain.snapshot.engines import EngineReadError, build_engine
from elastictrain.snapshot.manifest import Snapshot, SnapshotDamaged
from elastictrain.state import TrainState


def standalone_context() -> DistContext:
    """World size 1 on CPU with no process group: both engines read any snapshot this way."""
    return world_of_one()


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
        SnapshotDamaged: damaged; the message names the file.
        ValueError: incomplete (no commit record).
    """
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such snapshot directory")
    snap = Snapshot.at(path)
    if snap.commit is None:
        if snap.problem:
            raise SnapshotDamaged(f"{path}: snapshot is damaged: {snap.problem}")
        raise ValueError(f"{path}: not a complete snapshot (no {manifest.COMMIT}); refusing to read it")
    problem = snap.verify() if verify else None
    if problem:
        raise SnapshotDamaged(f"{path}: snapshot is damaged: {problem}")
    return snap.commit


def read_proven(path: Path, commit: dict[str, Any], app_state: dict[str, Any]) -> None:
    """Read ``app_state`` (a subset of what was saved) from the snapshot and prove every entry was read.

    Raises:
        SnapshotDamaged: the engine failed, or an entry does not hold what was saved; the message says which.
    """
    try:
        build_engine(commit["engine"]).read(path, app_state, standalone_context())
    except EngineReadError as e:
        raise SnapshotDamaged(f"{path}: snapshot is damaged: {e}") from None
    if "entries" in commit:
        complete, partial = proof.local_record({k: v.state_dict() for k, v in app_state.items()})
        problems = proof.differences(commit["entries"], proof.combine(complete, [partial]),
                                     only=tuple(f"{k}/" for k in app_state))
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise SnapshotDamaged(f"{path}: snapshot is damaged: {'; '.join(problems[:3])}{more}")


def read_snapshot_state(path: Path, commit: dict[str, Any]) -> TrainState:
    """Only the TrainState (counters, history, config) of a snapshot, through its own engine."""
    state = TrainState()
    read_proven(path, commit, {"train": JsonState(state)})
    return state


def load_snapshot_model(path: Path, verify: bool = True) -> tuple[torch.nn.Module, TrainState]:
    """The model of a snapshot, built from the config stored in it, with its weights proven read."""
    from elastictrain.config import from_dict
    from elastictrain.model import build_model

    commit = open_snapshot(path, verify)
    state = read_snapshot_state(path, commit)
    cfg = from_dict(state.config)
    cfg.model.encoder_weights = None  # the snapshot holds the weights; never download any
    model = build_model(cfg.model, cfg.data.num_classes)
    read_proven(path, commit, {"model": ModelState(model)})
    return model, state


CleanStep = tuple[Path, bool, str, str]
"""(path, delete?, tier, why): one line of ``ckpt clean``'s plan."""


def clean_plan(root: Path, delete: frozenset[str] = frozenset()) -> list[CleanStep]:
    """What ``ckpt clean`` would do, as (path, delete?, tier, why), newest first.

    Never deleted: the newest complete snapshot that verifies (a resume starts there; newer damaged ones are
    left for the resume to move aside), incomplete ones newer than every complete one (a running job may be
    writing them). Not deleted unless ``delete`` names their kind ('permanent', 'best', 'damaged'): permanent
    and best snapshots, wherever they are (moved aside by a rewind too), and damaged ones. Deleted: other
    rolling snapshots, older incomplete ones, and rolling snapshots a rewind moved aside (superseded)."""
    snapshots = manifest.list_snapshots(root)
    best = manifest.best_snapshot(snapshots)
    newest_complete = next((s.order for s in snapshots if s.complete), None)
    resume_point = False
    plan: list[CleanStep] = []
    kept_kind = _kept_kind(plan, delete)
    for snap in snapshots:
        if snap.damaged:
            kept_kind("damaged", f"damaged: {snap.problem}", snap.path, "damaged")
        elif not snap.complete:
            in_flight = newest_complete is None or snap.order > newest_complete
            plan.append((snap.path, not in_flight, "incomplete", "may still be being written" if in_flight
                         else "no commit record: cut off mid-write"))
        elif not resume_point:
            problem = snap.verify()
            resume_point = problem is None
            plan.append((snap.path, False, snap.tier, "newest complete: a resume starts here" if resume_point
                         else f"damaged, left for a resume to move aside: {problem}"))
        elif snap.tier == "permanent":
            kept_kind("permanent", "permanent", snap.path, snap.tier)
        elif best is not None and snap.name == best.name:
            kept_kind("best", f"best (val loss {snap.commit['val_loss']:.4f})", snap.path, snap.tier)
        else:
            plan.append((snap.path, True, snap.tier, "rolling, older than the newest kept"))
    return plan + _aside_plan(root, delete)


def _kept_kind(plan: list[CleanStep], delete: frozenset[str]) -> Callable[[str, str, Path, str], None]:
    """Adds to ``plan`` a snapshot of a kind kept unless ``delete`` names it, saying which flag deletes it."""

    def kept_kind(kind: str, why: str, path: Path, tier: str) -> None:
        flag = f"--delete-{kind}"
        plan.append((path, kind in delete, tier, why if kind in delete else f"{why}; {flag} to delete"))

    return kept_kind


def _aside_plan(root: Path, delete: frozenset[str]) -> list[CleanStep]:
    """The plan for snapshots moved aside (damaged, or superseded by a rewind)."""
    plan: list[CleanStep] = []
    kept_kind = _kept_kind(plan, delete)
    for path, why in manifest.aside_dirs(root):
        commit = manifest.read_commit(path) or {}
        tier = commit.get("tier", "unknown")
        if why == "damaged":
            kept_kind("damaged", "moved aside as damaged", path, tier)
        elif tier == "permanent" or commit.get("is_best"):
            kind = "permanent" if tier == "permanent" else "best"
            kept_kind(kind, f"moved aside by a rewind ({why}), {kind}", path, tier)
        elif not commit:
            kept_kind("damaged", f"moved aside by a rewind ({why}), no readable commit record", path, tier)
        else:
            plan.append((path, True, tier, f"moved aside by a rewind ({why})"))
    return plan

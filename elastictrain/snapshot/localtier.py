"""The node-local snapshot tier: where it lives, whether it may be used, which of its snapshots every rank
can read, and its removal.

Layout: BASE/RUN_ID/ (BASE = ``checkpoint.local_dir``, by default /dev/shm/elastictrain-UID), holding
OWNER.json (which run directory it belongs to) and snapshots/ (the same snapshot directories and commit
records as RUN_DIR/snapshots). RUN_ID is a random id kept in RUN_DIR/local_tier.json, so a snapshot of
another run (a new run directory, a deleted and re-created one) is never read; a copied run directory
finds its id's tier owned by the original and runs without a local tier. BASE and
RUN_ID are owner-only (0700) and must belong to this user: another user's files are never read.

A local snapshot is only as good as every rank's view of it: each rank lists the complete snapshots it
sees, and the newest one that every rank sees is the candidate (agreed_newest). On one node all ranks
share the directory; on several nodes every node holds its own ranks' files and its predecessor's
(nodecopy.py: with two nodes that is a whole copy, with more a part, completed from the others' parts at a
restore), and a node that lacks the newest one receives it from a node that has it before the views are
compared.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastictrain.osutil import write_json_atomic
from elastictrain.snapshot import manifest
from elastictrain.snapshot.manifest import Snapshot

log = logging.getLogger(__name__)

ID_FILE = "local_tier.json"
"""In the run directory: the id that keys this run's local tier."""
OWNER = "OWNER.json"
SAFE_MARGIN_BYTES = 64 * 2**20
"""What a local snapshot must leave free on its file system (memory: /dev/shm is the node's RAM)."""


def default_base() -> Path | None:
    """/dev/shm/elastictrain-UID on a system that has /dev/shm (Linux); None elsewhere (a Mac)."""
    shm = Path("/dev/shm")
    return shm / f"elastictrain-{os.getuid()}" if shm.is_dir() else None


def base_dir(local_dir: str) -> tuple[Path | None, str]:
    """(BASE, '') for the setting, or (None, why the tier is off)."""
    if local_dir == "none":
        return None, "--checkpoint.local_dir none"
    if local_dir == "auto":
        base = default_base()
        return (base, "") if base is not None else (None, "no /dev/shm on this system (--checkpoint.local_dir "
                                                          "names a node-local directory to use instead)")
    return Path(local_dir), ""


def private_dir(path: Path, create: bool) -> str | None:
    """Check that ``path`` is a real directory of this user (created owner-only when ``create``; a missing
    one is fine otherwise); None when usable, else why not. (An existing one is tightened to 0700.)"""
    try:
        if create:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif not os.path.lexists(path):
            return None
        st = path.lstat()
    except OSError as e:
        return f"cannot create {path}: {e.strerror or e}"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory of its own (a link?)"
    if st.st_uid != os.getuid():
        return f"{path} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return None


def run_id(run_dir: Path) -> str:
    """Rank 0: this run directory's local-tier id, created on first use. (A copied run directory keeps the
    id, but the tier's OWNER.json names the original: :func:`place` then turns the copy's local tier off.)"""
    path = run_dir / ID_FILE
    try:
        return str(json.loads(path.read_text())["id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    new = uuid.uuid4().hex[:16]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"id": new})
    return new


def owner_of(tier: Path) -> dict[str, Any]:
    """A tier's OWNER.json ({} when unreadable)."""
    try:
        data = json.loads((tier / OWNER).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@dataclass
class Placement:
    """Where this rank's local tier is, or why it is off."""

    root: Path | None
    """BASE/RUN_ID/snapshots, or None when off."""
    why_off: str = ""


def place(local_dir: str, run_dir: Path, tier_id: str, state_bytes: int, ranks_here: int) -> Placement:
    """Every rank: where this run's local tier is, if BASE and BASE/RUN_ID are this user's (or do not exist
    yet: they are created at the first local snapshot, see :func:`create`), are not another run directory's,
    and there is room for two generations of the state of this node's ranks plus the safe margin."""
    base, why = base_dir(local_dir)
    if base is None:
        return Placement(None, why)
    tier = base / tier_id
    problem = private_dir(base, create=False) or private_dir(tier, create=False)
    if problem:
        return Placement(None, problem)
    owner = owner_of(tier).get("run_dir")
    if owner is not None and owner != str(run_dir.resolve()):
        return Placement(None, f"{tier} belongs to run directory {owner}")
    existing = next((p for p in (tier, base, *base.parents) if p.is_dir()), Path("/"))
    need = 2 * state_bytes * ranks_here + SAFE_MARGIN_BYTES
    free = shutil.disk_usage(existing).free
    if free < need:
        return Placement(None, f"{base} has {manifest.human_size(free)} free, less than two generations of this "
                               f"node's state and a safe margin ({manifest.human_size(need)})")
    return Placement(tier / "snapshots")


def create(root: Path, run_dir: Path) -> None:
    """Before the first local snapshot: BASE, BASE/RUN_ID (owner-only) with OWNER.json, and ROOT."""
    tier = root.parent
    problem = private_dir(tier.parent, create=True) or private_dir(tier, create=True)
    if problem:
        raise RuntimeError(f"local snapshot tier: {problem}")
    if not (tier / OWNER).exists():
        write_json_atomic(tier / OWNER, {"run_dir": str(run_dir.resolve()), "id": tier.name, "created": time.time()})
    root.mkdir(mode=0o700, exist_ok=True)


def has_room(root: Path, state_bytes: int) -> bool:
    """Would one more snapshot of this rank still leave the safe margin free?"""
    existing = next((p for p in (root, *root.parents) if p.is_dir()), Path("/"))
    return shutil.disk_usage(existing).free >= state_bytes + SAFE_MARGIN_BYTES


def complete_ids(root: Path) -> dict[str, tuple[int, int]]:
    """This rank's view: {snapshot id: order} of the complete local snapshots whose files are all there."""
    found = {}
    for snap in manifest.list_snapshots(root):
        if snap.complete and snap.verify(checksums=False) is None:
            found[manifest.snapshot_id(snap.commit)] = snap.order  # type: ignore[arg-type]
    return found


def agreed_newest(root: Path, views: list[dict[str, tuple[int, int]]]) -> Snapshot | None:
    """The newest local snapshot in every rank's view (``views``, one per rank), or None."""
    common = set(views[0]).intersection(*views[1:])
    if not common:
        return None
    best = max(common, key=lambda i: (views[0][i], i))
    return next(s for s in manifest.list_snapshots(root) if s.complete
                and manifest.snapshot_id(s.commit) == best)  # type: ignore[arg-type]


def remove_tier(root: Path) -> None:
    """A finished run's local tier (BASE/RUN_ID) is removed at its end."""
    shutil.rmtree(root.parent, ignore_errors=True)
    log.info("removed the local snapshot tier %s (the run finished)", root.parent)


def other_tiers(base: Path, tier_id: str) -> list[tuple[Path, str, bool]]:
    """Tiers under ``base`` of other runs, as (path, whose it is, stale?): stale when its run directory is
    gone or no longer uses it (a re-created or copied run directory), or it has no owner record."""
    found: list[tuple[Path, str, bool]] = []
    if not base.is_dir():
        return found
    for tier in sorted(base.iterdir()):
        if tier.name == tier_id or not tier.is_dir():
            continue
        owner = owner_of(tier).get("run_dir")
        if owner is None:
            found.append((tier, "no owner record", True))
            continue
        try:
            uses = json.loads((Path(owner) / ID_FILE).read_text()).get("id") == tier.name
        except (OSError, ValueError, AttributeError):
            uses = False
        found.append((tier, f"of run directory {owner}" + ("" if uses else ", which no longer uses it"), not uses))
    return found


def of_run(run_dir: Path, local_dir: str | None = None) -> tuple[Path | None, str]:
    """Offline (``ckpt``): (BASE, RUN_ID) of a run directory: BASE from ``local_dir`` or the run's
    config.yaml (default 'auto'); RUN_ID '' when the run never had a local tier."""
    import yaml

    if local_dir is None:
        try:
            saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
            local_dir = str(saved.get("checkpoint", {}).get("local_dir", "auto"))
        except (OSError, yaml.YAMLError, AttributeError):
            local_dir = "auto"
    base, _ = base_dir(local_dir)
    try:
        tier_id = str(json.loads((run_dir / ID_FILE).read_text())["id"])
    except (OSError, ValueError, KeyError, TypeError):
        tier_id = ""
    return base, tier_id

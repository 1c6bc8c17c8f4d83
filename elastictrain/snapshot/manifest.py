"""What is on disk: snapshot naming, the commit record with its checksum manifest, discovery, verification.

A snapshot directory counts as COMPLETE only when ``COMMIT.json`` exists in it and parses. The commit
record is written after every rank finished writing, atomically (temp file, fsync, rename, fsync of the
directory), and lists a SHA-256 and size for every file of the snapshot and (format 2) a fingerprint of
every entry (see proof.py). A directory without the record is incomplete (cut off mid-write); one whose
record exists but does not parse is damaged (a complete snapshot whose record was hurt afterwards): it
is moved aside, never deleted. On three nodes or more, a node's copy of a local snapshot may hold only part
of its files (nodecopy.py): ``PART.json`` (the whole snapshot's commit record and the files held) marks that
part as written; it is never complete, never debris (a part that does not hold what its PART.json says is
damaged), and becomes a complete snapshot only when the files it lacks are received at a restore. Nothing here needs a process group: these are pure file operations,
unit-tested on their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastictrain.osutil import fsync_dir, write_json_atomic

COMMIT = "COMMIT.json"
PART = "PART.json"
"""In a node's partial copy of a local snapshot, instead of COMMIT (see the module doc)."""
BEST = "BEST.json"
FORMAT = 2
FORMATS = (1, 2)
"""Format 1 has no entry fingerprints (its restores are checked by checksums only)."""
_NAME = re.compile(r"^epoch(?P<epoch>\d+)-step(?P<step>\d+)$")
_ASIDE = re.compile(r"^epoch\d+-step\d+\.(?P<why>damaged|superseded)-\d+$")


class SnapshotDamaged(ValueError):
    """A complete snapshot that cannot be read: its files are not the ones committed, its commit record is
    hurt, or an entry does not hold what was saved. A resume moves it aside and tries the previous one."""


def snapshot_name(epoch: int, step: int) -> str:
    return f"epoch{epoch:05d}-step{step:08d}"


def is_snapshot_name(name: str) -> bool:
    return _NAME.match(name) is not None


def parse_name(name: str) -> tuple[int, int]:
    """(epoch, step) of a snapshot directory name."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a snapshot name like {snapshot_name(3, 120)!r}")
    return int(m["epoch"]), int(m["step"])


@dataclass
class Snapshot:
    """One snapshot directory and its commit record: what discovery, retention, restore and ``ckpt`` see."""

    path: Path
    commit: dict[str, Any] | None
    """The parsed commit record, or None when the snapshot is incomplete or its record is damaged."""
    problem: str | None = None
    """Why the commit record is unusable although it exists (the snapshot is damaged), else None."""
    part: dict[str, Any] | None = None
    """A node's partial copy (no commit record): {"record": the whole snapshot's, "held": [files here]}."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def complete(self) -> bool:
        return self.commit is not None

    @property
    def order(self) -> tuple[int, int]:
        epoch, step = parse_name(self.name)
        return step, epoch

    @property
    def damaged(self) -> bool:
        return self.problem is not None

    @property
    def tier(self) -> str:
        if self.problem is not None:
            return "damaged"
        record = self.commit or (self.part or {}).get("record")
        return record["tier"] if record else "incomplete"

    @classmethod
    def at(cls, path: Path) -> Snapshot:
        """The snapshot in directory ``path``, complete or not."""
        commit, problem = _load_commit(Path(path))
        part, problem = load_part(Path(path)) if commit is None and problem is None else (None, problem)
        return cls(Path(path), commit, problem, part)

    @property
    def engine(self) -> str:
        """The engine that wrote it (a complete snapshot's record names it; a restore reads with that one)."""
        return self.commit["engine"]  # type: ignore[index]

    @property
    def size(self) -> int:
        """Bytes of its files, as committed."""
        return sum(f["size"] for f in self.commit["files"].values())  # type: ignore[index]

    def verify(self, checksums: bool = True) -> str | None:
        """None when a complete snapshot's files are exactly the committed ones (see :func:`verify`), else
        what is wrong, naming the file."""
        from elastictrain.snapshot.engines import ENGINES

        return verify(self.path, self.commit, ENGINES[self.engine].marker, checksums)  # type: ignore[arg-type]


def snapshot_id(commit: dict[str, Any]) -> str:
    """A snapshot's identity, stable when its directory is copied or moved (format 1 had no ``id``)."""
    return commit.get("id") or f"{commit.get('name')}@{commit.get('committed_at')}"


def file_digest(path: Path, fsync: bool = False) -> str:
    """SHA-256 of a file (about 1.3 GB/s here); optionally fsync it first so the commit outlives a crash."""
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        return hashlib.file_digest(f, "sha256").hexdigest()


def data_files(snapshot: Path) -> list[Path]:
    """Every file the engine wrote, excluding our own commit record and temp files."""
    out = []
    for root, _, files in os.walk(snapshot):
        for name in files:
            if name in (COMMIT, PART) or name.startswith((f".{COMMIT}.tmp", f".{PART}.tmp")):
                continue
            out.append(Path(root) / name)
    return sorted(out)


def write_commit(snapshot: Path, info: dict[str, Any], files: dict[str, Any] | None = None,
                 checksum_seconds: float | None = None) -> dict[str, Any]:
    """Checksum every file (fsyncing it), then atomically write the commit record that makes it complete.
    ``files`` (with ``checksum_seconds``): checksums made already, by :func:`checksum_files` elsewhere (the
    snapshot engine process)."""
    start = time.time()
    if files is None:
        files = checksum_files(snapshot)
        checksum_seconds = time.time() - start
    record = commit_record(info, files, checksum_seconds or 0.0)
    write_json_atomic(snapshot / COMMIT, record)
    return record


def commit_record(info: dict[str, Any], files: dict[str, dict[str, Any]], checksum_seconds: float) -> dict[str, Any]:
    """The commit record of a snapshot with ``files`` (checksummed in ``checksum_seconds``), sealed by its own
    digest."""
    record = {"format": FORMAT, **info, "files": files, "committed_at": time.time(),
              "checksum_seconds": round(checksum_seconds or 0.0, 4)}
    record["record_sha256"] = record_digest(record)
    return record


def checksum_files(snapshot: Path) -> dict[str, dict[str, Any]]:
    """Every data file's size and SHA-256, each fsynced, and the directory: the commit record's ``files``."""
    files = {str(p.relative_to(snapshot)): {"size": p.stat().st_size, "sha256": file_digest(p, fsync=True)}
             for p in data_files(snapshot)}
    fsync_dir(snapshot)
    return files


def record_digest(record: dict[str, Any]) -> str:
    """SHA-256 of the record itself (all but this field): a changed manifest or entry list is damage too."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_commit(snapshot: Path) -> dict[str, Any] | None:
    """The commit record, or None when it is missing or unusable (see :func:`commit_problem`)."""
    return _load_commit(snapshot)[0]


def commit_problem(snapshot: Path) -> str | None:
    """Why an existing commit record cannot be used, or None (it is fine, or there is none)."""
    return _load_commit(snapshot)[1]


def load_part(snapshot: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A node's partial copy (see the module doc): ({"record", "held"}, None); (None, None) when there is no
    PART.json; (None, why) when it cannot be used: its record must pass every check a commit record does, and
    the files it holds must be the record's, regular files there with their sizes. Such a part is damaged
    (moved aside, like a snapshot with a damaged commit record), never deleted."""
    path = snapshot / PART
    try:
        if not stat.S_ISREG(path.lstat().st_mode):  # a FIFO would block the read
            return None, f"{path}: not a regular file"
        part = json.loads(path.read_bytes().decode("utf-8"))
        record, held = part["record"], part["held"]
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, TypeError, KeyError) as e:
        return None, f"{path}: unreadable ({e!r})"
    problem = check_record(path, record) or record_name_problem(snapshot, record)
    if problem:
        return None, problem
    if not isinstance(held, list) or not all(isinstance(rel, str) and rel in record["files"] for rel in held):
        return None, f"{path}: lists files held that are not the snapshot's"
    for rel in held:
        problem = _regular_file_problem(snapshot, rel)
        if problem is None and (snapshot / rel).lstat().st_size != record["files"][rel]["size"]:
            problem = f"{snapshot / rel}: not the {record['files'][rel]['size']} bytes committed"
        if problem:
            return None, problem
    return {"record": record, "held": held}, None


def is_uncommitted(snapshot: Path) -> bool:
    """No commit record at all: the debris of a write that was cut off (a damaged record is not debris; a
    node's partial copy counts as uncommitted here: it is never complete)."""
    return _load_commit(snapshot) == (None, None)


def remove_if_uncommitted(snapshot: Path) -> None:
    """Give back the space of a write that did not finish; a committed or damaged snapshot is never touched."""
    import shutil

    if is_uncommitted(snapshot):
        shutil.rmtree(snapshot, ignore_errors=True)


def make_room(snapshot: Path) -> Path | None:
    """Room for a new snapshot at ``snapshot``: debris of an earlier attempt is removed; a complete or damaged
    one of that name (an abandoned branch: we resumed from an older snapshot on purpose) is moved aside,
    never deleted. Returns where it was moved, or None."""
    import shutil

    if not snapshot.exists():
        return None
    if is_uncommitted(snapshot):
        shutil.rmtree(snapshot)
        return None
    aside = snapshot.with_name(f"{snapshot.name}.superseded-{int(time.time())}")
    snapshot.rename(aside)
    return aside


def _load_commit(snapshot: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = snapshot / COMMIT
    try:
        if not stat.S_ISREG(path.lstat().st_mode):  # a FIFO would block the read, a symlink leads anywhere
            return None, f"{path}: not a regular file"
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"{path}: unreadable ({e})"
    except UnicodeDecodeError as e:
        return None, f"{path}: not UTF-8 (byte {e.start})"
    try:
        record = json.loads(text)
    except ValueError as e:
        return None, f"{path}: not valid JSON ({e})"
    problem = check_record(path, record)
    return (None, problem) if problem else (record, None)


def check_record(path: Path, record: Any) -> str | None:
    """Why ``record`` (read from ``path``) is not a usable commit record, or None."""
    if not isinstance(record, dict) or record.get("format") not in FORMATS or not isinstance(record.get("files"), dict):
        return f"{path}: not a commit record of a known format ({', '.join(map(str, FORMATS))})"
    bad = next((rel for rel, entry in record["files"].items() if not _plain_entry(rel, entry)), None)
    if bad is not None:
        return f"{path}: lists {bad!r}, not a file inside the snapshot with a size and a checksum"
    if "record_sha256" in record and record["record_sha256"] != record_digest(record):
        return f"{path}: checksum mismatch (the commit record was changed after it was written)"
    if record.get("format", 1) >= 2 and "record_sha256" not in record:
        return f"{path}: no checksum of its own (the commit record was changed after it was written)"
    return None


def _plain_entry(rel: str, entry: Any) -> bool:
    """A manifest entry names a relative path inside the snapshot (no '..', not absolute) with its size and
    SHA-256; anything else would have verification read outside the snapshot."""
    parts = Path(rel).parts
    return (bool(parts) and not Path(rel).is_absolute() and ".." not in parts and "\0" not in rel
            and isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str))


def record_name_problem(snapshot: Path, record: dict[str, Any]) -> str | None:
    """Why a commit record does not belong to the directory it is in (renamed: ordered by its name, it would
    be resumed, counted best and rolling as another snapshot), or None. Only for directories named like a
    snapshot; one copied elsewhere under another name is read by its record alone."""
    if not is_snapshot_name(snapshot.name):
        return None
    epoch, step = parse_name(snapshot.name)
    said = (record.get("name"), record.get("epoch"), record.get("step"))
    if said != (snapshot.name, epoch, step):
        return (f"{snapshot / COMMIT}: records snapshot {said[0]!r} (epoch {said[1]}, step {said[2]}), not "
                f"{snapshot.name} (renamed?)")
    return None


def _regular_file_problem(snapshot: Path, rel: str) -> str | None:
    """A manifest entry must be a regular file inside the snapshot: a symlink (to /dev/zero: hashing never
    ends), a special file or a path leading out (through a linked folder) is damage, never opened."""
    path = snapshot / rel
    try:
        mode = path.lstat().st_mode
        inside = path.resolve().is_relative_to(snapshot.resolve())
    except FileNotFoundError:
        return f"{path}: missing"
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        return f"{path}: unreadable ({e})"
    if stat.S_ISLNK(mode):
        return f"{path}: a symbolic link, not a file of the snapshot"
    if not inside:
        return f"{path}: outside the snapshot (through a symbolic link)"
    if not stat.S_ISREG(mode):
        return f"{path}: not a regular file"
    return None


def verify(snapshot: Path, commit: dict[str, Any], marker: str, checksums: bool = True,
           workers: int = 2) -> str | None:
    """Return None if the files are exactly those of the manifest with their sizes (and, with ``checksums``,
    their SHA-256), else a message naming the damaged (or unexpected) file. The hashing runs on ``workers``
    threads (hashlib releases the GIL), largest files first."""
    if marker not in commit["files"]:
        return f"{snapshot / marker}: engine metadata missing from the manifest"
    for path in data_files(snapshot):
        if str(path.relative_to(snapshot)) not in commit["files"]:
            return f"{path}: not in the manifest of {snapshot / COMMIT} (added or renamed after the commit)"
    for rel, expect in commit["files"].items():
        path = snapshot / rel
        if not _plain_entry(rel, expect):
            return f"{snapshot / COMMIT}: lists {rel!r}, not a file inside the snapshot"
        problem = _regular_file_problem(snapshot, rel)
        if problem:
            return problem
        size = path.lstat().st_size
        if size != expect["size"]:
            return f"{path}: size {size} bytes, expected {expect['size']} (truncated or rewritten)"
    if not checksums:
        return None

    def check(rel: str) -> str | None:
        path = snapshot / rel
        try:
            if file_digest(path) != commit["files"][rel]["sha256"]:
                return f"{path}: checksum mismatch (bytes changed after the snapshot was committed)"
        except OSError as e:
            return f"{path}: unreadable ({e})"
        return None

    from concurrent.futures import ThreadPoolExecutor

    largest_first = sorted(commit["files"], key=lambda r: -commit["files"][r]["size"])
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return next((p for p in pool.map(check, largest_first) if p), None)


def enclosing_snapshot(folder: Path) -> Path | None:
    """The snapshot directory ``folder`` is (or lies in), else None: named like one (moved aside too) or
    holding a commit record or an engine's metadata file."""
    for d in (folder.resolve(), *folder.resolve().parents):
        if is_snapshot_name(d.name) or _ASIDE.match(d.name) or any(
                (d / name).exists() for name in (COMMIT, ".metadata", ".snapshot_metadata")):
            return d
    return None


def list_snapshots(root: Path) -> list[Snapshot]:
    """Every snapshot directory under ``root``, newest (highest step) first, complete or not."""
    if not root.is_dir():
        return []
    infos = [_snapshot_info(p) for p in root.iterdir() if p.is_dir() and is_snapshot_name(p.name)]
    return sorted(infos, key=lambda i: i.order, reverse=True)


def _snapshot_info(path: Path) -> Snapshot:
    """A snapshot of a run's snapshots directory: its record must also agree with the directory's name."""
    commit, problem = _load_commit(path)
    if commit is not None:
        problem = record_name_problem(path, commit)
        commit = None if problem else commit
    part, problem = load_part(path) if commit is None and problem is None else (None, problem)
    return Snapshot(path, commit, problem, part)


def read_best(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / BEST).read_text())
    except (OSError, ValueError):
        return None


def best_snapshot(snapshots: list[Snapshot]) -> Snapshot | None:
    """The newest complete snapshot whose commit record says it was the best so far.

    The commit records, not BEST.json, are the truth: a crash between a commit and the BEST.json
    update cannot lose track of the best snapshot (BEST.json is rewritten from them)."""
    return next((s for s in snapshots if s.complete and s.commit.get("is_best")), None)  # type: ignore[union-attr]


def retention_victims(snapshots: list[Snapshot], keep: int, best: str | None) -> list[Snapshot]:
    """Complete rolling snapshots beyond the newest ``keep`` (``snapshots`` newest first, as from
    :func:`list_snapshots`); permanent ones, ``best`` and incomplete ones are never victims. A node's partial
    copy of a local snapshot counts as the snapshot it is part of."""
    rolling = [s for s in snapshots if (s.complete or s.part) and s.tier == "rolling"]
    return [s for s in rolling[keep:] if s.name != best]


def apply_retention(root: Path, keep: int, pinned: str = "") -> list[str]:
    """Point BEST.json at the best snapshot (from the commit records), then delete rolling snapshots beyond
    ``keep`` (never ``pinned``: a local snapshot the durable writer is copying); the names deleted.
    Snapshots newer than the one just committed belong to an abandoned branch."""
    import shutil

    snapshots = list_snapshots(root)
    best = best_snapshot(snapshots)
    if best is not None and (read_best(root) or {}).get("name") != best.name:
        write_json_atomic(root / BEST, {"name": best.name, "val_loss": best.commit["val_loss"]})  # type: ignore[index]
    removed = []
    for victim in retention_victims(snapshots, keep, best.name if best else None):
        if victim.name != pinned:
            shutil.rmtree(victim.path, ignore_errors=True)
            removed.append(victim.name)
    return removed


def aside_dirs(root: Path) -> list[tuple[Path, str]]:
    """Snapshots moved aside by a resume ('damaged' or 'superseded'), kept for a human to look at."""
    if not root.is_dir():
        return []
    found = [(p, m["why"]) for p in root.iterdir() if p.is_dir() and (m := _ASIDE.match(p.name))]
    return sorted(found)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

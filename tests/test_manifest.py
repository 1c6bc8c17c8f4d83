"""manifest.py on its own: naming, the atomic commit record, verification of every kind of damage,
discovery ignoring incomplete snapshots, best-from-commits and retention. Pure file operations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from elastictrain.osutil import write_json_atomic
from elastictrain.snapshot import manifest
from elastictrain.snapshot.manifest import Snapshot

MARKER = ".snapshot_metadata"


def make_snapshot(root: Path, epoch: int, step: int, tier: str = "rolling", is_best: bool = False,
                  val_loss: float | None = 1.0, commit: bool = True) -> Path:
    """A fake engine output (marker + two data files), committed unless ``commit`` is False."""
    path = root / manifest.snapshot_name(epoch, step)
    (path / "replicated").mkdir(parents=True)
    (path / MARKER).write_text(f"metadata of {path.name}")
    (path / "replicated" / "weights").write_bytes(os.urandom(4096))
    (path / "batched").write_bytes(bytes(range(256)) * 64)
    if commit:
        manifest.write_commit(path, {"name": path.name, "engine": "torchsnapshot", "epoch": epoch, "step": step,
                                     "tier": tier, "val_loss": val_loss, "is_best": is_best})
    return path


def info(name: str, tier: str | None = "rolling", is_best: bool = False) -> Snapshot:
    """A Snapshot with a minimal commit record (None tier = incomplete) for retention logic."""
    commit = None if tier is None else {"tier": tier, "is_best": is_best, "files": {}}
    return Snapshot(Path("/nowhere") / name, commit)


def test_names_round_trip_and_order_by_step() -> None:
    name = manifest.snapshot_name(3, 120)
    assert name == "epoch00003-step00000120" and manifest.is_snapshot_name(name)
    assert manifest.parse_name(name) == (3, 120)
    for bad in ("epoch3", "epoch00003-step00000120.damaged-1", "BEST.json", ".tmp"):
        assert not manifest.is_snapshot_name(bad)
    with pytest.raises(ValueError, match="not a snapshot name"):
        manifest.parse_name("latest")


def test_commit_record_lists_every_file_and_is_written_atomically(tmp_path: Path) -> None:
    path = make_snapshot(tmp_path, 1, 4)
    record = manifest.read_commit(path)
    assert record is not None and record["format"] == manifest.FORMAT
    assert set(record["files"]) == {MARKER, "replicated/weights", "batched"}
    assert record["files"]["batched"]["size"] == 256 * 64
    assert not [p for p in path.iterdir() if p.name.startswith(".COMMIT")], "no temp file left behind"
    assert manifest.verify(path, record, MARKER) is None


@pytest.mark.parametrize("content", ["", "{not json", json.dumps({"format": 999, "files": {}}), "[1, 2]"])
def test_unreadable_commit_record_means_incomplete(tmp_path: Path, content: str) -> None:
    path = make_snapshot(tmp_path, 1, 4)
    (path / manifest.COMMIT).write_text(content)
    assert manifest.read_commit(path) is None
    assert not manifest.list_snapshots(tmp_path)[0].complete


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, target, expect", [
    (_truncate, "batched", "truncated"),
    (_flip, "batched", "checksum mismatch"),
    (Path.unlink, "replicated/weights", "missing"),
    (Path.unlink, MARKER, "missing"),
    (_flip, MARKER, "checksum mismatch"),
])
def test_verify_names_the_damaged_file(tmp_path: Path, damage, target: str, expect: str) -> None:  # type: ignore[no-untyped-def]
    path = make_snapshot(tmp_path, 2, 8)
    record = manifest.read_commit(path)
    damage(path / target)
    problem = manifest.verify(path, record, MARKER)  # type: ignore[arg-type]
    assert problem is not None and str(path / target) in problem and expect in problem


def test_verify_requires_the_engine_marker_in_the_manifest(tmp_path: Path) -> None:
    path = make_snapshot(tmp_path, 2, 8)
    record = manifest.read_commit(path)
    assert "engine metadata missing" in manifest.verify(path, record, ".metadata")  # type: ignore[arg-type, operator]


def test_discovery_lists_newest_first_and_flags_incomplete(tmp_path: Path) -> None:
    make_snapshot(tmp_path, 1, 4)
    make_snapshot(tmp_path, 2, 8)
    make_snapshot(tmp_path, 3, 12, commit=False)  # a write that was cut off
    (tmp_path / "epoch00002-step00000008.damaged-5").mkdir()
    (tmp_path / "notes").mkdir()
    snaps = manifest.list_snapshots(tmp_path)
    assert [(s.name, s.complete) for s in snaps] == [("epoch00003-step00000012", False),
                                                      ("epoch00002-step00000008", True),
                                                      ("epoch00001-step00000004", True)]
    assert [p.name for p, why in manifest.aside_dirs(tmp_path)] == ["epoch00002-step00000008.damaged-5"]
    assert manifest.list_snapshots(tmp_path / "absent") == []


def test_best_comes_from_the_commit_records(tmp_path: Path) -> None:
    make_snapshot(tmp_path, 1, 4, is_best=True)
    make_snapshot(tmp_path, 2, 8, is_best=True)
    make_snapshot(tmp_path, 3, 12, is_best=False)
    make_snapshot(tmp_path, 4, 16, is_best=True, commit=False)  # incomplete: never best
    best = manifest.best_snapshot(manifest.list_snapshots(tmp_path))
    assert best is not None and best.name == "epoch00002-step00000008"


def test_retention_keeps_newest_rolling_permanent_best_and_incomplete() -> None:
    snaps = [info("epoch00012-step00000048"), info("epoch00011-step00000044"),
             info("epoch00010-step00000040", "permanent"), info("epoch00009-step00000036"),
             info("epoch00008-step00000032", None), info("epoch00007-step00000028", is_best=True),
             info("epoch00006-step00000024"), info("epoch00005-step00000020", "permanent")]
    victims = manifest.retention_victims(snaps, keep=2, best="epoch00007-step00000028")
    assert [v.name for v in victims] == ["epoch00009-step00000036", "epoch00006-step00000024"]
    # keep counts rolling snapshots only; permanent ones do not use up the budget
    assert [v.name for v in manifest.retention_victims(snaps, keep=4, best=None)] == ["epoch00006-step00000024"]
    assert manifest.retention_victims(snaps[:2], keep=2, best=None) == []


def make_part(root: Path, epoch: int, step: int, drop: str = "batched") -> Path:
    """A node's partial copy: a committed snapshot whose file ``drop`` lives on another node."""
    path = make_snapshot(root, epoch, step)
    record = json.loads((path / manifest.COMMIT).read_text())
    (path / manifest.COMMIT).unlink()
    (path / drop).unlink()
    held = sorted(rel for rel in record["files"] if rel != drop)
    write_json_atomic(path / manifest.PART, {"record": record, "held": held})
    return path


def test_a_nodes_part_is_never_complete_never_debris_and_counts_for_retention(tmp_path: Path) -> None:
    from elastictrain.snapshot import discovery

    old, new = make_part(tmp_path, 1, 4), make_part(tmp_path, 2, 8)
    snap = Snapshot.at(new)
    assert not snap.complete and not snap.damaged and snap.part is not None and snap.tier == "rolling"
    assert sorted(snap.part["held"]) == [MARKER, "replicated/weights"]
    assert manifest.PART not in [p.name for p in manifest.data_files(new)]
    assert discovery.newest_intact(tmp_path) is None and old.exists() and new.exists()  # kept, not debris
    assert manifest.apply_retention(tmp_path, keep=1) == [old.name] and new.exists()
    # A part that does not hold what its PART.json says is damaged: moved aside with the reason, never deleted.
    (new / MARKER).write_text("cut")
    assert "not the" in (Snapshot.at(new).problem or "") and Snapshot.at(new).part is None
    other = make_part(tmp_path, 3, 12)
    part = json.loads((other / manifest.PART).read_text())
    for changed, why in ((dict(part, record={**part["record"], "step": 99}), "checksum mismatch"),
                         (dict(part, held=[5]), "not the snapshot's"),
                         (dict(part, held=["../../etc/passwd"]), "not the snapshot's")):
        write_json_atomic(other / manifest.PART, changed)
        assert why in (Snapshot.at(other).problem or ""), changed
    (other / manifest.PART).unlink()
    os.mkfifo(other / manifest.PART)  # would block a plain read
    assert "not a regular file" in (Snapshot.at(other).problem or "")
    assert discovery.newest_intact(tmp_path) is None and not new.exists() and not other.exists()
    assert sorted(why for _, why in manifest.aside_dirs(tmp_path)) == ["damaged", "damaged"]


def test_atomic_write_json_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / manifest.BEST
    write_json_atomic(target, {"name": "a"})
    write_json_atomic(target, {"name": "b"})
    assert json.loads(target.read_text()) == {"name": "b"}
    assert [p.name for p in tmp_path.iterdir()] == [manifest.BEST]


def test_human_size() -> None:
    assert manifest.human_size(512) == "512 B"
    assert manifest.human_size(5 * 1024 * 1024) == "5.0 MB"
    assert manifest.human_size(3 * 1024 ** 4) == "3072.0 GB"

"""Snapshots and run directories are untrusted input (issue 24): nothing read from a snapshot runs code, a
crafted commit record never hangs or escapes the snapshot, a broken record or log line is damage named, not a
traceback, and a renamed snapshot is never taken for another."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elastictrain.snapshot import manifest
from elastictrain.ckpt_cli import main as ckpt_main
from helpers import run_cli, tiny_args

NEWEST = "epoch00002-step00000008"


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny DCP run with two snapshots (epochs 1 and 2)."""
    run_dir = tmp_path_factory.mktemp("untrusted") / "run"
    run_cli(tiny_args(run_dir, "--epochs", "2", "--checkpoint.engine", "dcp"), check=True)
    return run_dir


@pytest.fixture(scope="module")
def torchsnapshot_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same finished tiny run with the torchsnapshot engine."""
    run_dir = tmp_path_factory.mktemp("untrusted_ts") / "run"
    run_cli(tiny_args(run_dir, "--epochs", "2"), check=True)
    return run_dir


@pytest.fixture(params=["torchsnapshot", "dcp"])
def engine_run(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(engine, finished run) for each engine; one run per engine for the whole module."""
    return request.param, request.getfixturevalue(f"{request.param}_run")


def data_file(snapshot: Path) -> Path:
    """One of the engine's data files in ``snapshot`` (any engine)."""
    return sorted(p for p in snapshot.rglob("*") if p.is_file() and p.name != manifest.COMMIT
                  and not p.name.startswith("."))[0]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "final_model.pt").unlink()
    return dst


class _Payload:
    """A pickle that writes ``marker`` when unpickled, then returns ``real`` (the genuine metadata), so that
    a reader that runs it notices nothing."""

    def __init__(self, marker: Path, real: bytes | None) -> None:
        self.marker, self.real = marker, real

    def __reduce__(self) -> tuple:
        code = f"__import__('pathlib').Path({str(self.marker)!r}).write_text('pwned')"
        if self.real is not None:
            code += f" and __import__('pickle').loads({self.real!r})"
        return eval, (code,)


def plant_payload(snapshot: Path, marker: Path, rehash: bool) -> None:
    """Replace the snapshot's DCP ``.metadata`` with a code-running pickle: same size and COMMIT.json
    untouched, or carrying the real metadata with COMMIT.json re-hashed to match (nothing in it is keyed)."""
    meta = snapshot / ".metadata"
    real = meta.read_bytes()
    if rehash:
        data = pickle.dumps(_Payload(marker, real))
    else:
        data = pickle.dumps(_Payload(marker, None))
        data += b"\0" * (len(real) - len(data))
    meta.write_bytes(data)
    if rehash:
        rewrite_commit(snapshot, lambda c: c["files"].__setitem__(
            ".metadata", {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))


def rewrite_commit(snapshot: Path, change) -> None:  # noqa: ANN001 - a callable on the record
    """Change a commit record and re-hash it, as anyone with write access can."""
    path = snapshot / manifest.COMMIT
    record = json.loads(path.read_text())
    change(record)
    record["record_sha256"] = manifest.record_digest(record)
    path.write_text(json.dumps(record))


def test_dcp_metadata_pickle_never_runs_on_restore_with_commit_untouched(dcp_run: Path, tmp_path: Path) -> None:
    run_dir, marker = copy_run(dcp_run, tmp_path / "run"), tmp_path / "PWNED"
    plant_payload(run_dir / "snapshots" / NEWEST, marker, rehash=False)
    out = run_cli(tiny_args(run_dir, "--epochs", "3", "--checkpoint.engine", "dcp"))
    assert not marker.exists(), "the snapshot's metadata ran code"
    assert out.returncode == 0, out.stdout[-3000:]
    assert "checksum mismatch" in out.stdout and ".metadata" in out.stdout
    assert any(p.name.startswith(f"{NEWEST}.damaged-") for p in (run_dir / "snapshots").iterdir())
    assert "Traceback" not in out.stdout


@pytest.mark.parametrize("reader", ["restore", "resume_from", "inspect", "predict"])
def test_dcp_metadata_pickle_never_runs_with_commit_rehashed(dcp_run: Path, tmp_path: Path, reader: str) -> None:
    run_dir, marker = copy_run(dcp_run, tmp_path / "run"), tmp_path / "PWNED"
    snapshot = run_dir / "snapshots" / NEWEST
    plant_payload(snapshot, marker, rehash=True)
    if reader == "restore":
        out = run_cli(tiny_args(run_dir, "--epochs", "3", "--checkpoint.engine", "dcp"))
        assert out.returncode == 0, out.stdout[-3000:]
        assert any(p.name.startswith(f"{NEWEST}.damaged-") for p in (run_dir / "snapshots").iterdir())
        text = out.stdout
    elif reader == "resume_from":  # a torchsnapshot run: the engine is taken from the record
        out = run_cli(tiny_args(tmp_path / "other", "--checkpoint", str(snapshot)))
        assert out.returncode == 2, out.stdout[-3000:]
        text = out.stdout
    elif reader == "inspect":
        assert ckpt_main(["inspect", str(snapshot)]) == 1
        text = ""
    else:
        from elastictrain.predict import main as predict_main

        (tmp_path / "in").mkdir()
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
        assert predict_main(["--model", str(snapshot), "--input", str(tmp_path / "in"),
                             "--output", str(tmp_path / "out"), "--num-workers", "0"]) == 1
        text = ""
    assert not marker.exists(), f"the snapshot's metadata ran code ({reader})"
    if text:
        assert "not DCP metadata" in text and "builtins.eval" in text, text[-3000:]
        assert "Traceback" not in text


def test_dcp_metadata_refuses_storage_outside_the_snapshot(dcp_run: Path, tmp_path: Path) -> None:
    """A metadata file of only allowed types can still name a data file elsewhere: refused, named."""
    from elastictrain.snapshot import dcp_metadata

    snapshot = copy_run(dcp_run, tmp_path / "run") / "snapshots" / NEWEST
    metadata = dcp_metadata.read_metadata(snapshot)
    for info in metadata.storage_data.values():
        info.relative_path = "../" + NEWEST.replace("2", "1") + "/__0_0.distcp"
    data = pickle.dumps(metadata)
    (snapshot / ".metadata").write_bytes(data)
    rewrite_commit(snapshot, lambda c: c["files"].__setitem__(
        ".metadata", {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    with pytest.raises(dcp_metadata.MetadataError, match="outside the snapshot"):
        dcp_metadata.read_metadata(snapshot)


# ---------- Medium 1: --checkpoint PATH kept in a command, after retention deleted PATH ----------
def test_checkpoint_kept_in_command_survives_retention_deleting_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_cli(tiny_args(run_dir, "--epochs", "2"), check=True)
    given = run_dir / "snapshots" / "epoch00001-step00000004"

    def command(epochs: int) -> list[str]:  # the same --checkpoint in every command, as in an sbatch script
        return tiny_args(run_dir, "--epochs", str(epochs), "--checkpoint", str(given))

    run_cli(command(4), check=True)
    assert not given.exists(), "retention (keep 2) was expected to delete the snapshot resumed from"
    out = run_cli(command(5))
    assert out.returncode == 0, out.stdout[-3000:]
    assert "continuing from its newest snapshot epoch00004-step00000016" in out.stdout
    assert "resuming from epoch 4 step 16" in out.stdout


# ---------- Medium 2: only regular files inside the snapshot count ----------
def add_entry(snapshot: Path, rel: str, size: int, sha256: str) -> None:
    rewrite_commit(snapshot, lambda c: c["files"].__setitem__(rel, {"size": size, "sha256": sha256}))


def plant_special(snapshot: Path, kind: str) -> None:
    """A file the commit record lists that is not a regular file of the snapshot (reading it never ends)."""
    if kind == "link":
        (snapshot / "evil").symlink_to("/dev/zero")
    else:
        os.mkfifo(snapshot / "evil")
    add_entry(snapshot, "evil", 0, hashlib.sha256(b"").hexdigest())


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_special_file_in_the_manifest_is_damage_never_read(engine_run: tuple[str, Path], tmp_path: Path,
                                                           kind: str) -> None:
    engine, run = engine_run
    run_dir = copy_run(run, tmp_path / "run")
    plant_special(run_dir / "snapshots" / NEWEST, kind)
    listed = run_cli(["ckpt", "list", str(run_dir), "--verify"], timeout=60)
    assert listed.returncode == 1 and f"{NEWEST}/evil" in listed.stdout, listed.stdout[-3000:]
    out = run_cli(tiny_args(run_dir, "--epochs", "3", "--checkpoint.engine", engine), timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]
    assert ("symbolic link" if kind == "link" else "not a regular file") in out.stdout
    assert "resuming from epoch 1 step 4" in out.stdout
    assert any(p.name.startswith(f"{NEWEST}.damaged-") for p in (run_dir / "snapshots").iterdir())


def test_manifest_entry_outside_the_snapshot_is_damage(engine_run: tuple[str, Path], tmp_path: Path) -> None:
    engine, run = engine_run
    run_dir = copy_run(run, tmp_path / "run")
    older_snapshot = run_dir / "snapshots" / "epoch00001-step00000004"
    older = data_file(older_snapshot)
    add_entry(run_dir / "snapshots" / NEWEST, f"../{older.relative_to(older_snapshot.parent)}", older.stat().st_size,
              hashlib.sha256(older.read_bytes()).hexdigest())
    out = run_cli(tiny_args(run_dir, "--epochs", "3", "--checkpoint.engine", engine))
    assert out.returncode == 0, out.stdout[-3000:]
    assert "not a file inside the snapshot" in out.stdout
    assert "resuming from epoch 1 step 4" in out.stdout


# ---------- Medium 3: a record or log line that is not UTF-8 ----------
def test_non_utf8_commit_record_and_metrics_line_are_named_not_tracebacks(engine_run: tuple[str, Path],
                                                                          tmp_path: Path) -> None:
    engine, run = engine_run
    run_dir = copy_run(run, tmp_path / "run")
    older = run_dir / "snapshots" / "epoch00001-step00000004" / manifest.COMMIT
    older.write_bytes(older.read_bytes().replace(b'"tier"', b'"ti\xffer"', 1))
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join([lines[0], b'{"kind": "\xff"}\n', *lines[1:]]))
    for command in (["list", str(run_dir)], ["clean", str(run_dir)]):
        out = run_cli(["ckpt", *command])
        assert "Traceback" not in out.stdout and f"{older}: not UTF-8" in out.stdout, out.stdout[-3000:]
        assert out.returncode == (1 if command[0] == "list" else 0)
    out = run_cli(tiny_args(run_dir, "--epochs", "3", "--checkpoint.engine", engine))
    assert out.returncode == 0 and "Traceback" not in out.stdout, out.stdout[-3000:]
    assert f"{metrics} line 2 is torn or not UTF-8 JSON, skipped" in out.stdout
    assert "resuming from epoch 2 step 8" in out.stdout
    # The newest record broken the same way: moved aside, named, and the previous one resumed.
    newest = run_dir / "snapshots" / "epoch00003-step00000012" / manifest.COMMIT
    newest.write_bytes(newest.read_bytes().replace(b'"tier"', b'"ti\xffer"', 1))
    out = run_cli(tiny_args(run_dir, "--epochs", "4", "--checkpoint.engine", engine))
    assert out.returncode == 0 and "Traceback" not in out.stdout, out.stdout[-3000:]
    assert f"{newest}: not UTF-8" in out.stdout and "resuming from epoch 2 step 8" in out.stdout


# ---------- Medium 6: a renamed snapshot ----------
def test_renamed_snapshot_is_damage_not_the_newest(engine_run: tuple[str, Path], tmp_path: Path) -> None:
    engine, run = engine_run
    run_dir = copy_run(run, tmp_path / "run")
    root = run_dir / "snapshots"
    (root / "epoch00001-step00000004").rename(root / "epoch00099-step00009999")
    assert [s.name for s in manifest.list_snapshots(root) if s.complete] == [NEWEST]
    out = run_cli(tiny_args(run_dir, "--epochs", "3", "--checkpoint.engine", engine))
    assert out.returncode == 0, out.stdout[-3000:]
    assert "records snapshot 'epoch00001-step00000004'" in out.stdout
    assert "resuming from epoch 2 step 8" in out.stdout
    assert any(p.name.startswith("epoch00099-step00009999.damaged-") for p in root.iterdir())


# ---------- Medium 7: ckpt export writes only a new path or a regular file outside every snapshot ----------
@pytest.mark.parametrize("target", ["commit", "data", "new_inside", "aside", "fifo", "link"])
def test_export_refuses_targets_inside_snapshots_and_special_files(engine_run: tuple[str, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     target: str) -> None:
    root = copy_run(engine_run[1], tmp_path / "run") / "snapshots"
    snapshot = root / NEWEST
    older = root / "epoch00001-step00000004"
    if target == "aside":
        older = older.rename(root / "epoch00001-step00000004.damaged-1")
    out = {"commit": snapshot / manifest.COMMIT, "data": data_file(snapshot), "new_inside": older / "m.pt",
           "aside": older / "m.pt", "fifo": tmp_path / "fifo", "link": tmp_path / "link"}[target]
    if target == "fifo":
        os.mkfifo(out)
    if target == "link":
        (tmp_path / "real.pt").write_bytes(b"mine")
        out.symlink_to(tmp_path / "real.pt")
    before = {p: p.read_bytes() for p in (*snapshot.rglob("*"), *older.rglob("*")) if p.is_file()}
    assert ckpt_main(["export", str(snapshot), str(out)]) == 2
    assert str(out) in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (*snapshot.rglob("*"), *older.rglob("*")) if p.is_file()} == before
    if target in ("new_inside", "aside"):
        assert not out.exists()
    if target == "fifo":
        assert out.is_fifo()
    if target == "link":
        assert out.is_symlink() and (tmp_path / "real.pt").read_bytes() == b"mine"
    assert ckpt_main(["export", str(snapshot), str(tmp_path / "model.pt")]) == 0  # a new path outside: written


# ---------- Low ----------
@pytest.mark.parametrize("lease", ["1e12", "0.001"])
def test_lock_lease_is_bounded_at_both_ends(lease: str) -> None:
    from elastictrain.config import load_config

    with pytest.raises(ValueError, match=r"--run.lock_lease_s: must be between 1 and 86400"):
        load_config(["--config", str(Path(__file__).parents[1] / "configs" / "tiny.yaml"),
                     "--run.lock_lease_s", lease])


def test_predict_refuses_a_code_pickle_final_model_in_one_line(dcp_run: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from elastictrain.predict import main as predict_main

    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(dcp_run, run_dir)
    (run_dir / "final_model.pt").write_bytes(pickle.dumps(_Payload(marker, None)))
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "in" / "a.png")
    rc = predict_main(["--model", str(run_dir / "final_model.pt"), "--input", str(tmp_path / "in"),
                       "--output", str(tmp_path / "out"), "--num-workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert f"{run_dir / 'final_model.pt'}: not a plain state dict" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("engine", ["torchsnapshot", "dcp"])
def test_full_disk_during_a_snapshot_is_one_line_exit_2_keeping_the_earlier_one(tmp_path: Path, engine: str) -> None:
    """The snapshots on a small tmpfs: epoch 1's snapshot (5-6 MB) fits, epoch 2's does not. Exit 2 (torchrun
    and slurm/train.sh must not restart into the same full disk), the path and the free space named, the
    partial snapshot gone and epoch 1's still complete."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    run_dir = tmp_path / "run"
    root = run_dir / "snapshots"
    root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9000k", "tmpfs", str(root)], check=True)
    try:
        out = run_cli(tiny_args(run_dir, "--epochs", "2", "--checkpoint.engine", engine))
        assert out.returncode == 2, out.stdout[-3000:]
        assert "Traceback" not in out.stdout, out.stdout[-3000:]
        assert f"snapshot {root / NEWEST}: no space left on device (" in out.stdout
        assert f"free in {root})" in out.stdout
        assert not (root / NEWEST).exists()
        assert [s.name for s in manifest.list_snapshots(root) if s.complete] == ["epoch00001-step00000004"]
        assert ckpt_main(["list", str(run_dir), "--verify"]) == 0  # its checksums still hold
    finally:
        subprocess.run(["umount", str(root)], check=True)


@pytest.mark.parametrize("lock", ["directory", "dangling_link", "wrong_types"])
def test_a_lock_that_is_not_a_lock_is_one_clear_error(tmp_path: Path, lock: str) -> None:
    from elastictrain.errors import UserError
    from elastictrain.runlock import LOCK_FILE, RunLock

    path = tmp_path / LOCK_FILE
    if lock == "directory":
        path.mkdir()
    elif lock == "dangling_link":
        path.symlink_to(tmp_path / "nowhere")
    else:
        path.write_text(json.dumps({"host": "h", "machine": "m", "pid": "12", "started": "", "job": {},
                                    "since": 0, "heartbeat": "soon", "lease_s": 30, "token": "t"}))
    why = {"directory": "a directory", "dangling_link": "a symbolic link", "wrong_types": "wrong type of pid, "
           "heartbeat"}[lock]
    with pytest.raises(UserError, match=f"{path} is not a run lock.*{why}"):
        RunLock(tmp_path, 30.0).acquire(1.0)


@pytest.mark.slow
def test_sigterm_soon_after_sigusr1_still_ends_75_after_a_committed_snapshot(tmp_path: Path) -> None:
    """The scheduler's SIGUSR1, then its SIGTERM (here: one every 50 ms until the process is gone): the
    handlers must stay until the process ends, or a SIGTERM during clean-up kills a run that has answered."""
    import signal
    import subprocess
    import time

    from helpers import ROOT, base_env, cli_cmd, kill_group, read_jsonl, wait_for

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(cli_cmd(tiny_args(run_dir, "--epochs", "200")), cwd=ROOT, env=base_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: any(r.get("kind") == "train" for r in read_jsonl(run_dir)), 120, "the first steps")
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        while proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        assert proc.returncode == 75
        assert any(s.complete for s in manifest.list_snapshots(run_dir / "snapshots"))
    finally:
        kill_group(proc)

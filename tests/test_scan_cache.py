"""The folder scan at start-up: cached across starts (counted, never timed), spread over processes and ranks,
and loaders whose workers persist while the exact resume still holds."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from elastictrain import scan_cache
from elastictrain.config import Config
from elastictrain.data import FolderScan, build_datasets, build_loaders, scan_folder, scan_folder_cached
from elastictrain.dist import DistContext
from elastictrain.errors import UserError
from helpers import assert_bitwise_equal, load_final, read_jsonl, run_cli, tiny_args

PAIRS = 2000
WS1 = DistContext(0, 1, 0, torch.device("cpu"), None)
OLD = time.time() - 3600  # files written an hour ago: not "racy" (see scan_cache.RACY_S)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root: Path, count: int = PAIRS, size: int = 8, num_classes: int = 3) -> None:
    """``count`` small image/mask pairs under root/images and root/masks, last modified an hour ago."""
    rng = np.random.default_rng(0)
    images = [png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(4)]
    masks = [png(rng.integers(0, num_classes, (size, size), dtype=np.uint8)) for _ in range(4)]
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        for path, data in ((root / "images" / f"p{i:05d}.png", images[i % 4]),
                           (root / "masks" / f"p{i:05d}.png", masks[i % 4])):
            path.write_bytes(data)
            os.utime(path, (OLD, OLD))


def write_mask(path: Path, value: int, size: int = 8, mtime: float | None = None) -> None:
    """Replace a mask (as a user's edit would); ``mtime`` sets its modification time afterwards."""
    path.write_bytes(png(np.full((size, size), value, dtype=np.uint8)))
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def config(root: Path, **data: object) -> Config:
    cfg = Config()
    cfg.data.source, cfg.data.root, cfg.data.image_size, cfg.data.num_classes = "folder", str(root), 32, 3
    cfg.data.num_workers = 0
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def scan(root: Path, cache: Path, processes: int = 1, **data: object) -> FolderScan:
    return scan_folder_cached(config(root, **data).data, 0, WS1, cache, processes=processes)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "data"
    make_folder(root)
    return root


@pytest.fixture
def folder(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the module's folder set (mtimes kept), so a test may change it."""
    import shutil

    return Path(shutil.copytree(pristine, tmp_path / "data", copy_function=shutil.copy2))


def test_second_start_rechecks_nothing_unchanged(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "run" / "data_scan_cache.json"
    first = scan(folder, cache)
    assert (first.checked, first.reused, first.problems) == (PAIRS, 0, [])
    assert cache.exists()
    second = scan(folder, cache)
    assert (second.checked, second.reused, second.problems) == (0, PAIRS, [])
    assert (second.train, second.val) == (first.train, first.val)
    # The serial scan of old finds the same split.
    serial = scan_folder(config(folder).data, 0)
    assert (serial.train, serial.val, serial.problems) == (first.train, first.val, [])


def test_touching_one_mask_rechecks_exactly_that_pair(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    scan(folder, cache)
    os.utime(folder / "masks" / "p00017.png", (OLD + 60, OLD + 60))
    again = scan(folder, cache)
    assert (again.checked, again.reused) == (1, PAIRS - 1)
    assert (scan(folder, cache).checked, scan(folder, cache).reused) == (0, PAIRS)


def test_a_new_pair_is_checked_and_a_removed_one_forgotten(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    scan(folder, cache)
    (folder / "images" / "p00003.png").unlink()
    for sub in ("images", "masks"):
        (folder / sub / "zz.png").write_bytes((folder / sub / "p00004.png").read_bytes())
        os.utime(folder / sub / "zz.png", (OLD, OLD))
    again = scan(folder, cache)
    assert (again.checked, again.reused, again.problems) == (1, PAIRS - 1, [])
    assert len(again.train) + len(again.val) == PAIRS
    entries = json.loads(cache.read_bytes().split(b"\n", 1)[1])["entries"]
    assert len(entries) == PAIRS and "images/zz.png\nmasks/zz.png" in entries
    assert not [k for k in entries if "p00003" in k]


def test_a_mask_made_invalid_between_runs_is_named_at_the_next_start(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "run" / "data_scan_cache.json"
    build_datasets(config(folder), WS1, scan_cache_file=cache)
    write_mask(folder / "masks" / "p00042.png", 9)  # a user's edit: its mtime is now
    with pytest.raises(UserError, match=r"masks/p00042\.png: mask holds class ids \[9\]") as err:
        build_datasets(config(folder), WS1, scan_cache_file=cache)
    assert "1 problem(s)" in str(err.value)
    # Still named at the start after (the problem is cached too, or checked again), and only it.
    with pytest.raises(UserError, match=r"1 problem\(s\).*\n.*masks/p00042\.png"):
        build_datasets(config(folder), WS1, scan_cache_file=cache)


def test_a_same_size_rewrite_within_the_same_second_is_not_trusted(folder: Path, tmp_path: Path) -> None:
    """Written now, checked now: a later write in the same mtime tick would look unchanged, so the outcome
    of a file this fresh is not cached (git's 'racy' index entries)."""
    cache = tmp_path / "cache.json"
    mask = folder / "masks" / "p00005.png"
    write_mask(mask, 1)
    assert scan(folder, cache).problems == []
    stamp = os.stat(mask)
    write_mask(mask, 7)  # same size, and forced to the same mtime: only the content differs
    os.utime(mask, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert [p for p in scan(folder, cache).problems if "p00005" in p]


def test_read_only_data_folder(folder: Path, tmp_path: Path) -> None:
    """The cache lives in the run directory: nothing is written beside the data."""
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    paths = [folder, *folder.rglob("*")]
    for path in paths:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        cache = tmp_path / "run" / "data_scan_cache.json"
        train, val = build_datasets(config(folder), WS1, scan_cache_file=cache)
        assert len(train) + len(val) == PAIRS
        assert scan(folder, cache).checked == 0
        assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    finally:
        for path in paths:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def forge_problem_away(path: Path) -> None:
    """Valid JSON, well-formed entries, but the bad pair's problem erased and the checksum left as it was."""
    head, body = path.read_bytes().split(b"\n", 1)
    content = json.loads(body)
    for entry in content["entries"].values():
        entry[4] = None
    path.write_bytes(head + b"\n" + json.dumps(content, separators=(",", ":")).encode())


def forge_with_checksum(path: Path) -> None:
    """A cache whose checksum matches but whose entries have the wrong shape."""
    import hashlib

    _, body = path.read_bytes().split(b"\n", 1)
    content = json.loads(body)
    content["entries"] = {k: ["1", 2] for k in content["entries"]}
    body = json.dumps(content).encode()
    head = json.dumps({"format": scan_cache.FORMAT, "version": scan_cache.VERSION,
                       "sha256": hashlib.sha256(body).hexdigest()}).encode()
    path.write_bytes(head + b"\n" + body)


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p: p.write_bytes(os.urandom(4096)),
    "empty": lambda p: p.write_bytes(b""),
    "a pickle": lambda p: p.write_bytes(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00."),
    "problem erased": forge_problem_away,
    "wrong shapes": forge_with_checksum,
    "a list": lambda p: p.write_text("[1, 2, 3]\n[]"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_corrupted_cache_is_ignored_and_rebuilt(folder: Path, tmp_path: Path, damage: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    write_mask(folder / "masks" / "p00100.png", 5, mtime=OLD)
    cache = tmp_path / "cache.json"
    assert len(scan(folder, cache).problems) == 1
    DAMAGE[damage](cache)
    again = scan(folder, cache)
    assert (again.checked, again.reused) == (PAIRS, 0), "a damaged cache must not answer for any pair"
    assert len(again.problems) == 1 and "masks/p00100.png: mask holds class ids [5]" in again.problems[0]
    assert "data scan cache" in caplog.text
    rebuilt = scan(folder, cache)  # and it was written anew
    assert (rebuilt.checked, rebuilt.problems) == (0, again.problems)


def test_other_settings_check_everything_again(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    write_mask(folder / "masks" / "p00100.png", 3, mtime=OLD)
    assert len(scan(folder, cache).problems) == 1
    more_classes = scan(folder, cache, num_classes=4)
    assert (more_classes.checked, more_classes.problems) == (PAIRS, [])
    assert scan(folder, cache, num_classes=4).checked == 0


def test_process_pool_names_the_same_problems_as_one_process(folder: Path, tmp_path: Path) -> None:
    for i in (3, 500, 1999):
        write_mask(folder / "masks" / f"p{i:05d}.png", 7, mtime=OLD)
    (folder / "masks" / "p01000.png").unlink()
    serial = scan_folder(config(folder).data, 0)
    pooled = scan(folder, tmp_path / "cache.json", processes=2)
    assert pooled.checked == PAIRS - 1 and len(serial.problems) == 4
    assert pooled.problems == serial.problems


# ----------------------------------------------------------------------------------------- two ranks


def _scan_at_two_ranks(rank: int, root: str, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ctx = DistContext(rank, 2, rank, torch.device("cpu"), "gloo")
        totals: list[int] = []

        def bar(checks: list, total: int, desc: str) -> list:  # the progress bar sees how many this rank checks
            totals.append(total)
            return checks

        result = scan_folder_cached(config(Path(root)).data, 0, ctx, Path(out_dir, "cache.json"), bar, 1)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
            {"problems": result.problems, "checked": result.checked, "train": [p.name for p, _ in result.train],
             "mine": sum(totals)}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_parallel_scan_at_two_ranks_names_the_same_problems_as_one(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    root = tmp_path / "data"
    make_folder(root, count=400)
    for i in (0, 1, 2, 3, 250, 399):  # bad masks on both ranks' shares
        write_mask(root / "masks" / f"p{i:05d}.png", 8, mtime=OLD)
    (root / "masks" / "p00101.png").unlink()
    (root / "images" / "p00102.png").write_bytes(b"not a png")
    os.utime(root / "images" / "p00102.png", (OLD, OLD))
    one = scan_folder_cached(config(root).data, 0, WS1, None, processes=1)
    assert len(one.problems) == 8
    mp.spawn(_scan_at_two_ranks, args=(str(root), f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for got in ranks:
        assert got["problems"] == one.problems and got["checked"] == 399
        assert got["train"] == [p.name for p, _ in one.train]
    assert [got["mine"] for got in ranks] == [200, 199], "each rank checks its half"
    with pytest.raises(UserError) as err:
        one.raise_problems(str(root))
    assert "8 problem(s)" in str(err.value)


# ----------------------------------------------------------------------------------------------- loaders


def test_persistent_workers_keep_the_exact_order_across_epochs_and_positions() -> None:
    """One loader, its workers alive across epochs and re-positions, yields what a fresh in-process loader
    yields at every (epoch, offset)."""
    cfg = Config()
    cfg.data.image_size, cfg.data.train_samples, cfg.data.val_samples, cfg.data.num_workers = 32, 24, 4, 2
    persistent = build_loaders(cfg, WS1, micro_batch=4, accum_steps=1)
    cfg.data.num_workers = 0
    plain = build_loaders(cfg, WS1, micro_batch=4, accum_steps=1)
    first = persistent.train_loader(0, 0)
    assert first.persistent_workers
    for epoch, offset in ((0, 0), (1, 8), (2, 0), (0, 20)):
        loader = persistent.train_loader(epoch, offset)
        assert loader is first, "one loader (and its workers) for the whole run"
        got = [batch for batch in loader]
        want = [batch for batch in plain.train_loader(epoch, offset)]
        assert len(got) == len(want) == (24 - offset) // 4
        for (a, b), (c, d) in zip(got, want):
            assert torch.equal(a, c) and torch.equal(b, d)
    iterator = iter(persistent.train_loader(1, 0))
    next(iterator)  # an epoch left early (preemption) does not leak its batches into the next position
    assert torch.equal(next(iter(persistent.train_loader(1, 12)))[0], next(iter(plain.train_loader(1, 12)))[0])


def test_num_workers_auto_follows_the_cores_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    from elastictrain.config import load_config
    from elastictrain.data import resolve_num_workers

    assert Config().data.num_workers == "auto"
    assert [resolve_num_workers("auto", c) for c in (1, 2, 4, 64)] == [0, 1, 3, 8]
    assert resolve_num_workers(5, 2) == 5
    assert load_config(["--data.num_workers", "3"]).data.num_workers == 3
    with pytest.raises(ValueError, match=r"--data.num_workers: a number of worker processes >= 0 or 'auto'"):
        load_config(["--data.num_workers", "many"])


@pytest.mark.slow
def test_persistent_workers_killed_mid_epoch_resume_bitwise(tmp_path: Path) -> None:
    """Folder data, 2 persistent workers: killed right after the mid-epoch snapshot at step 6, the same
    command resumes there with the scan answered by the cache, and ends with the weights of an
    uninterrupted run that loaded in-process (num_workers 0)."""
    root = tmp_path / "data"
    make_folder(root, count=40, size=32, num_classes=4)
    common = ["--data.source", "folder", "--data.root", str(root), "--data.val_fraction", "0.2",
              "--checkpoint.every_steps", "2", "--checkpoint.keep", "3"]
    reference = tmp_path / "reference"
    run_cli(tiny_args(reference, *common, "--data.num_workers", "0"), check=True)
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, *common, "--data.num_workers", "2", "--debug.fault", "sigkill@saved=6")
    first = run_cli(args)
    assert first.returncode != 0 and "checked 40 pair(s), 0 unchanged" in first.stdout
    again = run_cli(args, check=True).stdout
    assert "resuming from epoch 1 step 6" in again
    assert re.search(r"checked 0 pair\(s\), 40 unchanged since the scan cache .*data_scan_cache\.json", again)
    assert_bitwise_equal(load_final(reference), load_final(run_dir))
    shares = [r["data_wait"] for r in read_jsonl(run_dir) if r["kind"] == "train"]
    assert shares and all(0.0 <= s <= 1.0 for s in shares)


def test_data_wait_share_is_measured_and_advised_once(caplog: pytest.LogCaptureFixture) -> None:
    """Not a timing claim: a loader that only sleeps makes the loop wait nearly all of the window."""
    import logging

    from elastictrain.data_wait import DataWait

    def sleepy(n: int) -> Any:
        for i in range(n):
            time.sleep(0.02)
            yield i

    wait = DataWait(num_workers=2, cores=8)
    caplog.set_level(logging.WARNING)
    for window in range(3):
        assert list(wait.timed(sleepy(3))) == [0, 1, 2]
        share = wait.share()
        assert 0.5 < share <= 1.0
        wait.advise(share)
        assert ("data loading takes" in caplog.text) == (window >= 1), "not on the first window (worker start)"
    assert caplog.text.count("data loading takes") == 1
    assert "raise --data.num_workers (now 2; 8 cores per rank)" in caplog.text

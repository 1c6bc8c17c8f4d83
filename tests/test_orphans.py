"""Nothing hangs and nothing outlives its launcher: a DataLoader worker's error ends the run (every rank)
within seconds with the file named; a torchrun worker whose agent is SIGKILLed snapshots and exits, its
DataLoader workers with it; the next command (with a torchrun restart in it) is not locked out."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elastic_util import Jobs, events, processes_naming, read_records, torchrun_cmd, wait_for_record
from elastictrain.data import check_pair
from helpers import ROOT, assert_bitwise_equal, load_final, run_cli, tiny_args, wait_for


def folder_with_a_truncated_file(root: Path, truncate: str) -> Path:
    """12 image/mask pairs at 32x32 (configs/tiny.yaml's size and classes); ``truncate`` ('image' or
    'mask') cuts sample 3's file in half, as an interrupted copy would."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"s{i:02d}.png")
        Image.fromarray(rng.integers(0, 4, (32, 32), dtype=np.uint8), mode="L").save(root / "masks" / f"s{i:02d}.png")
    bad = root / ("images" if truncate == "image" else "masks") / "s03.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return bad


def folder_args(run_dir: Path, data: Path) -> list[str]:
    return tiny_args(run_dir, "--data.source", "folder", "--data.root", str(data), "--data.val_fraction", "0.2",
                     "--data.num_workers", "2")


def test_truncated_image_in_a_loader_worker_exits_2_naming_the_file(tmp_path: Path) -> None:
    """Two DataLoader workers (the default config's setting), one truncated PNG: one line naming the file,
    exit 2, no hang at exit (the workers ignore SIGTERM, so multiprocessing's exit join waited forever)."""
    bad = folder_with_a_truncated_file(tmp_path / "data", "image")
    out = run_cli(folder_args(tmp_path / "run", tmp_path / "data"), timeout=120)
    assert out.returncode == 2, out.stdout[-3000:]
    assert f"{bad}: not a readable image (image file is truncated); replace or remove it" in out.stdout
    assert "Traceback" not in out.stdout
    assert not processes_naming(f"{tmp_path}/"), "a DataLoader worker outlived the run"


def test_truncated_mask_is_named_at_start_up(tmp_path: Path) -> None:
    bad = folder_with_a_truncated_file(tmp_path, "mask")
    problems = [check_pair(tmp_path / "images" / p.name, p, 4, None) for p in sorted((tmp_path / "masks").iterdir())]
    assert [p for p in problems if p] == [f"{bad}: not a readable mask (image file is truncated)"]


def test_any_loader_worker_error_ends_the_process(tmp_path: Path) -> None:
    """Not only our own errors: a bug in a worker (any exception) ends the process too, with its
    traceback and exit 1, instead of a hang in multiprocessing's exit handler."""
    script = ("import torch\nfrom torch.utils.data import DataLoader, Dataset\nfrom elastictrain import data\n"
              "class Bad(Dataset):\n    def __len__(self): return 8\n"
              "    def __getitem__(self, i):\n        if i == 3: raise RuntimeError('a bug in a worker')\n"
              "        return torch.zeros(1)\n"
              "for _ in DataLoader(Bad(), num_workers=2, worker_init_fn=data._ignore_preemption_signals): pass\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 1 and "RuntimeError: a bug in a worker" in out.stderr


@pytest.mark.slow
def test_bad_batch_on_one_rank_ends_every_rank_within_seconds(tmp_path: Path) -> None:
    """Under torchrun the rank that loads the bad file exits 2 naming it; the other rank, waiting for it
    in a collective, is not left to wait out --dist.timeout_s (300 s): the failing process exits, gloo
    reports the closed connection at once, torchrun stops the group. Measured here: ~7 s in all."""
    bad = folder_with_a_truncated_file(tmp_path / "data", "image")
    started = time.monotonic()
    out = run_cli(folder_args(tmp_path / "run", tmp_path / "data"), nproc=2, timeout=150)
    print(f"torchrun exit {out.returncode} after {time.monotonic() - started:.1f}s")
    assert out.returncode == 1, out.stdout[-3000:]  # torchrun's own status when a worker failed
    assert re.search(rf"\[rank \d\] ERROR elastictrain: {re.escape(str(bad))}: not a readable image", out.stdout)
    assert re.search(r"exitcode\s*: 2 ", out.stdout), out.stdout[-3000:]  # the root cause: the user error
    assert not processes_naming(f"{tmp_path}/")


def test_workers_die_with_their_launcher(tmp_path: Path) -> None:
    """A launcher (here a plain python process) is SIGKILLed: its watched child gets SIGTERM from its
    lifeline thread (and, with no handler, dies of it), and a DataLoader-style child with the death
    signal armed dies at once, although it ignores SIGTERM."""
    marker = str(tmp_path / "lifeline-marker")
    (tmp_path / "watched.py").write_text(
        "import signal, sys, time\n"
        "from elastictrain import lifeline\n"
        "lifeline.watch_launcher(signal.SIGTERM, 1.0)\n"
        "open(sys.argv[1] + '.watching', 'w').close()\n"
        "time.sleep(120)\n")
    (tmp_path / "launcher.py").write_text(
        "import multiprocessing, os, signal, subprocess, sys, time\n"
        "from elastictrain import lifeline\n"
        "def loader_worker(parent):\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    lifeline.die_with_parent(parent)\n"
        "    open(sys.argv[1] + '.armed', 'w').close()\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    multiprocessing.get_context('fork').Process(target=loader_worker, args=(os.getpid(),)).start()\n"
        "    subprocess.Popen([sys.executable, sys.argv[2], sys.argv[1]], start_new_session=True)\n"
        "    time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "launcher.py"), marker, str(tmp_path / "watched.py")],
                            cwd=ROOT, env=env, start_new_session=True)
    try:
        wait_for(lambda: Path(marker + ".armed").exists() and Path(marker + ".watching").exists(), 30,
                 "the launcher's two children to arm their lifelines")
        assert len(processes_naming(marker)) == 3
        children = [p for p in processes_naming(marker) if p != proc.pid]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not processes_naming(marker), 10, f"the children {children} to die with their launcher")
    finally:
        for pid in processes_naming(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_kill_9_of_torchrun_stops_its_workers_and_the_next_command_resumes(
        reference_runs: dict[int, Path], tmp_path: Path) -> None:
    """``kill -9`` of torchrun's process group: its two workers (each with a DataLoader worker) stop at the
    next step boundary with a snapshot instead of training on as orphans, and nothing of them is left.
    The same command again then resumes there and, with a SIGKILL of rank 0 on the way that torchrun's
    --max-restarts absorbs (the dead rank 0's lock is taken over at once), ends bitwise equal to the
    uninterrupted run."""
    run_dir = tmp_path / "run"
    jobs = Jobs(tmp_path)
    args = tiny_args(run_dir, "--data.num_workers", "1", "--debug.fault", "sigkill@step=10:rank=0")
    try:
        first = jobs.start(torchrun_cmd(args, tmp_path, nproc=2, max_restarts=1), "first")
        wait_for_record(run_dir, lambda r: r["kind"] == "train" and r["step"] >= 3, 180, "step 3", first)
        os.killpg(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: not processes_naming(f"{run_dir}"), 60, "the orphaned workers to exit")
        print(f"orphans gone {time.monotonic() - killed_at:.1f}s after kill -9 of torchrun")
        records = read_records(run_dir)
        (preempted,) = events(records, "preempted")
        assert not events(records, "finished") and not (run_dir / "final_model.pt").exists()
        assert preempted["step"] < 10, "the orphans trained on"
        second = jobs.start(torchrun_cmd(args, tmp_path, nproc=2, max_restarts=1), "second")
        assert jobs.wait(second, 300, "second") == 0, jobs.log("second")[-4000:]
    finally:
        jobs.cleanup()
    resumes = events(read_records(run_dir), "resume")
    # The next command, then torchrun's restart from the snapshot after epoch 2 (or 1, if 2 was still in flight).
    # (or the preemption snapshot itself, if the one after epoch 2 was still being written)
    assert [r["step"] for r in resumes][0] == preempted["step"] and len(resumes) == 2
    assert resumes[1]["step"] in (preempted["step"], 8), resumes
    assert "took over the lock" in jobs.log("second") and "is in use" not in jobs.log("second")
    assert_bitwise_equal(load_final(reference_runs[2]), load_final(run_dir))

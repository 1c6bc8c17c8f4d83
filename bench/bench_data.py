"""Folder data at start-up and in the loop: restart cost against the data set's size, the first scan's
parallelism, and loader throughput with the data-wait share.

    python bench/bench_data.py --part restart --pairs 100,5000,20000     # SIGKILL, then the same command
    python bench/bench_data.py --part scan --pairs 5000                  # first scan: serial, pool, 2 ranks
    python bench/bench_data.py --part loaders --pairs 400                # steps/s at num_workers auto, 0, 2, 0

Every part interleaves its configurations and repeats them (``--trials``), so the spread of identical
configurations shows beside the ratios. Folder sets are SIZExSIZE pairs (a smooth JPEG image, a PNG mask of
a few classes), the same bytes in every file (a check costs the same whatever the content), made once under
``--data-dir`` and reused.

restart  configs/tiny.yaml on the folder set, --checkpoint.every_steps 2, SIGKILLed right after its snapshot at
         step 2 (--debug.fault sigkill@saved=2); then the same command: seconds from its launch to its first
         resumed step (the 'first_step' event's process age, read from metrics.jsonl). The killed start, which
         scanned without a cache, is shown too.
scan     the check of every pair in one process as before this change (data.scan_folder), then
         scan_folder_cached without a cache: 1 rank in 1 process, 1 rank with a process pool of --processes,
         and 2 ranks (gloo, 1 process each).
loaders  the tiny model on the folder set at --loader-size pixels (decoding the SIZExSIZE files is the data
         work), batch 8, 1 epoch: steps/s between the 5th and the last logged step, and the mean data-wait
         share of those steps; num_workers auto, 0, 2, and 0 again.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import base_env, cli_cmd, kill_group, read_jsonl, tiny_args  # noqa: E402

OLD = time.time() - 3600


def make_folder(root: Path, count: int, size: int) -> Path:
    """``count`` pairs under root (made once; reused when complete), last modified an hour ago."""
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    axis = np.linspace(0, 255, size, dtype=np.float32)
    smooth = (axis[None, :, None] * 0.6 + axis[:, None, None] * 0.4 + rng.normal(0, 4, (size, size, 3)))
    buf = io.BytesIO()
    Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    image = buf.getvalue()
    labels = (np.add.outer(np.arange(size) // 64, np.arange(size) // 64) % 4).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(labels).save(buf, format="PNG")
    mask = buf.getvalue()
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        for path, data in ((root / "images" / f"p{i:06d}.jpg", image), (root / "masks" / f"p{i:06d}.png", mask)):
            path.write_bytes(data)
            os.utime(path, (OLD, OLD))
    done.touch()
    return root


def folder_args(data: Path, *extra: str) -> list[str]:
    return ["--data.source", "folder", "--data.root", str(data), "--data.num_classes", "4", *extra]


def killed_start(args: list[str], timeout: float = 900) -> float:
    """Run the CLI until its fault kills it; the first_step event's process age (the start without a cache)."""
    run_dir = Path(args[args.index("--run.dir") + 1])
    done = subprocess.run(cli_cmd(args), cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=timeout)
    first = [r for r in read_jsonl(run_dir) if r.get("event") == "first_step"]
    if done.returncode == 0 or not first:
        raise RuntimeError(f"the killed start did not step and die:\n{done.stdout[-3000:]}")
    return first[0]["since_start"]


def resumed_start(args: list[str], timeout: float = 600) -> tuple[float, str]:
    """Launch the CLI again; once its first step after the resume is logged, kill it and return that step's
    process age and the output so far."""
    run_dir = Path(args[args.index("--run.dir") + 1])
    out = run_dir.parent / "resumed.txt"
    with open(out, "w") as log:
        proc = subprocess.Popen(cli_cmd(args), cwd=ROOT, env=base_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            records = read_jsonl(run_dir)
            starts = [i for i, r in enumerate(records) if r.get("event") == "resume"]
            first = [r for r in records[starts[-1]:] if r.get("event") == "first_step"] if starts else []
            if first:
                return first[0]["since_start"], out.read_text()
            time.sleep(0.05)
        raise RuntimeError(f"no resumed step in {run_dir}:\n{out.read_text()[-3000:]}")
    finally:
        kill_group(proc)
        proc.wait()


def restart(args: argparse.Namespace) -> None:
    sizes = [int(n) for n in args.pairs.split(",")]
    sets = {n: make_folder(args.data_dir / f"pairs{n}-{args.size}", n, args.size) for n in sizes}
    rows: dict[int, dict[str, list[float]]] = {n: {"first": [], "restart": []} for n in sizes}
    for trial in range(args.trials):
        for n in sizes:
            with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
                run = tiny_args(Path(tmp) / "run", *folder_args(sets[n], "--data.num_workers", "0"),
                                "--checkpoint.every_steps", "2", "--debug.fault", "sigkill@saved=2")
                first = killed_start(run)
                again, out = resumed_start(run)
                assert "checked 0 pair(s)" in out, out[-2000:]
            rows[n]["first"].append(first)
            rows[n]["restart"].append(again)
            print(f"trial {trial + 1} {n:>6} pairs: first start {first:.2f}s, restart after SIGKILL {again:.2f}s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    base = statistics.median(rows[sizes[0]]["restart"])
    print(f"\nstart -> first step, {args.size}x{args.size} pairs, medians of {args.trials} (min-max); "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"| pairs | first start (scan) s | restart after SIGKILL s | restart minus {sizes[0]}-pair restart s |")
    print("|---:|---:|---:|---:|")
    for n in sizes:
        rest = rows[n]["restart"]
        print(f"| {n:,} | {_cell(rows[n]['first'])} | {_cell(rest)} | {statistics.median(rest) - base:+.2f} |")


def scan(args: argparse.Namespace) -> None:
    import torch
    import torch.multiprocessing as mp

    from elastictrain.config import DataConfig
    from elastictrain.data import scan_folder, scan_folder_cached
    from elastictrain.dist import DistContext

    (n,) = [int(p) for p in args.pairs.split(",")]
    data = DataConfig(source="folder", root=str(make_folder(args.data_dir / f"pairs{n}-{args.size}", n, args.size)),
                      num_classes=4)
    ws1 = DistContext(0, 1, 0, torch.device("cpu"), None)
    ways = {
        "serial (before)": lambda: scan_folder(data, 0),
        "1 rank, 1 process": lambda: scan_folder_cached(data, 0, ws1, None, processes=1),
        f"1 rank, pool of {args.processes}": lambda: scan_folder_cached(data, 0, ws1, None, processes=args.processes),
    }
    times: dict[str, list[float]] = {name: [] for name in [*ways, "2 ranks, 1 process each"]}
    for trial in range(args.trials):
        for name, fn in ways.items():
            started = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - started)
            assert not result.problems, result.problems[:3]
        with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp:
            mp.spawn(_two_ranks, args=(data, f"file://{tmp}/init", tmp), nprocs=2, join=True)
            times["2 ranks, 1 process each"].append(float(Path(tmp, "seconds").read_text()))
        print(f"trial {trial + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    serial = statistics.median(times["serial (before)"])
    print(f"\nfirst scan of {n:,} pairs of {args.size}x{args.size}, medians of {args.trials} (min-max); "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print("| scan | seconds | speed-up over serial |\n|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {_cell(values)} | {serial / statistics.median(values):.2f}x |")


def _two_ranks(rank: int, data: Any, init: str, tmp: str) -> None:
    import torch
    import torch.distributed as dist

    from elastictrain.data import scan_folder_cached
    from elastictrain.dist import DistContext

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ctx = DistContext(rank, 2, rank, torch.device("cpu"), "gloo")
        dist.barrier()
        started = time.perf_counter()
        scan_folder_cached(data, 0, ctx, None, processes=1)
        dist.barrier()
        if rank == 0:
            Path(tmp, "seconds").write_text(str(time.perf_counter() - started))
    finally:
        dist.destroy_process_group()


def loaders(args: argparse.Namespace) -> None:
    (n,) = [int(p) for p in args.pairs.split(",")]
    folder = make_folder(args.data_dir / f"pairs{n}-{args.size}", n, args.size)
    settings = ["auto", "0", "2", "0 (again)"]
    rows: dict[str, list[tuple[float, float]]] = {s: [] for s in settings}
    for trial in range(args.trials):
        for setting in settings:
            with tempfile.TemporaryDirectory(prefix="bench-loaders-") as tmp:
                run_dir = Path(tmp) / "run"
                cmd = tiny_args(run_dir, *folder_args(folder, "--data.num_workers", setting.split()[0]),
                                "--data.image_size", str(args.loader_size), "--train.epochs", "1",
                                "--checkpoint.mode", "off", "--data.val_fraction", "0.02")
                subprocess.run(cli_cmd(cmd), cwd=ROOT, env=base_env(), check=True, capture_output=True)
                train = [r for r in read_jsonl(run_dir) if r["kind"] == "train"][4:]
                rate = (len(train) - 1) / (train[-1]["time"] - train[0]["time"])
                share = statistics.mean(r["data_wait"] for r in train[1:])
            rows[setting].append((rate, share))
            print(f"trial {trial + 1} num_workers {setting}: {rate:.2f} steps/s, data wait {share:.0%} "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\ntiny model, {args.size}x{args.size} files at {args.loader_size}x{args.loader_size}, batch 8, "
          f"medians of {args.trials}; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print("| --data.num_workers | steps/s | data-wait share |\n|---|---:|---:|")
    for setting, values in rows.items():
        print(f"| {setting} | {_cell([r for r, _ in values])} | "
              f"{statistics.median(s for _, s in values):.0%} |")


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["restart", "scan", "loaders"], required=True)
    parser.add_argument("--pairs", default="100,5000,20000", help="folder set sizes (one for scan and loaders)")
    parser.add_argument("--size", type=int, default=512, help="image and mask side in pixels")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2, help="the scan part's process pool")
    parser.add_argument("--loader-size", type=int, default=64, help="the loaders part's --data.image_size")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-data-sets")
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1")
    {"restart": restart, "scan": scan, "loaders": loaders}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a local snapshot's time goes, part by part, on the training process: the staging copy, the engine's
write to the local tier, the entry fingerprints, the commit (SHA-256 of every file, fsync, COMMIT.json), and
retention; beside one training step (forward and backward, then the optimizer step) of the same model.

    python bench/profile_local_snapshot.py                    # resnet34 Unet at 64 px, batch 16, both engines
    python bench/profile_local_snapshot.py --engines dcp --repeats 5 --image-size 128
    python bench/profile_local_snapshot.py --beside     # also: a step beside a write, per GIL switch interval

Every part runs alone, one after the other on the main thread (no overlap, no other thread competing), with
the real components the saver uses (DefaultStager with reused buffers, the engine, proof.local_record,
manifest.write_commit, manifest.apply_retention), into a scratch local tier under /dev/shm. Printed: the
median and minimum seconds of each part over --repeats snapshots (after one warm-up snapshot, whose staging
buffers are allocated), and the sum. What the loop waits for is the subject of bench_snapshots.py; this
says what there is to move off it.

With --beside, also what a write running beside training costs a step: the median time of a training step
alone, and beside a thread that hashes (SHA-256, as the commit does) or has the engine write the staged state
over and over, at Python's GIL switch intervals of 5 ms (its default), 1 ms and 0.2 ms (saver.gil_shared).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from elastictrain.config import load_config  # noqa: E402
from elastictrain.dist import world_of_one  # noqa: E402
from elastictrain.model import SegmentationLoss, build_model  # noqa: E402
from elastictrain.snapshot import manifest, proof  # noqa: E402
from elastictrain.snapshot.appstate import build_app_state  # noqa: E402
from elastictrain.snapshot.engines import build_engine  # noqa: E402
from elastictrain.state import TrainState  # noqa: E402

PARTS = ("step fwd+bwd", "step optimizer", "stage copy", "engine write", "fingerprints", "commit (sha256, fsync)",
         "retention")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--engines", default="torchsnapshot,dcp")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--base", default="/dev/shm", help="where the scratch local tier goes")
    p.add_argument("--beside", action="store_true", help="also time a step beside a write (see the module doc)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    cfg = load_config(["--config", args.config])
    model = build_model(cfg.model, cfg.data.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    loss_fn = SegmentationLoss()
    state = TrainState()
    app_state = build_app_state(model, optimizer, scheduler, None, state)
    ctx = world_of_one()
    image = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    mask = torch.randint(0, cfg.data.num_classes, (args.batch_size, args.image_size, args.image_size))
    scratch = Path(args.base) / f"et-profile-{uuid.uuid4().hex[:8]}"
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                          use_async_staging=False, use_non_blocking_copy=False))
    times: dict[str, dict[str, list[float]]] = {}
    try:
        for engine_name in args.engines.split(","):
            engine = build_engine(engine_name)
            parts = times[engine_name] = {p: [] for p in PARTS}
            for i in range(args.repeats + 1):
                clock = time.perf_counter()

                def lap(part: str) -> None:
                    nonlocal clock
                    now = time.perf_counter()
                    if i > 0:  # the first snapshot allocates the staging buffers and warms up
                        parts[part].append(now - clock)
                    clock = now

                loss_fn(model(image), mask).backward()
                lap("step fwd+bwd")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.step += 1
                lap("step optimizer")
                live = engine.prepare_for_save({k: getattr(v, "snapshot_state_dict", v.state_dict)()
                                                for k, v in app_state.items()}, ctx)
                staged = stager.stage(live)
                lap("stage copy")
                path = scratch / manifest.snapshot_name(0, state.step)
                path.parent.mkdir(parents=True, exist_ok=True)
                engine.write(path, staged, ctx)
                lap("engine write")
                complete, partial = proof.local_record(staged)
                lap("fingerprints")
                manifest.write_commit(path, {"name": path.name, "id": uuid.uuid4().hex, "engine": engine.name,
                                             "epoch": 0, "step": state.step, "tier": "rolling",
                                             "entries": proof.combine(complete, [partial])})
                lap("commit (sha256, fsync)")
                manifest.apply_retention(scratch, 1)
                lap("retention")
            size = manifest.dir_size(path)
            print(f"{engine_name}: snapshot {size / 2**20:.0f} MB", file=sys.stderr)
        if args.beside:
            beside = step_beside_writes(args, lambda: (loss_fn(model(image), mask).backward(), optimizer.step(),
                                                       optimizer.zero_grad(set_to_none=True)), staged, scratch, ctx)
    finally:
        stager.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(args, times)
    if args.beside:
        print("\na training step beside a write running throughout it (median of 6 steps):")
        for what, seconds in beside.items():
            print(f"  {what:<40} {seconds:.3f} s  {seconds / beside['alone']:.2f}x")
    return 0


def step_beside_writes(args: argparse.Namespace, step: Any, staged: Any, scratch: Path, ctx: Any) -> dict[str, float]:
    """Median step time alone, beside a hashing thread, and beside each engine's write in a loop at three GIL
    switch intervals (see the module doc)."""
    def median_step() -> float:
        times = []
        for _ in range(6):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    data = os.urandom(280 * 2**20)
    stop = threading.Event()

    def hashing() -> None:
        while not stop.is_set():
            hashlib.sha256(data).hexdigest()

    def writing(engine_name: str) -> Any:
        def loop() -> None:
            engine, i = build_engine(engine_name), 0
            while not stop.is_set():
                path = scratch / f"beside-{i}"
                engine.write(path, staged, ctx)
                shutil.rmtree(path)
                i += 1
        return loop

    result = {"alone": median_step()}
    default = sys.getswitchinterval()
    for interval in (0.005, 0.001, 0.0002):
        sys.setswitchinterval(interval)
        for what, target in [("sha256", hashing)] * (interval == 0.005) + [
                (f"{e} write", writing(e)) for e in args.engines.split(",")]:
            stop.clear()
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            time.sleep(0.5)
            result[f"beside {what}, switch interval {interval * 1000:g} ms"] = median_step()
            stop.set()
            thread.join()
    sys.setswitchinterval(default)
    result["alone again"] = median_step()
    return result


def print_table(args: argparse.Namespace, times: dict[str, dict[str, list[float]]]) -> None:
    med = statistics.median
    print(f"\n{Path(args.config).name} at {args.image_size} px, batch {args.batch_size}, one process, "
          f"{args.repeats} snapshots per engine after a warm-up; seconds, median / min, each part alone\n")
    engines = list(times)
    print(f"{'part':<24}" + "".join(f"{e:>22}" for e in engines))
    for part in PARTS:
        print(f"{part:<24}" + "".join(f"{med(times[e][part]):>13.3f} / {min(times[e][part]):.3f}" for e in engines))
    snap = PARTS[2:]
    print(f"{'snapshot, all parts':<24}" + "".join(f"{sum(med(times[e][p]) for p in snap):>13.3f}" + " " * 8
                                                  for e in engines))
    print(f"{'step, all parts':<24}" + "".join(f"{sum(med(times[e][p]) for p in PARTS[:2]):>13.3f}" + " " * 8
                                              for e in engines))


if __name__ == "__main__":
    raise SystemExit(main())

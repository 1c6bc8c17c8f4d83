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

With --beside-process, whether a separate process would do better: in --rounds interleaved rounds, the median
time of a training step alone (twice: the spread of two identical rows), beside the engine's write in a thread
(0.2 ms switch interval, as the saver runs it), beside the same write done over and over by a separate
process (nice 19, idle I/O class, as writer.py's copier runs) that reads the staged state from shared memory,
and a step followed by one plain copy of the whole state into reused buffers: the least any snapshot every
step can cost, a floor under the per-step target on this machine.
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
    p.add_argument("--beside-process", action="store_true",
                   help="also time a step beside a write in a thread, in a process, and the floor (module doc)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --beside-process")
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
        if args.beside_process:
            rounds = step_beside_process(args, lambda: (loss_fn(model(image), mask).backward(), optimizer.step(),
                                                        optimizer.zero_grad(set_to_none=True)), staged, scratch, ctx)
    finally:
        stager.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(args, times)
    if args.beside:
        print("\na training step beside a write running throughout it (median of 6 steps):")
        for what, seconds in beside.items():
            print(f"  {what:<40} {seconds:.3f} s  {seconds / beside['alone']:.2f}x")
    if args.beside_process:
        print_rounds(args, rounds)
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


def step_beside_process(args: argparse.Namespace, step: Any, staged: Any, scratch: Path,
                        ctx: Any) -> dict[str, list[float]]:
    """Per configuration, the median step time of each interleaved round (see the module doc)."""
    shared = _tree_map(staged, lambda t: t.clone().share_memory_())
    buffers = _tree_map(staged, torch.empty_like)
    live = staged  # the copy's source: a tree of tensors of the state's size (which ones does not matter here)
    engines = args.engines.split(",")
    spawn = torch.multiprocessing.get_context("spawn")
    stop = threading.Event()
    workers = {}
    for e in engines:  # started once, up front: their import of torch is not what is measured
        go, ready = spawn.Event(), spawn.Event()
        proc = spawn.Process(target=_process_writer, args=(e, shared, str(scratch / f"proc-{e}"), go, ready,
                                                           os.getpid()), daemon=True)
        proc.start()
        workers[e] = (proc, go, ready)
    for _, _, ready in workers.values():
        ready.wait(120)

    def median_step(run: Any = step) -> float:
        times = []
        for _ in range(6):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def thread_writing(engine_name: str) -> None:
        engine, i = build_engine(engine_name), 0
        while not stop.is_set():
            path = scratch / f"thread-{engine_name}-{i}"
            engine.write(path, staged, ctx)
            shutil.rmtree(path)
            i += 1

    def beside_thread(engine_name: str) -> float:
        stop.clear()
        default = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)
        thread = threading.Thread(target=thread_writing, args=(engine_name,), daemon=True)
        thread.start()
        time.sleep(0.5)
        try:
            return median_step()
        finally:
            stop.set()
            thread.join()
            sys.setswitchinterval(default)

    def beside_process(engine_name: str) -> float:
        _, go, _ = workers[engine_name]
        go.set()
        time.sleep(0.5)
        try:
            return median_step()
        finally:
            go.clear()
            time.sleep(0.5)  # let its write in flight end; the next row must not run beside it

    def floor() -> float:
        return median_step(lambda: (step(), _tree_copy(buffers, live)))

    rows: list[tuple[str, Any]] = [("alone", median_step), ("alone, again", median_step),
                                   ("step + one copy of the state (floor)", floor)]
    rows += [(f"beside {e} write, thread", lambda e=e: beside_thread(e)) for e in engines]
    rows += [(f"beside {e} write, process (nice 19)", lambda e=e: beside_process(e)) for e in engines]
    result: dict[str, list[float]] = {what: [] for what, _ in rows}
    try:
        for r in range(args.rounds):
            order = rows[r % len(rows):] + rows[:r % len(rows)]  # a different configuration first each round
            for what, measure in order:
                result[what].append(measure())
    finally:
        for proc, go, _ in workers.values():
            go.clear()
            proc.terminate()
            proc.join(10)
    return result


def _process_writer(engine_name: str, staged: Any, base: str, go: Any, ready: Any, parent: int) -> None:
    """In its own process: while ``go`` is set, have the engine write the shared staged state over and over."""
    from elastictrain.snapshot.writer import die_with_parent, lower_priority

    die_with_parent(parent)
    lower_priority()
    engine, ctx, i = build_engine(engine_name), world_of_one(), 0
    ready.set()
    while True:
        if not go.wait(1.0):
            continue
        path = Path(base) / f"{i}"
        engine.write(path, staged, ctx)
        shutil.rmtree(path)
        i += 1


def _tree_map(tree: Any, fn: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _tree_map(v, fn) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_map(v, fn) for v in tree)
    return tree


def _tree_copy(dst: Any, src: Any) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k in dst:
            _tree_copy(dst[k], src[k])
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            _tree_copy(d, s)


def print_rounds(args: argparse.Namespace, rounds: dict[str, list[float]]) -> None:
    alone = statistics.median(rounds["alone"] + rounds["alone, again"])
    print(f"\na training step beside a write running throughout it, {args.rounds} interleaved rounds "
          f"(each: median of 6 steps); seconds per round, and the median round against the step alone "
          f"({alone:.3f} s, both alone rows), torch threads {torch.get_num_threads()}:")
    for what, seconds in rounds.items():
        each = " ".join(f"{x:.3f}" for x in seconds)
        print(f"  {what:<46} {each:<24} {statistics.median(seconds) / alone:.2f}x")


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

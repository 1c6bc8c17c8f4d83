"""Per-rank memory of the training state and the cost of a snapshot: FSDP2 against DDP at 1, 2 and 3 ranks.

    python bench/bench_fsdp_memory.py [--config configs/default.yaml] [--image-size 64] [--world-sizes 1,2,3]

For each world size it launches itself under torchrun (gloo, CPU). Every rank builds the model of the config
(default: Unet with a resnet34 encoder, 24.4M parameters), wraps it as DDP and then as FSDP2 exactly as the
trainer does (``parallelize.wrap``), takes two AdamW steps on random images, and measures:

- param / optim: bytes of the parameters and optimizer state this rank holds (a DTensor counts its local shard);
- for each engine, one synchronous snapshot of {model, optim} through ``engines`` (the trainer's code path):
  the bytes this rank wrote (``wchar`` of /proc/self/io around the save), the slowest rank's time, and the
  snapshot's size on disk.

Parameters and optimizer state fall as 1/world size under FSDP2 and stay whole under DDP. A snapshot costs about
the same either way: each FSDP2 rank writes its own shard, and both engines spread DDP's replicated state over
the ranks (each write once), so bytes per rank are ~1/world size in both and the total is one copy.

Result (2 shared CPU cores, other jobs running: times are noisy; 2026-11-28):

| strategy | ranks | params/rank MB | optim/rank MB | state/rank MB | ts written/rank MB | ts s | ts disk MB | dcp written/rank MB | dcp s | dcp disk MB |
|---|---|---|---|---|---|---|---|---|---|---|
| ddp | 1 | 93.2 | 186.4 | 279.7 | 280.0 | 1.77 | 280.0 | 281.0 | 1.65 | 281.0 |
| ddp | 2 | 93.2/93.2 | 186.4/186.4 | 279.7 | 140.5/140.1 | 1.66 | 280.1 | 140.9/140.6 | 1.01 | 281.0 |
| ddp | 3 | 93.2/93.2/93.2 | 186.4/186.4/186.4 | 279.7 | 94.3/93.7/93.7 | 2.97 | 280.1 | 94.4/93.9/93.7 | 1.79 | 281.0 |
| fsdp | 1 | 93.2 | 186.4 | 279.7 | 280.2 | 2.74 | 280.2 | 281.0 | 1.19 | 281.0 |
| fsdp | 2 | 46.6/46.6 | 93.2/93.2 | 139.8 | 141.0/140.1 | 1.96 | 280.6 | 141.2/141.2 | 1.44 | 281.7 |
| fsdp | 3 | 31.2/31.2/30.8 | 62.5/62.5/61.5 | 93.7 | n/a | n/a | n/a | 95.7/94.8/93.4 | 2.28 | 282.4 |

n/a: torchsnapshot cannot take FSDP2 state when a rank holds no rows of some parameter (the 4-class head at 3
ranks); the trainer refuses that combination at start-up and points to --checkpoint.engine dcp.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MB = 1024 * 1024


def _written_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def _local_bytes(tensors: list) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def measure(strategy: str, cfg, ctx, image_size: int, workdir: Path) -> dict:
    """One strategy on this rank: local state bytes, then one snapshot per engine."""
    import torch
    import torch.nn.functional as F

    from elastictrain.snapshot.appstate import ModelState, OptimizerState
    from elastictrain.dist import all_gather_object, barrier
    from elastictrain.snapshot.engines import build_engine
    from elastictrain.model import build_model
    from elastictrain.parallelize import wrap

    torch.manual_seed(0)
    model = wrap(build_model(cfg.model, cfg.data.num_classes), strategy, ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(ctx.rank)
    for _ in range(2):
        image = torch.randn(2, 3, image_size, image_size, generator=generator)
        mask = torch.randint(0, cfg.data.num_classes, (2, image_size, image_size), generator=generator)
        F.cross_entropy(model(image), mask).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    row = {"param": _local_bytes(list(model.parameters())),
           "optim": _local_bytes([v for s in optimizer.state.values() for v in s.values()
                                  if isinstance(v, torch.Tensor)])}
    app_state = {"model": ModelState(model), "optim": OptimizerState(model, optimizer)}
    for engine in ("torchsnapshot", "dcp"):
        path = workdir / f"{strategy}-{ctx.world_size}-{engine}"
        barrier(ctx)
        written, start = _written_bytes(), time.perf_counter()
        writer = build_engine(engine)
        writer.write(path, writer.prepare_for_save({k: v.state_dict() for k, v in app_state.items()}, ctx), ctx)
        row[f"{engine}_s"] = time.perf_counter() - start
        row[f"{engine}_written"] = _written_bytes() - written
        barrier(ctx)
        if ctx.is_main:
            row[f"{engine}_disk"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path)
    rows = all_gather_object(ctx, row)
    return {"strategy": strategy, "world_size": ctx.world_size, "ranks": rows}


def worker(out: Path, config: str, image_size: int) -> None:
    from elastictrain.config import load_config
    from elastictrain.dist import init_distributed, teardown

    cfg = load_config(["--config", config, "--train.device", "cpu"])
    ctx = init_distributed(cfg)
    workdir = Path(os.environ["BENCH_DIR"])
    try:
        results = [measure(strategy, cfg, ctx, image_size, workdir) for strategy in ("ddp", "fsdp")]
        if ctx.is_main:
            with open(out, "a") as f:
                for r in results:
                    f.write(json.dumps(r) + "\n")
    finally:
        teardown(ctx)


def launch(world_size: int, out: Path, config: str, image_size: int, workdir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world_size), "--rdzv-backend",
           "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", uuid.uuid4().hex[:12],
           str(Path(__file__).resolve()), "--worker", str(out), "--config", config, "--image-size", str(image_size)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", BENCH_DIR=str(workdir),
               PYTHONWARNINGS="ignore")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def table(results: list[dict]) -> str:
    head = ("| strategy | ranks | params/rank MB | optim/rank MB | state/rank MB | ts written/rank MB | ts s "
            "| ts disk MB | dcp written/rank MB | dcp s | dcp disk MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(results, key=lambda r: (r["strategy"], r["world_size"])):
        ranks = r["ranks"]

        def per(key: str) -> str:
            return "/".join(f"{x[key] / MB:.1f}" for x in ranks) if key in ranks[0] else "n/a"

        def slowest(key: str) -> str:
            return f"{max(x[key] for x in ranks):.2f}" if key in ranks[0] else "n/a"

        def disk(key: str) -> str:
            return f"{ranks[0][key] / MB:.1f}" if key in ranks[0] else "n/a"

        lines.append(f"| {r['strategy']} | {r['world_size']} | {per('param')} | {per('optim')} | "
                     f"{max(x['param'] + x['optim'] for x in ranks) / MB:.1f} | {per('torchsnapshot_written')} | "
                     f"{slowest('torchsnapshot_s')} | {disk('torchsnapshot_disk')} | "
                     f"{per('dcp_written')} | {slowest('dcp_s')} | {disk('dcp_disk')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--world-sizes", default="1,2,3")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.config, args.image_size)
        return
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as tmp:
        out = Path(tmp) / "results.jsonl"
        for ws in (int(x) for x in args.world_sizes.split(",")):
            start = time.perf_counter()
            launch(ws, out, args.config, args.image_size, Path(tmp))
            print(f"world size {ws}: {time.perf_counter() - start:.0f}s", file=sys.stderr)
        results = [json.loads(line) for line in out.read_text().splitlines()]
    print(f"config {args.config}, images {args.image_size}x{args.image_size}, AdamW, CPU/gloo; "
          "per-rank values are rank0/rank1/...; times are the slowest rank's synchronous save; n/a: torchsnapshot "
          "cannot take FSDP2 when a rank holds no rows of a parameter (the 4-class head at 3 ranks)")
    print(table(results))


if __name__ == "__main__":
    main()

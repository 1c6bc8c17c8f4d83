"""elastictrain against the same job as a plain hand-written loop (bench/plain_loop.py): steady step time,
the cold start's first step, the first step after a restart, and the restart penalty, at 1 process and at
2 ranks under torchrun, with both engines; each as a ratio to the plain loop.

    python bench/bench_overhead.py                      # resnet34 Unet, 3 rounds
    python bench/bench_overhead.py --rounds 5 --nprocs 1

Per configuration and round: run A trains one epoch in a fresh directory (it ends with a snapshot, or the
plain loop's torch.save); run B is the same command with two epochs, so it restarts from A's state.
  cold first step     launch of A -> A's first training step completed
  restart first step  launch of B -> B's first training step completed (start-up plus the restore)
  restart penalty     restart first step - cold first step: what a failure costs beyond a cold start
  steady step         (A's last step - A's first step) / (steps - 1): epoch 1, before any background write
Configurations run interleaved, in the opposite order every other round; medians over rounds, and the spread
of the plain loop's rounds (max/min - 1) as the noise floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nprocs", default="1,2")
    p.add_argument("--engines", default="torchsnapshot,dcp")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--train-samples", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (per process at 1 process)")
    p.add_argument("--out", default="runs/bench-overhead")
    return p.parse_args()


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--max-restarts", "0"]


def command(args: argparse.Namespace, config: str, nproc: int, run_dir: Path, epochs: int) -> list[str]:
    if config == "plain":
        return [*launcher(nproc), str(ROOT / "bench" / "plain_loop.py"), str(run_dir), str(epochs),
                str(args.image_size), str(args.train_samples), str(args.batch_size)]
    steps = args.train_samples // args.batch_size
    return [*launcher(nproc), "-m", "elastictrain", "--config", str(ROOT / "configs" / "default.yaml"),
            "--run.dir", str(run_dir), "--epochs", str(epochs), "--data.image_size", str(args.image_size),
            "--data.train_samples", str(args.train_samples), "--data.val_samples", str(args.batch_size),
            "--data.num_workers", "0", "--train.batch_size", str(args.batch_size), "--optim.warmup_steps", "0",
            "--train.log_every", str(steps), "--checkpoint.engine", config.split("/")[1],
            "--metrics.wandb", "disabled", "--metrics.progress", "off"]


def records(run_dir: Path, config: str) -> list[dict[str, Any]]:
    path = run_dir / ("plain.jsonl" if config == "plain" else "metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(cmd: list[str], run_dir: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    launched = time.time()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return launched


def first_step(rs: list[dict[str, Any]], after: float) -> float:
    return next(r["time"] for r in rs if r.get("kind") == "first_step" or r.get("event") == "first_step"
                if r["time"] >= after)


def measure(args: argparse.Namespace, config: str, nproc: int, out: Path) -> dict[str, float]:
    run_dir = out / f"{config.replace('/', '-')}-{nproc}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    a = run(command(args, config, nproc, run_dir, 1), run_dir)
    rs = records(run_dir, config)
    cold = first_step(rs, a)
    steps = args.train_samples // args.batch_size
    if config == "plain":
        last = next(r["time"] for r in rs if r["kind"] == "last_step")
    else:
        last = next(r["time"] for r in rs if r["kind"] == "train" and r["step"] == steps)
    b = run(command(args, config, nproc, run_dir, 2), run_dir)
    restart = first_step(records(run_dir, config), b)
    shutil.rmtree(run_dir)
    return {"cold": cold - a, "restart": restart - b, "penalty": (restart - b) - (cold - a),
            "step": (last - cold) / (steps - 1)}


def main() -> int:
    args = parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    configs = [(c, n) for n in map(int, args.nprocs.split(","))
               for c in ["plain", *(f"elastictrain/{e}" for e in args.engines.split(","))]]
    results: dict[tuple[str, int], list[dict[str, float]]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for config, nproc in (configs if r % 2 == 0 else configs[::-1]):
            m = measure(args, config, nproc, out)
            results[(config, nproc)].append(m)
            sys.stderr.write(f"round {r + 1}/{args.rounds} {config} x{nproc}: " +
                             ", ".join(f"{k} {v:.2f}s" for k, v in m.items()) + "\n")
    med = statistics.median
    w = sys.stdout.write
    w(f"\nresnet34 Unet, {args.train_samples} samples of {args.image_size}px an epoch, global batch "
      f"{args.batch_size}, gloo on CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}; medians of "
      f"{args.rounds} interleaved rounds\n\n")
    head = f"{'configuration':<28}{'steady step s':>14}{'cold first step s':>19}{'restart first step s':>22}" \
           f"{'restart penalty s':>19}{'step x':>8}{'cold x':>8}{'penalty x':>11}\n"
    w(head)
    for nproc in map(int, args.nprocs.split(",")):
        plain = results[("plain", nproc)]
        base = {k: med(m[k] for m in plain) for k in plain[0]}
        spread = {k: max(m[k] for m in plain) / max(1e-9, min(m[k] for m in plain)) - 1 for k in ("step", "cold")}
        for config in [c for c, n in configs if n == nproc]:
            ms = results[(config, nproc)]
            v = {k: med(m[k] for m in ms) for k in ms[0]}
            w(f"{config + f' x{nproc}':<28}{v['step']:>14.3f}{v['cold']:>19.2f}{v['restart']:>22.2f}"
              f"{v['penalty']:>+19.2f}{v['step'] / base['step']:>8.3f}{v['cold'] / base['cold']:>8.3f}"
              f"{v['penalty'] / base['penalty'] if base['penalty'] > 0 else float('nan'):>11.2f}\n")
        w(f"  noise floor at {nproc} process(es): the plain loop's rounds spread {spread['step']:.1%} in step time, "
          f"{spread['cold']:.1%} in cold start\n")
    w("targets: restart penalty <= 1.5x the plain loop's (stretch: equal), step time <= 1.03x, cold start <= 1.05x\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

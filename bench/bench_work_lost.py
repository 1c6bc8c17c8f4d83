"""Expected work lost per failure: a run SIGKILLed at a random time, then the same command again; with a
snapshot at every epoch end only ('epoch'), against the automatic interval (``--checkpoint.every_minutes
auto``) and against a node-local snapshot every step ('local': ``--checkpoint.local_every_steps 1``, durable
ones at epoch ends) and against the default local tier ('localauto': ``--checkpoint.local_every_steps auto``, its
own Young/Daly interval with the same scaled MTBF). 'epoch' and 'auto' run without the local tier.

    python bench/bench_work_lost.py --trials 10          # resnet34 Unet (configs/default.yaml), 1 process
    python bench/bench_work_lost.py --trials 2 --append runs/lost.json   # pool trials over several invocations
    python bench/bench_work_lost.py --nproc 2 --policies epoch,auto,local   # 2 ranks under torchrun (DDP)

Per trial and configuration (interleaved, the order reversed every other trial): start the run; at a time
drawn uniformly from [--kill-after, --kill-after + --window] seconds after its first training step, SIGKILL
its whole process group (under torchrun: the agent and every worker, each in a session of its own, and the
workers' engine processes); run the same command again and stop it at its first training step after the resume.

  recomputed   optimizer steps done before the kill that the resumed run does again (last step logged before
               the kill minus the step resumed from), and the time they took (their count times the median
               step time of the killed run)
  restart      kill -> the first training step after the resume (start-up, restore, one step)
  lost         recomputed time + restart: what the failure cost

The automatic interval is sqrt(2 C MTBF). On a real run MTBF is hours and epochs are long; a bench cannot wait
that long, so the epoch here is about a minute and --mtbf-hours is scaled down (default 0.15 h) so that the
interval lands well inside an epoch, as it would with a 6 h MTBF and hour-long epochs. The printed interval
shows what was chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from elastic_util import kill_tree  # noqa: E402
from elastictrain.snapshot import localtier  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun when > 1; --batch-size is the global batch)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=2400, help="samples an epoch (the epoch must be long)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--engines", default="torchsnapshot,dcp")
    p.add_argument("--mtbf-hours", type=float, default=0.15)
    p.add_argument("--kill-after", type=float, default=10.0, help="earliest kill, seconds after the first step")
    p.add_argument("--window", type=float, default=50.0, help="kill times are uniform over this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-lost")
    p.add_argument("--policies", default="epoch,auto,local")
    p.add_argument("--append", default="", help="a JSON file of earlier trials of the same configurations: this "
                   "invocation's trials are added to it and the table shows them all (short runs under a lock)")
    return p.parse_args()


def command(args: argparse.Namespace, run_dir: Path, engine: str, policy: str) -> list[str]:
    extra = {"epoch": ["--checkpoint.local_every_steps", "0"],
             "auto": ["--checkpoint.every_minutes", "auto", "--checkpoint.mtbf_hours", str(args.mtbf_hours),
                      "--checkpoint.local_every_steps", "0"],
             "local": ["--checkpoint.local_every_steps", "1"],
             # the default local tier: its own Young/Daly interval, with the MTBF scaled like auto's
             "localauto": ["--checkpoint.local_every_steps", "auto", "--checkpoint.mtbf_hours", str(args.mtbf_hours)]
             }[policy]
    launch = [sys.executable] if args.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
         "--max-restarts", "0"]
    return [*launch, "-m", "elastictrain", "--config", args.config, "--run.dir", str(run_dir),
            "--epochs", "3", "--data.image_size", str(args.image_size), "--data.train_samples",
            str(args.train_samples), "--data.val_samples", str(args.batch_size), "--data.num_workers", "0",
            "--train.batch_size", str(args.batch_size), "--train.log_every", "1", "--checkpoint.engine", engine,
            "--checkpoint.keep", "3", "--metrics.wandb", "disabled", "--metrics.progress", "off", *extra]


def records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled"}
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until(predicate: Any, timeout: float, proc: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before it was expected to")
        time.sleep(0.05)
    raise TimeoutError("timed out")


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the run's whole tree at once (torchrun's workers are not in its process group)."""
    kill_tree(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def remove_run(run_dir: Path) -> None:
    """The run directory and its node-local tier (a killed run leaves it in /dev/shm: 2 generations of state)."""
    base, tier_id = localtier.of_run(run_dir)
    if base is not None and tier_id:
        shutil.rmtree(base / tier_id, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)


def trial(args: argparse.Namespace, run_dir: Path, engine: str, policy: str, delay: float) -> dict[str, float]:
    remove_run(run_dir)
    run_dir.mkdir(parents=True)
    cmd = command(args, run_dir, engine, policy)
    proc = start(cmd, run_dir.parent / f"{run_dir.name}.log")
    try:
        first = wait_until(lambda: next((r for r in records(run_dir) if r["kind"] == "train"), None), 600, proc)
        time.sleep(max(0.0, first["time"] + delay - time.time()))
        killed_at = time.time()
    finally:
        kill(proc)
    before = [r for r in records(run_dir) if r["kind"] == "train" and r["time"] <= killed_at]
    steps = [b["time"] - a["time"] for a, b in zip(before, before[1:]) if b["step"] == a["step"] + 1]
    intervals = [r for r in records(run_dir) if r.get("event") in ("snapshot_interval", "local_snapshot_interval")]
    proc = start(cmd, run_dir.parent / f"{run_dir.name}.log")
    try:
        def resumed_step() -> dict[str, Any] | None:
            rs = records(run_dir)
            i = next((i for i, r in enumerate(rs) if r.get("event") in ("resume", "start") and r["time"] > killed_at),
                     None)
            return None if i is None else next((r for r in rs[i:] if r["kind"] == "train"), None)

        after = wait_until(resumed_step, 600, proc)
    finally:
        kill(proc)
    again = [r for r in records(run_dir) if r.get("event") in ("resume", "start") and r["time"] > killed_at][0]
    remove_run(run_dir)
    recomputed = before[-1]["step"] - again["step"]
    step_s = statistics.median(steps) if steps else 0.0
    return {"delay": delay, "recomputed_steps": recomputed, "recomputed_s": recomputed * step_s,
            "restart_s": after["time"] - killed_at, "lost_s": recomputed * step_s + after["time"] - killed_at,
            "step_s": step_s, "interval_s": intervals[-1]["interval_s"] if intervals else float("nan")}


def main() -> int:
    args = parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    configs = [(e, p) for e in args.engines.split(",") for p in args.policies.split(",")]
    results: dict[tuple[str, str], list[dict[str, float]]] = {c: [] for c in configs}
    pooled = Path(args.append) if args.append else None
    if pooled is not None and pooled.exists():
        for key, trials in json.loads(pooled.read_text()).items():
            engine, policy = key.split("/")
            results.setdefault((engine, policy), []).extend(trials)
    done = max((len(v) for v in results.values()), default=0)
    rng = random.Random(args.seed + done)  # other kill times than the earlier invocations'
    for t in range(done, done + args.trials):
        delay = args.kill_after + rng.uniform(0, args.window)  # the same kill time for every configuration
        for engine, policy in (configs if t % 2 == 0 else configs[::-1]):
            r = trial(args, out / f"{engine}-{policy}", engine, policy, delay)
            results[(engine, policy)].append(r)
            sys.stderr.write(f"trial {t + 1}/{done + args.trials} {engine} {policy}: killed {delay:.1f}s in, "
                             f"{r['recomputed_steps']} steps redone, restart {r['restart_s']:.1f}s\n")
    med, mean = statistics.median, statistics.mean
    w = sys.stdout.write
    trials = min(len(v) for v in results.values())
    w(f"\n{Path(args.config).name}, {args.nproc} process(es), {args.train_samples} samples an epoch at {args.image_size}px, batch "
      f"{args.batch_size}; {trials} kills per configuration, uniform over {args.kill_after:.0f}-"
      f"{args.kill_after + args.window:.0f} s after the first step; auto with MTBF {args.mtbf_hours} h\n\n")
    w(f"{'engine':<14}{'snapshots':<10}{'step s':>8}{'interval s':>12}{'redone steps mean':>19}"
      f"{'redone s mean':>15}{'restart s med':>15}{'lost s mean':>13}{'lost s med':>12}\n")
    for (engine, policy), rs in results.items():
        w(f"{engine:<14}{policy:<10}{med(r['step_s'] for r in rs):>8.2f}"
          f"{med(r['interval_s'] for r in rs):>12.1f}{mean(r['recomputed_steps'] for r in rs):>19.1f}"
          f"{mean(r['recomputed_s'] for r in rs):>15.1f}{med(r['restart_s'] for r in rs):>15.1f}"
          f"{mean(r['lost_s'] for r in rs):>13.1f}{med(r['lost_s'] for r in rs):>12.1f}\n")
    for engine in sorted({e for e, _ in results}):
        epoch = results.get((engine, "epoch"))
        for policy in ("auto", "local", "localauto"):
            other = results.get((engine, policy))
            if epoch and other:
                w(f"{engine}: expected work lost per failure, {policy} / epoch-only = "
                  f"{mean(r['lost_s'] for r in other) / mean(r['lost_s'] for r in epoch):.2f}\n")
        local = results.get((engine, "local"))
        if local:
            w(f"{engine}: local every step redoes at most {max(r['recomputed_steps'] for r in local)} step(s) "
              f"(target: one step + the restart)\n")
    saved = json.dumps({f"{e}/{p}": v for (e, p), v in results.items()}, indent=1)
    (out / "results.json").write_text(saved)
    if pooled is not None:
        pooled.write_text(saved)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What snapshots cost the training loop: the same run without snapshots, with a sync or async snapshot every
epoch, with an async one every N steps, with the automatic interval, and with a node-local snapshot every
step plus a durable one every epoch copied by the writer process, per engine; and what one durable snapshot
costs in total, against bench/plain_loop.py's synchronous torch.save of the same state.

    python bench/bench_snapshots.py                      # resnet34 Unet (configs/default.yaml), 1 process
    python bench/bench_snapshots.py --nproc 2 --epochs 6 --image-size 128
    python bench/bench_snapshots.py --policies off,async,steps   # a subset
    python bench/bench_snapshots.py --policies off,plain,async,local,localonly --engines dcp   # the writer process
    python bench/bench_snapshots.py --policies off,local,localonly --baseline /tmp/main-copy   # before / after

Each configuration is a real ``python -m elastictrain`` run (under torchrun when --nproc > 1) in its own
run directory under --out, with every snapshot kept so each one is measured; a run directory is deleted
after it has been read unless --keep. Configurations run interleaved, --rounds times, in the opposite order
every other round (position in a round moved identical runs by 8% on these machines), and figures are pooled
over rounds. 'off' runs twice per round ('off' and 'off again'): their difference is the noise floor, and a
ratio inside it is no finding. Policies: off, sync (every epoch), async (every epoch), steps (async, every
--every-steps steps too), auto (async, --checkpoint.every_minutes auto), all without the local tier; local (a
local snapshot every step, the durable one every epoch made from it by the writer process), localonly (a
local snapshot every step, the durable one only after the last epoch); plain (bench/plain_loop.py, with and
without its torch.save at every epoch end: 'plain' and 'plain nosave'). With --baseline, the same policies run
from another checkout's code too (rows ENGINE@base), interleaved with this one's. Printed per configuration:

  epoch s     epoch time, median and minimum over epochs 2.. of every round (the first warms up; a
              snapshot's blocked time and its background write fall inside the next epoch); 'x off' divides
              by the same figure for mode off. On a shared machine the median carries other jobs' noise.
  blocked     seconds the training loop spent inside the snapshot call (summary.json
              snapshot_blocked_seconds), median and first of a run; for sync this includes the checksums
              and the commit
  write       seconds from the save call until the engine's last byte was written (commit records),
              and the throughput that gives, next to `dd` on the same disk (page cache, and fdatasync)
  checksum    seconds the commit spent fsyncing and hashing each snapshot (off the loop in async mode)
  verify      re-hashing the newest snapshot against its manifest, as a resume does (warm page cache)

and the total cost of one durable snapshot (the loop blocked plus the slower steps while it is written), as the
difference of median epoch times: local - localonly (the writer process), async - off (the writer thread),
plain - plain nosave (a synchronous torch.save), each divided by the last; and per local snapshot, how long
the loop was blocked for it and how long each part of its write took (summary.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from elastictrain.snapshot import manifest  # noqa: E402
from elastictrain.snapshot.engines import build_engine  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun when > 1)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--engines", default="torchsnapshot,dcp")
    p.add_argument("--policies", default="off,sync,async,steps,auto")
    p.add_argument("--every-steps", type=int, default=5, help="the steps policy's interval")
    p.add_argument("--mtbf-hours", type=float, default=6.0, help="the auto policy's checkpoint.mtbf_hours")
    p.add_argument("--out", default="runs/bench", help="scratch directory (on the disk being measured)")
    p.add_argument("--rounds", type=int, default=2, help="run every configuration this many times, interleaved "
                   "(on a shared machine other jobs drift; interleaving spreads that over all configurations)")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--baseline", default="", help="another checkout of elastictrain (e.g. the main branch): its "
                   "runs of --baseline-policies are interleaved with this checkout's, as rows ENGINE@base")
    p.add_argument("--baseline-policies", default="local,localonly")
    return p.parse_args()


POLICY_ARGS = {
    "off": ["--checkpoint.mode", "off"],
    "sync": ["--checkpoint.mode", "sync", "--checkpoint.local_every_steps", "0"],
    "async": ["--checkpoint.mode", "async", "--checkpoint.local_every_steps", "0"],
    "steps": ["--checkpoint.mode", "async", "--checkpoint.every_steps", "{every_steps}",
              "--checkpoint.local_every_steps", "0"],
    "auto": ["--checkpoint.mode", "async", "--checkpoint.every_minutes", "auto", "--checkpoint.mtbf_hours",
             "{mtbf_hours}", "--checkpoint.local_every_steps", "0"],
    "local": ["--checkpoint.mode", "async", "--checkpoint.local_every_steps", "1"],
    "localonly": ["--checkpoint.mode", "async", "--checkpoint.local_every_steps", "1", "--checkpoint.interval",
                  "100000"],
}


def run_training(args: argparse.Namespace, run_dir: Path, engine: str, policy: str) -> float:
    root = ROOT
    if engine.endswith("@base"):  # the same run from the baseline checkout's code
        root, engine = Path(args.baseline).resolve(), engine.removesuffix("@base")
    if policy == "plain":
        run_dir.mkdir(parents=True)
        train = [str(ROOT / "bench" / "plain_loop.py"), str(run_dir), str(args.epochs), str(args.image_size),
                 str(args.train_samples), str(args.batch_size), "0" if engine == "nosave" else "1"]
    else:
        train = elastictrain_args(args, run_dir, engine, policy)
    cmd = [sys.executable, *train]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               *train]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled",
           "PYTHONPATH": str(root)}
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return time.perf_counter() - start


def elastictrain_args(args: argparse.Namespace, run_dir: Path, engine: str, policy: str) -> list[str]:
    return ["-m", "elastictrain", "--config", args.config, "--run.dir", str(run_dir),
             "--epochs", str(args.epochs), "--data.image_size", str(args.image_size),
             "--data.train_samples", str(args.train_samples), "--data.val_samples", str(args.batch_size),
             "--data.num_workers", "0", "--train.batch_size", str(args.batch_size), "--train.log_every", "1000",
             *[a.format(every_steps=args.every_steps, mtbf_hours=args.mtbf_hours) for a in POLICY_ARGS[policy]],
             "--checkpoint.engine", engine, "--checkpoint.keep", "1000",
             "--checkpoint.permanent_every", "0", "--metrics.wandb", "disabled", "--metrics.progress", "off"]


def measure(run_dir: Path, into: dict[str, list[float]]) -> None:
    """Append this run's figures to ``into`` (lists per figure, pooled over rounds)."""
    if (run_dir / "plain.jsonl").exists():  # the plain loop: epoch times from its last steps
        lasts = [json.loads(line)["time"] for line in (run_dir / "plain.jsonl").read_text().splitlines()
                 if '"last_step"' in line]
        into["epoch"] += [b - a for a, b in zip(lasts, lasts[1:])]
        return
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = next(r["time"] for r in records if r.get("event") == "start")
    ends = [start] + [r["time"] for r in records if r["kind"] == "val"]
    into["epoch"] += [b - a for a, b in zip(ends[1:], ends[2:])]  # from epoch 2: the first one warms up
    summary = json.loads((run_dir / "summary.json").read_text())
    blocked = summary.get("snapshot_blocked_seconds", [])
    into["local_blocked"] += summary.get("local_snapshot_blocked_seconds", [])
    for parts in summary.get("local_snapshot_part_seconds", []):
        for part, seconds in parts.items():
            into[f"local_{part}"].append(seconds)
    into["blocked"] += blocked
    into["first_blocked"] += blocked[:1]
    snaps = [s for s in manifest.list_snapshots(run_dir / "snapshots") if s.complete]
    for commit in (s.commit for s in snaps):
        into["size"].append(sum(f["size"] for f in commit["files"].values()))  # type: ignore[index]
        into["write"].append(commit["write_seconds"])  # type: ignore[index]
        into["checksum"].append(commit["checksum_seconds"])  # type: ignore[index]
    if snaps:
        newest = snaps[0]
        t0 = time.perf_counter()
        problem = manifest.verify(newest.path, newest.commit, build_engine(newest.commit["engine"]).marker)  # type: ignore[arg-type, index]
        into["verify"].append(time.perf_counter() - t0)
        into["verify_size"].append(into["size"][-len(snaps)])
        assert problem is None, problem


def dd_throughput(directory: Path, megabytes: int) -> tuple[float, float]:
    """MB/s of `dd` writing ``megabytes`` into ``directory``: into the page cache, and with fdatasync."""
    rates = []
    for sync in ([], ["conv=fdatasync"]):
        target = directory / "dd.bin"
        result = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={megabytes}", *sync],
                                capture_output=True, text=True, check=True)
        target.unlink()
        m = re.search(r"copied, ([\d.]+) s", result.stderr)
        rates.append(megabytes / float(m[1]) if m else float("nan"))
    return rates[0], rates[1]


def main() -> int:
    args = parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    policies = args.policies.split(",")
    configs = [("-", "off"), ("-", "off again")] if "off" in policies else []
    configs += [("save", "plain"), ("nosave", "plain")] if "plain" in policies else []
    configs += [(e, p) for e in args.engines.split(",") for p in policies if p not in ("off", "plain")]
    if args.baseline:
        configs += [(f"{e}@base", p) for e in args.engines.split(",") for p in args.baseline_policies.split(",")]
    results: dict[tuple[str, str], dict[str, list[float]]] = {c: defaultdict(list) for c in configs}
    for round_ in range(args.rounds):
        for engine, policy in (configs if round_ % 2 == 0 else configs[::-1]):
            run_dir = out / f"{engine.strip('-').replace('@', '-') or 'none'}-{policy.replace(' ', '-')}-{round_}"
            shutil.rmtree(run_dir, ignore_errors=True)
            wall = run_training(args, run_dir, engine if engine != "-" else "torchsnapshot", policy.split()[0])
            measure(run_dir, results[(engine, policy)])
            sys.stderr.write(f"round {round_ + 1}/{args.rounds} {engine} {policy}: {wall:.0f} s\n")
            if not args.keep:
                shutil.rmtree(run_dir)
    size = max((max(r["size"], default=0) for r in results.values()), default=0)
    dd_cache, dd_sync = dd_throughput(out, max(64, int(size / 2**20)))
    print_table(args, results, size, dd_cache, dd_sync)
    return 0


def print_table(args: argparse.Namespace, results: dict[tuple[str, str], dict[str, list[float]]], size: float,
                dd_cache: float, dd_sync: float) -> None:
    med = statistics.median
    base, base_min = med(results[("-", "off")]["epoch"]), min(results[("-", "off")]["epoch"])
    mb = size / 2**20
    w = sys.stdout.write
    spread = abs(med(results[("-", "off again")]["epoch"]) / base - 1) if ("-", "off again") in results else float("nan")
    w(f"\n{Path(args.config).name}, {args.nproc} process(es), {args.epochs} epochs of {args.train_samples} "
      f"samples at {args.image_size}px, batch {args.batch_size}, {args.rounds} round(s); snapshot {mb:.0f} MB "
      f"(model + AdamW + TrainState), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}\n")
    w(f"dd on the same disk: {dd_cache:.0f} MB/s into the page cache, {dd_sync:.0f} MB/s with fdatasync\n\n")
    head = ["engine", "policy", "epoch s med/min", "x off med/min", "snapshots", "blocked s med/first", "write s",
            "write MB/s", "checksum s", "verify s", "verify MB/s"]
    rows = [head]
    for (engine, mode), r in results.items():
        row = [engine, mode, f"{med(r['epoch']):.2f} / {min(r['epoch']):.2f}",
               f"{med(r['epoch']) / base:.3f} / {min(r['epoch']) / base_min:.3f}",
               f"{len(r['blocked']) / args.rounds:.0f}"]
        if r["blocked"]:
            row.append(f"{med(r['blocked']):.3f} / {med(r['first_blocked']):.3f}")
            row += [f"{med(r['write']):.2f}", f"{med(r['size']) / 2**20 / med(r['write']):.0f}",
                    f"{med(r['checksum']):.2f}", f"{med(r['verify']):.2f}",
                    f"{med(r['verify_size']) / 2**20 / med(r['verify']):.0f}"]
        else:
            row += ["-"] * 6
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        w("  ".join(c.rjust(wd) if i > 1 else c.ljust(wd) for i, (c, wd) in enumerate(zip(row, widths))) + "\n")
    w(f"noise floor: two identical runs without snapshots differ by {spread:.1%} in median epoch time; a ratio "
      f"within that of 1.000 is no finding\n")
    for engine in args.engines.split(","):
        s, a = results.get((engine, "sync")), results.get((engine, "async"))
        if s and a and s["blocked"] and a["blocked"]:
            ratio = med(a["blocked"]) / med(s["blocked"])
            w(f"{engine}: async blocks the loop {ratio:.1%} of a sync snapshot (target <= 5%); epoch time with an "
              f"async snapshot every epoch {med(a['epoch']) / base:.3f}x none, median; "
              f"blocked time alone is {med(a['blocked']) / base:.1%} of an epoch\n")
        for policy, target in (("steps", 1.03), ("auto", 1.02), ("local", 1.03)):
            r = results.get((engine, policy))
            if r and r["epoch"]:
                w(f"{engine}: epoch time with policy {policy} {med(r['epoch']) / base:.3f}x none, median "
                  f"(target <= {target}x), {len(r['blocked']) / args.rounds:.0f} snapshots a run\n")
    print_local_parts(results)
    print_total_cost(args, results)


LOCAL_PARTS = ("staging", "engine", "fingerprints", "process", "commit", "retention")
"""process: the writer thread's wait for the engine process (engine_process.py), engine and fingerprints inside it."""


def print_local_parts(results: dict[tuple[str, str], dict[str, list[float]]]) -> None:
    """Per local snapshot: the loop's wait for it, and each part of its write (on the writer thread, off the
    loop unless the loop waits for it), medians in seconds (summary.json of each run)."""
    rows = [(k, r) for k, r in results.items() if r["local_blocked"]]
    if not rows:
        return
    w = sys.stdout.write
    w("\nper local snapshot, median seconds: the loop blocked (its start, waits for staging and commit), then "
      "each part of the write\n")
    w(f"{'engine':<14}{'policy':<11}{'n':>6}{'blocked':>9}" + "".join(f"{p:>14}" for p in LOCAL_PARTS) + "\n")
    for (engine, policy), r in rows:
        w(f"{engine:<14}{policy:<11}{len(r['local_blocked']):>6}{statistics.median(r['local_blocked']):>9.3f}"
          + "".join(f"{statistics.median(r[f'local_{p}']) if r[f'local_{p}'] else float('nan'):>14.3f}"
                    for p in LOCAL_PARTS) + "\n")


def print_total_cost(args: argparse.Namespace, results: dict[tuple[str, str], dict[str, list[float]]]) -> None:
    """One durable snapshot's total cost (blocked + slower steps while written) as a difference of median
    epoch times, against the plain loop's synchronous torch.save; the noise floor in the same seconds."""
    med, w = statistics.median, sys.stdout.write
    plain, nosave = results.get(("save", "plain")), results.get(("nosave", "plain"))
    if not (plain and nosave and plain["epoch"] and nosave["epoch"]):
        return
    save_cost = med(plain["epoch"]) - med(nosave["epoch"])
    w(f"\none durable snapshot's total cost per epoch (difference of median epoch times); plain loop's torch.save: "
      f"{save_cost:.2f} s\n")
    if ("-", "off again") in results:
        w(f"noise floor: off again - off = {med(results[('-', 'off again')]['epoch']) - med(results[('-', 'off')]['epoch']):+.2f} s\n")
    for engine in args.engines.split(","):
        pairs = (("writer process", (engine, "local"), (engine, "localonly")),
                 ("writer thread", (engine, "async"), ("-", "off")))
        for what, with_, without in pairs:
            a, b = results.get(with_), results.get(without)
            if a and b and a["epoch"] and b["epoch"]:
                cost = med(a["epoch"]) - med(b["epoch"])
                w(f"{engine}: {what} ({with_[1]} - {without[1]}) {cost:+.2f} s = {cost / save_cost:.2f}x the plain "
                  f"loop's torch.save (target <= 0.5x)\n")


if __name__ == "__main__":
    raise SystemExit(main())

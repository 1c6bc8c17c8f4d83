"""The CUDA path on one GPU in one call: NCCL, bf16 and fp16 AMP, device-to-host snapshots, exact resume.

    python bench/gpu_check.py          # one CUDA GPU, sized for under 5 minutes on an H200 (not yet run on one)
    python bench/gpu_check.py --cpu    # the same checks, shrunk to configs/tiny.yaml, gloo on CPU (CI runs this)

Every check runs the real command line in subprocesses (``python -m elastictrain``, ``torchrun``), each in its
own run directory under --out, and reads the outcome from disk (metrics.jsonl, summary.json, the commit records,
final_model.pt), as the tests do. One line per check with its figures, then ``N passed, M failed``.

  1   train     python -m elastictrain on configs/default.yaml shrunk, bf16: the loss falls, final_model.pt loads
                with weights_only=True with every tensor on CPU, and its fp32 logits on CPU match the same weights
                run in bf16 on the device (relative error within bf16 tolerance)
  2a  torchrun  world size 1 over NCCL
  2b  ddp       2 ranks sharing the one GPU; NCCL first, gloo over CUDA tensors where NCCL refuses (the line says
  2c  fsdp      which ran, and why NCCL did not); FSDP2 likewise
  3a  resume    SIGKILL right after a mid-epoch snapshot, then the same command again, bf16 (3a) and fp16 with a
  3b  resume    GradScaler (3b): final weights, and the optimizer, LR-schedule and scaler state of the last
                snapshot, bitwise equal to an uninterrupted run (deterministic algorithms,
                CUBLAS_WORKSPACE_CONFIG=:4096:8). Where they differ, the difference is printed beside the one
                between two uninterrupted runs (the noise floor) and the ops torch names as nondeterministic
  4   cost      snapshot cost for the resnet34 Unet at 256x256, batch 128: torchsnapshot and dcp, async and sync;
                loop blocked per snapshot, write throughput, step time without a snapshot, in the step that starts
                one, and while one is written; then the staging copy into pinned buffers with non-blocking copies
                against pageable buffers (in this process)
  5   memory    peak GPU memory allocated in steps with an async snapshot in flight against steps without
                (a snapshot must not double GPU memory)

--cpu runs 1, 2a-2c (2b and 2c ask for NCCL first and fall back to gloo, as on a GPU), 3a and 4 on CPU with gloo,
so the code cannot rot; 3b (fp16 needs CUDA) and 5 (GPU memory) are listed as not applicable and not counted.
Timing figures are printed, never judged (on CPU they mean nothing). Exit 0 when every check passed.

For a session with the device tool (one H200, 15 minutes of device time): first here, in the repository root,
``bash bench/gpu_wheels.sh`` (fetches into .whl/ the pure-Python packages the GPU image lacks), then one call

    run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=360)

The script stops itself after --budget seconds (300 by default on a GPU: runs not started by then fail as 'out of
time') and prints its summary either way. With a start of a minute or two that leaves a second call at once, on
the still warm machine (it goes back after 30 s idle), within the 15 minutes: the same command, or with
``--budget N`` for what status says is left, less a minute; then give_back. Its full output comes back as
gpu_check.log, the runs' logs and metrics (no snapshots, no weights) as gpu_check_runs.tgz.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KILL_SIGNAL_RC = -signal.SIGKILL
BF16_TOLERANCE = 0.05
"""Relative L2 error allowed between fp32 logits on CPU and bf16-autocast logits (8 mantissa bits, rounded at
every layer of a 30-layer network; the trained tiny and resnet34 models measured 0.4-1.5%)."""
MEMORY_TOLERANCE = 1.10
"""Peak memory with a snapshot in flight may exceed the peak without by 10% (allocator noise), never double."""


@dataclass(frozen=True)
class Profile:
    """What the checks run on: the device, the config and how far it is shrunk."""

    device: str
    config: str
    train: tuple[str, ...]
    """Flags of the runs of checks 1-3 (two epochs, mid-epoch snapshots)."""
    kill_step: int
    """The mid-epoch snapshot after which check 3 SIGKILLs the run."""
    cost: tuple[str, ...]
    """Flags of the runs of checks 4-5 (the full-size model at the size that fills the device reasonably)."""
    precisions: tuple[str, ...]
    parallel: int
    """Runs at a time in the first phase (checks 1-3); checks 4-5 run alone, one run at a time."""
    threads: str
    budget: float
    run_timeout: float


GPU = Profile(
    device="cuda", config="configs/default.yaml",
    # 12 steps per epoch, a snapshot every 4: the kill after the one at step 8 is mid-epoch.
    train=("--data.image_size", "256", "--data.train_samples", "384", "--data.val_samples", "64",
           "--train.batch_size", "32", "--train.epochs", "2", "--optim.warmup_steps", "2", "--data.num_workers", "3",
           "--checkpoint.every_steps", "4"),
    kill_step=8,
    # 48 steps of 128 images at 256x256 (the generated data needs ~1.5 ms per image and core: 12 workers keep up),
    # a snapshot every 12 steps: 3 mid-epoch snapshots and the one at the end.
    cost=("--data.image_size", "256", "--data.train_samples", str(48 * 128), "--data.val_samples", "128",
          "--train.batch_size", "128", "--train.epochs", "1", "--optim.warmup_steps", "2", "--data.num_workers", "12",
          "--checkpoint.every_steps", "12"),
    precisions=("bf16", "fp16"), parallel=8, threads="2", budget=300, run_timeout=200)

CPU = Profile(
    device="cpu", config="configs/tiny.yaml",
    # 4 steps per epoch, a snapshot every 2: the kill after the one at step 6 is in the middle of epoch 2.
    train=("--data.train_samples", "32", "--train.batch_size", "8", "--train.epochs", "2", "--data.num_workers", "0",
           "--checkpoint.every_steps", "2"),
    kill_step=6,
    cost=("--data.train_samples", "96", "--train.batch_size", "8", "--train.epochs", "1", "--data.num_workers", "0",
          "--checkpoint.every_steps", "4"),
    precisions=("bf16",), parallel=2, threads="1", budget=600, run_timeout=180)

COMMON = ("--train.log_every", "1", "--metrics.wandb", "disabled", "--metrics.progress", "off",
          # A rank that NCCL refuses, or a peer gone, fails the run in a minute rather than gloo's 30.
          "--dist.timeout_s", "60")


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Attempt:
    rc: int
    log: Path
    seconds: float

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Run:
    """One run directory and the command that trains in it (run again, it resumes there)."""

    name: str
    args: list[str]
    nproc: int = 0
    """0: plain ``python -m elastictrain``; else torchrun with this many ranks."""
    attempts: list[Attempt] = field(default_factory=list)


class Runner:
    """Starts runs as subprocesses in their own sessions, within one deadline, and kills them all on exit."""

    def __init__(self, out: Path, profile: Profile, deadline: float) -> None:
        self.out, self.profile, self.deadline = out, profile, deadline
        self.live: set[subprocess.Popen[bytes]] = set()
        self.lock = threading.Lock()
        self.env = {**os.environ, "OMP_NUM_THREADS": profile.threads, "WANDB_MODE": "disabled",
                    "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                    # As torch documents for deterministic cuBLAS (the trainer sets it too when it is unset).
                    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.env.pop("WANDB_SERVICE", None)
        self.env.pop("WANDB_API_KEY", None)

    def run_dir(self, run: Run) -> Path:
        return self.out / run.name

    def command(self, run: Run) -> list[str]:
        train = ["-m", "elastictrain", "--config", str(ROOT / self.profile.config), *COMMON,
                 "--train.device", self.profile.device, *run.args, "--run.dir", str(self.run_dir(run))]
        if run.nproc == 0:
            return [sys.executable, *train]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(run.nproc),
                "--max-restarts", "0", *train]

    def attempt(self, run: Run, timeout: float | None = None) -> Attempt:
        """Run the run's command once more, to its end, the deadline or the per-run timeout."""
        log = self.out / "logs" / f"{run.name}.{len(run.attempts) + 1}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        timeout = min(timeout or self.profile.run_timeout, self.deadline - time.monotonic())
        if timeout <= 5:
            log.write_text("not started: out of time (--budget)\n")
            run.attempts.append(Attempt(-999, log, 0.0))
            return run.attempts[-1]
        start = time.monotonic()
        with open(log, "wb") as f:
            proc = subprocess.Popen(self.command(run), cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            with self.lock:
                self.live.add(proc)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_session(proc)
                proc.wait()
                rc = -998
                f.write(f"\ngpu_check: killed after {timeout:.0f} s\n".encode())
            finally:
                with self.lock:
                    self.live.discard(proc)
        run.attempts.append(Attempt(rc, log, time.monotonic() - start))
        print(f"  ran {run.name} (attempt {len(run.attempts)}): exit {rc} in {run.attempts[-1].seconds:.0f} s",
              flush=True)
        return run.attempts[-1]

    def kill_all(self) -> None:
        with self.lock:
            for proc in list(self.live):
                kill_session(proc)


def kill_session(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------------ reading
def records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut off by the SIGKILL
    return out


def events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [r for r in records(run_dir) if r.get("kind") == "event" and r.get("event") == name]


def train_losses(run_dir: Path) -> list[float]:
    """The train loss per step of the last attempt (a resumed run replays steps)."""
    by_step = {r["step"]: r["loss"] for r in records(run_dir) if r.get("kind") == "train"}
    return [by_step[s] for s in sorted(by_step)]


def loss_falls(run_dir: Path) -> tuple[bool, str]:
    losses = train_losses(run_dir)
    if len(losses) < 4:
        return False, f"only {len(losses)} train records"
    k = max(2, len(losses) // 4)
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    return last < first, f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps"


def failure_reason(text: str) -> str:
    """The line of a failed run's log that says why, shortened."""
    # 'elastictrain: MESSAGE' may go on over indented lines (every problem of a configuration).
    for pattern in (r"Duplicate GPU[^\n]*", r"elastictrain: [^\n]*(?:\n  [^\n]*)*", r"NCCL (?:WARN|error)[^\n]*",
                    r"\b[A-Z]\w*(?:Error|Exception): [^\n]*"):
        found = re.findall(pattern, text)
        if found:
            return " ".join(found[-1 if pattern.startswith(r"\b") else 0].split())[:220]
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:220]


def newest_snapshot(run_dir: Path) -> Any:
    from elastictrain.snapshot import manifest

    snaps = [s for s in manifest.list_snapshots(run_dir / "snapshots") if s.complete]
    return snaps[0] if snaps else None


def load_final(run_dir: Path) -> dict[str, Any]:
    """final_model.pt as written: no map_location, so a tensor saved on the GPU would come back there."""
    import torch

    return torch.load(run_dir / "final_model.pt", weights_only=True)


def model_config(runner: Runner, run: Run) -> Any:
    from elastictrain.config import load_config

    return load_config(runner.command(run)[runner.command(run).index("elastictrain") + 1:])


def check_final(runner: Runner, run: Run) -> tuple[bool, str, dict[str, Any]]:
    """final_model.pt loads weights-only, every tensor on CPU, into the model its config builds (strict)."""
    from elastictrain.model import build_model

    path = runner.run_dir(run) / "final_model.pt"
    if not path.exists():
        return False, "no final_model.pt", {}
    sd = load_final(runner.run_dir(run))
    devices = sorted({str(t.device) for t in sd.values()})
    if devices != ["cpu"]:
        return False, f"final_model.pt holds tensors on {devices}", sd
    cfg = model_config(runner, run)
    build_model(cfg.model, cfg.data.num_classes).load_state_dict(sd)
    return True, f"final_model.pt on CPU ({len(sd)} tensors)", sd


# ------------------------------------------------------------------------------------------------ checks
@dataclass
class Result:
    key: str
    name: str
    ok: bool | None
    """None: does not apply here (not counted)."""
    text: str
    details: list[str] = field(default_factory=list)

    def line(self) -> str:
        status = {True: "PASS", False: "FAIL", None: "n/a "}[self.ok]
        return "\n".join([f"{status} {self.key:<3} {self.name:<9} {self.text}", *(f"         {d}" for d in self.details)])


def finished(runner: Runner, run: Run) -> tuple[bool, str]:
    last = run.attempts[-1] if run.attempts else None
    if last is None:
        return False, "never started"
    if last.rc != 0:
        return False, f"exit {last.rc}: {failure_reason(last.text())} (log {last.log.relative_to(runner.out)})"
    if not events(runner.run_dir(run), "finished"):
        return False, "exit 0 but no 'finished' event in metrics.jsonl"
    return True, f"{last.seconds:.0f} s"


def check_train(runner: Runner, run: Run) -> Result:
    """Check 1: it trains, the loss falls, final_model.pt is a CPU state dict with the trained model's logits."""
    ok, why = finished(runner, run)
    if not ok:
        return Result("1", "train", False, why)
    falls, loss_text = loss_falls(runner.run_dir(run))
    final_ok, final_text, sd = check_final(runner, run)
    if not final_ok:
        return Result("1", "train", False, f"{loss_text}; {final_text}")
    rel, agree = logits_agreement(model_config(runner, run), sd, runner.profile.device)
    ok = falls and rel <= BF16_TOLERANCE and agree >= 0.98
    return Result("1", "train", ok, f"{runner.profile.device} bf16: {loss_text}{'' if falls else ' (does not fall)'}; "
                  f"{final_text}, weights_only; fp32 logits on CPU vs bf16 on {runner.profile.device}: relative "
                  f"error {rel:.4f} (<= {BF16_TOLERANCE}), argmax agrees on {agree:.1%} of pixels ({why})")


def logits_agreement(cfg: Any, sd: dict[str, Any], device: str) -> tuple[float, float]:
    """(relative L2 error, argmax agreement) of bf16-autocast logits on ``device`` against fp32 logits on CPU,
    on the first validation images."""
    import torch

    from elastictrain import device as devices
    from elastictrain.data import build_datasets
    from elastictrain.model import build_model

    val = build_datasets(cfg)[1]
    images = torch.stack([val[i][0] for i in range(min(8, len(val)))])
    model = build_model(cfg.model, cfg.data.num_classes)
    model.load_state_dict(sd)
    model.eval()
    with torch.no_grad():
        reference = model(images)
        on_device = copy.deepcopy(model).to(device)
        with devices.autocast(torch.device(device), torch.bfloat16):
            low = on_device(images.to(device)).float().cpu()
    rel = float((low - reference).norm() / reference.norm())
    return rel, float((low.argmax(1) == reference.argmax(1)).float().mean())


def torchrun_check(runner: Runner, key: str, name: str, runs: list[Run]) -> Result:
    """Check 2: the first backend that ran to the end, with why the earlier ones did not."""
    refused = []
    for run in runs:
        if not run.attempts:
            continue
        ok, why = finished(runner, run)
        backend = run.args[run.args.index("--dist.backend") + 1]
        if not ok:
            refused.append(f"{backend} failed: {why}")
            continue
        falls, loss_text = loss_falls(runner.run_dir(run))
        final_ok, final_text, _ = check_final(runner, run)
        text = f"{backend} ran, {run.nproc} rank(s): {loss_text}; {final_text} ({why})"
        return Result(key, name, falls and final_ok, text, refused)
    return Result(key, name, False, "no backend ran to the end", refused)


def compare_runs(a: Path, b: Path) -> tuple[bool, str, float]:
    """Final weights and the last snapshot's model/optimizer/schedule/scaler entries: (equal, text, max |diff|)."""
    import torch

    fa, fb = load_final(a), load_final(b)
    differ = [k for k in fa if k not in fb or not torch.equal(fa[k], fb[k])]
    diff = max((float((fa[k].double() - fb[k].double()).abs().max()) for k in differ if k in fb
                and fa[k].is_floating_point()), default=0.0)
    sa, sb = newest_snapshot(a), newest_snapshot(b)
    if sa is None or sb is None:
        return False, "no complete snapshot to compare", diff
    prefixes = ("model/", "optim/", "sched/", "scaler/")
    ea = {k: v for k, v in sa.commit["entries"].items() if k.startswith(prefixes)}
    eb = {k: v for k, v in sb.commit["entries"].items() if k.startswith(prefixes)}
    entries_differ = sorted(k for k in ea.keys() | eb.keys() if ea.get(k) != eb.get(k))
    equal = not differ and not entries_differ and sa.name == sb.name
    text = (f"{len(fa) - len(differ)}/{len(fa)} final tensors equal, max |diff| {diff:.3g}; last snapshot "
            f"{sa.name} vs {sb.name}: {len(ea) - len(entries_differ)}/{len(ea)} model/optimizer/schedule/scaler "
            f"entries equal")
    return equal, text, diff


def scaler_state(run_dir: Path) -> dict[str, Any] | None:
    """The GradScaler state in the newest snapshot, read with the snapshot's own engine at world size 1."""
    import torch

    from elastictrain.dist import DistContext
    from elastictrain.snapshot.engines import build_engine

    snap = newest_snapshot(run_dir)
    if snap is None or not any(k.startswith("scaler/") for k in snap.commit.get("entries", {})):
        return None
    scaler = torch.amp.GradScaler("cpu")
    build_engine(snap.commit["engine"]).read(snap.path, {"scaler": scaler},
                                             DistContext(0, 1, 0, torch.device("cpu"), None))
    return scaler.state_dict()


def nondeterministic_ops(*texts: str) -> list[str]:
    found: set[str] = set()
    for text in texts:
        found |= set(re.findall(r"(\w+) does not have a deterministic implementation", text))
        if "CuBLAS" in text and "not deterministic" in text:
            found.add("cuBLAS (CUBLAS_WORKSPACE_CONFIG)")
    return sorted(found)


def check_resume(runner: Runner, key: str, precision: str, ref: Run, killed: Run, noise: Run | None) -> Result:
    """Check 3: the killed-and-rerun run ends where the uninterrupted one does."""
    name = "resume"
    ok, why = finished(runner, ref)
    if not ok:
        return Result(key, name, False, f"{precision}: the uninterrupted run failed: {why}")
    if not killed.attempts or killed.attempts[0].rc != KILL_SIGNAL_RC:
        first = killed.attempts[0] if killed.attempts else None
        return Result(key, name, False, f"{precision}: the first attempt was not SIGKILLed "
                      f"(exit {first.rc if first else 'none'}: {failure_reason(first.text()) if first else ''})")
    ok, why = finished(runner, killed)
    if not ok:
        return Result(key, name, False, f"{precision}: the re-run failed: {why}")
    kd = runner.run_dir(killed)
    resumes = events(kd, "resume")
    if not resumes or resumes[0]["step"] != runner.profile.kill_step or not resumes[0].get("sample_offset"):
        return Result(key, name, False, f"{precision}: expected a mid-epoch resume at step {runner.profile.kill_step}, "
                      f"got {resumes[:1]}")
    where = (f"killed after the snapshot at step {runner.profile.kill_step} (sample offset "
             f"{resumes[0]['sample_offset']}, mid-epoch), resumed")
    equal, text, diff = compare_runs(runner.run_dir(ref), kd)
    details = []
    if precision == "fp16":
        a, b = scaler_state(runner.run_dir(ref)), scaler_state(kd)
        if a is None or b is None:
            return Result(key, name, False, f"fp16: no GradScaler state in the last snapshot ({a}, {b})")
        equal = equal and a == b
        details.append(f"GradScaler in the last snapshot: uninterrupted {a}, resumed {b}")
    if equal:
        return Result(key, name, True, f"{precision}: {where}; bitwise equal: {text}", details)
    if noise is None or not noise.attempts:
        noise = noise or Run(f"{ref.name}-again", ref.args)
        runner.attempt(noise)
    ok, why = finished(runner, noise)
    if not ok:
        return Result(key, name, False, f"{precision}: NOT bitwise ({text}); the repeat run failed: {why}")
    repeat_equal, repeat_text, floor = compare_runs(runner.run_dir(ref), runner.run_dir(noise))
    ops = nondeterministic_ops(ref.attempts[-1].text(), *(a.text() for a in killed.attempts))
    details += [f"two uninterrupted runs: {repeat_text}",
                f"ops torch names as nondeterministic: {', '.join(ops) or 'none'}"]
    within = not repeat_equal and diff <= 10 * floor
    return Result(key, name, within, f"{precision}: {where}; NOT bitwise: {text}; "
                  f"{'within' if within else 'beyond'} the run-to-run noise of this device "
                  f"(max |diff| {floor:.3g} between two uninterrupted runs)", details)


# ------------------------------------------------------------------------------------------------ cost
@dataclass
class Cost:
    engine: str
    mode: str
    run: Run
    figures: dict[str, Any] = field(default_factory=dict)


def snapshot_windows(run_dir: Path) -> list[dict[str, Any]]:
    """Committed snapshots, oldest first: step, size, write seconds, and the wall-clock window of the write."""
    from elastictrain.snapshot import manifest

    out = []
    for s in reversed([s for s in manifest.list_snapshots(run_dir / "snapshots") if s.complete]):
        c = s.commit
        out.append({"step": c["step"], "size": sum(f["size"] for f in c["files"].values()),
                    "write": c["write_seconds"], "start": c["started_at"],
                    "end": c["started_at"] + c["write_seconds"], "mid_epoch": c["sample_offset"] > 0})
    return out


def step_intervals(run_dir: Path) -> list[dict[str, Any]]:
    """Per step from the third on: its wall-clock interval (previous train record to this one) and memory peak."""
    train = sorted((r for r in records(run_dir) if r.get("kind") == "train"), key=lambda r: r["step"])
    return [{"step": b["step"], "start": a["time"], "end": b["time"], "seconds": b["time"] - a["time"],
             "peak": b.get("gpu_peak_mib")} for a, b in zip(train[1:], train[2:])]


def measure_cost(runner: Runner, cost: Cost) -> tuple[bool, str]:
    ok, why = finished(runner, cost.run)
    if not ok:
        return False, why
    run_dir = runner.run_dir(cost.run)
    snaps = snapshot_windows(run_dir)
    blocked = json.loads((run_dir / "summary.json").read_text()).get("snapshot_blocked_seconds", [])
    steps = step_intervals(run_dir)
    mid = [s for s in snaps if s["mid_epoch"]]
    if not blocked or not mid or not steps:
        return False, f"{len(blocked)} blocked figures, {len(mid)} mid-epoch snapshots, {len(steps)} step records"
    starting = {s["step"] + 1 for s in mid}  # the step boundary after step s takes the snapshot, then step s+1
    in_flight = [st for st in steps if st["step"] not in starting
                 and any(st["start"] < s["end"] and st["end"] > s["start"] for s in mid)]
    plain = [st for st in steps if st["step"] not in starting and st not in in_flight]
    med = statistics.median
    cost.figures = {
        "blocked": med(blocked), "first_blocked": blocked[0], "size": med(s["size"] for s in snaps),
        "write": med(s["write"] for s in snaps), "throughput": med(s["size"] / s["write"] for s in snaps),
        "plain": med(st["seconds"] for st in plain) if plain else float("nan"),
        "starting": med(st["seconds"] for st in steps if st["step"] in starting),
        "writing": med(st["seconds"] for st in in_flight) if in_flight else float("nan"),
        "peak_plain": max((st["peak"] for st in plain if st["peak"] is not None), default=None),
        "peak_in_flight": max((st["peak"] for st in steps if st["peak"] is not None and st not in plain),
                              default=None),
        "snapshots": len(snaps)}
    return True, why


def cost_line(cost: Cost) -> str:
    f = cost.figures

    def s(x: float) -> str:
        return "-" if x != x else f"{x:.3f} s"  # nan: no such step (a sync snapshot is never in flight)

    return (f"{cost.engine:<13} {cost.mode:<5}: blocked {f['blocked']:.3f} s per snapshot (first {f['first_blocked']:.3f}); "
            f"write {f['throughput'] / 2**20:.0f} MB/s ({f['write']:.2f} s for {f['size'] / 2**20:.0f} MB); "
            f"step {s(f['plain'])} without a snapshot, {s(f['starting'])} starting one, "
            f"{s(f['writing'])} while one is written ({f['snapshots']} snapshots)")


def check_cost(runner: Runner, costs: list[Cost]) -> Result:
    problems, lines = [], []
    for cost in costs:
        ok, why = measure_cost(runner, cost)
        if ok:
            lines.append(cost_line(cost))
        else:
            problems.append(f"{cost.engine} {cost.mode}: {why}")
    cfg = model_config(runner, costs[0].run)
    what = (f"{cfg.model.arch} {cfg.model.encoder} at {cfg.data.image_size}x{cfg.data.image_size}, batch "
            f"{cfg.train.batch_size}, {runner.profile.device}")
    if problems:
        return Result("4", "cost", False, f"{what}: {'; '.join(problems)}", lines)
    if runner.profile.device == "cuda":
        if time.monotonic() < runner.deadline:
            lines.append(staging_copy_line(cfg))
        else:
            lines.append("staging copy, pinned against pageable: not measured, out of time (--budget)")
    by = {(c.engine, c.mode): c.figures for c in costs}
    ratios = ", ".join(f"{e} {by[(e, 'async')]['blocked'] / by[(e, 'sync')]['blocked']:.0%}"
                       for e in ("torchsnapshot", "dcp"))
    return Result("4", "cost", True, f"{what}: an async snapshot blocks the loop for this share of a sync one: "
                  f"{ratios}", lines)


def staging_copy_line(cfg: Any) -> str:
    """Device-to-host staging of the model and AdamW state as snapshot/saver.py does it, pinned against pageable."""
    import torch
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    from elastictrain.model import build_model

    model = build_model(cfg.model, cfg.data.num_classes).cuda()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, 3, 64, 64, device="cuda")).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    size = sum(t.numel() * t.element_size() for t in _tensors(state))
    figures = {}
    for pinned in (True, False):
        stager = DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False,
                                              use_async_staging=False, use_non_blocking_copy=pinned))
        times = []
        for _ in range(4):  # the first call allocates (and pins) the buffers the others reuse
            torch.cuda.synchronize()
            start = time.perf_counter()
            stager.stage(state)
            times.append(time.perf_counter() - start)
        stager.close()
        figures[pinned] = (times[0], statistics.median(times[1:]))
    (pf, p), (uf, u) = figures[True], figures[False]
    return (f"staging copy of {size / 2**20:.0f} MB (model + AdamW) to reused host buffers: pinned + non-blocking "
            f"{p:.3f} s ({size / p / 2**30:.1f} GB/s; first {pf:.3f} s), pageable {u:.3f} s "
            f"({size / u / 2**30:.1f} GB/s; first {uf:.3f} s)")


def _tensors(tree: Any) -> list[Any]:
    import torch

    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return [tree] if isinstance(tree, torch.Tensor) else []


def check_memory(runner: Runner, costs: list[Cost]) -> Result:
    """Check 5, from the async runs of check 4."""
    if runner.profile.device != "cuda":
        return Result("5", "memory", None, "no GPU memory on CPU")
    lines, ok = [], True
    for cost in (c for c in costs if c.mode == "async"):
        f = cost.figures
        if not f or f.get("peak_plain") is None or f.get("peak_in_flight") is None:
            ok = False
            lines.append(f"{cost.engine}: no per-step peaks (gpu_peak_mib) in metrics.jsonl")
            continue
        ratio = f["peak_in_flight"] / f["peak_plain"]
        ok = ok and ratio <= MEMORY_TOLERANCE
        lines.append(f"{cost.engine} async: peak allocated {f['peak_plain']:.0f} MiB in steps without a snapshot, "
                     f"{f['peak_in_flight']:.0f} MiB with one in flight ({ratio:.3f}x, limit {MEMORY_TOLERANCE}x)")
    return Result("5", "memory", ok and bool(lines), "peak GPU memory per step, async snapshots in flight vs not",
                  lines)


# ------------------------------------------------------------------------------------------------ plan
def plan(runner: Runner) -> Callable[[], list[Result]]:
    """Build every run, run them (phase 1 concurrently, phase 2 alone), and return the evaluation."""
    p = runner.profile
    refs = {prec: Run(f"train-{prec}", [*p.train, "--train.precision", prec]) for prec in p.precisions}
    killed = {prec: Run(f"resume-{prec}", [*refs[prec].args, "--debug.fault", f"sigkill@saved={p.kill_step}"])
              for prec in p.precisions}
    # On a GPU the noise floor runs beside the rest, in case it is needed; on CPU only when a resume differs.
    noise = {prec: Run(f"train-{prec}-again", refs[prec].args) for prec in p.precisions} if p.device == "cuda" else {}
    ws1 = [Run("torchrun-ws1", [*p.train, "--dist.backend", "nccl" if p.device == "cuda" else "gloo"], nproc=1)]
    two_rank = {strategy: [Run(f"{strategy}-ws2-{backend}", [*p.train, "--dist.strategy", strategy,
                                                               "--dist.backend", backend], nproc=2)
                           for backend in ("nccl", "gloo")] for strategy in ("ddp", "fsdp")}
    costs = [Cost(engine, mode, Run(f"cost-{engine}-{mode}", [*p.cost, "--checkpoint.engine", engine,
                                                               "--checkpoint.mode", mode, "--checkpoint.keep", "100",
                                                               "--checkpoint.permanent_every", "0"]))
             for engine in ("torchsnapshot", "dcp") for mode in ("async", "sync")]

    def first_that_runs(runs: list[Run]) -> None:
        for run in runs:
            # NCCL refuses two ranks on one GPU at start-up; a minute and a half is plenty to find out.
            if runner.attempt(run, timeout=90 if run is not runs[-1] else None).rc == 0:
                return

    chains: list[Callable[[], None]] = [lambda r=r: runner.attempt(r) for r in [*refs.values(), *noise.values()]]
    chains += [lambda r=r: (runner.attempt(r), runner.attempt(r)) for r in killed.values()]
    chains += [lambda runs=runs: first_that_runs(runs) for runs in [ws1, *two_rank.values()]]
    # On a GPU the cost runs go alone afterwards: their times are the point. On CPU the times are printed, never
    # judged, so they join the pool (the CI test of this script is 20 s shorter).
    alone = costs if p.device == "cuda" else []
    if not alone:
        chains += [lambda r=cost.run: runner.attempt(r) for cost in costs]
    with ThreadPoolExecutor(max_workers=p.parallel) as pool:
        for future in [pool.submit(chain) for chain in chains]:
            future.result()
    for cost in alone:
        runner.attempt(cost.run)

    def resume(key: str, prec: str) -> Callable[[], Result]:
        if prec not in refs:
            return lambda: Result(key, "resume", None, f"{prec} needs CUDA")
        return lambda: check_resume(runner, key, prec, refs[prec], killed[prec], noise.get(prec))

    def evaluate() -> list[Result]:
        checks = [("1", "train", lambda: check_train(runner, refs["bf16"])),
                  ("2a", "torchrun", lambda: torchrun_check(runner, "2a", "torchrun", ws1)),
                  ("2b", "ddp", lambda: torchrun_check(runner, "2b", "ddp", two_rank["ddp"])),
                  ("2c", "fsdp", lambda: torchrun_check(runner, "2c", "fsdp", two_rank["fsdp"])),
                  ("3a", "resume", resume("3a", "bf16")), ("3b", "resume", resume("3b", "fp16")),
                  ("4", "cost", lambda: check_cost(runner, costs)), ("5", "memory", lambda: check_memory(runner, costs))]
        return [guarded(check, key, name) for key, name, check in checks]

    return evaluate


def guarded(check: Callable[[], Result], key: str, name: str) -> Result:
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - a check that breaks is a failed check, and the others still report
        return Result(key, name, False, f"the check itself failed: {type(e).__name__}: {e}")


def preflight(profile: Profile) -> str | None:
    """Why this machine cannot run the checks, or None."""
    try:
        import segmentation_models_pytorch  # noqa: F401
        import torch
        import torchsnapshot  # noqa: F401
        from torch.distributed.checkpoint.staging import StagingOptions

        StagingOptions(use_pinned_memory=False, use_shared_memory=False, use_async_staging=False,
                       use_non_blocking_copy=False)
    except Exception as e:  # noqa: BLE001 - reported as the reason
        return f"{type(e).__name__}: {e} (on a GPU machine, carry the wheels: bash bench/gpu_wheels.sh)"
    if profile.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device here (use --cpu for the CPU mode)"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="the CPU mode: tiny config, gloo (CI)")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"), help="scratch directory, emptied first")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole check (GPU 300, CPU 600)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = CPU if args.cpu else GPU
    start = time.monotonic()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    problem = preflight(profile)
    if problem:
        print(f"FAIL 0   preflight {problem}\n0 passed, 1 failed", flush=True)
        return 1
    import torch

    gpu = torch.cuda.get_device_name() if profile.device == "cuda" else "CPU"
    print(f"gpu_check on {gpu}, torch {torch.__version__}, python {sys.version.split()[0]}, out {out}", flush=True)
    runner = Runner(out, profile, start + (args.budget or profile.budget))
    try:
        results = plan(runner)()
    finally:
        runner.kill_all()
    for r in results:
        print(r.line(), flush=True)
    passed, failed = sum(r.ok is True for r in results), sum(r.ok is False for r in results)
    skipped = [f"{r.key} ({r.text})" for r in results if r.ok is None]
    if skipped:
        print(f"not applicable here, not counted: {', '.join(skipped)}")
    print(f"total {time.monotonic() - start:.0f} s")
    print(f"{passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

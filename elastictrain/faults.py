"""Test-only fault injection, driven by ``--debug.fault`` (never by editing code).

Form: ``KIND@POINT=N[:rank=R][:seconds=S]`` e.g. ``sigkill@step=5``, ``sigkill@saving=8:rank=1``, ``sigterm@step=3``.

KIND   sigkill  the rank SIGKILLs itself (a crash with no cleanup)
       raise    the rank raises RuntimeError (a Python crash; @record writes the error file)
       sigterm  the rank sends SIGTERM to itself (what torchrun delivers on preemption)
       groupterm the rank sends SIGTERM to its whole process group, DataLoader workers included
                (what SLURM delivers: it signals every process of a job)
       hang     the rank SIGSTOPs itself (a frozen peer; others hit the collective timeout)
       stall    the rank sleeps for 10 minutes, signal handlers still running (a very slow step)
       slow     the rank sleeps ``seconds`` (default 10) and goes on: a slow phase that is no hang
POINT  start    after start-up, before the first step of this process (N is ignored; use 0)
       step     right after optimizer step N completed
       saving   right after the snapshot at optimizer step N was started (async copy and write in flight)
       commit   on the writer thread, right before the commit record of the snapshot at step N
       saved    on the writer thread, right after the snapshot at step N was written (rank 0: committed)
                (the snapshot points count optimizer steps, so they name mid-epoch snapshots too)
       copy     right after the durable copy of the local snapshot at step N was handed to the writer
                process (a sigkill here kills the rank between the local commit and its durable copy;
                the writer process dies with it)
       writer   the durable writer process SIGKILLs itself after copying the first file of the snapshot at
                step N (KIND must be sigkill: the writer alone dies, the rank goes on); rank 0's, or on
                several nodes the writer of the node leader R (each copies its node's share)
       engine   the snapshot engine process (world size 1, CPU: snapshot/engine_process.py) SIGKILLs itself
                right after the engine wrote the snapshot at step N, before its checksums (KIND must be
                sigkill: the engine process alone dies, the rank goes on without that snapshot)
       restore  while restoring (N is ignored; use 0)
       validate at the start of the validation after optimizer step N

Several faults: separate them with commas (``slow@validate=4:seconds=8,slow@commit=8:seconds=8``).
A fault fires once per run directory: a marker under RUN_DIR/.faults/ is created atomically first, so
the restarted or re-run job goes on normally. Default rank is 0.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("sigkill", "raise", "sigterm", "groupterm", "hang", "stall", "slow")
POINTS = ("start", "step", "saving", "commit", "saved", "copy", "writer", "engine", "restore", "validate")
_FORM = re.compile(r"^(?P<kind>\w+)@(?P<point>\w+)=(?P<n>\d+)(?::rank=(?P<rank>\d+))?"
                   r"(?::seconds=(?P<seconds>\d+(?:\.\d+)?))?$")


@dataclass(frozen=True)
class Fault:
    kind: str
    point: str
    n: int
    rank: int
    seconds: float = 10.0


def parse_fault(spec: str) -> Fault:
    """Parse ``KIND@POINT=N[:rank=R][:seconds=S]``; raise ValueError with the accepted form otherwise."""
    m = _FORM.match(spec)
    if not m or m["kind"] not in KINDS or m["point"] not in POINTS:
        raise ValueError(f"{spec!r} is not KIND@POINT=N[:rank=R][:seconds=S] with KIND in {KINDS} and POINT in "
                         f"{POINTS}")
    return Fault(m["kind"], m["point"], int(m["n"]), int(m["rank"] or 0), float(m["seconds"] or 10.0))


class FaultInjector:
    """Fires the configured fault once, at the matching point, on the matching rank."""

    def __init__(self, spec: str, run_dir: Path, rank: int) -> None:
        first, _, rest = spec.partition(",")
        self.fault = parse_fault(first) if first else None
        self.marker = run_dir / ".faults" / re.sub(r"[^\w.=-]", "_", first)
        self.rank = rank
        self.others = [FaultInjector(s, run_dir, rank) for s in rest.split(",") if s] if rest else []

    def aims_at(self, point: str) -> bool:
        """Whether some fault of the spec (on any rank) is at ``point``."""
        return (self.fault is not None and self.fault.point == point) or any(o.aims_at(point) for o in self.others)

    def claim(self, point: str, n: int) -> str | None:
        """The kind of a fault due here that has not fired yet, now marked as fired; None otherwise. (For a
        fault another process carries out: the durable writer's.)"""
        kinds = [k for k in (o.claim(point, n) for o in self.others) if k]
        f = self.fault
        if f is None or f.point != point or self.rank != f.rank or (point not in ("start", "restore") and n != f.n):
            return kinds[0] if kinds else None
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return kinds[0] if kinds else None  # already fired in an earlier attempt
        return f.kind

    def maybe_fire(self, point: str, n: int) -> None:
        for other in self.others:
            other.maybe_fire(point, n)
        f = self.fault
        if f is None or f.point != point or self.rank != f.rank or (point not in ("start", "restore") and n != f.n):
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # already fired in an earlier attempt
        if f.kind == "raise":
            raise RuntimeError(f"injected fault {f.kind}@{point}={n} on rank {self.rank}")
        if f.kind == "groupterm":
            os.killpg(os.getpgid(0), signal.SIGTERM)
            return
        if f.kind == "slow":
            time.sleep(f.seconds)
            return
        if f.kind == "stall":
            time.sleep(600)  # signal handlers run meanwhile; the sleep resumes after each (PEP 475)
            return
        sig = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "hang": signal.SIGSTOP}[f.kind]
        os.kill(os.getpid(), sig)

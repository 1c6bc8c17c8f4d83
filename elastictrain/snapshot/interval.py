"""When to take a snapshot inside an epoch: every N steps, every M minutes, or 'auto'.

'auto' is the Young/Daly interval ``T = sqrt(2 C MTBF)``, which minimises the expected time lost to a
failure (the snapshots' cost, plus the work since the last one) when failures arrive at random:

- ``C``, the cost of one snapshot to the training loop, is measured in this run: how much longer the steps
  took while it was being written, over their usual length (which includes every wait for it inside those
  steps), plus the time it blocked the loop outside any measured step (a snapshot at an epoch end).
- ``MTBF`` starts from ``checkpoint.mtbf_hours`` and is refined by the failures this run directory has
  seen: the prior counts as one failure after ``mtbf_hours`` (a Gamma prior), so
  ``MTBF = (mtbf_hours + hours observed) / (1 + failures observed)``. A failure is an attempt that ended
  without finishing and without a preemption snapshot (a crash, a lost node, a kill).

Everything here is pure: the clock is passed in, so the decisions are unit-tested with a fake one. The
decision at a step boundary is each rank's own; the trainer agrees on it across ranks in the collective
it already makes there (any rank due means every rank snapshots), so the ranks never disagree. The
failure history is read by the manager when it restores (rank 0, from metrics.jsonl).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from elastictrain.runlog import attempts

MIN_AUTO_S = 10.0
"""The shortest automatic interval: below it, snapshots would follow each other as fast as they are written."""
ASSUMED_COST_S = 1.0
"""Under 'auto', the cost assumed until the first snapshot of this process has been measured (about a
synchronous snapshot of a few hundred MB here)."""


def young_daly(cost_s: float, mtbf_s: float) -> float:
    """The interval between snapshots that minimises expected lost time: sqrt(2 C MTBF), at least MIN_AUTO_S."""
    return max(MIN_AUTO_S, math.sqrt(2.0 * max(cost_s, 0.0) * mtbf_s))


def estimated_mtbf_hours(prior_hours: float, failures: int, hours_observed: float) -> float:
    """The prior as one pseudo-failure after ``prior_hours``, plus what this run directory has seen."""
    return (prior_hours + hours_observed) / (1 + failures)


def failure_history(records: list[dict[str, Any]], ongoing: bool = True) -> tuple[int, float]:
    """(failures, hours observed) from a run's metrics.jsonl records.

    An attempt starts at a start/resume event (runlog.attempts). An attempt is a failure unless it logged
    'preempted' or 'finished', except the last one when ``ongoing`` (it is this process's, still running).
    Hours observed: the time each attempt spent from its first to its last record (a finished run re-run
    later adds no idle time)."""
    runs = attempts(records)
    failures = 0
    seconds = 0.0
    for i, attempt in enumerate(runs):
        times = [r["time"] for r in attempt if isinstance(r.get("time"), (int, float))]
        if len(times) > 1:
            seconds += max(times) - min(times)
        ended = {r.get("event") for r in attempt if r.get("kind") == "event"}
        running = ongoing and i == len(runs) - 1
        if not running and not ended & {"preempted", "finished"}:
            failures += 1
    return failures, seconds / 3600.0


@dataclass(frozen=True)
class EveryMinutes:
    """``checkpoint.every_minutes`` parsed: 'auto', or a number of minutes (0 = no time-based snapshots)."""

    minutes: float = 0.0
    auto: bool = False

    @classmethod
    def parse(cls, text: str) -> EveryMinutes:
        """The one parser of the setting (config validation and the clock both use it).

        Raises:
            ValueError: naming the flag, for anything but 'auto' or a finite number >= 0.
        """
        if text == "auto":
            return cls(auto=True)
        try:
            minutes = float(text)
        except ValueError:
            minutes = -1.0
        if not (math.isfinite(minutes) and minutes >= 0):
            raise ValueError(f"--checkpoint.every_minutes: a number of minutes >= 0 or 'auto', got {text!r}")
        return cls(minutes)


@dataclass
class SnapshotClock:
    """Decides at each step boundary whether a mid-epoch snapshot is due, and measures what snapshots cost.

    Args:
        every_steps: a snapshot every N optimizer steps; 0 = off.
        every_minutes: the parsed setting (its text is parsed once, here).
        mtbf_hours: the prior mean time between failures for 'auto'.
    """

    every_steps: int = 0
    every_minutes: EveryMinutes | str = EveryMinutes()
    mtbf_hours: float = 6.0
    failures: int = 0
    hours_observed: float = 0.0
    last_snapshot_at: float | None = None
    costs: list[float] = field(default_factory=list)
    """Measured cost to the loop of each finished snapshot (seconds)."""
    _idle_steps: list[float] = field(default_factory=list)
    _writing_steps: list[float] = field(default_factory=list)
    _blocked: float = 0.0
    _blocked_outside: float = 0.0
    """Of ``_blocked``, the part outside any measured step (taken after an epoch's last step: :meth:`gap`)."""
    _last_boundary: float | None = None
    _measuring: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.every_minutes, str):
            self.every_minutes = EveryMinutes.parse(self.every_minutes)

    @property
    def auto(self) -> bool:
        return self.every_minutes.auto  # type: ignore[union-attr]

    @property
    def mtbf_s(self) -> float:
        return 3600.0 * estimated_mtbf_hours(self.mtbf_hours, self.failures, self.hours_observed)

    @property
    def cost_s(self) -> float | None:
        """The cost of one snapshot: the median of the recent measured ones (None before the first)."""
        return statistics.median(self.costs[-5:]) if self.costs else None

    def interval_s(self) -> float | None:
        """Seconds between time-based snapshots; None when they are off."""
        if self.auto:
            cost = self.cost_s
            return young_daly(ASSUMED_COST_S if cost is None else cost, self.mtbf_s)
        minutes = self.every_minutes.minutes  # type: ignore[union-attr]
        return minutes * 60.0 if minutes > 0 else None

    def due(self, step: int, now: float) -> bool:
        """Is a mid-epoch snapshot due at this boundary (after ``step`` optimizer steps)? This rank's view."""
        if self.every_steps and step > 0 and step % self.every_steps == 0:
            return True
        interval = self.interval_s()
        if interval is None or step == 0:
            return False
        if self.last_snapshot_at is None:
            self.last_snapshot_at = now  # the clock starts with the first step boundary of this process
            return False
        return now - self.last_snapshot_at >= interval

    # ---------- measuring ----------
    def boundary(self, now: float, writing: bool) -> None:
        """A step boundary at ``now``; ``writing`` says whether a snapshot was being written during that step."""
        if self._last_boundary is not None:
            (self._writing_steps if writing else self._idle_steps).append(now - self._last_boundary)
            del self._idle_steps[:-50]
        self._last_boundary = now

    def gap(self) -> None:
        """The time since the last boundary is no step: the epoch's last step, validation and the epoch-end
        snapshot. The next boundary starts measuring afresh (else that interval would count as one slow step)."""
        self._last_boundary = None

    def started(self, now: float, blocked_s: float) -> None:
        """A snapshot was started at ``now`` and kept the loop ``blocked_s`` seconds. Taken at a step boundary,
        that wait lies inside the step now running, which the next boundary measures."""
        self.last_snapshot_at = now
        self._blocked, self._writing_steps, self._measuring = blocked_s, [], True
        self._blocked_outside = 0.0 if self._last_boundary is not None else blocked_s

    @property
    def measuring(self) -> bool:
        """A snapshot was started and its cost is not known yet."""
        return self._measuring

    def add_blocked(self, seconds: float, outside: bool = False) -> None:
        """More time the loop waited for the snapshot being measured: for its staging, before an optimizer step
        (inside a step), or ``outside`` any of the steps it was written in (the next snapshot waiting for it)."""
        self._blocked += seconds
        if outside:
            self._blocked_outside += seconds

    def written(self) -> float | None:
        """The snapshot being measured has been written: record and return its cost to the loop."""
        if not self._measuring:
            return None
        self._measuring = False
        usual = statistics.median(self._idle_steps) if self._idle_steps else None
        if usual is None or not self._writing_steps:  # nothing to compare: what the loop waited, at least
            cost = self._blocked
        else:  # the waits inside the writing steps are part of their slowdown: not counted twice; but never
            # less than those waits (a slowdown measured below them is the steps' noise hiding them)
            slowdown = sum(max(0.0, d - usual) for d in self._writing_steps)
            cost = max(self._blocked, self._blocked_outside + slowdown)
        self.costs.append(cost)
        return cost

    def describe(self) -> str:
        """Why the interval is what it is, for the log: 'snapshot every 4.1 min: cost 0.9 s, MTBF 6.0 h'."""
        interval = self.interval_s()
        if interval is None:
            return "no time-based snapshots"
        if not self.auto:
            return f"snapshot every {interval / 60:.1f} min (checkpoint.every_minutes)"
        cost = f"cost {self.cost_s:.2f} s" if self.cost_s is not None else f"cost {ASSUMED_COST_S:.0f} s assumed until measured"
        return (f"snapshot every {interval / 60:.1f} min: {cost}, MTBF {self.mtbf_s / 3600:.1f} h "
                f"({self.failures} failure(s) in {self.hours_observed:.1f} h seen here, prior {self.mtbf_hours} h)")

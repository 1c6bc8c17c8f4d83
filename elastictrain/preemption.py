"""Preemption: signal handlers only set a flag; the loop agrees on it across ranks at step boundaries.

No I/O and no collectives run inside a handler (a handler may interrupt anything, and one blocked in a
gloo collective does not run at all): the snapshot is taken by the loop, at a step boundary, where
the state is consistent on every rank.

The same signals arrive when torchrun tears a worker group down (a peer crashed, or a node joins):
SIGTERM to every worker, SIGKILL after a fixed 30 s grace at a restart. A worker whose peer died cannot
snapshot (its collectives fail); it is on its way out with an exception, and :meth:`end_if_unanswered`
lets the signal take its default effect then, instead of the process spending seconds more in
clean-up and interpreter shutdown while the whole group waits to be restarted.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

from elastictrain.config import PreemptionConfig
from elastictrain.dist import DistContext, any_rank

log = logging.getLogger(__name__)


class Preemption:
    """Install with :meth:`install`; ask :meth:`should_stop` at each step boundary (a collective)."""

    def __init__(self, cfg: PreemptionConfig) -> None:
        self.cfg = cfg
        self.requested: str | None = None
        self.requested_at = 0.0
        self._answered = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.cfg.signals:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            self.requested_at = time.monotonic()

    def answered(self) -> None:
        """The run reached a clean end (finished, or stopped with a snapshot): a signal needs nothing more."""
        self._answered = True

    def end_if_unanswered(self) -> None:
        """Called last, after clean-up: if a signal came but the run did not end cleanly (it is failing),
        die of that signal now, as the process would have without our handler. torchrun then sees the
        worker gone at once; it already knows the root cause from the rank that failed first."""
        if self.requested is None or self._answered:
            return
        sig = signal.Signals[self.requested]
        log.warning("%s received while failing: exiting on it without a snapshot", sig.name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)

    def should_stop(self, ctx: DistContext) -> bool:
        """True on every rank when any rank got a preemption signal."""
        return any_rank(ctx, self.requested is not None)

    def start_deadline(self) -> threading.Timer:
        """Exit hard if the preemption snapshot overruns its budget: a snapshot that is cut off is never
        marked complete, whereas being SIGKILLed by torchrun or SLURM later leaves no clear exit status."""
        started = self.requested_at or time.monotonic()
        remaining = max(1.0, self.cfg.deadline_s - (time.monotonic() - started))

        def expire() -> None:
            log.error("preemption snapshot overran --preemption.deadline_s=%s; exiting without it",
                      self.cfg.deadline_s)
            os._exit(self.cfg.exit_code)

        timer = threading.Timer(remaining, expire)
        timer.daemon = True
        timer.start()
        return timer

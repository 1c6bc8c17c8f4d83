"""Preemption: signal handlers only set a flag; the loop agrees on it across ranks at step boundaries.

No I/O and no collectives run inside a handler (a handler may interrupt anything, and one blocked in a
gloo collective does not run at all): the snapshot is taken by the loop, at a step boundary, where
the state is consistent on every rank.

The same signals arrive when torchrun tears a worker group down (a peer crashed, or a node joins):
SIGTERM to every worker, SIGKILL after a fixed 30 s grace at a restart. A worker whose peer died cannot
snapshot (its collectives fail); it is on its way out with an exception, and :meth:`end_if_unanswered`
lets the signal take its default effect then, instead of the process spending seconds more in
clean-up and interpreter shutdown while the whole group waits to be restarted.

Ctrl-C twice: the first SIGINT is a preemption request like any other (snapshot at the end of this step,
exit 75), and rank 0 says so at once on stderr. A SIGINT after that means "stop now": the process exits
with :data:`INTERRUPTED_EXIT_CODE` (130, the shell's 128 + SIGINT) without waiting for the snapshot; the
snapshot in progress is never committed, so the next start resumes from the previous complete one.
The notice is written with ``os.write`` on stderr's file descriptor: logging takes locks and Python's
buffered streams refuse re-entry, and a handler may run in the middle of either.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

from elastictrain.config import PreemptionConfig
from elastictrain.osutil import launcher

log = logging.getLogger(__name__)

INTERRUPTED_EXIT_CODE = 130
"""Exit status after a second Ctrl-C: stopped at once, no snapshot of the current step."""


class Preemption:
    """Install with :meth:`install`; the loop reads :attr:`requested` at each step boundary and agrees on it
    across ranks in the collective it makes there (Trainer.train_epoch)."""

    def __init__(self, cfg: PreemptionConfig) -> None:
        self.cfg = cfg
        self.requested: str | None = None
        self.requested_at = 0.0
        self._answered = False
        self._previous: dict[int, object] = {}
        # Decided before any handler runs: a handler must not look anything up. Only global rank 0 speaks, so
        # a Ctrl-C under torchrun prints one notice, not one per rank.
        self._notice = launcher().rank == 0

    def install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.cfg.signals:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self, keep_if_answered: bool = False) -> None:
        """Restore the previous handlers; with ``keep_if_answered``, a run that reached its clean end keeps ours
        until the process exits: a second signal landing during clean-up (metrics, the lock, the process
        group) must not turn its exit 75 (or 0) into death by that signal."""
        if keep_if_answered and self._answered:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def hold_to_exit(self) -> None:
        """Last thing before the process exits: a run that answered ignores further preemption signals from
        here on (Python resets its own handlers to the default during interpreter shutdown, and a SIGTERM
        then would turn exit 75 into death by that signal); any other run restores the previous handlers."""
        if not self._answered:
            self.uninstall()
            return
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            self.requested_at = time.monotonic()
            if self._notice:
                self._write_notice(signum)
        elif signum == signal.SIGINT:
            os._exit(INTERRUPTED_EXIT_CODE)  # "stop now": no clean-up, no snapshot (one in flight never commits)

    def _write_notice(self, signum: int) -> None:
        again = " Press Ctrl-C again to stop at once without it" if signum == signal.SIGINT else ""
        text = (f"\nelastictrain: {signal.Signals(signum).name}: taking a snapshot at the end of this step, then "
                f"exiting {self.cfg.exit_code}.{again and again + f' (exit {INTERRUPTED_EXIT_CODE}).'}\n")
        try:
            os.write(2, text.encode())
        except OSError:  # stderr closed: the notice is a courtesy
            pass

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

    def start_deadline(self) -> threading.Timer:
        """Exit hard if the preemption snapshot overruns its budget: a snapshot that is cut off is never
        marked complete, whereas being SIGKILLed by torchrun or SLURM later leaves no clear exit status.

        A scheduler's grace period runs from its signal; a person's Ctrl-C has no kill timer behind it (and a
        second Ctrl-C to stop now), so for SIGINT the budget runs from the step boundary: a CPU step longer
        than the budget would otherwise always end a Ctrl-C without the promised snapshot."""
        started = time.monotonic() if self.requested == "SIGINT" else (self.requested_at or time.monotonic())
        remaining = max(1.0, self.cfg.deadline_s - (time.monotonic() - started))

        def expire() -> None:
            log.error("preemption snapshot overran --preemption.deadline_s=%s; exiting without it",
                      self.cfg.deadline_s)
            os._exit(self.cfg.exit_code)

        timer = threading.Timer(remaining, expire)
        timer.daemon = True
        timer.start()
        return timer

"""Processes that die with the process that started them: torchrun workers with their agent, DataLoader
workers with their training process.

torchrun starts every worker in its own session (``start_new_session=True``), so when the agent dies
without stopping them (``kill -9`` of torchrun, an OOM kill, a signal it does not handle, such as SIGHUP
with ``--signals-to-handle SIGTERM,SIGINT,SIGUSR1``) the workers would go on training and committing
snapshots as orphans, beside whatever the user starts next in the same run directory.

* A worker watches its agent (:func:`watch_launcher`): a daemon thread polls ``os.getppid()``. When the
  agent is gone, the worker sends itself its first preemption signal (SIGTERM by default): the ordinary
  preemption path, so the orphans agree at the next step boundary, take a snapshot there and exit 75,
  losing no work, and the next command continues exactly. Why not an immediate SIGKILL: every local
  worker is orphaned at once, so they can still agree; the snapshot is at most ``preemption.deadline_s``
  away; the run-directory lock (runlock.py) keeps a next command out until they are gone; and an agent
  that died of SIGHUP or SIGUSR1 was most likely asked for exactly that. If the worker is still alive
  ``preemption.deadline_s + 30`` s later (wedged in a collective with a frozen peer, say), it SIGKILLs
  itself. Why a watchdog thread rather than ``PR_SET_PDEATHSIG``: the death signal fires when the *thread*
  that forked the worker exits, not the process; torch 2.14.1's agent forks from its main thread today,
  but a parent-pid check cannot be fooled by a launcher that does otherwise (elastic_launch from a thread).
* A DataLoader worker holds nothing worth saving and ignores the preemption signals (data.py), so it gets
  ``PR_SET_PDEATHSIG`` = SIGKILL (:func:`die_with_parent`): it dies the instant its training process does.
  The DataLoader forks its workers from the thread that iterates it, our main thread.

Residual window: a launcher that dies between starting a worker and the worker's call of
:func:`watch_launcher` (interpreter start and imports, a few seconds) is noticed only if the orphan was
re-parented to pid 1, not to a sub-reaper.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

POLL_S = 0.5
"""How often a worker checks that its launcher is alive."""
HARD_KILL_AFTER_S = 30.0
"""Beyond ``preemption.deadline_s``: how long an orphan may take to snapshot and exit before it SIGKILLs itself."""
_PR_SET_PDEATHSIG = 1


def watch_launcher(stop_signal: signal.Signals, deadline_s: float, parent: int | None = None) -> threading.Thread:
    """Start the daemon thread that stops this process when its launcher (``parent``, default the current
    parent process) is gone: ``stop_signal`` to itself at once, SIGKILL ``deadline_s + HARD_KILL_AFTER_S``
    later if it is still alive."""
    parent = os.getppid() if parent is None else parent
    thread = threading.Thread(target=_watch, args=(parent, stop_signal, deadline_s), name="lifeline", daemon=True)
    thread.start()
    return thread


def _watch(parent: int, stop_signal: signal.Signals, deadline_s: float) -> None:
    # pid 1 from the start: the launcher died before we could watch it (we were re-parented to init).
    while os.getppid() == parent and parent != 1:
        time.sleep(POLL_S)
    log.error("the launcher of this worker (pid %d) is gone: stopping with %s (snapshot at the next step "
              "boundary, then exit); SIGKILL in %.0f s if still running", parent, stop_signal.name,
              deadline_s + HARD_KILL_AFTER_S)
    os.kill(os.getpid(), stop_signal)
    time.sleep(deadline_s + HARD_KILL_AFTER_S)
    log.error("still running %.0f s after the launcher died: SIGKILL", deadline_s + HARD_KILL_AFTER_S)
    for handler in logging.getLogger().handlers + logging.getLogger("elastictrain").handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(parent: int | None) -> None:
    """SIGKILL this process the moment its parent thread ends (Linux ``PR_SET_PDEATHSIG``; a no-op
    elsewhere). ``parent`` is the pid expected as parent: if it already died, exit now."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this process may outlive its parent",
                    ctypes.get_errno())
        return
    if parent is not None and os.getppid() != parent:  # it died before the death signal was armed
        os._exit(0)

"""Preemption's pure logic: handlers only record the first signal; uninstall restores; a signal the run
could not answer (it is failing) ends the process by that signal; the deadline timer exits hard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from elastictrain.config import PreemptionConfig
from elastictrain.preemption import Preemption
from helpers import ROOT, base_env

# Signal deadlines are judged against the clock: no second job beside them (conftest.py).
pytestmark = pytest.mark.alone


def test_handler_only_records_the_first_signal_and_uninstall_restores() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    p = Preemption(PreemptionConfig(signals=["SIGUSR1", "SIGTERM"]))
    p.install()
    try:
        assert p.requested is None
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs at the next bytecode boundary
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.requested == "SIGUSR1" and p.requested_at > 0
    finally:
        p.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def run_snippet(body: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent("""
        import os, signal
        from elastictrain.config import PreemptionConfig
        from elastictrain.preemption import Preemption
        p = Preemption(PreemptionConfig(signals=["SIGTERM", "SIGUSR1"], deadline_s=1.0, exit_code=75))
        p.install()
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=base_env(), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("answered", [False, True])
def test_an_unanswered_signal_ends_the_process_by_that_signal(answered: bool) -> None:
    """What torchrun sees when it SIGTERMs a worker whose peer died: the worker gone at once, not after
    seconds of clean-up (and not an exit 0 or 75 that would claim a snapshot)."""
    result = run_snippet(f"""
        os.kill(os.getpid(), signal.SIGTERM)
        if {answered}:
            p.answered()
        p.uninstall()
        p.end_if_unanswered()
        print("still here")
    """)
    if answered:
        assert result.returncode == 0 and "still here" in result.stdout
    else:
        assert result.returncode == -signal.SIGTERM, result.stderr
        assert "still here" not in result.stdout


def test_the_deadline_exits_hard_when_the_snapshot_overruns() -> None:
    result = run_snippet("""
        import time
        os.kill(os.getpid(), signal.SIGUSR1)
        p.start_deadline()
        time.sleep(30)  # a snapshot that never finishes
    """)
    assert result.returncode == 75
    assert "overran --preemption.deadline_s" in result.stderr


def test_first_ctrl_c_says_at_once_what_happens_and_the_second_stops_at_once() -> None:
    """The handler itself: the notice comes from the handler (before the loop could act on the flag), and a
    second SIGINT ends the process at once with 130, nothing after it running."""
    result = run_snippet("""
        import sys, time
        signal.signal(signal.SIGINT, p._handle)  # the snippet's config does not list SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        print("flag", p.requested, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        print("still here", flush=True)
    """)
    assert result.returncode == 130, (result.returncode, result.stderr)
    assert "flag SIGINT" in result.stdout and "still here" not in result.stdout
    assert ("elastictrain: SIGINT: taking a snapshot at the end of this step, then exiting 75. Press Ctrl-C "
            "again to stop at once without it (exit 130).") in result.stderr


def test_a_second_sigterm_does_not_cut_the_snapshot_short() -> None:
    """SLURM and torchrun send SIGTERM and wait: only a person's second Ctrl-C means 'now'."""
    result = run_snippet("""
        import time
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        print("still here", p.requested, flush=True)
    """)
    assert result.returncode == 0 and "still here SIGTERM" in result.stdout
    assert "SIGTERM: taking a snapshot at the end of this step, then exiting 75.\n" in result.stderr
    assert "Ctrl-C" not in result.stderr


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGINT"])
def test_the_snapshot_budget_of_a_ctrl_c_starts_at_the_step_boundary(sig: str) -> None:
    """A step longer than the budget (2 s here): a scheduler's signal is out of time at once (1 s is the least
    it gets), a person's Ctrl-C still gets the whole budget for the snapshot."""
    result = run_snippet(f"""
        import time
        p.cfg.deadline_s = 2.0
        signal.signal(signal.SIGINT, p._handle)
        os.kill(os.getpid(), signal.{sig})
        time.sleep(2.2)  # the rest of a slow step
        p.start_deadline()
        time.sleep(1.5)  # a snapshot within 2 s
        print("snapshot done", flush=True)
    """)
    if sig == "SIGINT":
        assert result.returncode == 0 and "snapshot done" in result.stdout, result.stderr
    else:
        assert result.returncode == 75 and "snapshot done" not in result.stdout

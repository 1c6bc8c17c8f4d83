"""Preemption's pure logic: handlers only record the first signal; uninstall restores; a signal the run
could not answer (it is failing) ends the process by that signal; the deadline timer exits hard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from elastictrain.config import PreemptionConfig
from elastictrain.dist import DistContext
from elastictrain.preemption import Preemption
from helpers import ROOT, base_env


def world_of_one() -> DistContext:
    return DistContext(0, 1, 0, torch.device("cpu"), None)


def test_handler_only_records_the_first_signal_and_uninstall_restores() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    p = Preemption(PreemptionConfig(signals=["SIGUSR1", "SIGTERM"]))
    p.install()
    try:
        assert not p.should_stop(world_of_one())
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs at the next bytecode boundary
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.requested == "SIGUSR1" and p.requested_at > 0
        assert p.should_stop(world_of_one())
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

"""Helpers for tests/test_multinode.py: test hosts (tests/hosts.sh: network namespaces on a private bridge),
running commands on them, failing and partitioning them, and proving afterwards that nothing of theirs is left.

A host "fails" the way a machine does when its power goes: its link goes down first, then every process on
it is SIGKILLed, so no FIN or RST reaches the others and they learn of the loss only from their timeouts.
A host is "partitioned" when only its link goes down: its processes live on and keep the shared file system.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT

HOSTS = ROOT / "tests" / "hosts.sh"
HOSTS_DIR = Path(os.environ.get("HOSTS_DIR", "/run/elastictrain-hosts"))


def require_root(what: str) -> None:
    """Skip without root, except under ELASTICTRAIN_REQUIRE_SLURM=1 (CI, as root), where it is a failure."""
    if os.geteuid() != 0:
        skip_or_fail(f"{what} need root: network namespaces, and SLURM's daemons run as root")


def skip_or_fail(reason: str) -> None:
    if os.environ.get("ELASTICTRAIN_REQUIRE_SLURM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def hosts(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", str(HOSTS), *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"tests/hosts.sh {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def on_host(host: str, cmd: list[str]) -> list[str]:
    """``cmd`` run on ``host``; the environment passes through, and the pid becomes cmd's."""
    return ["bash", str(HOSTS), "exec", host, *cmd]


def pids_on(host: str) -> list[int]:
    return [int(p) for p in hosts("pids", host).stdout.split()]


def fail_host(host: str) -> None:
    """The machine dies: link down, then SIGKILL of everything on it."""
    hosts("link", host, "down")
    hosts("kill", host)


def partition(host: str) -> None:
    hosts("link", host, "down")


def stopped(pid: int) -> bool:
    """True for a SIGSTOPped process (state T)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def leftovers(host_set: str, names: list[str]) -> list[str]:
    """What of test-host set ``host_set`` (hosts ``names``) still exists: namespaces, links, records."""
    left = [f"netns {n}" for n in names if Path(f"/run/netns/{n}").exists()]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    left += [line.split(":")[1].strip() for line in links.splitlines()
             if line.rstrip().endswith(f"elastictrain-hosts:{host_set}")]
    if (HOSTS_DIR / host_set).exists():
        left.append(str(HOSTS_DIR / host_set))
    return left


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

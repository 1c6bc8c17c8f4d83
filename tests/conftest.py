"""Session fixtures; the helpers themselves live in helpers.py."""

from __future__ import annotations

import fcntl
import tempfile
from pathlib import Path

import pytest

from helpers import run_cli, tiny_args


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Uninterrupted tiny runs at world size 1 (plain) and 2 (torchrun), made once per session and
    shared by every test that compares a disturbed run against them."""
    root = tmp_path_factory.mktemp("reference")
    refs = {}
    for nproc in (1, 2):
        run_dir = root / f"ws{nproc}"
        run_cli(tiny_args(run_dir), nproc=0 if nproc == 1 else nproc, check=True)
        refs[nproc] = run_dir
    return refs


# ------------------------------------------------------------------ running on two workers (pytest-xdist)
# The suite runs with `-n 2 --dist loadfile` (pyproject's addopts): most tests spend their time starting
# processes (importing torch and smp: ~4.5 s each) on one core, so two at once fill both cores. Three rules
# keep that sound:
# - a module's tests stay on one worker, in order, so its module fixtures are made once (loadfile);
# - the largest modules start first, so no long one is left alone at the end;
# - a test marked `alone` (recovery times, hang and peer timeouts, signal deadlines: whatever a second
#   job's load could make late) runs with nothing beside it: it takes a lock the other worker's tests
#   share. tests/test_multinode.py is not: its lost hosts are found in 6-14 s against bounds of 100 s, and
#   its tests, the only ones to drive the multi-host cluster and test hosts, run one at a time on one worker.
#   Beside test_slurm and test_untrusted it took 7:18 against 10:36 for the three modules one test at a time.


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    sizes: dict[Path, float] = {}
    for item in items:
        sizes[item.path] = sizes.get(item.path, 0) + (10 if item.get_closest_marker("slow") else 0.5)
    items.sort(key=lambda item: -sizes[item.path])  # stable: a module's own order is kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    """Under xdist: an `alone` test holds the run's lock exclusively (set-up, call and tear-down), every
    other test holds it shared. A turnstile keeps a waiting `alone` test from being overtaken."""
    uid = getattr(item.config, "workerinput", {}).get("testrunuid")
    if uid is None:  # not under xdist: one test at a time anyway
        yield
        return
    base = Path(tempfile.gettempdir()) / f"elastictrain-pytest-{uid}"
    alone = item.get_closest_marker("alone") is not None
    with open(f"{base}.turnstile", "a") as turnstile, open(f"{base}.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)

"""Session fixtures; the helpers themselves live in helpers.py."""

from __future__ import annotations

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

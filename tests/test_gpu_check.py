"""bench/gpu_check.py --cpu: the GPU check's own code (its runs, its readers, its verdicts) on CPU with gloo, so
the script a GPU session runs in its few minutes cannot rot between such sessions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, base_env

APPLY_ON_CPU = ("1", "2a", "2b", "2c", "3a", "4")
"""3b (fp16 needs CUDA) and 5 (GPU memory) do not apply on CPU."""


@pytest.mark.slow
def test_gpu_check_cpu_mode_passes_every_check_that_applies_on_cpu(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(tmp_path / "gpu-check")],
                         cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=540)
    shown = out.stdout[-8000:] + out.stderr[-3000:]
    assert re.search(rf"^{len(APPLY_ON_CPU)} passed, 0 failed$", out.stdout, re.M), shown
    assert out.returncode == 0, shown
    for key in APPLY_ON_CPU:
        assert re.search(rf"^PASS {key}\s", out.stdout, re.M), f"no PASS line for check {key}\n{shown}"
    assert re.search(r"^n/a\s+3b\s.*fp16 needs CUDA", out.stdout, re.M), shown
    assert re.search(r"^n/a\s+5\s", out.stdout, re.M), shown
    # The NCCL-first path ran: refused (CPU), then gloo, and the line says so.
    for key in ("2b", "2c"):
        line = re.search(rf"^PASS {key}\s.*(?:\n\s+.*)*", out.stdout, re.M)
        assert line and "gloo ran, 2 rank(s)" in line.group(0) and "nccl failed" in line.group(0), shown
    assert "bitwise equal" in out.stdout and "mid-epoch" in out.stdout, shown

"""The logic of the GPU-only code paths, where it can be tested on CPU: fp16 and NCCL refused where they cannot
work, a user error at start-up exits 2, the collectives of the training loop under a default group without a
CPU backend (as NCCL's), the GradScaler's state through a real snapshot, and the deterministic-cuBLAS setting.
What only a GPU can show is bench/gpu_check.py's (its CPU mode is tests/test_gpu_check.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from elastictrain import device as devices
from elastictrain.snapshot import SnapshotManager
from elastictrain.snapshot.appstate import build_app_state
from elastictrain.config import CheckpointConfig, load_config
from elastictrain.dist import DistContext
from elastictrain.errors import UserError
from elastictrain.state import TrainState
from helpers import ROOT, base_env, run_cli, tiny_args

WS1 = DistContext(0, 1, 0, torch.device("cpu"), None)


# ---------- settings that only CUDA can honour ----------
@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_fp16_and_nccl_on_a_device_other_than_cuda_are_user_errors(device: str) -> None:
    """Decided on the resolved device: --train.device auto on a machine without CUDA is cpu, and fp16 there
    used to train on without a GradScaler (gradients underflow), NCCL to fail on device ids."""
    with pytest.raises(UserError, match="--train.precision fp16 needs CUDA"):
        devices.autocast_dtype(torch.device(device), "fp16")
    with pytest.raises(UserError, match="--dist.backend nccl needs CUDA"):
        devices.backend_for(torch.device(device), "nccl")
    assert devices.autocast_dtype(torch.device(device), "bf16") == torch.bfloat16
    assert devices.backend_for(torch.device(device), "auto") == "gloo"
    assert devices.autocast_dtype(torch.device("cuda"), "fp16") == torch.float16  # no CUDA call: a dtype only
    assert devices.backend_for(torch.device("cuda"), "auto") == "nccl"


def test_nccl_with_an_explicit_cpu_device_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="--dist.backend: nccl needs CUDA; use gloo"):
        load_config(["--dist.backend", "nccl", "--train.device", "cpu"])


def _start_up_error_cases() -> list[Any]:
    cases = [pytest.param(["--train.precision", "fp16"], "--train.precision fp16 needs CUDA", id="fp16-auto-device"),
             pytest.param(["--checkpoint.resume_from", "no-such-snapshot"], "--checkpoint.resume_from",
                          id="resume-from-missing")]
    if not torch.cuda.is_available():
        cases.append(pytest.param(["--train.device", "cuda"], "--device cuda: no CUDA device is available here", id="no-cuda"))
    return cases


@pytest.mark.parametrize(("flags", "message"), _start_up_error_cases())
def test_a_user_error_found_at_start_up_is_one_line_and_exit_2(tmp_path: Path, flags: list[str], message: str) -> None:
    """errors.UserError's promise, for mistakes only start-up can see (the device, the run directory)."""
    run_dir = tmp_path / "run"
    out = run_cli(tiny_args(run_dir, *flags))
    assert out.returncode == 2, out.stdout[-3000:]
    assert f"elastictrain: {message}" in out.stdout and "Traceback" not in out.stdout, out.stdout[-3000:]
    assert not (run_dir / "snapshots").exists() or not any((run_dir / "snapshots").iterdir())


# ---------- collectives under a default group that, like NCCL's, has no CPU backend ----------
COLLECTIVES = """
import sys, torch, torch.distributed as dist
from elastictrain.dist import (DistContext, all_gather_object, all_reduce_sum, any_rank_each, barrier,
                               broadcast_object, on_main_together, raise_together)
dist.init_process_group("cuda:gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
try:
    dist.all_reduce(torch.zeros(1))
    sys.exit("the premise failed: the default group took a CPU tensor")
except RuntimeError as e:
    assert "No backend type associated with device type cpu" in str(e), e
# What init_distributed builds under nccl: a gloo group for the snapshot engine, one for host-side collectives.
ctx = DistContext(0, 1, 0, torch.device("cpu"), "nccl", dist.new_group(backend="gloo"), dist.new_group(backend="gloo"))
assert all_reduce_sum(ctx, torch.tensor([1.5, 2.0], dtype=torch.float64)).tolist() == [1.5, 2.0]
assert any_rank_each(ctx, True) == [True] and any_rank_each(ctx, False, True) == [False, True]
assert broadcast_object(ctx, {"a": 1}) == {"a": 1} and all_gather_object(ctx, 3) == [3]
barrier(ctx)
raise_together(ctx, None)
assert on_main_together(ctx, lambda: "done") == "done"
dist.destroy_process_group()
print("collectives ok")
"""


def test_the_loops_collectives_work_where_the_default_group_has_no_cpu_backend(tmp_path: Path) -> None:
    """Under NCCL the default group refuses CPU tensors ('No backend type associated with device type cpu');
    the training loop's sums (train and validation losses, confusion stats) and its step-boundary decisions
    are on CPU. A default group made for CUDA alone ('cuda:gloo') has the same property on a CPU machine."""
    out = subprocess.run([sys.executable, "-c", COLLECTIVES, str(tmp_path / "store")], cwd=ROOT, env=base_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "collectives ok" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


# ---------- the GradScaler's state in a snapshot ----------
def _scaled_training(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    # The CPU scaler: the same state and state_dict as the CUDA one the trainer builds for fp16.
    return model, opt, sched, torch.amp.GradScaler("cpu")


def _scaled_step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, scaler: torch.amp.GradScaler,
                 overflow: bool = False) -> None:
    scaler.scale(model(torch.randn(16, 4)).square().mean()).backward()
    if overflow:  # what an fp16 overflow looks like to the scaler: the step is skipped, the scale backs off
        model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    sched.step()


@pytest.mark.parametrize("engine", ["torchsnapshot", "dcp"])
def test_grad_scaler_state_round_trips_through_a_snapshot(tmp_path: Path, engine: str) -> None:
    """A backed-off scale and a running growth tracker are restored (a fresh scaler would restart at 65536
    and skip other steps than the uninterrupted run), and the next step scales with them."""
    model, opt, sched, scaler = _scaled_training()
    state = TrainState()
    mgr = SnapshotManager(CheckpointConfig(engine=engine, mode="async"), WS1, tmp_path, 4)
    _scaled_step(model, opt, sched, scaler, overflow=True)
    for _ in range(3):
        _scaled_step(model, opt, sched, scaler)
    saved = scaler.state_dict()
    assert saved["scale"] == 2.0**15 and saved["_growth_tracker"] == 3, saved
    state.epoch, state.step = 1, 4
    assert mgr.maybe_save(build_app_state(model, opt, sched, scaler, state), state, 1.0)
    mgr.wait()
    mgr.close()

    fresh_model, fresh_opt, fresh_sched, fresh_scaler = _scaled_training(seed=1)
    resumed = SnapshotManager(CheckpointConfig(engine=engine), WS1, tmp_path, 4).restore_latest(
        build_app_state(fresh_model, fresh_opt, fresh_sched, fresh_scaler, TrainState()))
    assert resumed is not None and resumed.step == 4
    assert fresh_scaler.state_dict() == saved
    assert float(fresh_scaler.scale(torch.ones(1))) == 2.0**15


# ---------- deterministic cuBLAS ----------
@pytest.fixture
def restore_determinism() -> Any:
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_deterministic_mode_sets_cublas_workspace_on_cuda_only_and_keeps_a_users_value(
        monkeypatch: pytest.MonkeyPatch, restore_determinism: None) -> None:
    """torch documents CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8) for deterministic cuBLAS; without it a CUDA run
    with --debug.deterministic (the default) is not repeatable. Nothing here touches CUDA itself."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    devices.make_deterministic(torch.device("cpu"))
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.are_deterministic_algorithms_enabled()
    devices.make_deterministic(torch.device("cuda", 0))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    devices.make_deterministic(torch.device("cuda", 0))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert devices.memory_peaks(torch.device("cpu")) == {}

"""Everything that depends on the kind of device, in one place (CPU tests exercise the rest of the Mac path).

What differs per device: which one 'auto' picks, the autocast dtype, whether a GradScaler is needed,
which RNGs exist, and the process-group backend.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from elastictrain.errors import UserError


def pick_device(requested: str, local_rank: int) -> torch.device:
    """Resolve ``--device`` ('auto': cuda, then mps, then cpu); one CUDA device per local rank."""
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here (try --device auto or cpu)")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if requested == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here (try --device auto or cpu)")
    return torch.device(requested)


def backend_for(device: torch.device, requested: str) -> str:
    """nccl for CUDA, gloo for everything else (MPS and CPU have no other backend).

    Raises:
        UserError: ``--dist.backend nccl`` on a process whose device is not CUDA (``--train.device auto`` may
            have resolved to cpu): NCCL would fail later with a message about device ids.
    """
    if requested == "nccl" and device.type != "cuda":
        raise UserError(f"--dist.backend nccl needs CUDA, but this process runs on {device.type}; use "
                        f"--dist.backend gloo (or auto)")
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``--train.precision`` on this device, or None for full fp32.

    'auto' picks bf16 where it is fast (CUDA with bf16 support, MPS) and fp32 on CPU, where bf16
    autocast is slower than fp32 for convolutions.

    Raises:
        UserError: fp16 on a device other than CUDA. Only CUDA gets a GradScaler, and fp16 gradients without
            loss scaling underflow to zero: the run would train on silently without learning. Checked here,
            on the resolved device, because ``--train.device auto`` is only resolved at start-up.
    """
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise UserError(f"--train.precision fp16 needs CUDA (loss scaling with a GradScaler), but this process "
                            f"runs on {device.type}; use --train.precision bf16 or fp32")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "mps":
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """An autocast context, or a no-op when training in fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def needs_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> bool:
    """fp16 underflows without loss scaling; bf16 and fp32 do not need it."""
    return dtype == torch.float16 and device.type == "cuda"


def make_deterministic(device: torch.device) -> None:
    """Deterministic algorithms (``--debug.deterministic``); on CUDA also the cuBLAS workspace setting torch
    documents for reproducible matrix products (read when cuBLAS is first used, so this must run before the
    first forward). A value the user set is kept. Operations without a deterministic kernel warn (they name
    themselves in the log) instead of stopping the run."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def wait_for_queued_work(device: torch.device) -> None:
    """Block until the kernels queued so far on this thread's CUDA stream have run (a no-op elsewhere).

    The snapshot stager copies device tensors on a stream of its own, which does not wait for the training
    stream: without this, its copy could read parameters before the optimizer step queued just before has
    written them. At a step boundary the queue holds little more than that step (the loss's .item() waited
    for the backward), so the wait is short."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def memory_peaks(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory allocated and reserved by this process since the last call, in MiB, then reset; {} on
    other devices. Logged with every train record, so a step with a snapshot in flight can be compared with
    one without."""
    if device.type != "cuda":
        return {}
    peaks = {"gpu_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
             "gpu_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20}
    torch.cuda.reset_peak_memory_stats(device)
    return {k: round(v, 1) for k, v in peaks.items()}


def device_rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """RNG states of the accelerator, moved to CPU so a snapshot never holds device tensors."""
    if device.type == "cuda":
        return {"cuda": torch.cuda.get_rng_state(device).cpu()}
    if device.type == "mps":
        return {"mps": torch.mps.get_rng_state().cpu()}
    return {}


def set_device_rng_states(device: torch.device, states: dict[str, torch.Tensor]) -> None:
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    elif device.type == "mps" and "mps" in states:
        torch.mps.set_rng_state(states["mps"])

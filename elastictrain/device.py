"""Everything that depends on the kind of device, in one place (CPU tests exercise the rest of the Mac path).

What differs per device: which one 'auto' picks, the autocast dtype, whether a GradScaler is needed,
which RNGs exist, and the process-group backend.
"""

from __future__ import annotations

import contextlib
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
    """nccl for CUDA, gloo for everything else (MPS and CPU have no other backend)."""
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``--train.precision`` on this device, or None for full fp32.

    'auto' picks bf16 where it is fast (CUDA with bf16 support, MPS) and fp32 on CPU, where bf16
    autocast is slower than fp32 for convolutions.
    """
    if precision == "fp32":
        return None
    if precision == "fp16":
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

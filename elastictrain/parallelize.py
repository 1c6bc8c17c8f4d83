"""Wrap the model for the chosen strategy: none, DDP or FSDP2, and nothing else."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from elastictrain.dist import DistContext


def resolve_strategy(requested: str, ctx: DistContext) -> str:
    """'auto' is DDP when there is more than one rank; with no process group only 'none' is possible."""
    if not ctx.distributed:
        return "none"
    if requested == "auto":
        return "ddp"
    return requested


def wrap(model: nn.Module, strategy: str, ctx: DistContext) -> nn.Module:
    """Move to the device and wrap; returns the module the training loop calls."""
    model.to(ctx.device)
    if strategy == "none":
        return model
    if strategy == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per encoder stage and for the decoder/head, then the root: parameters of a
        # unit are gathered only while it runs, which is what bounds memory per rank.
        for name in ("encoder", "decoder", "segmentation_head"):
            part = getattr(model, name, None)
            if part is None:
                continue
            children = list(part.children()) if name == "encoder" else [part]
            for child in children:
                if any(p.requires_grad for p in child.parameters()):
                    fully_shard(child)
        fully_shard(model)
        return model
    raise AssertionError(f"unknown strategy {strategy}")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP wrapper (FSDP2 shards in place, so it is its own root)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def grad_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Skip the gradient all-reduce on accumulation micro-batches; only the last one synchronizes."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def sync_buffers(model: nn.Module, distributed: bool) -> None:
    """Make buffers (batch-norm running stats) equal to rank 0's on every rank before a snapshot.

    They drift per rank (each sees its own batches), and a snapshot stores them once as replicated
    state, written by whichever rank the engine picks: unsynchronized, a restore would mix ranks'
    values. DDP copies rank 0's buffers at every forward anyway, so this changes no trajectory there.
    """
    if not distributed:
        return
    import torch.distributed as dist

    for buf in unwrap(model).buffers():
        dist.broadcast(buf, src=0)

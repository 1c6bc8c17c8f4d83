"""Wrap the model for the chosen strategy: none, DDP or FSDP2, and nothing else."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from elastictrain.dist import DistContext

log = logging.getLogger(__name__)

# Containers whose elements are the model's blocks (ResNet layers, timm stages, smp decoder blocks);
# subclasses such as smp's Conv2dReLU are layers, not lists of blocks.
_BLOCK_CONTAINERS = (nn.Sequential, nn.ModuleList)


def resolve_strategy(requested: str, ctx: DistContext) -> str:
    """'auto' is DDP when there is more than one rank; with no process group only 'none' is possible."""
    if not ctx.distributed:
        if requested in ("ddp", "fsdp"):
            log.info("--dist.strategy %s: launched without torchrun (world size 1, no process group), so the "
                     "model is not wrapped; use torchrun --nproc-per-node 1 to run %s on one device", requested,
                     requested)
        return "none"
    if requested == "auto":
        return "ddp"
    return requested


def wrap(model: nn.Module, strategy: str, ctx: DistContext, amp_dtype: torch.dtype | None = None) -> nn.Module:
    """Move to the device and wrap; returns the module the training loop calls.

    Args:
        model: The plain smp model, initialized identically on every rank.
        strategy: 'none', 'ddp' or 'fsdp' (from ``resolve_strategy``).
        ctx: This rank's distributed context.
        amp_dtype: The training autocast dtype; under FSDP2 on CUDA, bf16 also becomes the dtype in
            which parameters are gathered (see ``fsdp_mixed_precision``).
    """
    model.to(ctx.device)
    if strategy == "none":
        return model
    if strategy == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        policy = fsdp_mixed_precision(ctx.device, amp_dtype)
        # One FSDP unit per block, then the root (stems, heads and anything else): a unit's parameters
        # are gathered only while it runs, which is what bounds memory per rank.
        for block in model_blocks(model):
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    raise AssertionError(f"unknown strategy {strategy}")


def fsdp_mixed_precision(device: torch.device, amp_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """bf16 parameter gathers with fp32 gradient reduction on CUDA when training in bf16; fp32 otherwise.

    On CPU (gloo) the gathers stay fp32: bf16 autocast is what ``--train.precision bf16`` means there,
    and the sharded parameters and optimizer state are fp32 in every case (so snapshots never hold
    bf16 tensors, which torchsnapshot cannot take when their element count is odd).
    """
    if device.type == "cuda" and amp_dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one: the elements of every plain Sequential/ModuleList in the model,
    opening nested lists (timm's stages of blocks). Blocks without trainable parameters are skipped."""
    blocks: list[nn.Module] = []

    def visit(module: nn.Module, in_list: bool) -> None:
        for child in module.children():
            if type(child) in _BLOCK_CONTAINERS:
                visit(child, in_list=True)
            elif in_list:
                if any(p.requires_grad for p in child.parameters()):
                    blocks.append(child)
            else:
                visit(child, in_list=False)

    visit(model, in_list=False)
    return blocks


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP wrapper (FSDP2 shards in place, so it is its own root)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def grad_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Skip the gradient all-reduce on accumulation micro-batches; only the last one synchronizes."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if isinstance(model, FSDPModule):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule) -> Iterator[None]:
    # Recursive: every FSDP unit keeps its unsharded gradient and skips the reduce-scatter until the last
    # micro-batch, which reduces the accumulated sum once.
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def sync_buffers(model: nn.Module, distributed: bool) -> None:
    """Make buffers (batch-norm running stats) equal to rank 0's on every rank before a snapshot.

    They drift per rank (each sees its own batches), and a snapshot stores them once as replicated
    state, written by whichever rank the engine picks: unsynchronized, a restore would mix ranks'
    values. DDP copies rank 0's buffers at every forward anyway, so this changes no trajectory there;
    FSDP2 leaves buffers unsharded and never synchronizes them, so this is where they are made to agree.
    """
    if not distributed:
        return
    import torch.distributed as dist

    for buf in unwrap(model).buffers():
        dist.broadcast(buf, src=0)

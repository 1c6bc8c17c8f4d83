"""Who am I: rank, world size, device and backend; process-group set-up and teardown.

Launched by torchrun (RANK/WORLD_SIZE in the environment) we join a process group; launched plainly
we are world size 1 with no process group at all, and every helper here works in both cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from elastictrain.config import Config
from elastictrain.device import backend_for, pick_device
from elastictrain.errors import UserError

T = TypeVar("T")


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    """None when there is no process group (world size 1 without torchrun)."""
    ckpt_group: Any = None
    """A gloo group for the snapshot engine alone: its collectives run on a background thread and must
    never interleave with the training thread's collectives."""
    cpu_group: Any = None
    """A gloo group for the training thread's object collectives (works under nccl too)."""

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def attempt(self) -> int:
        """torchrun's restart count on this node (not a global generation; only for logs)."""
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init_distributed(cfg: Config) -> DistContext:
    """Join the process group if torchrun launched us; otherwise return a world-size-1 context."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg.train.device, local_rank)
    if not launched:
        return DistContext(0, 1, 0, device, None)
    backend = backend_for(device, cfg.dist.backend)
    timeout = timedelta(seconds=cfg.dist.timeout_s)
    dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
    ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return DistContext(rank, world, local_rank, device, backend, ckpt_group, cpu_group)


def teardown(ctx: DistContext | None) -> None:
    if ctx is not None and ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def cores_per_rank() -> int:
    """The CPU cores this process may use (its affinity: a SLURM or container limit counts) shared among the
    ranks on this host (torchrun's LOCAL_WORLD_SIZE); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def broadcast_object(ctx: DistContext, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank (identity at world size 1)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=ctx.cpu_group)
    return box[0]


def all_gather_object(ctx: DistContext, obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order; ``group`` defaults to the training thread's object group."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=group if group is not None else ctx.cpu_group)
    return out


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank if it is true on any rank: a collective decision, made collectively."""
    return any_rank_each(ctx, flag)[0]


def any_rank_each(ctx: DistContext, *flags: bool) -> list[bool]:
    """For each flag, True on every rank if it is true on any rank: several decisions in one collective.

    On host memory over gloo whatever the backend: a step boundary then waits for no GPU work (a CUDA
    tensor read back to the host would wait for every kernel queued so far)."""
    if not ctx.distributed:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.cpu_group)
    return [bool(v) for v in t.tolist()]


def all_reduce_sum(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (identity at world size 1). A CPU tensor goes through the gloo group: the
    default group under nccl has no CPU backend ('No backend type associated with device type cpu')."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=ctx.cpu_group if t.device.type == "cpu" else None)
    return t


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier(group=ctx.cpu_group)


def raise_together(ctx: DistContext, error: str | BaseException | None) -> None:
    """Raise on every rank if any rank has an error, so no rank waits alone in a collective.

    Every rank raises the same message: the first failing rank's. A :class:`UserError` stays one (exit 2),
    anything else becomes a RuntimeError; a plain string is a user error (the historical use)."""
    if isinstance(error, BaseException):
        mine: tuple[bool, str] | None = (isinstance(error, UserError), str(error) or type(error).__name__)
    else:
        mine = (True, error) if error else None
    if not ctx.distributed:
        if isinstance(error, BaseException):
            raise error
        if mine:
            raise UserError(mine[1])
        return
    errors = [e for e in all_gather_object(ctx, mine) if e]
    if errors:
        user, message = errors[0]
        if isinstance(error, BaseException) and mine == errors[0]:
            raise error  # the rank that failed keeps its own exception and traceback
        raise (UserError if user else RuntimeError)(message)


def on_main_together(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 alone and give every rank its result, or raise its failure on every rank.

    For the file operations only rank 0 performs (discovery, moving a snapshot aside, mkdir): a failure
    there must not leave the other ranks waiting in the next collective until the timeout."""
    result: T | None = None
    error: BaseException | None = None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - every failure is shared, then raised on every rank
            error = e
    raise_together(ctx, error)
    return broadcast_object(ctx, result)  # type: ignore[return-value]

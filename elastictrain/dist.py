"""Who am I: rank, world size, device and backend; process-group set-up and teardown.

Launched by torchrun (RANK/WORLD_SIZE in the environment) we join a process group; launched plainly
we are world size 1 with no process group at all, and every helper here works in both cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from elastictrain.config import Config
from elastictrain.device import backend_for, pick_device
from elastictrain.errors import UserError
from elastictrain.osutil import launcher

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
    timeout_s: float = 1800.0
    """The collectives' timeout (--dist.timeout_s)."""

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0



def world_of_one(device: torch.device | None = None) -> DistContext:
    """World size 1 with no process group (a plain ``python -m elastictrain``, the offline tools), on CPU
    unless ``device`` says otherwise."""
    return DistContext(0, 1, 0, device or torch.device("cpu"), None)


def init_distributed(cfg: Config) -> DistContext:
    """Join the process group if torchrun launched us; otherwise return a world-size-1 context."""
    env = launcher()
    rank, world = env.rank, env.world_size
    device = pick_device(cfg.train.device, env.local_rank)
    if not env.launched:
        return world_of_one(device)
    backend = backend_for(device, cfg.dist.backend)
    timeout = timedelta(seconds=cfg.dist.timeout_s)
    dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
    ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return DistContext(rank, world, env.local_rank, device, backend, ckpt_group, cpu_group, cfg.dist.timeout_s)


def check_same_config(ctx: DistContext, settings: dict[str, Any]) -> None:
    """Every rank (collective): raise the same UserError on every rank when some rank was started with other
    settings than rank 0 (a node launched with other flags or another config file). Ranks that disagree
    would train a different run than any of them was told, and the snapshot engines would fail later with
    an error that names neither the setting nor the node."""
    if not ctx.distributed:
        return
    import socket

    flat = _flatten(settings)
    views = all_gather_object(ctx, (socket.gethostname(), flat))
    host0, first = views[0]
    for rank, (host, theirs) in enumerate(views[1:], start=1):
        differ = sorted(k for k in first.keys() | theirs.keys() if first.get(k) != theirs.get(k))
        if differ:
            shown = "; ".join(f"{k} is {theirs.get(k)!r} there and {first.get(k)!r} on rank 0 ({host0})"
                              for k in differ[:3])
            more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
            raise UserError(f"rank {rank} (host {host}) was started with other settings than rank 0: {shown}"
                            f"{more}. Start every node with the same config file and flags")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def teardown(ctx: DistContext | None) -> None:
    if ctx is not None and ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


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


def raise_together(ctx: DistContext, error: BaseException | None) -> None:
    """Raise on every rank if any rank has an error, so no rank waits alone in a collective.

    Every rank raises the same message: the first failing rank's. A :class:`UserError` stays one (exit 2),
    anything else becomes a RuntimeError."""
    mine = None if error is None else (isinstance(error, UserError), str(error) or type(error).__name__)
    if not ctx.distributed:
        if error is not None:
            raise error
        return
    errors = [e for e in all_gather_object(ctx, mine) if e]
    if errors:
        user, message = errors[0]
        if error is not None and mine == errors[0]:
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

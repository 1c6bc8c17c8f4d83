"""Snapshot engines behind one small interface: torchsnapshot (default) and DCP.

The manager in checkpoint.py owns policy (when, where, commit, retention); an engine only writes an
app_state into a directory (in the background when asked) and reads it back.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from elastictrain.dist import DistContext

AppState = dict[str, Any]

# torchsnapshot's async_take returns before copying CPU tensors at or above this size (a bug in
# both builds: an enum is compared with a string), so we raise it above the largest tensor.
_SLAB_ENV = "TORCHSNAPSHOT_SLAB_SIZE_THRESHOLD_BYTES_OVERRIDE"
_DEFAULT_SLAB = 128 * 1024 * 1024


class PendingWrite(Protocol):
    def wait(self) -> None: ...
    def done(self) -> bool: ...


class Engine(Protocol):
    name: str
    """Name of the engine, recorded in the commit record so a restore uses the same one."""
    marker: str
    """The file the library itself writes last; its presence is necessary (not sufficient) for completeness."""

    def save(self, path: Path, app_state: AppState, ctx: DistContext, background: bool) -> PendingWrite: ...
    def load(self, path: Path, app_state: AppState, ctx: DistContext) -> None: ...


class _Done:
    def wait(self) -> None:
        return None

    def done(self) -> bool:
        return True


class _Waiter:
    def __init__(self, wait: Callable[[], Any], done: Callable[[], bool]) -> None:
        self._wait, self._done = wait, done

    def wait(self) -> None:
        self._wait()

    def done(self) -> bool:
        return self._done()


def _largest_tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return max((_largest_tensor_bytes(v) for v in obj.values()), default=0)
    if isinstance(obj, (list, tuple)):
        return max((_largest_tensor_bytes(v) for v in obj), default=0)
    return 0


class TorchSnapshotEngine:
    name = "torchsnapshot"
    marker = ".snapshot_metadata"

    def save(self, path: Path, app_state: AppState, ctx: DistContext, background: bool) -> PendingWrite:
        from torchsnapshot import Snapshot

        largest = max(_largest_tensor_bytes(v.state_dict()) for v in app_state.values())
        os.environ[_SLAB_ENV] = str(max(_DEFAULT_SLAB, largest + 1))
        # torchsnapshot draws event ids from Python's global `random`; keep the training stream intact.
        py_state = random.getstate()
        try:
            # Everything we store is identical on every rank (RNG states are gathered into TrainState),
            # so "**" lets any world size read it; FSDP2's DTensor shards are excluded automatically.
            if background:
                if not ctx.distributed:
                    _single_process_store()
                pending = Snapshot.async_take(str(path), app_state, pg=ctx.ckpt_group, replicated=["**"])
                return _Waiter(pending.wait, pending.done)
            Snapshot.take(str(path), app_state, pg=ctx.ckpt_group, replicated=["**"])
            return _Done()
        finally:
            random.setstate(py_state)

    def load(self, path: Path, app_state: AppState, ctx: DistContext) -> None:
        from torchsnapshot import Snapshot

        py_state = random.getstate()
        try:
            Snapshot(str(path), pg=ctx.ckpt_group).restore(app_state)
        finally:
            random.setstate(py_state)


def _single_process_store() -> None:
    """async_take wants a store for its completion barrier; with no process group it tries to build a
    TCPStore and crashes unpacking an IPv4 address as IPv6. An in-process HashStore serves one rank."""
    from torchsnapshot import dist_store

    if None not in dist_store._pg_to_store:
        dist_store._pg_to_store[None] = torch.distributed.HashStore()


class DCPEngine:
    name = "dcp"
    marker = ".metadata"

    def save(self, path: Path, app_state: AppState, ctx: DistContext, background: bool) -> PendingWrite:
        import torch.distributed.checkpoint as dcp

        kwargs: dict[str, Any] = {"checkpoint_id": str(path), "process_group": ctx.ckpt_group,
                                  "no_dist": not ctx.distributed}
        if background:
            future = dcp.async_save(app_state, **kwargs)
            future = getattr(future, "upload_completion", future)  # AsyncSaveResponse in newer torch
            return _Waiter(future.result, future.done)
        dcp.save(app_state, **kwargs)
        return _Done()

    def load(self, path: Path, app_state: AppState, ctx: DistContext) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.load(app_state, checkpoint_id=str(path), process_group=ctx.ckpt_group, no_dist=not ctx.distributed)


ENGINES: dict[str, type] = {"torchsnapshot": TorchSnapshotEngine, "dcp": DCPEngine}


def build_engine(name: str) -> Engine:
    return ENGINES[name]()

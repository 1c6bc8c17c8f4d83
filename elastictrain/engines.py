"""Snapshot engines behind one small interface: torchsnapshot (default) and DCP.

The manager in checkpoint.py owns policy (when, where, commit, retention); an engine only writes an
app_state into a directory (in the background when asked) and reads it back.
"""

from __future__ import annotations

import os
import random
import warnings
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


class _Computed:
    """A state dict already taken, presented as a Stateful for saving."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self.sd = sd

    def state_dict(self) -> dict[str, Any]:
        return self.sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        raise AssertionError("a computed state dict is only saved")


class TorchSnapshotEngine:
    name = "torchsnapshot"
    marker = ".snapshot_metadata"

    def save(self, path: Path, app_state: AppState, ctx: DistContext, background: bool) -> PendingWrite:
        from torchsnapshot import Snapshot

        # Each state_dict() once: get_model/optimizer_state_dict cost ~0.1 s on a resnet34 Unet, all of it
        # time the training loop is blocked.
        app_state = {k: _Computed(v.state_dict()) for k, v in app_state.items()}
        largest = max(_largest_tensor_bytes(v.sd) for v in app_state.values())
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
            snapshot = Snapshot(str(path), pg=ctx.ckpt_group)
            _match_sharding(snapshot, app_state, path)
            snapshot.restore(app_state)
        finally:
            random.setstate(py_state)


def _match_sharding(snapshot: Any, app_state: AppState, path: Path) -> None:
    """torchsnapshot reads FSDP2's sharded DTensors only into DTensors. For an unsharded model (DDP, one
    process, ``ckpt export``) we present those entries as ShardedTensors, which torchsnapshot's own reader
    assembles into full plain tensors (in memory only; the snapshot is not changed). The other way, unsharded
    state into FSDP2, it has no reader and loses the failure in a background task, leaving the weights as they
    were: refuse. Every rank sees the same snapshot and strategy, so every rank decides alike."""
    if "model" not in app_state:
        return
    from torch.distributed.tensor import DTensor
    from torchsnapshot.manifest import DTensorEntry, ShardedTensorEntry

    entries = snapshot.metadata.manifest
    saved = any(isinstance(e, DTensorEntry) for k, e in entries.items() if k.startswith("0/model/"))
    now = any(isinstance(v, DTensor) for v in app_state["model"].state_dict().values())
    if saved and not now:
        for key, entry in entries.items():
            if isinstance(entry, DTensorEntry):
                entries[key] = ShardedTensorEntry(shards=entry.shards)
    elif now and not saved:
        raise ValueError(
            f"snapshot {path} holds unsharded (DDP or one-process) state written by the torchsnapshot engine, "
            f"which cannot restore it into this FSDP2 run. Continue it once more with --dist.strategy ddp (or on "
            f"one process) adding --checkpoint.engine dcp, whose snapshots load into FSDP2; or use "
            f"--checkpoint.engine dcp from the start.")


def _single_process_store() -> None:
    """async_take wants a store for its completion barrier; with no process group it tries to build a
    TCPStore and crashes unpacking an IPv4 address as IPv6. An in-process HashStore serves one rank."""
    from torchsnapshot import dist_store

    if None not in dist_store._pg_to_store:
        dist_store._pg_to_store[None] = torch.distributed.HashStore()


# At world size 1 we pass no_dist=True on purpose (DCP otherwise wants a process group even on one
# device, pytorch issue 118554); its warning about "assuming single process" says nothing new.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized",
                        category=UserWarning)


class DCPEngine:
    """torch.distributed.checkpoint: reshards freely (any world size, DDP <-> FSDP2); ``async_save``
    copies the state to CPU memory before it returns. Strings are stored as pickled bytes objects."""

    name = "dcp"
    marker = ".metadata"

    def __init__(self) -> None:
        self._stager: Any = None

    def save(self, path: Path, app_state: AppState, ctx: DistContext, background: bool) -> PendingWrite:
        import torch.distributed.checkpoint as dcp

        kwargs: dict[str, Any] = {"checkpoint_id": str(path), "process_group": ctx.ckpt_group,
                                  "no_dist": not ctx.distributed}
        if background:
            future = dcp.async_save(app_state, async_stager=self._staging_buffers(), **kwargs)
            future = getattr(future, "upload_completion", future)  # AsyncSaveResponse in newer torch
            return _Waiter(future.result, future.done)
        dcp.save(app_state, **kwargs)
        return _Done()

    def _staging_buffers(self) -> Any:
        """One stager for the engine's lifetime: it keeps the CPU copies of the previous snapshot and copies
        into them again (a fresh stager allocates, and page-faults, the whole state every time). Reuse is
        safe because the manager starts a snapshot only after the previous one has been written."""
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self._stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=False))
        return self._stager

    def load(self, path: Path, app_state: AppState, ctx: DistContext) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.load(app_state, checkpoint_id=str(path), process_group=ctx.ckpt_group, no_dist=not ctx.distributed)


ENGINES: dict[str, type] = {"torchsnapshot": TorchSnapshotEngine, "dcp": DCPEngine}


def build_engine(name: str) -> Engine:
    return ENGINES[name]()

"""Snapshot engines behind one small interface: torchsnapshot (default) and DCP.

The manager in manager.py owns policy (when, where, staging, commit, retention, proof of a read); an
engine only writes an already staged state (plain CPU state dicts, synchronously, on the manager's writer
thread) into a directory, and reads a directory back into live objects, raising :class:`EngineReadError`
when it could not read everything. What torchsnapshot gets wrong on this torch is mended here, in one place.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import random
import warnings
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch.distributed.tensor import DTensor, Shard

from elastictrain.dist import DistContext

AppState = dict[str, Any]
"""Stateful name -> an object with state_dict() / load_state_dict()."""
StateDicts = dict[str, dict[str, Any]]
"""Stateful name -> its state dict (what is staged and written)."""


class EngineReadError(RuntimeError):
    """The engine could not read part of a snapshot (a damaged or truncated file, a missing entry)."""


class ForeignContentError(EngineReadError):
    """A file of the snapshot holds what the engine never writes (e.g. code in DCP's metadata): damage,
    whatever its checksums say."""


class Engine(Protocol):
    name: str
    """Name of the engine, recorded in the commit record so a restore uses the same one."""
    marker: str
    """The file the library itself writes last; its presence is necessary (not sufficient) for completeness."""

    def prepare_for_save(self, state: StateDicts, ctx: DistContext) -> StateDicts:
        """On the training thread, before staging: reshape what this engine cannot take as it is."""
        ...

    def write(self, path: Path, state: StateDicts, ctx: DistContext) -> None:
        """Write a staged state into ``path``; every rank calls it (collectives on ``ctx.ckpt_group``)."""
        ...

    def read(self, path: Path, app_state: AppState, ctx: DistContext) -> None:
        """Read ``path`` into the live objects of ``app_state`` (a subset of what was saved)."""
        ...


class _Computed:
    """A staged state dict presented as a Stateful, for torchsnapshot's take()."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self.sd = sd

    def state_dict(self) -> dict[str, Any]:
        return self.sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        # Never called: take() only reads, but checks isinstance(value, Stateful), a protocol that has this.
        raise NotImplementedError("a staged state is only written")


# ---------- torchsnapshot ----------
def _private_random_for_torchsnapshot() -> None:
    """torchsnapshot draws its event ids from Python's global ``random`` (snapshot._generate_random_int64),
    which shifted the training run's own stream; and the writer thread may not save and restore the global
    state around it while the training thread draws from it. Give the library a generator of its own."""
    import torchsnapshot.snapshot as ts_snapshot

    if not isinstance(ts_snapshot.random, random.Random):
        assert ts_snapshot._generate_random_int64.__code__.co_names[:2] == ("random", "randint"), \
            "torchsnapshot changed how it draws event ids; revisit engines._private_random_for_torchsnapshot"
        ts_snapshot.random = random.Random()  # type: ignore[assignment]


def empty_shard(t: Any) -> bool:
    """A DTensor of which some rank holds no elements: torchsnapshot divides by the shard size then (FSDP2
    cuts dim 0 into chunks of ceil(rows / ranks): a 4-class head over 3 ranks leaves the third none).
    Decided from the shape and the mesh alone, so every rank decides alike."""
    if not isinstance(t, DTensor):
        return False
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard):
            size, ranks = t.shape[placement.dim], t.device_mesh.size(mesh_dim)
            if -(-size // ranks) * (ranks - 1) >= size:
                return True
    return False


def _map_leaves(tree: Any, fn: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _map_leaves(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map_leaves(v, fn) for v in tree]
    return fn(tree)


@contextlib.contextmanager
def _engine_errors() -> Iterator[list[logging.LogRecord]]:
    """Collect what asyncio reports about failed tasks that nobody awaited ('Task exception was never
    retrieved'), which is the only trace torchsnapshot leaves of a failed read, instead of letting it print
    thousands of lines."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("asyncio")
    handler, propagate = Collect(logging.ERROR), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _collect_abandoned_writes(error: BaseException) -> None:
    """After a failed take() (a full disk), torchsnapshot's event loop leaves write tasks pending. Garbage-
    collected later, at any moment, they print 'Task was destroyed but it is pending!' and a traceback of their
    coroutines' clean-up ('no running event loop') beside the one clear error the run ends with. So: release
    the failure's frames (they hold the loop), and collect those tasks now, with their reports dropped."""
    import gc
    import sys
    import traceback

    seen: BaseException | None = error
    while seen is not None:
        if seen.__traceback__ is not None:
            traceback.clear_frames(seen.__traceback__)
        seen = seen.__cause__ or seen.__context__
    hook = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        with _engine_errors():
            gc.collect()
    finally:
        sys.unraisablehook = hook


class TorchSnapshotEngine:
    name = "torchsnapshot"
    marker = ".snapshot_metadata"

    def __init__(self) -> None:
        # Imported here, on the thread that builds the engine: first imported on a writer thread while the
        # training thread ran a backward, psutil's import (torchsnapshot's) crashed the process (a segfault, once
        # in the suite).
        importlib.import_module("torchsnapshot")

    def prepare_for_save(self, state: StateDicts, ctx: DistContext) -> StateDicts:
        # A DTensor with an empty shard on some rank is stored whole, as a replicated entry (it is small: a
        # tensor that does not fill every rank with one row each). full_tensor() is a collective; every rank
        # decides alike from the shapes.
        return {name: _map_leaves(sd, lambda t: t.full_tensor() if empty_shard(t) else t)
                for name, sd in state.items()}

    def write(self, path: Path, state: StateDicts, ctx: DistContext) -> None:
        from torchsnapshot import Snapshot

        _private_random_for_torchsnapshot()
        # Everything not sharded is identical on every rank (RNG states are gathered into TrainState, batch-norm
        # buffers synchronized), so "**" lets any world size read it; DTensor shards are excluded automatically.
        try:
            Snapshot.take(str(path), {k: _Computed(v) for k, v in state.items()}, pg=ctx.ckpt_group,
                          replicated=["**"])
        except BaseException as e:
            _collect_abandoned_writes(e)
            raise

    def read(self, path: Path, app_state: AppState, ctx: DistContext) -> None:
        from elastictrain.snapshot import ts_format

        try:
            if ts_format.read(path, app_state):
                return
        except ts_format.FormatError as e:
            raise EngineReadError(f"could not read {path}: {e}") from e
        self._read_with_torchsnapshot(path, app_state, ctx)

    def _read_with_torchsnapshot(self, path: Path, app_state: AppState, ctx: DistContext) -> None:
        """torchsnapshot's own reader, for what ts_format does not read (FSDP2 shards, chunked tensors)."""
        from torchsnapshot import Snapshot

        _private_random_for_torchsnapshot()
        snapshot = Snapshot(str(path), pg=ctx.ckpt_group)
        targets = {k: _ReadTarget(k, v, snapshot.metadata.manifest) for k, v in app_state.items()}
        with _engine_errors() as errors:
            try:
                snapshot.restore(targets)  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001 - any failure to read is the snapshot's, named below
                raise EngineReadError(f"torchsnapshot could not read {path}: {type(e).__name__}: {e}") from e
        if errors:
            first = errors[0].exc_info[1] if errors[0].exc_info else errors[0].getMessage()
            raise EngineReadError(f"torchsnapshot failed to read {len(errors)} part(s) of {path}, e.g. "
                                  f"{type(first).__name__}: {first}")
        for target in targets.values():
            target.finish()


class _ReadTarget:
    """What torchsnapshot reads one stateful into. It reads an FSDP2 DTensor only into a DTensor laid out as
    saved, and not at all where a rank holds an empty shard; so such entries (and every DTensor saved unsharded,
    or unsharded state saved as DTensors) are read whole into a plain tensor and then sharded locally, with no
    communication: every rank read the whole tensor."""

    def __init__(self, key: str, stateful: Any, manifest: dict[str, Any]) -> None:
        self.key, self.stateful, self.manifest = key, stateful, manifest
        # The manifest has one entry per rank that wrote a path ('RANK/stateful/...'): convert them all alike.
        self.by_path: dict[str, list[str]] = {}
        for k in manifest:
            self.by_path.setdefault(k.split("/", 1)[1], []).append(k)
        self.loaded: dict[str, Any] | None = None
        # Now, before the restore: torchsnapshot takes its per-rank view of the manifest before it asks
        # for the state dict.
        from torchsnapshot.manifest import DTensorEntry, ShardedTensorEntry

        self.live = stateful.state_dict()
        self.targets = self._targets(self.live, key, DTensorEntry, ShardedTensorEntry)

    def state_dict(self) -> dict[str, Any]:
        return self.targets

    def _targets(self, tree: Any, path: str, dtensor_entry: type, sharded_entry: type) -> Any:
        if isinstance(tree, dict):
            return {k: self._targets(v, f"{path}/{k}", dtensor_entry, sharded_entry) for k, v in tree.items()}
        if isinstance(tree, list):
            return [self._targets(v, f"{path}/{i}", dtensor_entry, sharded_entry) for i, v in enumerate(tree)]
        keys = self.by_path.get(path, [])
        saved_sharded = any(isinstance(self.manifest[k], dtensor_entry) for k in keys)
        read_whole = isinstance(tree, DTensor) and (not saved_sharded or empty_shard(tree))
        if saved_sharded and (read_whole or not isinstance(tree, DTensor)):
            # Read FSDP2 shards whole (into an unsharded model: DDP, one process, ckpt export; or to be
            # sharded again here): torchsnapshot's ShardedTensor reader assembles them, in memory only.
            for k in keys:
                if isinstance(self.manifest[k], dtensor_entry):
                    self.manifest[k] = sharded_entry(shards=self.manifest[k].shards)
        return torch.empty(tree.shape, dtype=tree.dtype) if read_whole else tree

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.loaded = sd

    def finish(self) -> None:
        """Shard what was read whole, and load it all into the live object."""
        from elastictrain.snapshot.ts_format import shard_like

        if self.loaded is None:
            raise EngineReadError(f"torchsnapshot restored nothing into '{self.key}'")
        self.stateful.load_state_dict(shard_like(self.live, self.loaded))


# ---------- DCP ----------
# At world size 1 we pass no_dist=True on purpose (DCP otherwise wants a process group even on one
# device, pytorch issue 118554); its warning about "assuming single process" says nothing new.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized",
                        category=UserWarning)


class DCPEngine:
    """torch.distributed.checkpoint: reshards freely (any world size, DDP <-> FSDP2) and fails loudly on a
    damaged file. Strings are stored as pickled bytes objects (read back weights-only)."""

    name = "dcp"
    marker = ".metadata"

    def __init__(self) -> None:
        importlib.import_module("torch.distributed.checkpoint")  # on the building thread (see TorchSnapshotEngine)

    def prepare_for_save(self, state: StateDicts, ctx: DistContext) -> StateDicts:
        return state

    def write(self, path: Path, state: StateDicts, ctx: DistContext) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(state, checkpoint_id=str(path), process_group=ctx.ckpt_group, no_dist=not ctx.distributed)

    def read(self, path: Path, app_state: AppState, ctx: DistContext) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        from elastictrain.snapshot import dcp_metadata

        try:
            # Read (checksum first, then an allow-listed unpickle) once, here: DCP's own reader would unpickle
            # the file with plain pickle.
            metadata = dcp_metadata.read_metadata(path)
        except dcp_metadata.MetadataError as e:
            raise ForeignContentError(str(e)) from None
        try:
            templates = {k: _dcp_template(metadata, k) for k, v in app_state.items()
                         if getattr(v, "wants_template", False)}
            state = {k: templates.get(k, v) for k, v in app_state.items()}
            dcp.load(state, checkpoint_id=str(path), process_group=ctx.ckpt_group, no_dist=not ctx.distributed,
                     planner=_WeightsOnlyLoadPlanner(), storage_reader=dcp_metadata.safe_reader(path, metadata))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - CheckpointException is a BaseException
            raise EngineReadError(f"DCP could not read {path}: {type(e).__name__}: {e}") from e
        for key, template in templates.items():
            app_state[key].load_state_dict(template)


def _dcp_template(metadata: Any, key: str) -> dict[str, Any]:
    """The state dict of ``key`` as the snapshot holds it, with empty tensors of the saved shapes to read into
    (from DCP's metadata: its flattened keys and the path each came from)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    root: dict[str, Any] = {}
    for flat, item in metadata.state_dict_metadata.items():
        where = (metadata.planner_data or {}).get(flat, (flat,))
        if where[0] != key:
            continue
        value = torch.empty(item.size, dtype=item.properties.dtype) if isinstance(item, TensorStorageMetadata) \
            else None  # an object: DCP replaces it with what it reads
        _set_path(root, where, value)
    return root.get(key, {})


def _set_path(root: dict[str, Any], where: tuple[Any, ...], value: Any) -> None:
    """Put ``value`` at ``where`` (dict keys and list indices), making the containers on the way."""
    node: Any = root
    for key, nxt in zip(where, where[1:]):
        empty: Any = [] if isinstance(nxt, int) else {}
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            node[key] = empty if node[key] is None else node[key]
        else:
            node.setdefault(key, empty)
        node = node[key]
    if isinstance(node, list):
        node.extend([None] * (where[-1] + 1 - len(node)))
    node[where[-1]] = value


def _weights_only_planner_class() -> type:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner unpickles every non-tensor entry with ``torch.load(weights_only=False)``,
        which runs whatever code a tampered file holds. Ours only ever loads weights_only."""

        def load_bytes(self, read_item: Any, value: Any) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                _set_path(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyLoadPlanner


def _WeightsOnlyLoadPlanner() -> Any:  # noqa: N802 - a factory that reads like the class it makes
    return _weights_only_planner_class()()


ENGINES: dict[str, type] = {"torchsnapshot": TorchSnapshotEngine, "dcp": DCPEngine}


def build_engine(name: str) -> Engine:
    return ENGINES[name]()

"""A fast reader of torchsnapshot's on-disk format, for the snapshots most runs write: every entry replicated
(one process, DDP), tensors stored as raw bytes.

Why not torchsnapshot's own reader: a restart pays for it on every rank, every failure. It imports the
library (TorchScript compilation at import), runs an asyncio pipeline with thousands of tasks and executor
submissions, and reads into its own buffers before copying (measured: 2-4x the time of a plain
``torch.load`` of the same state). Here the metadata is one JSON file, and each tensor's bytes are read
with one ``readinto`` straight into the tensor that will hold them: the live parameter where there is one,
else a new tensor (optimizer state is built from the snapshot, as ``torch.load`` would, instead of from a
fake optimizer step). Anything else (FSDP2 shards, chunked tensors, a format version we do not know)
returns False and the engine uses torchsnapshot. Every restore is proven entry by entry afterwards
(proof.py), whichever reader ran.

The format (torchsnapshot 0.1.0 / nightly 2024.7.26, .snapshot_metadata): ``{"version", "world_size",
"manifest": {"RANK/stateful/path": entry}}``; a path joins keys with '/' (each escaped: '%' -> '%25',
'/' -> '%2F'); entries are 'dict' (its keys in order), 'list', primitives ('int', 'float' as a base64
double, 'bool', 'str', 'bytes') inline, 'object' (a torch.save file) and 'Tensor' (a file and a byte range).
"""

from __future__ import annotations

import base64
import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

KNOWN_VERSIONS = ("0.1.0",)
_CONTAINERS = ("dict", "list")
_PRIMITIVES = ("int", "float", "bool", "str", "bytes")


class FormatError(RuntimeError):
    """A file of the snapshot does not hold what its metadata says (short, missing, unreadable)."""


def _encode(key: str) -> str:
    return key.replace("%", "%25").replace("/", "%2F")


def load_manifest(path: Path) -> dict[str, dict[str, Any]] | None:
    """Rank 0's entries ('stateful/...' paths), or None when this reader does not know the format."""
    try:
        metadata = json.loads((path / ".snapshot_metadata").read_text())
    except (OSError, ValueError):
        return None
    if metadata.get("version") not in KNOWN_VERSIONS or not isinstance(metadata.get("manifest"), dict):
        return None
    return {k[2:]: v for k, v in metadata["manifest"].items() if k.startswith("0/")}


def _supported(entry: dict[str, Any]) -> bool:
    kind = entry.get("type")
    if kind in _CONTAINERS:
        return True
    if not entry.get("replicated"):
        return False
    if kind in _PRIMITIVES:
        return True
    if kind == "object":
        return entry.get("serializer") == "torch_save"
    if kind == "Tensor":
        return entry.get("serializer") in ("buffer_protocol", "torch_save")
    return False  # ShardedTensor, DTensor, ChunkedTensor, OrderedDict, ...


def _leaves(tree: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _leaves(v, f"{prefix}/{_encode(str(k))}", out)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _leaves(v, f"{prefix}/{i}", out)
    else:
        out[prefix] = tree
    return out


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise FormatError(f"unknown dtype {name!r}")
    return dtype


def _primitive(entry: dict[str, Any]) -> Any:
    kind, value = entry["type"], entry["serialized_value"]
    if kind == "int":
        return int(value)
    if kind == "bool":
        return value == "True"
    if kind == "float":
        return struct.unpack("d", base64.b64decode(value))[0]
    if kind == "bytes":
        return base64.b64decode(value)
    return value


class _Reads:
    """Tensor reads grouped by file, so each file is opened once and read front to back."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.by_file: dict[str, list[tuple[int, int, torch.Tensor]]] = defaultdict(list)

    def add(self, entry: dict[str, Any], dest: Any) -> torch.Tensor:
        shape, dtype = list(entry["shape"]), _dtype(entry["dtype"])
        fits = (type(dest) in (torch.Tensor, torch.nn.Parameter) and list(dest.shape) == shape  # type: ignore[union-attr]
                and dest.dtype == dtype and dest.is_contiguous() and dest.device.type == "cpu")  # type: ignore[union-attr]
        if not fits:
            dest = torch.empty(shape, dtype=dtype)
        lo, hi = entry.get("byte_range") or (0, dest.numel() * dest.element_size())
        if hi - lo != dest.numel() * dest.element_size():
            raise FormatError(f"{self.root / entry['location']}: {hi - lo} bytes for a {shape} {dtype} tensor")
        self.by_file[entry["location"]].append((lo, hi, dest))
        return dest

    def run(self) -> None:
        for location, reads in self.by_file.items():
            path = self.root / location
            try:
                with open(path, "rb", buffering=0) as f:
                    for lo, hi, dest in sorted(reads, key=lambda r: r[0]):
                        f.seek(lo)
                        view = memoryview(dest.detach().view(-1).view(torch.uint8).numpy())
                        got = f.readinto(view) if hi > lo else 0
                        if got != hi - lo:
                            raise FormatError(f"{path}: {got} bytes where {hi - lo} were expected at offset {lo} "
                                              f"(truncated?)")
            except OSError as e:
                raise FormatError(f"{path}: unreadable ({e})") from e


def read(path: Path, app_state: dict[str, Any]) -> bool:
    """Read ``app_state`` from the snapshot at ``path``; False (nothing read) when this reader cannot.

    A stateful with ``wants_template`` true (an optimizer without state) gets tensors made from the snapshot;
    every other one is read into the tensors of its own state dict where they fit, then loaded.

    Raises:
        FormatError: a file does not hold what the metadata promises.
    """
    manifest = load_manifest(path)
    if manifest is None:
        return False
    plans = {}
    for key, stateful in app_state.items():
        prefix = _encode(key)
        entries = {k: v for k, v in manifest.items() if k == prefix or k.startswith(prefix + "/")}
        if prefix not in entries or not all(_supported(e) for e in entries.values()):
            return False
        plans[key] = (prefix, entries)
    reads = _Reads(path)
    trees, lives = {}, {}
    for key, (prefix, entries) in plans.items():
        stateful = app_state[key]
        lives[key] = {} if getattr(stateful, "wants_template", False) else stateful.state_dict()
        trees[key] = _inflate(prefix, entries, _leaves(lives[key], prefix, {}), reads, path)
    reads.run()
    for key, tree in trees.items():
        app_state[key].load_state_dict(shard_like(lives[key], tree))
    return True


def shard_like(live: Any, read: Any) -> Any:
    """``read`` with every plain tensor that stands where ``live`` has a DTensor sharded like that DTensor
    (an unsharded snapshot read into FSDP2). Every rank read the whole tensor, so each only keeps its own
    part: no communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(live, dict) and isinstance(read, dict):
        return {k: shard_like(live.get(k), v) for k, v in read.items()}
    if isinstance(live, list) and isinstance(read, list) and len(live) == len(read):
        return [shard_like(a, b) for a, b in zip(live, read)]
    if isinstance(live, DTensor) and isinstance(read, torch.Tensor) and not isinstance(read, DTensor):
        return distribute_tensor(read.to(live.device), live.device_mesh, live.placements, src_data_rank=None)
    return read


def _inflate(prefix: str, entries: dict[str, dict[str, Any]], live: dict[str, Any], reads: _Reads,
             root: Path) -> Any:
    children: dict[str, list[str]] = defaultdict(list)
    for k in entries:
        if k != prefix:
            children[k.rsplit("/", 1)[0]].append(k)

    def build(p: str) -> Any:
        entry = entries[p]
        kind = entry["type"]
        if kind == "dict":
            present = set(children[p])
            return {k: build(f"{p}/{_encode(str(k))}") for k in entry["keys"] if f"{p}/{_encode(str(k))}" in present}
        if kind == "list":
            indices = sorted(int(c.rsplit("/", 1)[1]) for c in children[p])
            return [build(f"{p}/{i}") for i in indices]
        if kind in _PRIMITIVES:
            return _primitive(entry)
        if kind == "object" or entry.get("serializer") == "torch_save":
            try:
                value = torch.load(root / entry["location"], weights_only=True, map_location="cpu")
            except Exception as e:  # noqa: BLE001 - a torn or foreign file; weights_only refuses code
                raise FormatError(f"{root / entry['location']}: unreadable ({type(e).__name__}: {e})") from e
            return value
        return reads.add(entry, live.get(p))

    return build(prefix)

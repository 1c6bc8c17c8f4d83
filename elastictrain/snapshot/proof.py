"""Proof of a complete read: a fingerprint of every entry of a snapshot, written at save time, checked after
every restore.

Checksums of the files prove the bytes on disk are the ones written. They cannot prove that the engine then
put those bytes into every tensor: torchsnapshot loses read errors in asyncio tasks nobody awaits and returns
normally, leaving a tensor with the values it had before (shared/notes/torchsnapshot.md). So every leaf of
the saved state (each tensor, each number and string) gets a fingerprint in the commit record, and a restore
recomputes them from the live state and compares.

A tensor's fingerprint is the wrapping integer sum of its elements' bit patterns. Integer addition is
associative, so the value does not depend on thread count or reduction order, and it is additive over
shards: the fingerprint of an FSDP2 parameter is the sum of its ranks' local shards whatever the world size,
which lets a snapshot taken at 2 ranks be checked at 3. It is not a cryptographic hash (the checksums of the
files are); it tells an entry that was read from one that was not, or was read from the wrong place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_WRAP = 2**64

Record = dict[str, list[Any]]
"""key -> [kind, dtype or type name, shape, fingerprint]; kind is 'tensor' or 'object'."""


def leaves(tree: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(key, leaf) for every leaf of nested dicts/lists/tuples, keys joined with '/'."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from leaves(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


def tensor_fingerprint(t: torch.Tensor) -> int:
    """Wrapping sum of the element bit patterns, as a non-negative int below 2**64."""
    if t.numel() == 0:
        return 0
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    bits = t.contiguous().view(_INT_OF_SIZE[t.element_size()])
    return int(bits.sum(dtype=torch.int64)) % _WRAP


def _object_fingerprint(value: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "little")


def _is_sharded(t: DTensor) -> bool:
    return any(isinstance(p, Shard) for p in t.placements)


def local_record(state: dict[str, Any]) -> tuple[Record, dict[str, int]]:
    """This rank's view: (complete entries, partial sums of sharded entries still to be added across ranks).

    Args:
        state: stateful name -> state dict (the staged copy at save time, the live state after a restore).
    """
    complete: Record = {}
    partial: dict[str, int] = {}
    for name, tree in state.items():
        for key, leaf in leaves(tree, name):
            if isinstance(leaf, DTensor):
                entry = ["tensor", str(leaf.dtype), list(leaf.shape)]
                if _is_sharded(leaf):
                    complete[key] = [*entry, None]
                    partial[key] = tensor_fingerprint(leaf.to_local())
                else:
                    complete[key] = [*entry, tensor_fingerprint(leaf.to_local())]
            elif isinstance(leaf, torch.Tensor):
                complete[key] = ["tensor", str(leaf.dtype), list(leaf.shape), tensor_fingerprint(leaf)]
            else:
                complete[key] = ["object", type(leaf).__name__, [], _object_fingerprint(leaf)]
    return complete, partial


def combine(complete: Record, partials: list[dict[str, int]]) -> Record:
    """The full record: rank 0's complete entries with every rank's partial sums added in."""
    record = {k: list(v) for k, v in complete.items()}
    for key in record:
        if record[key][3] is None:
            record[key][3] = sum(p.get(key, 0) for p in partials) % _WRAP
    return record


def differences(expected: Record, actual: Record, only: tuple[str, ...] = ()) -> list[str]:
    """Entries of ``expected`` (those under the ``only`` prefixes, if given) that ``actual`` lacks or holds
    with other values, each as 'key: why'."""
    problems = []
    for key, want in expected.items():
        if only and not key.startswith(only):
            continue
        got = actual.get(key)
        if got is None:
            problems.append(f"{key}: not restored")
        elif got[:3] != want[:3]:
            problems.append(f"{key}: restored as {got[1]} {got[2]}, saved as {want[1]} {want[2]}")
        elif got[3] != want[3]:
            problems.append(f"{key}: values differ from the ones saved (not read, or read from the wrong place)")
    return problems

"""Read DCP's ``.metadata`` without running code from it.

torch's ``FileSystemReader.read_metadata`` unpickles the file with plain ``pickle``: a snapshot from elsewhere
(or a tampered one) could run anything at a restore, ``ckpt inspect`` or ``predict``. Here the file is
(1) a regular file inside the snapshot, (2) checked against its SHA-256 in the commit record before a byte of
it is parsed, and (3) unpickled by an unpickler that admits only the types DCP itself writes there (measured
on torch 2.14.1: the dataclasses of ``torch.distributed.checkpoint.metadata``, ``filesystem._StorageInfo``,
``torch.Size``, torch dtypes, the layout and memory-format encodings, ``pathlib.PosixPath``). Every storage
location it names must be a file of the snapshot itself. The checksum keeps an intact snapshot's bytes
honest; the allow-list holds even when the commit record was rewritten to match a tampered file (nothing in it
is keyed), and then the worst a crafted file can do is make the restore fail.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
from pathlib import Path
from typing import Any

import torch

_METADATA_CLASSES = ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                     "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
_ALLOWED = frozenset({
    *(("torch.distributed.checkpoint.metadata", n) for n in _METADATA_CLASSES),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a name -> torch.layout lookup (how torch pickles a layout)
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id: a path, never opened from here
})
_MAX_BYTES = 1 << 30
"""A metadata file larger than this is not DCP's (ours are ~0.2 MB for a small Unet, tens of MB for big ones)."""


class MetadataError(ValueError):
    """The ``.metadata`` file is not what DCP writes (or not what was committed); the message names it."""


class _DCPUnpickler(pickle.Unpickler):
    """Resolves only DCP's own metadata types; anything else (os.system, builtins.eval...) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (not a DCP metadata type)")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of DCP metadata")


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file (a symlink to /dev/zero or a FIFO would hang a read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise MetadataError(f"{path}: missing") from None
    except OSError as e:
        raise MetadataError(f"{path}: unreadable, or not a regular file ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise MetadataError(f"{path}: not a regular file")
        if info.st_size > _MAX_BYTES:
            raise MetadataError(f"{path}: {info.st_size} bytes, too large for DCP metadata")
        return f.read()


def _expected_sha256(path: Path) -> str | None:
    """The file's SHA-256 in the snapshot's commit record, if there is a usable one that lists it (a snapshot
    being written, or read by a test before its commit, has none: the allow-list alone protects it)."""
    from elastictrain.snapshot import manifest

    commit = manifest.read_commit(path.parent)
    entry = (commit or {}).get("files", {}).get(path.name)
    return entry.get("sha256") if isinstance(entry, dict) else None


def read_metadata(snapshot: Path, rank: int | None = None) -> Any:
    """DCP's ``Metadata`` of ``snapshot`` (or of one rank's ``__RANK.metadata``), read safely.

    Raises:
        MetadataError: missing, not a regular file, a checksum mismatch, a type DCP does not write, a storage
            location outside the snapshot, or not a pickle at all; the message names the file.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = snapshot / (".metadata" if rank is None else f"__{rank}.metadata")
    data = _read_regular(path)
    expected = _expected_sha256(path)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise MetadataError(f"{path}: checksum mismatch (bytes changed after the snapshot was committed)")
    try:
        metadata = _DCPUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - whatever a crafted pickle raises, the file is the problem
        raise MetadataError(f"{path}: not DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise MetadataError(f"{path}: not DCP metadata (a {type(metadata).__name__})")
    _check_locations(path, metadata)
    return metadata


def _check_locations(path: Path, metadata: Any) -> None:
    """Every file DCP would open must be a plain file name of this snapshot (no '../', no absolute path)."""
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", ".."):
            raise MetadataError(f"{path}: names a data file outside the snapshot ({rel!r})")


def safe_reader(snapshot: Path, metadata: Any) -> Any:
    """A ``FileSystemReader`` for ``dcp.load`` that hands DCP the metadata already read by
    :func:`read_metadata` instead of unpickling the file itself."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedReader(str(snapshot))

"""Snapshots: taking, committing, discovering, verifying, restoring and proving them.

The public face is small: the trainer uses :class:`SnapshotManager` and its result :class:`ResumeInfo`;
``elastictrain ckpt`` and ``predict`` read snapshots offline through :mod:`elastictrain.snapshot.offline`.
Inside, one module per job (see the README's layout): manager (policy and lifecycle), saver (staging, the
writer thread, commit, retention), restorer (restore, the damage vote, the proof), discovery (which snapshot,
lineage, moving aside), appstate (what a snapshot holds), manifest (the on-disk record: :class:`Snapshot`),
proof (entry fingerprints), engines + ts_format (torchsnapshot and DCP), interval (the mid-epoch clock).
"""


from __future__ import annotations

from typing import Any

__all__ = ["ResumeInfo", "Snapshot", "SnapshotDamaged", "SnapshotManager"]

_WHERE = {"SnapshotManager": "manager", "Snapshot": "manifest", "SnapshotDamaged": "manifest", "ResumeInfo": "restorer"}


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (PEP 562): the durable writer process (writer.py) imports
    this package's file-only modules and must not pay for torch."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)

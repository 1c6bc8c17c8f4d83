"""Snapshots: taking, committing, discovering, verifying, restoring and proving them.

The public face is small: the trainer uses :class:`SnapshotManager` and its result :class:`ResumeInfo`;
``elastictrain ckpt`` and ``predict`` read snapshots offline through :mod:`elastictrain.snapshot.offline`.
Inside, one module per job (see the README's layout): manager (policy and lifecycle), saver (staging, the
writer thread, commit, retention), restorer (restore, the damage vote, the proof), discovery (which snapshot,
lineage, moving aside), appstate (what a snapshot holds), manifest (the on-disk record: :class:`Snapshot`),
proof (entry fingerprints), engines + ts_format (torchsnapshot and DCP), interval (the mid-epoch clock).
"""

from elastictrain.snapshot.manager import SnapshotManager
from elastictrain.snapshot.manifest import Snapshot, SnapshotDamaged
from elastictrain.snapshot.restorer import ResumeInfo

__all__ = ["ResumeInfo", "Snapshot", "SnapshotDamaged", "SnapshotManager"]

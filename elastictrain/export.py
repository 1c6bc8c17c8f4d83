"""The one way a model leaves elastictrain: a plain, unsharded state dict on CPU in a file that
``torch.load(path, weights_only=True)`` reads on any device, into the model its config builds.

Used for RUN_DIR/final_model.pt at the end of a run and by ``elastictrain ckpt export``.
"""

from __future__ import annotations

import stat
from pathlib import Path

import torch
from torch import nn

from elastictrain.dist import DistContext
from elastictrain.errors import UserError
from elastictrain.osutil import atomic_path


def check_target(out: Path) -> None:
    """Refuse an output that is a directory, in a folder that does not exist, inside a snapshot (it would
    damage it: the next start would fall back), or that exists as anything but a regular file (a device node,
    a FIFO, a symbolic link). Callers check before any expensive work; :func:`export_model` checks again,
    since the target may change meanwhile.

    Raises:
        UserError: naming the path.
    """
    from elastictrain.snapshot.manifest import enclosing_snapshot

    if out.is_dir():
        raise UserError(f"{out} is a directory; give the file to write, e.g. {out / 'model.pt'}")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such directory for the exported model")
    snapshot = enclosing_snapshot(out.parent)
    if snapshot is not None:
        raise UserError(f"{out}: inside snapshot {snapshot}; writing there would damage it. Write elsewhere")
    try:
        mode = out.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise UserError(f"{out}: exists and is not a regular file; give a new path or a file to replace")


def export_model(model: nn.Module, out: Path, ctx: DistContext) -> None:
    """Gather the full weights (a collective under FSDP2: every rank calls this) and write them on rank 0,
    to a temp file renamed into place, so a crash never leaves a torn file and a failure leaves nothing.

    Raises:
        UserError: ``out`` is a directory, or its folder does not exist.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return
    out = Path(out)
    check_target(out)
    with atomic_path(out, fsync=True) as tmp:
        torch.save({k: v.detach().cpu().contiguous() for k, v in full.items()}, tmp)

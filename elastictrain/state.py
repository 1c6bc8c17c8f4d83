"""TrainState: the counters and bookkeeping a snapshot carries besides model and optimizer tensors.

Everything here is JSON-able primitives (it is stored as one JSON string): torchsnapshot and DCP
restore with weights-only unpickling, which rejects numpy values, dataclasses, Enum, Path and datetime.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from elastictrain.device import device_rng_states, set_device_rng_states


@dataclass
class TrainState:
    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    """Optimizer steps completed, over the whole run (the global step axis)."""
    sample_offset: int = 0
    """Global samples consumed in the current (incomplete) epoch; 0 at an epoch boundary."""
    best_val_loss: float = math.inf
    best_snapshot: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per completed epoch: epoch, step, train_loss, val_loss, iou."""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved config of the run that took the snapshot."""
    run_id: str = ""
    """The metrics (wandb) run id, so a resumed run logs into the same run."""
    world_size: int = 1
    """World size when the snapshot was taken."""
    rng: list[dict[str, Any]] = field(default_factory=list)
    """Every rank's RNG states, gathered so that any world size can restore them."""
    data_order: dict[str, Any] = field(default_factory=dict)
    """What defines each epoch's sample order (``data.sample_order_key``): a mid-epoch resume checks it is unchanged."""

    def state_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        # inf is not valid JSON and some engines round-trip through it; -1 means "none yet".
        d["best_val_loss"] = -1.0 if math.isinf(self.best_val_loss) else self.best_val_loss
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if k in self.__dataclass_fields__:
                setattr(self, k, v)
        if self.best_val_loss < 0:
            self.best_val_loss = math.inf


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This rank's Python, numpy, torch CPU and accelerator RNG states, as JSON-able primitives."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [str(np_state[0]), np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        **{k: v.tolist() for k, v in device_rng_states(device).items()},
    }


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    set_device_rng_states(device, {k: torch.tensor(state[k], dtype=torch.uint8) for k in ("cuda", "mps")
                                   if k in state})


def seed_everything(seed: int, rank: int) -> None:
    """Distinct per-rank streams, all derived from the run seed."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)

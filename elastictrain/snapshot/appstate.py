"""What a snapshot holds, as statefuls an engine can save and load: the model and optimizer keyed by parameter
name (the same for a plain module, DDP and FSDP2), the LR scheduler, the grad scaler, and TrainState as JSON."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from elastictrain.snapshot.engines import AppState
from elastictrain.state import TrainState


class ModelState:
    """Model weights keyed by parameter name, the same for a plain module, DDP and FSDP2."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def snapshot_state_dict(self) -> dict[str, Any]:
        """The state dict to stage in the background: buffers (batch-norm statistics) are copied now, because
        the next forward changes them in place; parameters only change at the next optimizer step, which waits
        for the staging (:meth:`SnapshotManager.before_optimizer_step`)."""
        from elastictrain.parallelize import unwrap

        buffers = {name for name, _ in unwrap(self.model).named_buffers()}
        return {k: v.clone() if k in buffers else v for k, v in self.state_dict().items()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_model_state_dict(self.model, sd)


class OptimizerState:
    """Optimizer state keyed by parameter name (not position), so it survives a change of wrapper."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    @property
    def _sharded(self) -> bool:
        return any(isinstance(p, DTensor) for g in self.optimizer.param_groups for p in g["params"])

    @property
    def wants_template(self) -> bool:
        """True when the optimizer has no state yet and is not sharded: an engine then builds the tensors to
        read into from the snapshot itself. (Asking for a state dict now would initialise the state with a
        fake optimizer step on zero gradients: ~0.7 s for a resnet34 Unet, on every restart.)"""
        return not self.optimizer.state and not self._sharded

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self._sharded:
            set_optimizer_state_dict(self.model, self.optimizer, sd)
            return
        # Unsharded: the optimizer's own load, with parameter names mapped to its positions (what
        # set_optimizer_state_dict does too, after the same fake step as above).
        from elastictrain.parallelize import unwrap

        names = {id(p): n for n, p in unwrap(self.model).named_parameters()}
        order = [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        index = {n: i for i, n in enumerate(order)}
        unknown = [n for n in sd["state"] if n not in index]
        if unknown:
            raise ValueError(f"optimizer state for parameters this model does not have: {unknown[:3]}")
        self.optimizer.load_state_dict({
            "state": {index[n]: v for n, v in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]})


class JsonState:
    """TrainState as one JSON string: engines store strings as plain objects whatever their length,
    and JSON cannot smuggle numpy or class instances into a weights-only restore."""

    def __init__(self, state: TrainState) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(self.state.state_dict())}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.state.load_state_dict(json.loads(sd["json"]))


def build_app_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any, state: TrainState) -> AppState:
    """Everything a resume needs; RNG states travel inside TrainState."""
    app: AppState = {
        "model": ModelState(model),
        "optim": OptimizerState(model, optimizer),
        "sched": scheduler,
        "train": JsonState(state),
    }
    if scaler is not None:
        app["scaler"] = scaler
    return app

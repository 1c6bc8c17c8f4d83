"""The model, loss and metrics: all from segmentation-models-pytorch, built from config."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from elastictrain.config import ModelConfig


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """``smp.create_model`` from config; ``encoder_weights=None`` by default so nothing is downloaded."""
    kwargs: dict[str, object] = {"encoder_depth": cfg.encoder_depth}
    if cfg.decoder_channels:
        kwargs["decoder_channels"] = list(cfg.decoder_channels)
    try:
        return smp.create_model(cfg.arch, encoder_name=cfg.encoder, encoder_weights=cfg.encoder_weights,
                                in_channels=cfg.in_channels, classes=num_classes, **kwargs)
    except KeyError as e:
        raise ValueError(f"--model.arch/--model.encoder: smp does not know {e} "
                         f"(arch {cfg.arch!r}, encoder {cfg.encoder!r})") from None
    except TypeError as e:
        raise ValueError(f"--model.decoder_channels/--model.encoder_depth: not accepted by {cfg.arch}: {e}") from None


class SegmentationLoss(nn.Module):
    """Dice + cross-entropy: Dice copes with class imbalance, cross-entropy gives smooth early gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.dice = smp.losses.DiceLoss(smp.losses.MULTICLASS_MODE, from_logits=True)

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # losses in fp32 even under autocast
        return self.dice(logits, mask) + F.cross_entropy(logits, mask)


def confusion_stats(logits: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class [tp, fp, fn, tn] summed over the batch, shape (4, C): summable across batches and ranks."""
    pred = logits.argmax(dim=1)
    tp, fp, fn, tn = smp.metrics.get_stats(pred, mask, mode="multiclass", num_classes=num_classes)
    return torch.stack([tp.sum(0), fp.sum(0), fn.sum(0), tn.sum(0)])


def scores(stats: torch.Tensor) -> dict[str, float]:
    """Micro-averaged IoU and Dice (F1) from summed confusion stats."""
    tp, fp, fn, tn = (s.unsqueeze(0) for s in stats)
    return {
        "iou": float(smp.metrics.iou_score(tp, fp, fn, tn, reduction="micro")),
        "dice": float(smp.metrics.f1_score(tp, fp, fn, tn, reduction="micro")),
    }

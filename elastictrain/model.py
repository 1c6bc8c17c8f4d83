"""The model, loss and metrics: all from segmentation-models-pytorch, built from config.

Pretrained encoder weights come from the Hugging Face hub cache (smp's own encoders and timm's) or torch
hub's cache, whichever the encoder's library uses. :func:`fetch_encoder_weights` runs on every process
before any process group exists: local rank 0 fills the node's cache (or proves the weights are there)
and fails with one message when they can be neither found nor downloaded; the other local ranks never go
to the network: they wait, reading the cache only, until local rank 0's files are there. So a node
downloads once, and when local rank 0 fails, torchrun's SIGTERM ends the waiting ranks at once (no signal
handler is installed yet), instead of leaving them stuck joining a process group that will never form.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from elastictrain.augment import Normalization
from elastictrain.config import ModelConfig
from elastictrain.errors import UserError

log = logging.getLogger(__name__)


def _smp_weights(cfg: ModelConfig) -> str | bool | None:
    """timm ('tu-') encoders take True for their default pretrained tag; smp warns about any other value."""
    return True if cfg.encoder_weights is not None and cfg.encoder.startswith("tu-") else cfg.encoder_weights


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """``smp.create_model`` from config; ``encoder_weights=None`` by default so nothing is downloaded."""
    kwargs: dict[str, object] = {"encoder_depth": cfg.encoder_depth}
    if cfg.decoder_channels:
        kwargs["decoder_channels"] = list(cfg.decoder_channels)
    try:
        return smp.create_model(cfg.arch, encoder_name=cfg.encoder, encoder_weights=_smp_weights(cfg),
                                in_channels=cfg.in_channels, classes=num_classes, **kwargs)
    except KeyError as e:
        raise UserError(f"--model.arch/--model.encoder/--model.encoder_weights: smp does not know {e} "
                        f"(arch {cfg.arch!r}, encoder {cfg.encoder!r}, weights {cfg.encoder_weights!r})") from None
    except TypeError as e:
        raise UserError(f"--model.decoder_channels/--model.encoder_depth: not accepted by {cfg.arch}: {e}") from None
    except RuntimeError as e:
        if not str(e).startswith("Unknown model"):  # timm's words for a 'tu-' name it does not have
            raise
        raise UserError(f"--model.encoder: timm has no model {cfg.encoder[3:]!r} (from {cfg.encoder!r}): {e}") from None


def _prefetch_command(cfg: ModelConfig) -> str:
    return (f"python -c \"import segmentation_models_pytorch as smp; smp.encoders.get_encoder("
            f"'{cfg.encoder}', weights='{cfg.encoder_weights}')\"")


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub reads only its cache meanwhile (``HF_HUB_OFFLINE``, read at each call by the hub's
    ``is_offline_mode``; tests/test_model.py breaks if an upgrade moves it)."""
    import huggingface_hub.constants as hub

    before, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def _load_encoder(cfg: ModelConfig) -> None:
    smp.encoders.get_encoder(cfg.encoder, in_channels=cfg.in_channels, depth=cfg.encoder_depth,
                             weights=_smp_weights(cfg))


def _wait_for_cache(cfg: ModelConfig, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with _hub_offline():
                _load_encoder(cfg)
            return
        except KeyError:
            raise
        except Exception:  # noqa: BLE001 - not (completely) there yet
            if time.monotonic() > deadline:
                raise UserError(f"--model.encoder_weights {cfg.encoder_weights}: local rank 0 did not bring the "
                                f"weights of {cfg.encoder} into the cache within {wait_s:.0f} s "
                                "(--dist.timeout_s)") from None
            time.sleep(1.0)


def fetch_encoder_weights(cfg: ModelConfig, local_rank: int = 0, wait_s: float = 300.0) -> None:
    """Make sure the pretrained encoder weights are in this machine's cache; local rank 0 downloads them if
    need be, the other local ranks wait (up to ``wait_s``) reading the cache only. Call it before any
    process group starts, on every process.

    Raises:
        UserError: unknown weights for this encoder, or weights neither cached nor downloadable; the message
            names --model.encoder_weights, the cache directories and how to pre-fetch.
    """
    if cfg.encoder_weights is None:
        return
    try:
        if local_rank == 0:
            _load_encoder(cfg)
        else:
            _wait_for_cache(cfg, wait_s)
    except KeyError as e:  # smp: no such encoder, or no such weights for it (the message lists the options)
        raise UserError(f"--model.encoder_weights {cfg.encoder_weights}: {e.args[0] if e.args else e}") from None
    except Exception as e:  # noqa: BLE001 - offline, a firewall, a hub outage, a timm model without weights...
        import huggingface_hub.constants

        raise UserError(
            f"--model.encoder_weights {cfg.encoder_weights}: cannot get the pretrained weights of encoder "
            f"{cfg.encoder}: not in the cache and the download failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Pre-fetch them on a machine with internet access with "
            f"{_prefetch_command(cfg)} and copy its Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}, "
            f"set by HF_HOME) and torch hub cache ({torch.hub.get_dir()}, set by TORCH_HOME) to the same place "
            "here; set HF_HUB_OFFLINE=1 on a machine that never has internet. Or train from scratch with "
            "--model.encoder_weights none.") from None
    log.info("pretrained weights %r of encoder %s are in the cache", cfg.encoder_weights, cfg.encoder)


def encoder_normalization(cfg: ModelConfig) -> Normalization:
    """The encoder's own input statistics (``smp.encoders.get_preprocessing_params``) when it is pretrained;
    ImageNet's otherwise (nothing to match, and never a network call)."""
    if cfg.encoder_weights is None:
        return Normalization()
    try:
        params = smp.encoders.get_preprocessing_params(cfg.encoder, pretrained=cfg.encoder_weights)
    except Exception as e:  # noqa: BLE001 - its config file is fetched with the weights; without them, say so
        raise UserError(f"--model.encoder_weights {cfg.encoder_weights}: cannot read the input statistics of "
                        f"encoder {cfg.encoder} ({type(e).__name__}: {e}); they come with the weights: "
                        f"{_prefetch_command(cfg)}") from None
    scale = float(max(params.get("input_range", [0, 1])))  # [0, 255] encoders: fold the range into mean/std
    return Normalization(tuple(m / scale for m in params["mean"]), tuple(s / scale for s in params["std"]),
                         params.get("input_space", "RGB") == "BGR")


class SegmentationLoss(nn.Module):
    """Dice + cross-entropy: Dice copes with class imbalance, cross-entropy gives smooth early gradients.
    Pixels whose mask value is ``ignore_index`` count in neither."""

    def __init__(self, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.dice = smp.losses.DiceLoss(smp.losses.MULTICLASS_MODE, from_logits=True, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # losses in fp32 even under autocast
        if self.ignore_index is None:
            return self.dice(logits, mask) + F.cross_entropy(logits, mask)
        # A batch of only ignored pixels would make the mean cross-entropy 0/0.
        total = F.cross_entropy(logits, mask, ignore_index=self.ignore_index, reduction="sum")
        counted = (mask != self.ignore_index).sum().clamp(min=1)
        return self.dice(logits, mask) + total / counted


def confusion_stats(logits: torch.Tensor, mask: torch.Tensor, num_classes: int,
                    ignore_index: int | None = None) -> torch.Tensor:
    """Per-class [tp, fp, fn, tn] summed over the batch, shape (4, C): summable across batches and ranks.
    ``logits`` may also be class predictions (B x H x W integers)."""
    pred = logits.argmax(dim=1) if logits.dim() == mask.dim() + 1 else logits
    tp, fp, fn, tn = smp.metrics.get_stats(pred.long(), mask.long(), mode="multiclass", num_classes=num_classes,
                                           ignore_index=ignore_index)
    return torch.stack([tp.sum(0), fp.sum(0), fn.sum(0), tn.sum(0)])


def scores(stats: torch.Tensor, names: list[str] | None = None) -> dict[str, float | None]:
    """Micro-averaged IoU and Dice (F1) from summed confusion stats, and with ``names`` (one per class) also
    ``iou/NAME`` and ``dice/NAME`` per class: None for a class that is in neither the truth nor a prediction."""
    tp, fp, fn, tn = (s.unsqueeze(0) for s in stats)
    out: dict[str, float | None] = {
        "iou": float(smp.metrics.iou_score(tp, fp, fn, tn, reduction="micro")),
        "dice": float(smp.metrics.f1_score(tp, fp, fn, tn, reduction="micro")),
    }
    if names is None:
        return out
    iou = smp.metrics.iou_score(tp, fp, fn, tn, reduction="none", zero_division=0)[0]
    dice = smp.metrics.f1_score(tp, fp, fn, tn, reduction="none", zero_division=0)[0]
    seen = (stats[0] + stats[1] + stats[2]) > 0
    for c, name in enumerate(names):
        out[f"iou/{name}"] = float(iou[c]) if seen[c] else None
        out[f"dice/{name}"] = float(dice[c]) if seen[c] else None
    return out

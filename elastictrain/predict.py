"""``elastictrain predict``: run a trained model over a folder of images, one class-index PNG per image.

    elastictrain predict --model RUN_DIR|final_model.pt|SNAPSHOT --input DIR --output DIR [--masks DIR]

The model settings come from the run (``RUN_DIR/config.yaml``, or the config stored in a snapshot), so
nothing is repeated. Each image goes through the validation pipeline (resize to ``data.image_size``, the
encoder's normalisation); the logits are resized back to the image's own size (bilinear) before the
argmax, so ``OUTPUT/<stem>.png`` has the original size. It is a palette PNG: its pixel values are class
ids (``np.asarray(Image.open(p))``), shown in the class colours by any viewer. With ``--masks DIR``
(``DIR/<stem>.png`` per image, like training masks) it prints IoU and Dice, overall and per class,
computed at the original size. Runs on any device, in batches, with a progress bar on a terminal.

Exit status: 0 done, 2 a usage error (a missing path, a mask missing or bad, no images), 1 a damaged snapshot
or any other failure.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from elastictrain import device as devices
from elastictrain.snapshot import manifest
from elastictrain.augment import SamplePipeline
from elastictrain.config import Config, from_dict
from elastictrain.data import (IMAGE_SUFFIXES, bad_class_ids, bad_ids_message, class_names, load_image, load_mask,
                               size_mismatch_message)
from elastictrain.errors import UserError
from elastictrain.model import build_model, confusion_stats, encoder_normalization, scores
from elastictrain.osutil import atomic_path
from elastictrain.viz import class_index_png

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


def _read_run_config(run_dir: Path) -> Config | None:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: not a config this version can read ({e})") from None


def _model_from_snapshot(path: Path, verify: bool) -> tuple[nn.Module, Config]:
    from elastictrain.snapshot.offline import load_snapshot_model

    model, state = load_snapshot_model(path, verify)
    return model, from_dict(state.config)


def _empty_model(cfg: Config) -> nn.Module:
    model_cfg = type(cfg.model)(**{**vars(cfg.model), "encoder_weights": None})  # the weights come from the run
    return build_model(model_cfg, cfg.data.num_classes)


def _model_from_file(path: Path, cfg: Config) -> nn.Module:
    model = _empty_model(cfg)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        # weights_only refuses anything but tensors and plain containers: say so in one line, not torch's page.
        raise UserError(f"{path}: not a plain state dict (refused to load with weights_only=True: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); export one with "
                        f"`elastictrain ckpt export`") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: does not fit the model of {path.parent / CONFIG_FILE}: "
                        f"{str(e).splitlines()[0]}") from None
    return model


def load_trained_model(path: Path, verify: bool = True) -> tuple[nn.Module, Config, str]:
    """(model on CPU in eval mode, the run's config, where the weights came from) for ``--model PATH``.

    PATH is a snapshot directory, a run directory (its final_model.pt, else its latest complete snapshot)
    or a final_model.pt with the run's config.yaml beside it.
    """
    if not path.exists():
        raise UserError(f"--model: no such file or directory: {path}")
    if path.is_dir() and (manifest.is_snapshot_name(path.name) or (path / manifest.COMMIT).exists()):
        model, cfg = _model_from_snapshot(path, verify)
        return model.eval(), cfg, f"snapshot {path}"
    if path.is_dir():
        final = path / "final_model.pt"
        cfg = _read_run_config(path)
        if final.is_file() and cfg is not None:
            return _model_from_file(final, cfg).eval(), cfg, str(final)
        latest = next((s for s in manifest.list_snapshots(path / "snapshots") if s.complete), None) \
            if (path / "snapshots").is_dir() else None
        if latest is None:
            raise UserError(f"--model {path}: neither a finished run (final_model.pt and {CONFIG_FILE}) nor a run "
                            "with a complete snapshot nor a snapshot directory")
        model, cfg = _model_from_snapshot(latest.path, verify)
        return model.eval(), cfg, f"snapshot {latest.path} (the run has no final model yet)"
    cfg = _read_run_config(path.parent)
    if cfg is None:
        raise UserError(f"--model {path}: no {CONFIG_FILE} beside it to say which model it is; pass the run "
                        "directory or a snapshot instead")
    return _model_from_file(path, cfg).eval(), cfg, str(path)


class _Images(Dataset):
    """Input images through the validation pipeline, with their original size and (optionally) mask; an
    unreadable file comes back as its error message (from a worker, an exception would arrive wrapped in
    DataLoader's traceback text and end the whole run at the first bad file)."""

    def __init__(self, images: list[Path], masks: list[Path] | None, pipeline: SamplePipeline) -> None:
        self.images, self.masks, self.pipeline = images, masks, pipeline

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, tuple[int, int], int, torch.Tensor | None] | str:
        try:
            image = load_image(self.images[i])  # its errors name the file already
        except UserError as e:
            return str(e)
        size = (int(image.shape[1]), int(image.shape[2]))
        model_input, _ = self.pipeline(image, torch.zeros(size, dtype=torch.int64))
        mask = None
        if self.masks is not None:
            try:
                mask = torch.from_numpy(load_mask(self.masks[i]))  # upright like its image
            except UserError as e:
                return str(e)
        return model_input, size, i, mask


def _collate(batch: list) -> tuple[torch.Tensor | None, list, list, list, list[str]]:
    good = [b for b in batch if not isinstance(b, str)]
    images = torch.stack([b[0] for b in good]) if good else None
    return images, [b[1] for b in good], [b[2] for b in good], [b[3] for b in good], \
        [b for b in batch if isinstance(b, str)]


def _list_inputs(input_dir: Path, masks_dir: Path | None, output: Path) -> tuple[list[Path], list[Path] | None]:
    if not input_dir.is_dir():
        raise UserError(f"--input: no such directory: {input_dir}")
    images = sorted(p for p in input_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"--input {input_dir}: no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise UserError(f"--input: {p} and {stems[p.stem]} would both be predicted as {output / (p.stem + '.png')}")
        stems[p.stem] = p
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output}: exists and is not a directory")
    resolved_out = output.resolve()
    if resolved_out == input_dir.resolve() or (masks_dir is not None and resolved_out == masks_dir.resolve()):
        raise UserError(f"--output {output}: is the input or masks folder; predictions would overwrite them")
    if masks_dir is None:
        return images, None
    if not masks_dir.is_dir():
        raise UserError(f"--masks: no such directory: {masks_dir}")
    masks = [masks_dir / f"{p.stem}.png" for p in images]
    missing = [str(m) for m in masks if not m.is_file()]
    if missing:
        raise UserError(f"--masks {masks_dir}: {len(missing)} image(s) have no mask: " + ", ".join(missing[:20])
                        + (" ..." if len(missing) > 20 else ""))
    return images, masks


def predict(args: argparse.Namespace) -> tuple[dict[str, Any] | None, list[str]]:
    """Write one class-index PNG per input image; return (the scores when masks were given, class names)."""
    images, masks = _list_inputs(args.input, args.masks, args.output)
    model, cfg, source = load_trained_model(args.model, verify=not args.no_verify)
    try:
        device = devices.pick_device(args.device, 0)
    except ValueError as e:
        raise UserError(str(e)) from None
    amp = devices.autocast_dtype(device, cfg.train.precision)
    model.to(device)
    names, ignore = class_names(cfg.data), cfg.data.ignore_index
    pipeline = SamplePipeline([], cfg.data.image_size, encoder_normalization(cfg.model),
                              ignore if ignore is not None else 0)
    loader = DataLoader(_Images(images, masks, pipeline), batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=_collate)
    log.info("predicting %d image(s) from %s with %s (%s / %s, %d classes, input %dx%d) on %s", len(images),
             args.input, source, cfg.model.arch, cfg.model.encoder, cfg.data.num_classes, cfg.data.image_size,
             cfg.data.image_size, device)
    args.output.mkdir(parents=True, exist_ok=True)
    stats = torch.zeros(4, cfg.data.num_classes, dtype=torch.long)
    unreadable: list[str] = []
    bad_masks: list[str] = []
    with torch.no_grad():
        for batch, sizes, indices, truths, errors in _progress(loader, len(images), args.progress):
            unreadable += errors
            if batch is None:
                continue
            with devices.autocast(device, amp):
                logits = model(batch.to(device))
            for k, (size, i, truth) in enumerate(zip(sizes, indices, truths)):
                one = logits[k:k + 1].float()
                if tuple(one.shape[-2:]) != size:
                    one = F.interpolate(one, size=size, mode="bilinear", align_corners=False)
                pred = one.argmax(1)[0].cpu()
                _save(class_index_png(pred.numpy(), cfg.data.num_classes), args.output / f"{images[i].stem}.png")
                problem = None if truth is None else _mask_problem(pred, truth, masks[i], images[i],
                                                                   cfg.data.num_classes, ignore)
                if problem:
                    bad_masks.append(problem)
                elif truth is not None:
                    stats += confusion_stats(pred[None], truth[None], cfg.data.num_classes, ignore)
    log.info("wrote %d prediction(s) to %s", len(images) - len(unreadable), args.output)
    _raise_problems(unreadable, bad_masks)
    return (scores(stats, names) if masks is not None else None), names


def _raise_problems(unreadable: list[str], bad_masks: list[str]) -> None:
    """One UserError naming every file that had no prediction or no score: the others are written, and
    scores over a subset would pass for the whole folder."""
    parts = []
    if unreadable:
        parts.append(f"{len(unreadable)} file(s) could not be read, so no prediction and no score for them:\n  "
                     + "\n  ".join(unreadable))
    if bad_masks:
        parts.append(f"{len(bad_masks)} mask(s) do not fit their image, so no score (the predictions are "
                     "written):\n  " + "\n  ".join(bad_masks))
    if parts:
        raise UserError("\n".join(parts))


def _mask_problem(pred: torch.Tensor, truth: torch.Tensor, mask_path: Path, image_path: Path, num_classes: int,
                  ignore: int | None) -> str | None:
    """Why this mask cannot score its prediction (channels, size, class ids), or None."""
    if truth.dim() != 2:
        return (f"{mask_path}: mask has {truth.shape[-1]} channels; masks must be single-channel PNGs "
                "(grey or palette) whose pixel values are class ids")
    if tuple(truth.shape) != tuple(pred.shape):
        return size_mismatch_message(mask_path, truth.shape[::-1], image_path, pred.shape[::-1])
    bad = bad_class_ids(truth.numpy(), num_classes, ignore)
    return bad_ids_message(mask_path, bad, num_classes, ignore) if bad else None


def _save(image: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, "PNG")


def _progress(loader: DataLoader, total: int, setting: str) -> Any:
    if setting == "off" or (setting == "auto" and not sys.stderr.isatty()):
        return loader
    from tqdm import tqdm

    return tqdm(loader, total=-(-total // (loader.batch_size or 1)), desc="predict", unit="batch", dynamic_ncols=True)


def report(result: dict[str, Any], names: list[str]) -> str:
    """The scores as printed: overall, then one line per class."""
    lines = [f"IoU {result['iou']:.4f}  Dice {result['dice']:.4f}  (micro-averaged over all pixels, at the "
             "images' own size)"]
    width = max(len(n) for n in names)
    for name in names:
        iou, dice = result[f"iou/{name}"], result[f"dice/{name}"]
        lines.append(f"  {name:<{width}}  IoU {'-' if iou is None else f'{iou:.4f}'}  "
                     f"Dice {'-' if dice is None else f'{dice:.4f}'}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastictrain predict", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a run directory, its final_model.pt, or a snapshot")
    parser.add_argument("--input", type=Path, required=True, help="folder of images to predict")
    parser.add_argument("--output", type=Path, required=True, help="folder for the class-index PNGs (created)")
    parser.add_argument("--masks", type=Path, default=None, help="ground-truth masks (<stem>.png): print IoU/Dice")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding processes (0: in this one)")
    parser.add_argument("--progress", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--no-verify", action="store_true", help="skip a snapshot's checksum check")
    return parser


def main(argv: list[str]) -> int:
    """``elastictrain predict ...``; returns the exit status."""
    from elastictrain.console import setup_logging

    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the usage (or --help)
        return int(e.code or 0)
    setup_logging(None, rank=0)
    if args.batch_size < 1 or args.num_workers < 0:
        sys.stderr.write("elastictrain predict: --batch-size must be >= 1 and --num-workers >= 0\n")
        return 2
    try:
        result, names = predict(args)
    except (UserError, FileNotFoundError) as e:
        sys.stderr.write(f"elastictrain predict: {e}\n")
        return 2
    except ValueError as e:  # a damaged or incomplete snapshot: not the user's typo, but no traceback either
        sys.stderr.write(f"elastictrain predict: {e}\n")
        return 1
    if result is not None:
        sys.stdout.write(report(result, names) + "\n")
    return 0

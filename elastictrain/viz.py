"""Pictures of what the model predicts: a few fixed validation samples, truth and prediction overlaid.

At every validation each rank keeps the samples of the fixed set (the first ``count`` validation images)
that its shard holds, rank 0 gathers them and writes ``RUN_DIR/predictions/epochNNNNN.png``: one row per
sample, columns image | truth | prediction, class colours explained in a legend under the grid. Drawn
with PIL alone (no matplotlib in the training process; a grid takes milliseconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from elastictrain.augment import Normalization
from elastictrain.osutil import atomic_path

# tab10 then tab20's lighter shades: distinct at a glance, colour-blind friendlier than a hue wheel.
_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
            "#dbdb8d", "#9edae5"]
_IGNORE_COLOUR = (255, 255, 255)
_ALPHA = 0.6  # how strongly a class colour covers the image
_MIN_CELL = 160  # small images are enlarged (nearest) to at least this side, so a person can see them


def palette(num_classes: int) -> np.ndarray:
    """One RGB colour per class id (uint8, ``num_classes x 3``); class 0 (background) is black."""
    colours = [(0, 0, 0)]
    for c in range(1, num_classes):
        if c - 1 < len(_COLOURS):
            h = _COLOURS[c - 1]
            colours.append((int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)))
        else:  # beyond 21 classes: spread hues (rarely looked at one by one anyway)
            rgb = Image.new("HSV", (1, 1), (int(255 * ((c * 0.618) % 1)), 200, 230)).convert("RGB").getpixel((0, 0))
            colours.append(rgb)
    return np.array(colours, dtype=np.uint8)


@dataclass
class Example:
    """One validation sample as pictures: RGB uint8 ``HxWx3``, truth and prediction as class ids ``HxW``."""

    index: int
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray


class ExampleCollector:
    """Keeps, during one validation pass, this rank's share of the first ``count`` validation samples.

    The validation shard of rank ``r`` holds indices ``r, r + W, r + 2W, ...`` in order (``ValSampler``), so
    the j-th sample this rank sees is index ``r + j * W``; blank FSDP2 batches come last and are skipped.
    """

    def __init__(self, rank: int, world_size: int, count: int, normalization: Normalization) -> None:
        self.rank, self.world_size, self.count = rank, world_size, count
        self.normalization = normalization
        self.seen = 0
        self.examples: list[Example] = []

    def add(self, images: torch.Tensor, logits: torch.Tensor, masks: torch.Tensor) -> None:
        """Record the samples of this batch that belong to the fixed set (a no-op once past it)."""
        for i in range(len(images)):
            index = self.rank + (self.seen + i) * self.world_size
            if index < self.count:
                image = self.normalization.denormalize(images[i].float())
                self.examples.append(Example(
                    index, (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
                    masks[i].cpu().numpy().astype(np.int64), logits[i].argmax(0).cpu().numpy().astype(np.int64)))
        self.seen += len(images)


def overlay(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, ignore_index: int | None) -> np.ndarray:
    """A grey copy of ``image`` with every non-background class painted in its colour (ignored pixels white):
    grey, so that every colour in the picture is a label's, whatever the image's own colours."""
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = np.repeat(grey[..., None], 3, axis=2)
    valid = (labels >= 0) & (labels < len(colours))
    painted = valid & (labels > 0)
    colour = colours[np.where(valid, labels, 0)].astype(np.float32)
    out[painted] = (1 - _ALPHA) * out[painted] + _ALPHA * colour[painted]
    if ignore_index is not None:
        out[labels == ignore_index] = _IGNORE_COLOUR
    return out.round().astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def prediction_grid(examples: list[Example], class_names: list[str], ignore_index: int | None,
                    title: str) -> Image.Image:
    """The grid as a PIL image: rows of image | truth | prediction, a title, and a legend of class colours."""
    colours = palette(len(class_names))
    side = max(_MIN_CELL, max((e.image.shape[0] for e in examples), default=_MIN_CELL))
    pad, head, font = 6, 44, _font(14)
    legend_rows = (len(class_names) + (ignore_index is not None) + 3) // 4
    width = 3 * side + 4 * pad + 70
    height = head + len(examples) * (side + pad) + pad + 22 * legend_rows + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 4), title, fill=(0, 0, 0), font=font)
    for col, name in enumerate(("image", "truth", "prediction")):
        draw.text((70 + pad + col * (side + pad), head - 20), name, fill=(60, 60, 60), font=font)
    for row, e in enumerate(examples):
        y = head + row * (side + pad)
        draw.text((pad, y + side // 2 - 8), f"val {e.index}", fill=(0, 0, 0), font=font)
        cells = (e.image, overlay(e.image, e.truth, colours, ignore_index),
                 overlay(e.image, e.prediction, colours, ignore_index))
        for col, cell in enumerate(cells):
            tile = Image.fromarray(cell).resize((side, side), Image.Resampling.NEAREST)
            grid.paste(tile, (70 + pad + col * (side + pad), y))
    y = head + len(examples) * (side + pad) + pad
    entries = [(name, tuple(int(v) for v in colours[c])) for c, name in enumerate(class_names)]
    if ignore_index is not None:
        entries.append((f"ignored ({ignore_index})", _IGNORE_COLOUR))
    for k, (name, colour) in enumerate(entries):
        x, yy = pad + (k % 4) * (width // 4), y + (k // 4) * 22
        draw.rectangle((x, yy + 2, x + 14, yy + 16), fill=colour, outline=(0, 0, 0))
        draw.text((x + 20, yy), name, fill=(0, 0, 0), font=font)
    return grid


def write_prediction_grid(examples: list[Example], path: Path, class_names: list[str], ignore_index: int | None,
                          title: str) -> Path:
    """Write the grid PNG atomically (a viewer or a kill never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        prediction_grid(sorted(examples, key=lambda e: e.index), class_names, ignore_index, title).save(tmp, "PNG")
    return path


def class_index_png(labels: np.ndarray, num_classes: int) -> Image.Image:
    """A class-index PNG: pixel values are class ids; up to 256 classes as a palette image that viewers
    show in the class colours (``np.asarray`` still gives the ids), beyond that 16-bit grey."""
    if num_classes <= 256:
        image = Image.fromarray(labels.astype(np.uint8))  # mode L; putpalette makes it P, ids unchanged
        image.putpalette(palette(num_classes).reshape(-1).tolist())
        return image
    return Image.fromarray(labels.astype(np.uint16))  # mode I;16

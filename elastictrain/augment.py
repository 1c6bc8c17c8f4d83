"""Joint image+mask transforms from torchvision.transforms.v2, chosen by name in ``data.augment``.

Every sample goes through one :class:`SamplePipeline`: resize (or a random resized crop) to
``data.image_size``, the training augmentations in the order listed, then the encoder's normalisation.
The mask travels as a ``tv_tensors.Mask``, so every geometric step uses nearest-neighbour for it and the
colour steps leave it alone: it stays class ids (plus ``ignore_index``, which also fills rotated corners).

torchvision draws its random parameters from the global torch RNG. A training sample is therefore
transformed under ``torch.random.fork_rng`` seeded from ``(seed, epoch, index)`` alone: it looks the same
on every rank, in every DataLoader worker and at every world size, and the training process's own RNG
stream is left exactly where it was.

``data.augment`` accepts (YAML or ``--data.augment``):

* a preset name: ``default`` (``resized_crop``, ``hflip``, ``color_jitter``) or ``none`` (also ``false``);
* a list of names and presets, e.g. ``[resized_crop, hflip, vflip]`` or ``hflip,vflip`` on the command line;
* list items with arguments as one-key mappings: ``[{rotate: {degrees: 30}}, {resized_crop: {scale: [0.3, 1]}}]``.

The vocabulary (arguments and defaults):

=============  ==============================================  ===========================================
name           arguments (default)                             torchvision
=============  ==============================================  ===========================================
resized_crop   scale [0.5, 1.0], ratio [0.75, 1.333]           RandomResizedCrop to image_size (replaces
                                                               the plain resize; crops the original image)
hflip          p 0.5                                           RandomHorizontalFlip
vflip          p 0.5                                           RandomVerticalFlip
rotate         degrees 15                                      RandomRotation (bilinear image, nearest mask)
color_jitter   brightness 0.2, contrast 0.2, saturation 0.2,   ColorJitter (image only)
               hue 0.0
=============  ==============================================  ===========================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

PRESETS: dict[str, list[str]] = {
    # Scale and horizontal flips help nearly every segmentation task and are safe for it: the labels of a
    # mirrored or rescaled scene stay true. Mild colour jitter covers exposure and white balance. Vertical flips
    # and rotations are left out: they break scenes with an up (streets, people, indoor); add them for
    # aerial, satellite or microscopy images, where orientation carries no meaning.
    "default": ["resized_crop", "hflip", "color_jitter"],
    "none": [],
}

_RANGE = "a pair [low, high]"


def _pair(low: float, high: float | None = None) -> Callable[[Any], tuple[float, float] | None]:
    """A validator for ``[a, b]`` with ``low <= a <= b <= high``; returns None when invalid."""
    def check(value: Any) -> tuple[float, float] | None:
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            return None
        a, b = float(value[0]), float(value[1])
        return (a, b) if low <= a <= b and (high is None or b <= high) and b > 0 else None
    return check


def _number(low: float, high: float) -> Callable[[Any], float | None]:
    def check(value: Any) -> float | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
        return float(value) if ok else None
    return check


# name -> {argument: (default, validator, what a valid value is)}
VOCABULARY: dict[str, dict[str, tuple[Any, Callable[[Any], Any], str]]] = {
    "resized_crop": {"scale": ((0.5, 1.0), _pair(1e-3, 1.0), f"{_RANGE} within (0, 1]"),
                     "ratio": ((3 / 4, 4 / 3), _pair(1e-2, 1e2), f"{_RANGE} of aspect ratios > 0")},
    "hflip": {"p": (0.5, _number(0.0, 1.0), "a probability in [0, 1]")},
    "vflip": {"p": (0.5, _number(0.0, 1.0), "a probability in [0, 1]")},
    "rotate": {"degrees": (15.0, _number(0.0, 180.0), "degrees in [0, 180]")},
    "color_jitter": {"brightness": (0.2, _number(0.0, 1.0), "a number in [0, 1]"),
                     "contrast": (0.2, _number(0.0, 1.0), "a number in [0, 1]"),
                     "saturation": (0.2, _number(0.0, 1.0), "a number in [0, 1]"),
                     "hue": (0.0, _number(0.0, 0.5), "a number in [0, 0.5]")},
}

Step = tuple[str, dict[str, Any]]


def parse(value: Any) -> tuple[list[Step], list[str]]:
    """``data.augment`` as ``[(name, arguments with defaults filled in)]`` plus every problem found."""
    if value is None or value is False:
        return [], []
    if value is True:
        value = "default"
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, dict):  # one augmentation with arguments, written without the list around it
        value = [value]
    if not isinstance(value, list):
        return [], [f"--data.augment: expected a preset name or a list of augmentations, got {value!r}"]
    steps: list[Step] = []
    problems: list[str] = []
    for item in value:
        name, args = _split_item(item, problems)
        if name is None:
            continue
        if name.lower() in ("false", "off"):
            name = "none"
        if name in PRESETS and not args:
            steps += [(n, _filled(n, {}, problems)) for n in PRESETS[name]]
        elif name in VOCABULARY:
            steps.append((name, _filled(name, args, problems)))
        else:
            problems.append(f"--data.augment: unknown augmentation {name!r} (known: {', '.join(VOCABULARY)}; "
                            f"presets: {', '.join(PRESETS)})")
    if sum(name == "resized_crop" for name, _ in steps) > 1:
        problems.append("--data.augment: resized_crop may appear only once (it replaces the resize)")
    return steps, problems


def _split_item(item: Any, problems: list[str]) -> tuple[str | None, dict[str, Any]]:
    if isinstance(item, str):
        return item.strip(), {}
    if isinstance(item, dict) and len(item) == 1:
        (name, args), = item.items()
        if args is None:
            args = {}
        if isinstance(name, str) and isinstance(args, dict):
            return name, args
    problems.append(f"--data.augment: {item!r} is neither a name nor a one-key mapping like "
                    "{rotate: {degrees: 30}}")
    return None, {}


def _filled(name: str, args: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    spec = VOCABULARY[name]
    filled = {}
    for key, value in args.items():
        if key not in spec:
            problems.append(f"--data.augment: {name} has no argument {key!r} (it takes {', '.join(spec)})")
            continue
        checked = spec[key][1](value)
        if checked is None:
            problems.append(f"--data.augment: {name} {key} must be {spec[key][2]}, got {value!r}")
        filled[key] = checked
    return {key: filled.get(key) if filled.get(key) is not None else default for key, (default, _, _) in spec.items()}


def _transform(name: str, args: dict[str, Any], image_size: int, mask_fill: int) -> v2.Transform:
    if name == "resized_crop":
        return v2.RandomResizedCrop(image_size, scale=args["scale"], ratio=args["ratio"], antialias=True)
    if name == "hflip":
        return v2.RandomHorizontalFlip(args["p"])
    if name == "vflip":
        return v2.RandomVerticalFlip(args["p"])
    if name == "rotate":
        # The interpolation applies to the image; torchvision always takes nearest for a Mask.
        return v2.RandomRotation(args["degrees"], interpolation=InterpolationMode.BILINEAR,
                                 fill={tv_tensors.Image: 0.0, tv_tensors.Mask: mask_fill})
    if name == "color_jitter":
        return v2.ColorJitter(args["brightness"], args["contrast"], args["saturation"], args["hue"] or None)
    raise AssertionError(name)


@dataclass(frozen=True)
class Normalization:
    """What the encoder expects of an image in [0, 1]: channel order, then ``(x * range - mean) / std``."""

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    bgr: bool = False

    def denormalize(self, image: torch.Tensor) -> torch.Tensor:
        """A normalised CxHxW float image back to RGB in [0, 1] (for pictures)."""
        mean = torch.tensor(self.mean, dtype=image.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=image.dtype)[:, None, None]
        out = (image.cpu() * std + mean).clamp(0, 1)
        return out.flip(0) if self.bgr else out


def sample_seed(seed: int, tag: int, epoch: int, index: int) -> int:
    """A 64-bit seed that depends only on its arguments (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([seed % 2**64, tag, epoch, index]).generate_state(1, np.uint64)[0])


class SamplePipeline:
    """Image and mask of one sample to the model's input: resize or crop, augment, normalise.

    Args:
        steps: parsed ``data.augment`` (empty: deterministic resize only, as for validation and predict).
        image_size: output side.
        normalization: the encoder's normalisation.
        mask_fill: mask value for pixels a rotation brings in (``ignore_index``, else background 0).
        seed: run seed; a training sample's randomness comes from (seed, epoch, index) only.
        tag: keeps this stream apart from the run's other seeded streams.
    """

    def __init__(self, steps: list[Step], image_size: int, normalization: Normalization, mask_fill: int = 0,
                 seed: int = 0, tag: int = 0) -> None:
        transforms = [_transform(name, args, image_size, mask_fill) for name, args in steps]
        if not any(name == "resized_crop" for name, _ in steps):
            transforms.insert(0, v2.Resize((image_size, image_size), antialias=True))
        self.random = bool(steps)
        self.geometry = v2.Compose(transforms)
        self.normalize = v2.Normalize(list(normalization.mean), list(normalization.std))
        self.bgr = normalization.bgr
        self.seed, self.tag = seed, tag

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, epoch: int = 0,
                 index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` CxHxW (uint8, or float in [0, 1]) and ``mask`` HxW int64 to float32 and int64 tensors."""
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.random:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, self.tag, epoch, index))
                image, mask = self.geometry(image, mask)
        else:
            image, mask = self.geometry(image, mask)
        image = v2.functional.to_dtype(image, torch.float32, scale=True)
        if self.bgr:
            image = image.flip(0)
        image = self.normalize(image)
        return image.as_subclass(torch.Tensor).contiguous(), mask.as_subclass(torch.Tensor).contiguous()

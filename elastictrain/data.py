"""Datasets, the folder scan and the resumable distributed sampler.

Two ideas make a restart at another world size neither repeat nor skip a sample:

* The sampler is keyed on a GLOBAL sample offset. Each epoch has one permutation (from the seed and the
  epoch only); global step ``k`` consumes ``perm[k*G:(k+1)*G]`` whatever the world size, and a rank only
  picks its micro-batches out of that step. Resuming is ``set_position(epoch, offset)``.
* A sample is addressed by the key ``(epoch, index)``, and all of its randomness (generation,
  augmentation) comes from ``(seed, epoch, index)``: it looks the same on whichever rank or worker loads it.

Folder data (``data.source: folder``) is listed on rank 0 and checked at start-up by every rank (each its
share, in a process pool), and the result is shared with every rank: which files pair up, how they split
into train and val, and every bad file found, all named in one error that every rank raises together. The
checks are cached in the run directory (:mod:`elastictrain.scan_cache`): a restart opens only changed files.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import hashlib
import functools
import logging
import multiprocessing
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from elastictrain import augment, lifeline, scan_cache
from elastictrain.augment import Normalization, SamplePipeline
from elastictrain.config import Config, DataConfig
from elastictrain.dist import DistContext, on_main_together, world_of_one
from elastictrain.errors import UserError
from elastictrain.osutil import cores_per_rank
from elastictrain.console import progress

log = logging.getLogger(__name__)

# Stream tags keep the random streams (order, generation, augmentation, folder split) apart for one seed.
_ORDER, _GENERATE, _AUGMENT, _SPLIT, _TRAIN_LOADER, _VAL_LOADER = range(6)
_SPLIT_IDS = {"train": 0, "val": 1}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_SINGLE_CHANNEL_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")
_LISTED_PROBLEMS = 30  # an error names this many bad files, then counts the rest


def _entropy(seed: int, tag: int, *values: int) -> list[int]:
    """Non-negative entropy words for numpy's SeedSequence (which rejects negative seeds)."""
    return [seed % 2**64, tag, *values]


def _rng(seed: int, tag: int, *values: int) -> np.random.Generator:
    """A numpy generator that depends only on its arguments, never on global RNG state."""
    return np.random.default_rng(_entropy(seed, tag, *values))


def _torch_generator(seed: int, tag: int, *values: int) -> torch.Generator:
    """A private torch generator seeded from its arguments only."""
    state = np.random.SeedSequence(_entropy(seed, tag, *values)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


# --------------------------------------------------------------------------------------------- samplers


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields this rank's ``(epoch, index)`` keys from a global sample offset to the end of the epoch.

    Global step ``k`` consumes ``perm[k*G:(k+1)*G]`` with ``G = micro_batch * accum_steps * world_size``;
    micro-step ``m`` of rank ``r`` gets ``perm[k*G + (m*world_size + r)*micro_batch:][:micro_batch]``.
    The last partial global batch is dropped; with shuffle the order changes every epoch, so every
    sample is still seen.

    Args:
        num_samples: Dataset length.
        seed: Run seed; the order of an epoch depends on ``(seed, epoch)`` only.
        rank: This process's rank.
        world_size: Number of ranks.
        micro_batch: Samples per rank per forward pass.
        accum_steps: Micro-steps per optimizer step.
        shuffle: Permute each epoch (identity order otherwise).
    """

    def __init__(self, num_samples: int, seed: int, rank: int, world_size: int,
                 micro_batch: int, accum_steps: int, shuffle: bool = True) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if micro_batch < 1 or accum_steps < 1:
            raise ValueError(f"micro_batch ({micro_batch}) and accum_steps ({accum_steps}) must be >= 1")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.micro_batch = micro_batch
        self.accum_steps = accum_steps
        self.shuffle = shuffle
        self.global_batch = micro_batch * accum_steps * world_size
        self.steps_per_epoch = num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"the training set has {num_samples} samples, fewer than one global batch of "
                            f"{self.global_batch}: lower --train.batch_size or add data")
        self.epoch = 0
        self.sample_offset = 0

    def set_position(self, epoch: int, sample_offset: int) -> None:
        """Start the next iteration at ``sample_offset`` global samples into ``epoch``.

        Raises:
            ValueError: if the offset is not a multiple of the global batch or lies past the epoch's end.
        """
        end = self.steps_per_epoch * self.global_batch
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if sample_offset % self.global_batch or not 0 <= sample_offset <= end:
            raise ValueError(f"sample offset {sample_offset} must be a multiple of the global batch "
                             f"{self.global_batch} between 0 and {end} (the samples used per epoch)")
        self.epoch = epoch
        self.sample_offset = sample_offset

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The global sample order of ``epoch``, identical on every rank and at every world size."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=_torch_generator(self.seed, _ORDER, epoch))

    def _rank_indices(self) -> torch.Tensor:
        used = self.epoch_order(self.epoch)[: self.steps_per_epoch * self.global_batch]
        # [step, micro-step, rank, sample]: slicing out one rank keeps its micro-batches in micro-step order.
        grid = used.view(self.steps_per_epoch, self.accum_steps, self.world_size, self.micro_batch)
        return grid[self.sample_offset // self.global_batch:, :, self.rank, :].reshape(-1)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, i) for i in self._rank_indices().tolist()])

    def __len__(self) -> int:
        steps_left = self.steps_per_epoch - self.sample_offset // self.global_batch
        return steps_left * self.accum_steps * self.micro_batch


class ValSampler(Sampler[tuple[int, int]]):
    """Strided validation shard: ``(0, i)`` for ``i`` in ``range(rank, num_samples, world_size)``.

    Shares may differ by one sample (no padding, so no sample is counted twice in a metric); a rank
    past the end of a tiny set gets none.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((0, i) for i in range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


# --------------------------------------------------------------------------------------------- datasets


class SegmentationDataset(Dataset[tuple[torch.Tensor, torch.Tensor]], abc.ABC):
    """Image/mask pairs addressed by ``(epoch, index)``; subclasses only load sample ``index``.

    ``dataset[(epoch, index)]`` returns the image as float32 ``CxHxW`` (resized, augmented when the pipeline
    augments, normalised for the encoder) and the mask as int64 ``HxW`` holding class ids in
    ``[0, num_classes)`` or ``ignore_index``. A bare int is read as epoch 0.
    """

    def __init__(self, pipeline: SamplePipeline) -> None:
        self.pipeline = pipeline

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return image ``3xHxW`` (uint8, or float in [0, 1]) and mask int64 ``HxW`` at their stored size."""

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = (0, int(key)) if isinstance(key, (int, np.integer)) else key
        image, mask = self._load(index)
        return self.pipeline(image, mask, epoch, index)


class GeneratedDataset(SegmentationDataset):
    """Synthetic shapes on a textured background, made on the fly from ``(seed, split, index)``.

    Each shape (circle, ellipse, rectangle, triangle) carries a class id in ``1..num_classes-1`` and a
    noisy colour tied to that class, so the task is learnable; background is class 0. Train and val
    come from different random streams.
    """

    def __init__(self, seed: int, split: str, num_samples: int, image_size: int, num_classes: int,
                 pipeline: SamplePipeline) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {', '.join(_SPLIT_IDS)}, got {split!r}")
        super().__init__(pipeline)
        self.seed = seed
        self.num_classes = num_classes
        self.split = split
        self.num_samples = num_samples
        self.image_size = image_size
        self.palette = _class_palette(num_classes)

    def __len__(self) -> int:
        return self.num_samples

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = _rng(self.seed, _GENERATE, _SPLIT_IDS[self.split], index)
        size = self.image_size
        image = _background(rng, size)
        mask = np.zeros((size, size), dtype=np.int64)
        for _ in range(int(rng.integers(2, 6))):
            cls = int(rng.integers(1, self.num_classes))
            colour = np.clip(self.palette[cls] + rng.normal(0.0, 0.06, 3), 0.0, 1.0).astype(np.float32)
            _paint_shape(rng, image, mask, cls, colour)
        # Uniform pixel noise: as good a texture as Gaussian here, at a fraction of the cost.
        noise = rng.random(image.shape, dtype=np.float32)
        noise -= np.float32(0.5)
        noise *= np.float32(0.16)
        image += noise
        np.clip(image, 0.0, 1.0, out=image)
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask)


def _class_palette(num_classes: int) -> np.ndarray:
    """One saturated colour per class (row 0 unused): evenly spaced hues, alternating brightness."""
    hue = np.arange(num_classes - 1) / max(num_classes - 1, 1)
    value = np.where(np.arange(num_classes - 1) % 2 == 0, 0.95, 0.6)
    # HSV -> RGB with saturation 0.85: the hue picks where each channel sits on a triangle wave.
    k = (np.array([5.0, 3.0, 1.0])[None, :] + hue[:, None] * 6.0) % 6.0
    rgb = value[:, None] * (1.0 - 0.85 * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.vstack([np.zeros((1, 3)), rgb]).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A greyish, slightly tinted image with a smooth gradient and low-frequency waves.

    Built as a row term plus a column term: one broadcast add instead of several full-size passes.
    """
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    grey = rng.uniform(0.3, 0.7) + rng.uniform(-0.05, 0.05, 3)
    slopes = rng.uniform(-0.25, 0.25, (2, 3))
    freqs, phases = rng.uniform(0.5, 3.0, 2), rng.uniform(0, 2 * np.pi, 2)
    terms = []
    for slope, freq, phase in zip(slopes, freqs, phases):
        wave = 0.04 * np.sin(2 * np.pi * freq * axis + phase)
        terms.append(((axis - 0.5)[:, None] * slope + wave[:, None]).astype(np.float32))
    return terms[1][:, None, :] + (terms[0] + grey.astype(np.float32))[None, :, :]


def _paint_shape(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, cls: int,
                 colour: np.ndarray) -> None:
    """Draw one random shape into ``image`` and ``mask`` in place (later shapes occlude earlier ones)."""
    size = mask.shape[0]
    kind = int(rng.integers(4))  # 0 circle, 1 ellipse, 2 rectangle, 3 triangle
    radius = rng.uniform(0.08, 0.22) * size
    cx, cy = rng.uniform(0, size, 2)
    angle = rng.uniform(0, np.pi)
    # Work on the shape's bounding box only: most of the image is untouched, and this keeps a sample fast.
    reach = radius * 1.5
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, size)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, size)
    if y0 >= y1 or x0 >= x1:
        return
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
    if kind == 3:
        corners = angle + np.array([0.0, 2.0, 4.0]) * np.pi / 3 + rng.uniform(-0.4, 0.4, 3)
        px, py = radius * np.cos(corners), radius * np.sin(corners)
        # Inside a counter-clockwise triangle: on the left of all three edges.
        inside = np.ones(dy.shape[0:1] + dx.shape[1:2], dtype=bool)
        for i in range(3):
            j = (i + 1) % 3
            inside &= (px[j] - px[i]) * (dy - py[i]) - (py[j] - py[i]) * (dx - px[i]) >= 0
    else:
        cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        a = radius
        b = radius if kind == 0 else radius * rng.uniform(0.4, 0.9)
        inside = (np.abs(u) <= a) & (np.abs(v) <= b) if kind == 2 else (u / a) ** 2 + (v / b) ** 2 <= 1.0
    image[y0:y1, x0:x1][inside] = colour
    mask[y0:y1, x0:x1][inside] = cls


class FolderDataset(SegmentationDataset):
    """Image/mask file pairs of any size; the pipeline resizes (or crops) them to ``data.image_size``.

    The start-up scan (:func:`scan_folder`) has already checked every mask; a mask is checked again when it
    is loaded, so a file changed since start-up is caught too.

    Args:
        pairs: (image file, mask file) per sample.
        num_classes: Masks must hold ids below it (or ``ignore_index``).
        pipeline: Resize/augment/normalise.
        ignore_index: A mask value that is allowed besides the class ids.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, pipeline: SamplePipeline,
                 ignore_index: int | None = None) -> None:
        super().__init__(pipeline)
        self.pairs = pairs
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = load_image(image_path)
        labels = load_mask(mask_path)
        if labels.shape != tuple(image.shape[1:]):  # changed since the scan, or EXIF the scan could not see
            raise UserError(size_mismatch_message(mask_path, labels.shape[::-1], image_path, image.shape[:0:-1]))
        bad = bad_class_ids(labels, self.num_classes, self.ignore_index)
        if bad:  # changed since the start-up scan
            raise UserError(bad_ids_message(mask_path, bad, self.num_classes, self.ignore_index))
        return image, torch.from_numpy(labels)


_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_UINT16_MAX = 65535


def load_image(path: Path) -> torch.Tensor:
    """An image file, upright (its EXIF orientation applied), as a ``3xHxW`` RGB tensor.

    8-bit images of every mode (grey, palette, RGB, RGBA, CMYK, ...) become uint8 RGB. Deeper images become
    float32 in [0, 1] by a fixed rule, the same for every image, in training, validation and predict (see
    :func:`pixel_problem` for the ones refused): 16-bit integer images (``I;16``) are divided by 65535, the
    largest value of their type, as scikit-image's ``img_as_float`` does, so that equal pixel values mean equal
    brightness in every file; 32-bit integer images (``I``) whose values fit in 16 bits likewise; float images
    (``F``) are taken as they are when they lie in [0, 1]. A grey image is repeated into three channels.

    Raises:
        UserError: naming the file, when it cannot be decoded or its pixels have no fixed conversion.
    """
    with _reading(path), Image.open(path) as image:
        ImageOps.exif_transpose(image, in_place=True)
        problem = pixel_problem(image, path)
        if problem:
            raise UserError(problem)
        return _rgb_tensor(image)


def _rgb_tensor(image: Image.Image) -> torch.Tensor:
    """``3xHxW``: uint8 for 8-bit modes, float32 in [0, 1] for the 16- and 32-bit ones."""
    if image.mode in _UINT16_MODES or image.mode in ("I", "F"):
        grey = np.asarray(image).astype(np.float32)
        if image.mode != "F":
            grey /= _UINT16_MAX
        return torch.from_numpy(grey)[None].repeat(3, 1, 1)
    # PIL's own conversion for 8-bit modes; for the deeper ones it clips to 255 (a 12-bit image turns white).
    rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def pixel_problem(image: Image.Image, path: Path) -> str | None:
    """Why this open image's pixels have no fixed conversion to the model's input, or None.

    Only 32-bit images (modes ``I`` and ``F``) are refused, and only for their values: an integer image with
    values outside 0..65535, a float image with values outside [0, 1] or not finite. Rescaling each such image
    by its own range would make one pixel value mean a different brightness in every file (and in predict);
    the user knows what the values mean, and rescales them once. Decodes the pixels of those modes only.
    """
    if image.mode not in ("I", "F"):
        return None
    values = np.asarray(image)
    if image.mode == "F" and not np.isfinite(values).all():
        return f"{path}: float image (mode F) holds NaN or infinite values; replace them, or remove the file"
    low, high = (values.min(), values.max()) if values.size else (0, 0)
    if image.mode == "I" and (low < 0 or high > _UINT16_MAX):
        return (f"{path}: 32-bit integer image (mode I) with values {low}..{high}; integer images are read as 8 or "
                "16 bits (values up to 65535): save it as 16-bit, or as float32 scaled to [0, 1]")
    if image.mode == "F" and (low < 0 or high > 1):
        return (f"{path}: float image (mode F) with values {low:g}..{high:g}; float images must hold values in "
                "[0, 1]: rescale it (the same way for every file), or save it as 16-bit")
    return None


def load_mask(path: Path) -> np.ndarray:
    """A mask file, upright like its image (EXIF orientation applied), as int64 ``HxW`` class ids."""
    with _reading(path), Image.open(path) as mask:
        ImageOps.exif_transpose(mask, in_place=True)
        return np.asarray(mask, dtype=np.int64)


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an open image once its EXIF orientation is applied, from the header alone.

    ``Image.Image.getexif`` rather than the image's own: a PNG's ``getexif`` decodes the whole image to look
    for EXIF after the pixel data, and the scan reads headers only. Such a late EXIF block is applied when the
    image is loaded, where :meth:`FolderDataset._load` checks the sizes again.
    """
    orientation = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A file that cannot be decoded (truncated, corrupt, unreadable, too large) becomes a UserError naming it:
    PIL's own words ('image file is truncated') do not say which of thousands of files it was. The start-up
    scan reads only the images' headers, so a truncated image is first found here, in a DataLoader worker."""
    try:
        yield
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # SyntaxError: PIL's 'broken PNG file'
        raise UserError(f"{unreadable_message(path, e)}; replace or remove it") from None


def unreadable_message(path: Path, error: BaseException, what: str = "image") -> str:
    """'PATH: not a readable image (why)', with PIL's copy of the path taken out of the why."""
    why = str(error).replace(f"'{path}'", "").replace(str(path), "").strip(" :") or type(error).__name__
    if isinstance(error, Image.DecompressionBombError):  # Pillow's guard; a real slide this large needs tiling
        why = f"{why.rstrip('.')}; split it into tiles or downscale it"
    return f"{path}: not a readable {what} ({why})"


def size_mismatch_message(mask_path: Path, mask_size: tuple[int, ...], image_path: Path,
                          image_size: tuple[int, ...]) -> str:
    """'MASK: mask is WxH but its image IMAGE is WxH' (sizes as (width, height), EXIF orientation applied)."""
    return (f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
            f"{image_size[0]}x{image_size[1]}")


def bad_class_ids(labels: np.ndarray, num_classes: int, ignore_index: int | None) -> list[int]:
    """The values in ``labels`` that are neither a class id nor ``ignore_index``."""
    outside = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        outside &= labels != ignore_index
    return np.unique(labels[outside]).tolist() if outside.any() else []


def bad_ids_message(mask_path: Path, bad: list[int], num_classes: int, ignore_index: int | None) -> str:
    allowed = f"0..{num_classes - 1}" + (f" or --data.ignore_index {ignore_index}" if ignore_index is not None else "")
    return f"{mask_path}: mask holds class ids {bad[:10]} but --data.num_classes is {num_classes} (ids must be {allowed})"


# ------------------------------------------------------------------------------------------ folder scan


@dataclass
class FolderScan:
    """What rank 0 found under ``data.root``; shared with every rank as is."""

    train: list[tuple[Path, Path]] = field(default_factory=list)
    val: list[tuple[Path, Path]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    layout: str = ""
    """'train/ and val/ folders', 'val_list FILE' or 'val_fraction F': how the split was made (for the log)."""
    checked: int = 0
    """Pairs whose files this scan opened (on all ranks together)."""
    reused: int = 0
    """Pairs answered by the scan cache without opening a file (their size and mtime had not changed)."""

    def raise_problems(self, root: str) -> None:
        """One UserError naming every bad file (the first ``_LISTED_PROBLEMS``, then a count)."""
        if not self.problems:
            return
        listed = self.problems[:_LISTED_PROBLEMS]
        more = len(self.problems) - len(listed)
        raise UserError(f"--data.root {root}: {len(self.problems)} problem(s) with the data:\n  " + "\n  ".join(listed)
                        + (f"\n  ... and {more} more" if more else ""))


def scan_folder(data: DataConfig, seed: int, bar: Callable[[list, int, str], Iterable] | None = None) -> FolderScan:
    """Find the image/mask pairs under ``data.root``, split them, and check every one of them.

    Layouts: ``root/train/{images,masks}`` + ``root/val/{images,masks}`` (an explicit split), or
    ``root/{images,masks}`` split by ``data.val_list`` (a file naming the validation images) or else by a
    seeded ``data.val_fraction``. Problems are collected, not raised, so that one run names them all.
    ``bar(iterable, total, description)`` wraps the check of every pair in a progress bar.
    This is the serial scan in one process; start-up uses :func:`scan_folder_cached`.
    """
    scan = list_folder(data, seed)
    pairs = scan.train + scan.val  # checked even when some files are missing: one run names every problem
    for image_path, mask_path in (bar or _no_bar)(pairs, len(pairs), "checking data"):
        problem = check_pair(image_path, mask_path, data.num_classes, data.ignore_index)
        if problem:
            scan.problems.append(problem)
    scan.checked = len(pairs)
    return scan


def list_folder(data: DataConfig, seed: int) -> FolderScan:
    """The pairs and their split under ``data.root``, with the problems of the listing (missing folders,
    images without a mask, a bad val_list); no file is opened. See :func:`scan_folder` for the layouts."""
    root = Path(data.root)
    scan = FolderScan()
    try:
        if (root / "train").is_dir() or (root / "val").is_dir():
            _explicit_split(root, data, scan)
        else:
            pairs = find_pairs(root, scan.problems)
            if data.val_list:
                scan.train, scan.val = _listed_split(pairs, Path(data.val_list), scan.problems)
                scan.layout = f"--data.val_list {data.val_list}"
            elif len(pairs) == 1:
                scan.problems.append(f"{root}: found 1 image/mask pair, need at least 2 (train and val)")
            elif pairs:
                scan.train, scan.val = split_pairs(pairs, data.val_fraction, seed)
                scan.layout = f"--data.val_fraction {data.val_fraction}"
    except OSError as e:  # e.g. a folder we may not read: reported like any bad file, on every rank
        scan.problems.append(f"{getattr(e, 'filename', None) or root}: {e.strerror or e}")
    except UnicodeDecodeError as e:
        scan.problems.append(f"--data.val_list {data.val_list}: not a text file ({e})")
    return scan


def scan_folder_cached(data: DataConfig, seed: int, ctx: DistContext, cache: Path | None = None,
                       bar: Callable[[list, int, str], Iterable] | None = None,
                       processes: int | None = None) -> FolderScan:
    """:func:`scan_folder` for start-up: the same result on every rank, at a cost that does not grow with the
    data set once ``cache`` holds it.

    Rank 0 lists the folder (cheap: no file is opened) and shares the listing. Every pair is then answered by
    the scan cache when its files' size and mtime are those recorded there, and checked with
    :func:`check_pair` otherwise: each rank checks its share (in a pool of ``processes``, default one per core
    of this rank), and the problems are gathered in file order, so every rank names the same bad files as a
    1-rank scan would. Rank 0 writes the cache back (see :mod:`elastictrain.scan_cache`).
    """
    scan = on_main_together(ctx, lambda: list_folder(data, seed))
    settings = {"num_classes": data.num_classes, "ignore_index": data.ignore_index}
    check = functools.partial(check_pair, num_classes=data.num_classes, ignore_index=data.ignore_index)
    result = scan_cache.check_pairs(scan.train + scan.val, check, Path(data.root), settings, ctx, cache,
                                    bar or _no_bar, processes)
    scan.problems += result.problems
    scan.checked, scan.reused = result.checked, result.reused
    return scan


def _no_bar(pairs: list, total: int, desc: str) -> Iterable:
    return pairs


def _explicit_split(root: Path, data: DataConfig, scan: FolderScan) -> None:
    if (root / "images").is_dir():
        scan.problems.append(f"{root}: holds both images/ and train/ or val/; keep one layout (images/ + masks/ "
                             "split by --data.val_list or --data.val_fraction, or train/ + val/)")
        return
    if data.val_list:
        scan.problems.append(f"--data.val_list {data.val_list}: {root} already splits into train/ and val/")
        return
    for split in ("train", "val"):
        pairs = find_pairs(root / split, scan.problems)
        setattr(scan, split, pairs)
    scan.layout = f"{root}/train and {root}/val"


def find_pairs(root: Path, problems: list[str]) -> list[tuple[Path, Path]]:
    """Match ``root/images/*.{png,jpg,...}`` with ``root/masks/<stem>.png``, sorted by file name.

    Every problem (a missing folder, no images, images without a mask, two images with one stem) is
    appended to ``problems``; masks without an image are ignored.
    """
    missing = [f for f in (root / "images", root / "masks") if not f.is_dir()]
    if missing:
        problems += [f"{f}: no such folder (expected {root}/images and {root}/masks)" for f in missing]
        return []
    images = sorted(p for p in (root / "images").iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        problems.append(f"{root / 'images'}: no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)})")
    masks = {p.stem: p for p in (root / "masks").iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    pairs: list[tuple[Path, Path]] = []
    seen: dict[str, Path] = {}
    for image in images:
        if image.stem in seen:
            problems.append(f"{image}: shares the stem {image.stem!r} with {seen[image.stem]}; a mask can only "
                            "belong to one image")
            continue
        seen[image.stem] = image
        if image.stem not in masks:
            problems.append(f"{image}: no mask {root / 'masks' / (image.stem + '.png')}")
            continue
        pairs.append((image, masks[image.stem]))
    return pairs


def check_pair(image_path: Path, mask_path: Path, num_classes: int, ignore_index: int | None) -> str | None:
    """Why this pair cannot be trained on, or None. Reads the image's header (and the pixels of 32-bit images,
    see :func:`pixel_problem`) and the whole mask; sizes are compared upright (EXIF orientation applied)."""
    try:
        with Image.open(image_path) as image:
            image_size = oriented_size(image)
            problem = pixel_problem(image, image_path)
            if problem:
                return problem
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return unreadable_message(image_path, e)
    try:
        with Image.open(mask_path) as mask:
            if mask.mode not in _SINGLE_CHANNEL_MODES:
                return (f"{mask_path}: mask has mode {mask.mode}; masks must be single-channel PNGs (grey or "
                        "palette) whose pixel values are class ids")
            mask_size = oriented_size(mask)
            if mask_size != image_size:
                return size_mismatch_message(mask_path, mask_size, image_path, image_size)
            # getextrema runs in C on the decoded mask; the slow path below only runs on a suspicious mask.
            lowest, highest = mask.getextrema()
            if mask.mode == "1":
                highest = min(highest, 1)  # bilevel masks report 255 for set pixels but load as class 1
            if lowest < 0 or highest >= num_classes:
                bad = bad_class_ids(np.asarray(mask, dtype=np.int64), num_classes, ignore_index)
                if bad:
                    return bad_ids_message(mask_path, bad, num_classes, ignore_index)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return unreadable_message(mask_path, e, "mask")
    return None


def split_pairs(pairs: list[tuple[Path, Path]], val_fraction: float,
                seed: int) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """Seeded train/val split keeping at least one sample on each side; each side stays in file order."""
    if len(pairs) < 2:
        raise UserError(f"--data.root: found {len(pairs)} image/mask pair, need at least 2 (train and val)")
    num_val = min(max(1, round(len(pairs) * val_fraction)), len(pairs) - 1)
    order = _rng(seed, _SPLIT).permutation(len(pairs))
    val = set(order[:num_val].tolist())
    return ([p for i, p in enumerate(pairs) if i not in val], [p for i, p in enumerate(pairs) if i in val])


def _listed_split(pairs: list[tuple[Path, Path]], val_list: Path,
                  problems: list[str]) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """Validation = the images named in ``val_list`` (file names or stems, one per line, '#' comments)."""
    if not val_list.is_file():
        problems.append(f"--data.val_list: no such file: {val_list}")
        return [], []
    names = [line.split("#", 1)[0].strip() for line in val_list.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    by_name = {key: pair for pair in pairs for key in (pair[0].name, pair[0].stem)}
    problems += [f"{val_list}: names {n!r}, which is not an image with a mask in --data.root" for n in names
                 if n not in by_name]
    val_images = {by_name[n][0] for n in names if n in by_name}
    train = [p for p in pairs if p[0] not in val_images]
    val = [p for p in pairs if p[0] in val_images]
    if not val or not train:
        problems.append(f"{val_list}: leaves {len(train)} training and {len(val)} validation images; both need one")
    return train, val


# ----------------------------------------------------------------------------------------- construction


def class_names(data: DataConfig) -> list[str]:
    """``data.class_names``, or background, class1, class2, ... when not given."""
    return list(data.class_names) or ["background", *(f"class{i}" for i in range(1, data.num_classes))]


def pipelines(cfg: Config, normalization: Normalization) -> tuple[SamplePipeline, SamplePipeline]:
    """(train, eval) sample pipelines: only train augments; eval is the resize + normalisation predict uses too."""
    steps, problems = augment.parse(cfg.data.augment)
    if problems:  # load_config validated it already; a Config built in code may not have been
        raise UserError("\n".join(problems))
    fill = cfg.data.ignore_index if cfg.data.ignore_index is not None else 0
    size = cfg.data.image_size
    return (SamplePipeline(steps, size, normalization, fill, cfg.run.seed, _AUGMENT),
            SamplePipeline([], size, normalization, fill))


def build_datasets(cfg: Config, ctx: DistContext | None = None, normalization: Normalization | None = None,
                   scan_cache_file: Path | None = None) -> tuple[SegmentationDataset, SegmentationDataset]:
    """Return the (train, val) datasets described by ``cfg.data``; only train augments.

    Folder data is scanned by :func:`scan_folder_cached` (through ``scan_cache_file`` when given), so every
    rank trains on the same file list and, when something is wrong, every rank raises the same UserError at
    the same moment.
    """
    data, seed = cfg.data, cfg.run.seed
    ctx = ctx or world_of_one()
    train_pipe, eval_pipe = pipelines(cfg, normalization or Normalization())
    if data.source == "generated":
        return (GeneratedDataset(seed, "train", data.train_samples, data.image_size, data.num_classes, train_pipe),
                GeneratedDataset(seed, "val", data.val_samples, data.image_size, data.num_classes, eval_pipe))
    if data.source == "folder":
        def bar(pairs: list, total: int, desc: str) -> Iterable:
            return progress(pairs, total, desc, cfg, ctx.rank)

        scan = scan_folder_cached(data, seed, ctx, scan_cache_file, bar)
        scan.raise_problems(data.root)
        if ctx.is_main:
            log.info("data: %d training and %d validation images from %s (split: %s)", len(scan.train),
                     len(scan.val), data.root, scan.layout)
            log.info("data: checked %d pair(s), %d unchanged since the scan cache %s", scan.checked, scan.reused,
                     scan_cache_file or "(none)")
        return (FolderDataset(scan.train, data.num_classes, train_pipe, data.ignore_index),
                FolderDataset(scan.val, data.num_classes, eval_pipe, data.ignore_index))
    raise ValueError(f"--data.source: must be one of generated, folder, got {data.source!r}")


def sample_order_key(train_set: SegmentationDataset, seed: int) -> dict[str, Any]:
    """What an epoch's sample order depends on besides the epoch (see :class:`ResumableSampler`): the seed, the
    number of training samples and, for folder data, which file each index is (a hash of the image names in
    order, so the same files under another ``--data.root`` keep their order). JSON-able: stored in snapshots."""
    key: dict[str, Any] = {"seed": seed, "train_samples": len(train_set)}
    if isinstance(train_set, FolderDataset):
        names = "\n".join(image.name for image, _ in train_set.pairs)
        key["train_files_sha256"] = hashlib.sha256(names.encode("utf-8", "surrogateescape")).hexdigest()
    return key


def sample_order_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How two :func:`sample_order_key` results differ, each change naming its setting ([] when equal)."""
    changes = []
    if before.get("seed") != now.get("seed"):
        changes.append(f"--run.seed {before.get('seed')} -> {now.get('seed')}")
    folder = "train_files_sha256" in now or "train_files_sha256" in before
    if before.get("train_samples") != now.get("train_samples"):
        what = "training images under --data.root" if folder else "--data.train_samples"
        changes.append(f"{what} {before.get('train_samples')} -> {now.get('train_samples')}")
    elif before.get("train_files_sha256") != now.get("train_files_sha256"):
        changes.append("the training images under --data.root (other file names)")
    return changes


# ---------------------------------------------------------------------------------------------- loaders


@dataclass
class Loaders:
    """This rank's data: a resumable train sampler and its loader, the val loader.

    With workers, one train loader serves every epoch and its workers persist: each epoch (or restart
    position) re-positions the sampler, which the loader iterates afresh in this process, and every sample's
    randomness comes from its key, not from a worker's seed, so the samples stay those of the exact order.
    """

    train_sampler: ResumableSampler
    val_loader: DataLoader
    train_set: SegmentationDataset
    num_workers: int
    pin_memory: bool = False
    """Page-locked batches (CUDA), so the copy to the device can overlap the step."""
    _train_loader: DataLoader | None = field(default=None, repr=False)

    def train_loader(self, epoch: int, sample_offset: int) -> DataLoader:
        """Position the sampler at ``sample_offset`` global samples into ``epoch`` and return the loader."""
        self.train_sampler.set_position(epoch, sample_offset)
        if self._train_loader is None or not self.num_workers:
            sampler = self.train_sampler
            self._train_loader = _loader(self.train_set, sampler, sampler.micro_batch, self.num_workers,
                                         self.pin_memory, _torch_generator(sampler.seed, _TRAIN_LOADER, epoch),
                                         sampler.accum_steps)
        return self._train_loader


def _loader(dataset: Dataset, sampler: Sampler, batch: int, num_workers: int, pin_memory: bool,
            generator: torch.Generator, accum_steps: int = 1) -> DataLoader:
    """A loader of ``sampler``'s micro-batches whose workers (if any) persist across iterations and keep about
    two optimizer steps of micro-batches in flight."""
    extra = {} if not num_workers else {"persistent_workers": True,
                                        "prefetch_factor": max(2, -(-2 * accum_steps // num_workers))}
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      drop_last=False, generator=generator, worker_init_fn=_ignore_preemption_signals, **extra)


def resolve_num_workers(setting: int | str, cores: int) -> int:
    """``data.num_workers`` as a number: 'auto' leaves one core of this rank to training and gives the
    others to loading, up to 8 (beyond that a worker rarely pays for its memory)."""
    return min(8, max(0, cores - 1)) if setting == "auto" else int(setting)


def _ignore_preemption_signals(worker_id: int) -> None:
    """SLURM signals every process of a job, DataLoader workers included. A worker killed by that
    SIGTERM would crash the training process in the middle of its preemption snapshot, so workers
    ignore the preemption signals. They die with the training process instead: at once, by SIGKILL
    (they hold nothing worth saving), whenever it ends (lifeline.die_with_parent); and
    :func:`_kill_loader_workers` kills those still alive when it exits."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    lifeline.die_with_parent(parent.pid if parent else None)


@atexit.register
def _kill_loader_workers() -> None:
    """At exit, SIGKILL the DataLoader workers still alive. When an exception ends the run, its traceback
    keeps the loader's iterator (and its workers) alive until interpreter exit; multiprocessing's exit
    handler, which runs after this one (atexit is last-in, first-out), would then SIGTERM them, which they
    ignore, and wait for them forever. Registered here, after torch imported multiprocessing."""
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if not workers:
        return
    # torch's SIGCHLD handler would report each worker's death as a DataLoader failure while we exit.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout=5)


def build_loaders(cfg: Config, ctx: DistContext, micro_batch: int, accum_steps: int,
                  normalization: Normalization | None = None) -> Loaders:
    """Build this rank's datasets, train sampler and val loader (each rank holds its own copies).

    Folder data's scan is cached in RUN_DIR/data_scan_cache.json: the run directory is ours to write (a
    data folder may be read-only or shared by runs with other settings), and every restart reads it."""
    rank, world_size = ctx.rank, ctx.world_size
    train_set, val_set = build_datasets(cfg, ctx, normalization, Path(cfg.run.dir) / "data_scan_cache.json")
    sampler = ResumableSampler(len(train_set), cfg.run.seed, rank, world_size, micro_batch, accum_steps)
    workers = resolve_num_workers(cfg.data.num_workers, cores_per_rank())
    pin = ctx.device.type == "cuda"
    if ctx.is_main and cfg.data.num_workers == "auto":
        log.info("data: %d loader worker(s) per rank (--data.num_workers auto, %d cores per rank)", workers,
                 cores_per_rank())
    # A private generator: otherwise every iter(DataLoader) draws its worker base seed from the global torch
    # RNG, and the number of loaders a run creates (it differs after a restart) would shift training's RNG.
    val_loader = _loader(val_set, ValSampler(len(val_set), rank, world_size), micro_batch, workers, pin,
                         _torch_generator(cfg.run.seed, _VAL_LOADER))
    return Loaders(sampler, val_loader, train_set, workers, pin)

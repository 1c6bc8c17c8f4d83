"""Datasets and the resumable distributed sampler.

Two ideas make a restart at another world size neither repeat nor skip a sample:

* The sampler is keyed on a GLOBAL sample offset. Each epoch has one permutation (from the seed and the
  epoch only); global step ``k`` consumes ``perm[k*G:(k+1)*G]`` whatever the world size, and a rank only
  picks its micro-batches out of that step. Resuming is ``set_position(epoch, offset)``.
* A sample is addressed by the key ``(epoch, index)``, and all of its randomness (generation,
  augmentation) comes from ``(seed, epoch, index)``: it looks the same on whichever rank or worker loads it.
"""

from __future__ import annotations

import abc
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from elastictrain.config import Config

# Stream tags keep the random streams (order, generation, augmentation, folder split) apart for one seed.
_ORDER, _GENERATE, _AUGMENT, _SPLIT, _TRAIN_LOADER, _VAL_LOADER = range(6)
_SPLIT_IDS = {"train": 0, "val": 1}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# ImageNet statistics: the convention smp's pretrained encoders expect, and roughly zero-mean
# unit-variance for the generated images too.
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_INV_STD = 1 / np.array([0.229, 0.224, 0.225], dtype=np.float32)
_SINGLE_CHANNEL_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")


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
            raise ValueError(f"the training set has {num_samples} samples, fewer than one global batch of "
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

    ``dataset[(epoch, index)]`` returns the image as float32 ``CxHxW`` (ImageNet-normalized) and the mask
    as int64 ``HxW`` holding class ids in ``[0, num_classes)``. With ``augment``, a random flip/90-degree
    rotation drawn from ``(seed, epoch, index)`` alone is applied to both. A bare int is read as epoch 0.
    """

    def __init__(self, seed: int, num_classes: int, augment: bool) -> None:
        self.seed = seed
        self.num_classes = num_classes
        self.augment = augment

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Return image float32 ``HxWx3`` in [0, 1] and mask integer ``HxW``."""

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = (0, int(key)) if isinstance(key, (int, np.integer)) else key
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        image, mask = self._load(index)
        if self.augment:
            image, mask = _flip_rotate(image, mask, _rng(self.seed, _AUGMENT, epoch, index))
        # Normalize straight into the CxHxW layout: one pass, no temporaries (it is a large share of a sample).
        chw = np.empty((3, *image.shape[:2]), dtype=np.float32)
        np.subtract(image.transpose(2, 0, 1), _MEAN[:, None, None], out=chw)
        chw *= _INV_STD[:, None, None]
        return torch.from_numpy(chw), torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))


def _flip_rotate(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Apply the same random element of the square's symmetry group to image and mask."""
    turns, flip_h, flip_v = int(rng.integers(4)), bool(rng.integers(2)), bool(rng.integers(2))
    image, mask = np.rot90(image, turns), np.rot90(mask, turns)
    if flip_h:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if flip_v:
        image, mask = image[::-1], mask[::-1]
    return image, mask


class GeneratedDataset(SegmentationDataset):
    """Synthetic shapes on a textured background, made on the fly from ``(seed, split, index)``.

    Each shape (circle, ellipse, rectangle, triangle) carries a class id in ``1..num_classes-1`` and a
    noisy colour tied to that class, so the task is learnable; background is class 0. Train and val
    come from different random streams.
    """

    def __init__(self, seed: int, split: str, num_samples: int, image_size: int, num_classes: int,
                 augment: bool) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {', '.join(_SPLIT_IDS)}, got {split!r}")
        super().__init__(seed, num_classes, augment)
        self.split = split
        self.num_samples = num_samples
        self.image_size = image_size
        self.palette = _class_palette(num_classes)

    def __len__(self) -> int:
        return self.num_samples

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
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
        return np.clip(image, 0.0, 1.0, out=image), mask


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
    """Image/mask file pairs, resized to ``image_size`` (images bilinear, masks nearest).

    Masks are checked EAGERLY at construction (every rank reads every mask once): a bad mask then stops
    every rank at start-up with the same error, instead of one DataLoader worker crashing mid-epoch while
    the other ranks wait in a collective. It costs ~1.5 ms per 512x512 mask (~5 s for 3000 files). The loaded
    mask is checked again in ``__getitem__``, so a file changed since start-up is caught too.

    Args:
        pairs: (image file, mask file) per sample.
        image_size: Output side.
        num_classes: Masks must hold ids below it.
        seed: Run seed for augmentation.
        augment: Random flips/rotations.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], image_size: int, num_classes: int, seed: int,
                 augment: bool) -> None:
        super().__init__(seed, num_classes, augment)
        self.pairs = pairs
        self.image_size = image_size
        for image_path, mask_path in pairs:
            self._check_mask(image_path, mask_path)

    def __len__(self) -> int:
        return len(self.pairs)

    def _check_mask(self, image_path: Path, mask_path: Path) -> None:
        with Image.open(mask_path) as mask, Image.open(image_path) as image:
            if mask.mode not in _SINGLE_CHANNEL_MODES:
                raise ValueError(f"{mask_path}: mask has mode {mask.mode}; masks must be single-channel PNGs "
                                 "whose pixel values are class ids")
            if mask.size != image.size:
                raise ValueError(f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]} but its image "
                                 f"{image_path} is {image.size[0]}x{image.size[1]}")
            # getextrema runs in C on the decoded mask; the slow path below only runs on the error.
            lowest, highest = mask.getextrema()
            if mask.mode == "1":
                highest = min(highest, 1)  # bilevel masks report 255 for set pixels but load as class 1
            if lowest < 0 or highest >= self.num_classes:
                self._raise_bad_ids(mask_path, np.asarray(mask))

    def _raise_bad_ids(self, mask_path: Path, mask: np.ndarray) -> None:
        bad = np.unique(mask[(mask < 0) | (mask >= self.num_classes)]).tolist()
        raise ValueError(f"{mask_path}: mask holds class ids {bad} but --data.num_classes is {self.num_classes} "
                         f"(ids must be 0..{self.num_classes - 1})")

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        side = (self.image_size, self.image_size)
        with Image.open(image_path) as image:
            rgb = image.convert("RGB").resize(side, Image.Resampling.BILINEAR)
        with Image.open(mask_path) as mask:
            labels = np.asarray(mask.resize(side, Image.Resampling.NEAREST), dtype=np.int64)
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= self.num_classes:
            self._raise_bad_ids(mask_path, labels)
        return np.asarray(rgb, dtype=np.float32) / np.float32(255.0), labels


def find_pairs(root: Path) -> list[tuple[Path, Path]]:
    """Match ``root/images/*.{png,jpg,jpeg}`` with ``root/masks/<stem>.png``, sorted by file name.

    Masks without an image are ignored.

    Raises:
        FileNotFoundError: naming a missing folder, or an image without a mask.
        ValueError: if the images folder holds no images, or two images share a stem.
    """
    for folder in (root, root / "images", root / "masks"):
        if not folder.is_dir():
            raise FileNotFoundError(f"--data.root: no such folder: {folder} "
                                    f"(expected {root}/images and {root}/masks)")
    images = sorted(p for p in (root / "images").iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"--data.root: no images (*.png, *.jpg, *.jpeg) in {root / 'images'}")
    masks = {p.stem: p for p in (root / "masks").iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    pairs: list[tuple[Path, Path]] = []
    seen: dict[str, Path] = {}
    for image in images:
        if image.stem in seen:
            raise ValueError(f"{image} and {seen[image.stem]} share the stem {image.stem!r}; "
                             "a mask can only belong to one image")
        seen[image.stem] = image
        if image.stem not in masks:
            raise FileNotFoundError(f"{image}: no mask {root / 'masks' / (image.stem + '.png')}")
        pairs.append((image, masks[image.stem]))
    return pairs


def split_pairs(pairs: list[tuple[Path, Path]], val_fraction: float,
                seed: int) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """Seeded train/val split keeping at least one sample on each side; each side stays in file order."""
    if len(pairs) < 2:
        raise ValueError(f"--data.root: found {len(pairs)} image/mask pair, need at least 2 (train and val)")
    num_val = min(max(1, round(len(pairs) * val_fraction)), len(pairs) - 1)
    order = _rng(seed, _SPLIT).permutation(len(pairs))
    val = set(order[:num_val].tolist())
    return ([p for i, p in enumerate(pairs) if i not in val], [p for i, p in enumerate(pairs) if i in val])


def build_datasets(cfg: Config) -> tuple[SegmentationDataset, SegmentationDataset]:
    """Return the (train, val) datasets described by ``cfg.data``; only train augments."""
    data, seed = cfg.data, cfg.run.seed
    if data.source == "generated":
        return (GeneratedDataset(seed, "train", data.train_samples, data.image_size, data.num_classes, data.augment),
                GeneratedDataset(seed, "val", data.val_samples, data.image_size, data.num_classes, False))
    if data.source == "folder":
        train, val = split_pairs(find_pairs(Path(data.root)), data.val_fraction, seed)
        return (FolderDataset(train, data.image_size, data.num_classes, seed, data.augment),
                FolderDataset(val, data.image_size, data.num_classes, seed, False))
    raise ValueError(f"--data.source: must be one of generated, folder, got {data.source!r}")


# ---------------------------------------------------------------------------------------------- loaders


@dataclass
class Loaders:
    """This rank's data: a resumable train sampler, a fresh train loader per (epoch, offset), the val loader."""

    train_sampler: ResumableSampler
    val_loader: DataLoader
    train_set: SegmentationDataset
    num_workers: int

    def train_loader(self, epoch: int, sample_offset: int) -> DataLoader:
        """Position the sampler at ``sample_offset`` global samples into ``epoch`` and return a new loader."""
        self.train_sampler.set_position(epoch, sample_offset)
        return DataLoader(self.train_set, batch_size=self.train_sampler.micro_batch, sampler=self.train_sampler,
                          num_workers=self.num_workers, persistent_workers=False, pin_memory=False,
                          drop_last=False, generator=_torch_generator(self.train_sampler.seed, _TRAIN_LOADER, epoch),
                          worker_init_fn=_ignore_preemption_signals)


def _ignore_preemption_signals(worker_id: int) -> None:
    """SLURM signals every process of a job, DataLoader workers included. A worker killed by that
    SIGTERM would crash the training process in the middle of its preemption snapshot; workers exit
    on their own when their parent does, so they simply ignore the preemption signals."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def build_loaders(cfg: Config, rank: int, world_size: int, micro_batch: int, accum_steps: int) -> Loaders:
    """Build this rank's datasets, train sampler and val loader (each rank holds its own copies)."""
    train_set, val_set = build_datasets(cfg)
    sampler = ResumableSampler(len(train_set), cfg.run.seed, rank, world_size, micro_batch, accum_steps)
    # A private generator: otherwise every iter(DataLoader) draws its worker base seed from the global torch
    # RNG, and the number of loaders a run creates (it differs after a restart) would shift training's RNG.
    val_loader = DataLoader(val_set, batch_size=micro_batch, sampler=ValSampler(len(val_set), rank, world_size),
                            num_workers=cfg.data.num_workers, persistent_workers=False, pin_memory=False,
                            drop_last=False, generator=_torch_generator(cfg.run.seed, _VAL_LOADER),
                            worker_init_fn=_ignore_preemption_signals)
    return Loaders(sampler, val_loader, train_set, cfg.data.num_workers)

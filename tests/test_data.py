"""Tests for elastictrain.data: the resumable sampler across world sizes, and the datasets."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from elastictrain.config import Config
from elastictrain.data import (
    FolderDataset,
    GeneratedDataset,
    ResumableSampler,
    ValSampler,
    build_datasets,
    build_loaders,
)

SEED = 7


def rank_streams(num_samples: int, world_size: int, micro_batch: int, accum_steps: int, epoch: int = 0,
                 offset: int = 0, shuffle: bool = True) -> list[list[tuple[int, int]]]:
    """What each rank's sampler yields from (epoch, offset)."""
    streams = []
    for rank in range(world_size):
        sampler = ResumableSampler(num_samples, SEED, rank, world_size, micro_batch, accum_steps, shuffle)
        sampler.set_position(epoch, offset)
        keys = list(sampler)
        assert len(keys) == len(sampler)
        streams.append(keys)
    return streams


def global_steps(streams: list[list[tuple[int, int]]], micro_batch: int, accum_steps: int) -> list[list[int]]:
    """Reassemble the global order: per step, per micro-step, rank by rank (the documented layout)."""
    world_size = len(streams)
    per_step = micro_batch * accum_steps
    steps = []
    for k in range(len(streams[0]) // per_step):
        step = []
        for m in range(accum_steps):
            for rank in range(world_size):
                chunk = streams[rank][k * per_step + m * micro_batch:][:micro_batch]
                step += [index for _, index in chunk]
        steps.append(step)
    return steps


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("accum_steps", [1, 2])
def test_sampler_covers_each_sample_once_per_epoch(world_size: int, accum_steps: int) -> None:
    num_samples, micro_batch = 53, 2
    global_batch = micro_batch * accum_steps * world_size
    used = (num_samples // global_batch) * global_batch
    epochs = []
    for epoch in range(2):
        streams = rank_streams(num_samples, world_size, micro_batch, accum_steps, epoch)
        keys = [key for stream in streams for key in stream]
        assert {e for e, _ in keys} == {epoch}
        indices = [i for _, i in keys]
        assert len(indices) == len(set(indices)) == used
        # Exactly the first `used` samples of the epoch's order: which ones are dropped does not depend on
        # the world size.
        order = ResumableSampler(num_samples, SEED, 0, 1, 1, 1).epoch_order(epoch)
        assert set(indices) == set(order[:used].tolist())
        epochs.append(sum(global_steps(streams, micro_batch, accum_steps), []))
    assert epochs[0] != epochs[1]


def test_global_order_is_the_same_at_every_world_size() -> None:
    # Global batch 12 split three ways: the samples of each global step are identical (and in order).
    layouts = [(1, 4, 3), (1, 2, 6), (2, 2, 3), (3, 2, 2), (3, 4, 1)]  # (world size, micro batch, accum)
    orders = [global_steps(rank_streams(100, w, mb, a, epoch=1), mb, a) for w, mb, a in layouts]
    assert all(order == orders[0] for order in orders)
    assert len(orders[0]) == 100 // 12


def test_every_sample_is_seen_across_epochs_despite_dropping() -> None:
    seen = set()
    for epoch in range(6):
        seen |= {i for stream in rank_streams(30, 2, 4, 1, epoch) for _, i in stream}
    assert seen == set(range(30))


def test_sampler_without_shuffle_is_identity_order() -> None:
    (stream,) = rank_streams(10, 1, 3, 1, epoch=4, shuffle=False)
    assert stream == [(4, i) for i in range(9)]


def test_sampler_order_is_deterministic_and_seeded() -> None:
    a = list(ResumableSampler(40, SEED, 0, 1, 4, 1))
    b = list(ResumableSampler(40, SEED, 0, 1, 4, 1))
    c = list(ResumableSampler(40, SEED + 1, 0, 1, 4, 1))
    assert a == b != c


@pytest.mark.parametrize("then_world_size,then_micro,then_accum", [(1, 4, 3), (3, 2, 2)])
def test_resume_mid_epoch_at_another_world_size(then_world_size: int, then_micro: int, then_accum: int) -> None:
    num_samples, epoch = 100, 2
    full = sum(global_steps(rank_streams(num_samples, 1, 12, 1, epoch), 12, 1), [])
    # World size 2 trains three optimizer steps of 12 samples, then the job restarts elsewhere.
    before = rank_streams(num_samples, 2, 2, 3, epoch)
    done_steps = 3
    consumed = sum(global_steps(before, 2, 3)[:done_steps], [])
    after = rank_streams(num_samples, then_world_size, then_micro, then_accum, epoch, offset=done_steps * 12)
    resumed = sum(global_steps(after, then_micro, then_accum), [])
    assert consumed + resumed == full  # no repeat, no skip, same order
    assert len(set(consumed + resumed)) == len(full) == (num_samples // 12) * 12


def test_set_position_rejects_bad_offsets_and_allows_the_end() -> None:
    sampler = ResumableSampler(50, SEED, 0, 2, 2, 2)  # global batch 8, 6 steps
    with pytest.raises(ValueError, match="multiple of the global batch 8"):
        sampler.set_position(0, 4)
    with pytest.raises(ValueError, match="between 0 and 48"):
        sampler.set_position(0, 56)
    sampler.set_position(1, 48)
    assert list(sampler) == [] and len(sampler) == 0
    sampler.set_position(1, 40)
    assert len(list(sampler)) == len(sampler) == 4


def test_sampler_rejects_too_little_data_and_bad_ranks() -> None:
    with pytest.raises(ValueError, match="--train.batch_size"):
        ResumableSampler(7, SEED, 0, 2, 2, 2)
    with pytest.raises(ValueError, match="rank 2"):
        ResumableSampler(70, SEED, 2, 2, 2, 2)


def test_val_sampler_shards_without_padding() -> None:
    shards = [list(ValSampler(10, rank, 3)) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    assert [len(ValSampler(10, rank, 3)) for rank in range(3)] == [4, 3, 3]
    assert sorted(i for s in shards for e, i in s if e == 0) == list(range(10))


# --------------------------------------------------------------------------------------------- datasets


def small_config(**data: object) -> Config:
    cfg = Config()
    cfg.run.seed = SEED
    cfg.data.image_size = 64
    cfg.data.train_samples = 24
    cfg.data.val_samples = 5
    cfg.data.num_workers = 0
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def test_generated_dataset_is_deterministic_with_valid_labels() -> None:
    train, val = build_datasets(small_config(num_classes=5))
    train2, _ = build_datasets(small_config(num_classes=5))
    other_seed = GeneratedDataset(SEED + 1, "train", 24, 64, 5, augment=True)
    assert len(train) == 24 and len(val) == 5
    labels = set()
    for i in range(len(train)):
        image, mask = train[(0, i)]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert mask.shape == (64, 64) and mask.dtype == torch.int64
        assert 0 <= int(mask.min()) and int(mask.max()) < 5
        labels |= set(mask.unique().tolist())
        again = train2[(0, i)]
        assert torch.equal(image, again[0]) and torch.equal(mask, again[1])
    assert labels == set(range(5))
    assert not torch.equal(train[(0, 0)][0], other_seed[(0, 0)][0])
    assert not torch.equal(train[(0, 0)][0], val[(0, 0)][0])  # different streams per split
    images = torch.stack([train[(0, i)][0] for i in range(len(train))])
    assert abs(float(images.mean())) < 0.5 and 0.5 < float(images.std()) < 1.5


def test_augmentation_depends_on_epoch_only_for_train() -> None:
    train, val = build_datasets(small_config())
    plain = GeneratedDataset(SEED, "train", 24, 64, 4, augment=False)
    changed = 0
    for i in range(8):
        base = plain[(0, i)][1].numpy()
        variants = [np.rot90(base, k) for k in range(4)]
        variants += [v[:, ::-1] for v in variants]
        for epoch in range(3):
            mask = train[(epoch, i)][1].numpy()
            assert any(np.array_equal(mask, v) for v in variants)  # a flip/rotation of the same sample
            changed += not np.array_equal(mask, base)
        assert torch.equal(val[(0, i % 5)][0], val[(5, i % 5)][0])
    assert changed > 0


def test_sample_is_identical_in_workers_and_main_process() -> None:
    cfg = small_config()
    train_a, _ = build_datasets(cfg)
    train_b, _ = build_datasets(cfg)
    sampler = ResumableSampler(len(train_a), SEED, 1, 2, 2, 2)
    sampler.set_position(3, 8)
    keys = list(sampler)
    torch.manual_seed(123)
    np.random.seed(123)  # global RNG state must not matter
    loader = DataLoader(train_b, batch_size=2, sampler=sampler, num_workers=2)
    loaded = [(image, mask) for images, masks in loader for image, mask in zip(images, masks)]
    assert len(loaded) == len(keys)
    for key, (image, mask) in zip(keys, loaded):
        expected = train_a[key]
        assert torch.equal(image, expected[0]) and torch.equal(mask, expected[1])


def test_loaders_batches_positions_and_global_rng() -> None:
    cfg = small_config()
    loaders = build_loaders(cfg, rank=1, world_size=2, micro_batch=3, accum_steps=2)
    assert loaders.train_sampler.global_batch == 12 and loaders.train_sampler.steps_per_epoch == 2
    rng_before = torch.get_rng_state()
    batches = list(loaders.train_loader(epoch=1, sample_offset=12))
    val_batches = list(loaders.val_loader)
    # Loaders draw from private generators: creating one must not shift training's RNG stream.
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert [b[0].shape for b in batches] == [(3, 3, 64, 64)] * 2
    assert [len(b[1]) for b in val_batches] == [2]  # val indices 1 and 3 of 5
    expected = [loaders.train_set[key][1] for key in list(loaders.train_sampler)]
    assert all(torch.equal(a, b) for a, b in zip(torch.cat([b[1] for b in batches]), expected))


# --------------------------------------------------------------------------------------------- folder


def write_folder(root: Path, count: int = 5, num_classes: int = 3) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        suffix = ".jpg" if i % 2 else ".png"
        Image.fromarray(image).save(root / "images" / f"sample{i}{suffix}")
        mask = rng.integers(0, num_classes, (30, 40), dtype=np.uint8)
        Image.fromarray(mask, mode="L").save(root / "masks" / f"sample{i}.png")


def folder_config(root: Path, **data: object) -> Config:
    settings: dict[str, object] = {"image_size": 32, "num_classes": 3, "val_fraction": 0.2, **data}
    return small_config(source="folder", root=str(root), **settings)


def test_folder_dataset_happy_path(tmp_path: Path) -> None:
    write_folder(tmp_path)
    train, val = build_datasets(folder_config(tmp_path))
    assert isinstance(train, FolderDataset) and isinstance(val, FolderDataset)
    assert len(train) == 4 and len(val) == 1
    stems = {p.stem for ds in (train, val) for p, _ in ds.pairs}
    assert stems == {f"sample{i}" for i in range(5)}
    for ds in (train, val):
        for i in range(len(ds)):
            image, mask = ds[(1, i)]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert mask.shape == (32, 32) and mask.dtype == torch.int64
            assert set(mask.unique().tolist()) <= {0, 1, 2}
    train2, val2 = build_datasets(folder_config(tmp_path))
    assert train2.pairs == train.pairs and val2.pairs == val.pairs  # the split is seeded


@pytest.mark.parametrize("missing", ["", "images", "masks"])
def test_folder_missing_folder(tmp_path: Path, missing: str) -> None:
    root = tmp_path / "data"
    if missing:
        write_folder(root)
        for f in (root / missing).iterdir():
            f.unlink()
        (root / missing).rmdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / missing))):
        build_datasets(folder_config(root))


def test_folder_image_without_mask(tmp_path: Path) -> None:
    write_folder(tmp_path)
    (tmp_path / "masks" / "sample3.png").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "images" / "sample3.jpg"))):
        build_datasets(folder_config(tmp_path))


def test_folder_mask_with_too_high_class(tmp_path: Path) -> None:
    write_folder(tmp_path)
    bad = np.zeros((30, 40), dtype=np.uint8)
    bad[0, :3] = [1, 5, 9]
    Image.fromarray(bad, mode="L").save(tmp_path / "masks" / "sample2.png")
    with pytest.raises(ValueError) as err:
        build_datasets(folder_config(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "masks" / "sample2.png") in message
    assert "[5, 9]" in message and "--data.num_classes" in message


def test_folder_bad_mask_is_also_caught_when_loading(tmp_path: Path) -> None:
    write_folder(tmp_path)
    train, _ = build_datasets(folder_config(tmp_path))
    _, mask_path = train.pairs[0]
    Image.fromarray(np.full((30, 40), 4, dtype=np.uint8), mode="L").save(mask_path)
    with pytest.raises(ValueError, match=re.escape(str(mask_path))):
        train[(0, 0)]


def test_folder_empty_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "images"))):
        build_datasets(folder_config(tmp_path))


def test_folder_accepts_bilevel_masks(tmp_path: Path) -> None:
    write_folder(tmp_path, count=3, num_classes=2)
    for mask_path in (tmp_path / "masks").iterdir():
        with Image.open(mask_path) as mask:
            labels = np.asarray(mask) > 0
        Image.fromarray(labels).save(mask_path)  # a 1-bit PNG: PIL reports 255 for set pixels
    train, _ = build_datasets(folder_config(tmp_path, num_classes=2))
    assert set(train[(0, 0)][1].unique().tolist()) == {0, 1}


def test_folder_mask_size_must_match_its_image(tmp_path: Path) -> None:
    write_folder(tmp_path)
    Image.fromarray(np.zeros((30, 41), dtype=np.uint8), mode="L").save(tmp_path / "masks" / "sample0.png")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "masks" / "sample0.png"))):
        build_datasets(folder_config(tmp_path))

"""Tests for elastictrain.data: the resumable sampler across world sizes, and the datasets."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from torch.utils.data import DataLoader

from elastictrain.config import Config
from elastictrain.data import (
    FolderDataset,
    ResumableSampler,
    ValSampler,
    build_datasets,
    build_loaders,
    load_image,
    sample_order_changes,
    sample_order_key,
)
from elastictrain.dist import DistContext
from elastictrain.errors import UserError

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
    other = small_config(num_classes=5)
    other.run.seed = SEED + 1
    other_seed, _ = build_datasets(other)
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
    loaders = build_loaders(cfg, DistContext(1, 2, 1, torch.device("cpu"), None), micro_batch=3, accum_steps=2)
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
    with pytest.raises(UserError, match=re.escape(str(root / missing))):
        build_datasets(folder_config(root))


def test_folder_image_without_mask(tmp_path: Path) -> None:
    write_folder(tmp_path)
    (tmp_path / "masks" / "sample3.png").unlink()
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "images" / "sample3.jpg"))):
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


# ------------------------------------------------------------------------------------ folder at real scale


def save_pair(root: Path, stem: str, size: tuple[int, int], labels: np.ndarray | None = None,
              suffix: str = ".png", palette: bool = False) -> np.ndarray:
    """An image of ``size`` (w, h) and its mask (random ids 0..2 unless given), as a user would have them."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(stem) + size[0])
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / f"{stem}{suffix}")
    labels = rng.integers(0, 3, (size[1], size[0])).astype(np.uint8) if labels is None else labels
    mask = Image.fromarray(labels)
    if palette:  # a palette PNG: the pixel values are indices, the colours are only for viewers
        mask.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30] + [255, 255, 255] * 253)
    mask.save(root / "masks" / f"{stem}.png")
    return labels


def test_folder_images_of_mixed_sizes_and_aspect_ratios(tmp_path: Path) -> None:
    for i, size in enumerate([(30, 40), (64, 20), (17, 90), (300, 200), (32, 32)]):
        save_pair(tmp_path, f"s{i}", size, suffix=".jpg" if i % 2 else ".png")
    train, val = build_datasets(folder_config(tmp_path))  # default augmentation: random resized crop from the original
    for ds in (train, val):
        for i in range(len(ds)):
            for epoch in range(2):
                image, mask = ds[(epoch, i)]
                assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
                assert set(mask.unique().tolist()) <= {0, 1, 2}


def test_folder_palette_masks_are_class_indices(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    written = {}
    for i in range(4):
        written[f"p{i}"] = save_pair(tmp_path, f"p{i}", (32, 32), rng.integers(0, 3, (32, 32)).astype(np.uint8),
                                     palette=True)
    with Image.open(tmp_path / "masks" / "p0.png") as m:
        assert m.mode == "P"
    train, val = build_datasets(folder_config(tmp_path, val_fraction=0.5))
    for i, (image_path, _) in enumerate(val.pairs):
        # Validation does not augment and the images already have the model's size: the ids come through as is.
        assert np.array_equal(val[(0, i)][1].numpy(), written[image_path.stem])


def test_folder_ignore_index_is_allowed_only_when_set(tmp_path: Path) -> None:
    for i in range(3):
        labels = np.random.default_rng(i).integers(0, 3, (32, 32)).astype(np.uint8)
        labels[:2] = 255  # a border the annotator left out
        save_pair(tmp_path, f"b{i}", (32, 32), labels)
    with pytest.raises(UserError, match=r"\[255\].*--data.num_classes is 3") as err:
        build_datasets(folder_config(tmp_path))
    assert str(err.value).count("masks/b") == 3  # every file, not only the first
    train, val = build_datasets(folder_config(tmp_path, ignore_index=255))
    assert set(val[(0, 0)][1].unique().tolist()) <= {0, 1, 2, 255} and 255 in val[(0, 0)][1]


def test_folder_explicit_split_from_train_and_val_folders(tmp_path: Path) -> None:
    for i in range(3):
        save_pair(tmp_path / "train", f"t{i}", (40, 30))
    save_pair(tmp_path / "val", "v0", (40, 30))
    train, val = build_datasets(folder_config(tmp_path))
    assert [p.stem for p, _ in train.pairs] == ["t0", "t1", "t2"] and [p.stem for p, _ in val.pairs] == ["v0"]
    save_pair(tmp_path, "extra", (40, 30))  # a second layout beside the first: which one is meant?
    with pytest.raises(UserError, match="both images/ and train/"):
        build_datasets(folder_config(tmp_path))


def test_folder_explicit_split_from_a_list_file(tmp_path: Path) -> None:
    for i in range(5):
        save_pair(tmp_path / "data", f"s{i}", (40, 30), suffix=".jpg" if i == 3 else ".png")
    listed = tmp_path / "val.txt"
    listed.write_text("# validation images\ns1.png\ns3\n\n")  # a file name and a stem
    train, val = build_datasets(folder_config(tmp_path / "data", val_list=str(listed)))
    assert [p.name for p, _ in val.pairs] == ["s1.png", "s3.jpg"]
    assert [p.stem for p, _ in train.pairs] == ["s0", "s2", "s4"]
    listed.write_text("s1\nnope\nalso_missing.png\n")
    with pytest.raises(UserError) as err:
        build_datasets(folder_config(tmp_path / "data", val_list=str(listed)))
    assert "'nope'" in str(err.value) and "'also_missing.png'" in str(err.value)


def test_folder_several_bad_files_are_named_together(tmp_path: Path) -> None:
    for i in range(6):
        save_pair(tmp_path, f"s{i}", (40, 30))
    (tmp_path / "masks" / "s1.png").unlink()  # an image without a mask
    Image.fromarray(np.full((30, 40), 7, dtype=np.uint8)).save(tmp_path / "masks" / "s2.png")  # ids too high
    (tmp_path / "images" / "s3.png").write_bytes(b"not a png at all")  # not an image
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(tmp_path / "masks" / "s4.png")  # an RGB mask
    with pytest.raises(UserError) as err:
        build_datasets(folder_config(tmp_path))
    message = str(err.value)
    assert "4 problem(s)" in message
    for bad in ("images/s1.png: no mask", "masks/s2.png: mask holds class ids [7]", "images/s3.png: not a readable",
                "masks/s4.png: mask has mode RGB"):
        assert bad in message, message
    assert "s0" not in message and "s5" not in message


def _scan_on_two_ranks(rank: int, root: str, init: str, out_dir: str) -> None:
    """One rank of a real 2-process gloo group building the folder datasets twice: on good data, then after
    rank 0 has broken one mask (see the test below)."""
    import json

    import torch.distributed as dist

    import elastictrain.data as data

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        if rank == 1:  # only rank 0 may look at the files; rank 1 gets the result
            def forbidden(*args: object, **kwargs: object) -> None:
                raise AssertionError("rank 1 scanned the folder")
            data.scan_folder = forbidden  # type: ignore[assignment]
        ctx = DistContext(rank, 2, rank, torch.device("cpu"), "gloo")
        results = []
        for attempt in range(2):
            if attempt == 1 and rank == 0:
                Image.fromarray(np.full((30, 40), 9, dtype=np.uint8)).save(Path(root, "masks", "s3.png"))
            dist.barrier()
            try:
                train, val = build_datasets(folder_config(Path(root)), ctx)
                results.append({"train": [p.name for p, _ in train.pairs], "val": [p.name for p, _ in val.pairs]})
            except UserError as e:
                results.append({"error": str(e)})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_folder_scan_runs_on_rank0_and_every_rank_gets_it(tmp_path: Path) -> None:
    import json

    import torch.multiprocessing as mp

    for i in range(5):
        save_pair(tmp_path / "data", f"s{i}", (40, 30))
    mp.spawn(_scan_on_two_ranks, args=(str(tmp_path / "data"), f"file://{tmp_path}/init", str(tmp_path)),
             nprocs=2, join=True)
    (good0, bad0), (good1, bad1) = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert good0 == good1 and len(good0["train"]) == 4 and len(good0["val"]) == 1
    assert "error" in bad0 and bad0 == bad1  # the same message on both ranks, raised together
    assert "masks/s3.png" in bad0["error"]


# --------------------------------------------------------------------------- image modes, EXIF, the scan's guards


def test_deep_images_convert_by_their_type_not_to_white_or_black(tmp_path: Path) -> None:
    """16-bit integer images are divided by 65535 and float images in [0, 1] taken as they are, in the scan,
    in training and in validation (PIL's convert('RGB') clipped a 12-bit image to 94% white and a float one
    to black); float or 32-bit values with no fixed meaning are refused, naming the file and its mode."""
    rng = np.random.default_rng(0)
    twelve_bit = rng.integers(0, 4096, (30, 40)).astype(np.uint16)
    unit_float = rng.random((30, 40), dtype=np.float32)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    written = {"g12": twelve_bit, "t12": twelve_bit, "f32": unit_float}
    Image.fromarray(twelve_bit).save(tmp_path / "images" / "g12.png")
    Image.fromarray(twelve_bit).save(tmp_path / "images" / "t12.tif")
    Image.fromarray(unit_float).save(tmp_path / "images" / "f32.tif")
    for stem in written:
        Image.fromarray(rng.integers(0, 3, (30, 40)).astype(np.uint8)).save(tmp_path / "masks" / f"{stem}.png")
    assert {Image.open(p).mode for p in (tmp_path / "images").iterdir()} == {"I;16", "F"}
    for stem, values in written.items():
        path = next((tmp_path / "images").glob(f"{stem}.*"))
        image = load_image(path)
        expected = values / 65535 if values.dtype == np.uint16 else values
        assert image.shape == (3, 30, 40) and image.dtype == torch.float32
        assert torch.allclose(image, torch.from_numpy(expected.astype(np.float32)).expand(3, -1, -1)), stem
    train, val = build_datasets(folder_config(tmp_path, augment="none", val_fraction=0.34))
    for ds in (train, val):  # through the pipeline: never a constant picture
        for i in range(len(ds)):
            assert float(ds[(0, i)][0].std()) > 0.05

    Image.fromarray(unit_float * 4000).save(tmp_path / "images" / "f32.tif")  # raw intensities as float
    Image.fromarray((twelve_bit.astype(np.int32) * 100_000)).save(tmp_path / "images" / "t12.tif")  # 32-bit
    with pytest.raises(UserError) as err:
        build_datasets(folder_config(tmp_path))
    message = str(err.value)
    assert "2 problem(s)" in message
    assert f"{tmp_path / 'images' / 'f32.tif'}: float image (mode F) with values" in message
    assert f"{tmp_path / 'images' / 't12.tif'}: 32-bit integer image (mode I) with values" in message
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "images" / "f32.tif")) + ".*mode F"):
        load_image(tmp_path / "images" / "f32.tif")  # a file changed after the scan: refused when loaded too


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif.tobytes()


def test_exif_orientation_is_applied_to_images_and_masks(tmp_path: Path) -> None:
    """A photo stored sideways with EXIF orientation 6 is shown upright by viewers and labelling tools, whose
    masks are then upright too: the image is turned before its size is checked and before it is used; a mask
    that carries an orientation of its own is turned by it the same way."""
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)  # 40 wide, 30 high as stored
    upright = np.asarray(Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270))  # 30 wide, 40 high
    labels = rng.integers(0, 3, (40, 30)).astype(np.uint8)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for stem in ("a", "b", "c"):
        Image.fromarray(stored).save(tmp_path / "images" / f"{stem}.png", exif=_exif(6))
    Image.fromarray(labels).save(tmp_path / "masks" / "a.png")  # drawn on the upright picture
    Image.fromarray(labels).save(tmp_path / "masks" / "b.png")
    sideways = np.asarray(Image.fromarray(labels).transpose(Image.Transpose.ROTATE_90))  # stored like its image
    Image.fromarray(sideways).save(tmp_path / "masks" / "c.png", exif=_exif(6))
    assert np.array_equal(load_image(tmp_path / "images" / "a.png").permute(1, 2, 0).numpy(), upright)
    train, val = build_datasets(folder_config(tmp_path, augment="none", image_size=40, val_fraction=0.34))
    for ds in (train, val):
        for i, (image_path, _) in enumerate(ds.pairs):
            image, mask = ds._load(i)
            assert image.shape == (3, 40, 30) and np.array_equal(mask.numpy(), labels), image_path


def test_decompression_bomb_is_listed_with_the_other_data_problems(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's decompression-bomb guard (an image over twice Image.MAX_IMAGE_PIXELS) raises its own error
    type: the scan lists it like any unreadable file instead of a traceback, and loading names the file."""
    for i in range(4):
        save_pair(tmp_path, f"s{i}", (40, 30))
    save_pair(tmp_path, "huge", (200, 100))
    (tmp_path / "masks" / "s1.png").unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 20000 pixels > 2 x 5000: the guard's error
    with pytest.raises(UserError) as err:
        build_datasets(folder_config(tmp_path))
    message = str(err.value)
    assert "2 problem(s)" in message and "s1.png: no mask" in message
    assert f"{tmp_path / 'images' / 'huge.png'}: not a readable image (" in message and "decompression" in message
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "images" / "huge.png"))):
        load_image(tmp_path / "images" / "huge.png")


def test_an_unreadable_image_is_named_once_in_one_clean_message(tmp_path: Path) -> None:
    write_folder(tmp_path)
    bad = tmp_path / "images" / "sample2.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(UserError) as err:
        build_datasets(folder_config(tmp_path))
    (line,) = [line for line in str(err.value).splitlines() if "sample2" in line]
    assert line.strip() == f"{bad}: not a readable image (cannot identify image file)"
    with pytest.raises(UserError) as err:
        load_image(bad)
    assert str(err.value) == f"{bad}: not a readable image (cannot identify image file); replace or remove it"


def test_sample_order_key_names_what_changed(tmp_path: Path) -> None:
    """What a mid-epoch resume compares: the seed, the number of samples, and for folder data which file
    each index is."""
    generated = build_datasets(small_config())[0]
    key = sample_order_key(generated, SEED)
    assert sample_order_changes(key, sample_order_key(generated, SEED)) == []
    assert sample_order_changes(key, sample_order_key(build_datasets(small_config(train_samples=30))[0], SEED)) \
        == ["--data.train_samples 24 -> 30"]
    assert sample_order_changes(key, sample_order_key(generated, SEED + 1)) == [f"--run.seed {SEED} -> {SEED + 1}"]
    for i in range(6):
        save_pair(tmp_path / "train", f"s{i}", (40, 30))
    save_pair(tmp_path / "val", "v0", (40, 30))
    before = sample_order_key(build_datasets(folder_config(tmp_path))[0], SEED)
    save_pair(tmp_path / "train", "new", (40, 30))
    assert sample_order_changes(before, sample_order_key(build_datasets(folder_config(tmp_path))[0], SEED)) \
        == ["training images under --data.root 6 -> 7"]
    (tmp_path / "train" / "images" / "s0.png").rename(tmp_path / "train" / "images" / "z.png")
    (tmp_path / "train" / "masks" / "s0.png").rename(tmp_path / "train" / "masks" / "z.png")
    (tmp_path / "train" / "images" / "new.png").unlink()
    assert sample_order_changes(before, sample_order_key(build_datasets(folder_config(tmp_path))[0], SEED)) \
        == ["the training images under --data.root (other file names)"]

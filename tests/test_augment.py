"""Augmentation (elastictrain.augment): the config vocabulary, masks that stay class ids through every
transform, image and mask moved together, and randomness that is a pure function of (seed, epoch, index)
whatever the rank, DataLoader worker, world size or global RNG state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from elastictrain.augment import PRESETS, VOCABULARY, Normalization, SamplePipeline, parse
from elastictrain.config import Config, load_config
from elastictrain.data import ResumableSampler, build_datasets

SEED = 11
# Every transform with strong settings, so that a change of behaviour shows.
STRONG = [{"resized_crop": {"scale": [0.2, 0.6]}}, "hflip", {"vflip": {"p": 0.5}}, {"rotate": {"degrees": 45}},
          {"color_jitter": {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.2}}]


def test_parse_presets_names_arguments_and_every_problem_at_once() -> None:
    assert [name for name, _ in parse("default")[0]] == PRESETS["default"] == ["resized_crop", "hflip", "color_jitter"]
    for off in (None, False, "none", "false", [], "off"):
        assert parse(off) == ([], []), off
    assert parse(True)[0] == parse("default")[0]
    steps, problems = parse("hflip, vflip")
    assert not problems and steps == [("hflip", {"p": 0.5}), ("vflip", {"p": 0.5})]
    steps, problems = parse([{"rotate": {"degrees": 30}}, {"resized_crop": {"scale": [0.3, 1]}}])
    assert not problems
    assert steps == [("rotate", {"degrees": 30.0}), ("resized_crop", {"scale": (0.3, 1.0), "ratio": (3 / 4, 4 / 3)})]
    _, problems = parse(["fliip", {"rotate": {"degrees": 400, "axis": 1}}, {"resized_crop": {"scale": [0.9, 0.1]}},
                         ["nested"], "resized_crop"])
    text = "\n".join(problems)
    for expected in ("unknown augmentation 'fliip'", "rotate degrees must be degrees in [0, 180], got 400",
                     "rotate has no argument 'axis'", "resized_crop scale must be", "['nested'] is neither",
                     "resized_crop may appear only once"):
        assert expected in text, text
    assert all(p.startswith("--data.augment:") for p in problems)


def test_augment_setting_from_yaml_and_command_line(tmp_path) -> None:
    cfg = load_config(["--data.augment", "[hflip, {rotate: {degrees: 20}}]"])
    assert cfg.data.augment == ["hflip", {"rotate": {"degrees": 20}}]
    assert load_config(["--data.augment", "hflip,vflip"]).data.augment == "hflip,vflip"
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  augment:\n    - resized_crop\n    - {color_jitter: {hue: 0.1}}\n")
    assert load_config(["--config", str(path)]).data.augment == ["resized_crop", {"color_jitter": {"hue": 0.1}}]
    with pytest.raises(ValueError) as err:  # reported with every other problem, before anything starts
        load_config(["--data.augment", "[hflip, spin]", "--train.epochs", "0"])
    assert "unknown augmentation 'spin'" in str(err.value) and "--train.epochs" in str(err.value)


def striped(size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose red channel encodes the class of each pixel (class * 80), and that mask with an
    ignored border: a transform that moved image and mask differently would break the correspondence."""
    mask = torch.zeros(size, size, dtype=torch.int64)
    mask[:, size // 4:size // 2] = 1
    mask[size // 2:, size // 2:] = 2
    mask[:2] = 255
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    image[0] = (mask.clamp(max=3) * 80).to(torch.uint8)
    image[1] = 128
    return image, mask


@pytest.mark.parametrize("item", [*STRONG, "default"], ids=lambda i: i if isinstance(i, str) else next(iter(i)))
def test_masks_stay_class_ids_and_move_with_the_image(item: object) -> None:
    steps, problems = parse([item])
    assert not problems
    colour_only = [name for name, _ in steps] == ["color_jitter"]
    image, mask = striped()
    pipe = SamplePipeline(steps, 32, Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), mask_fill=255, seed=SEED)
    changed = 0
    for index in range(12):
        out_image, out_mask = pipe(image, mask, epoch=0, index=index)
        assert out_image.shape == (3, 32, 32) and out_image.dtype == torch.float32
        assert out_mask.shape == (32, 32) and out_mask.dtype == torch.int64 and type(out_mask) is torch.Tensor
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 255}  # nearest only: no blended ids
        changed += not torch.equal(out_mask, torch.nn.functional.interpolate(
            mask[None, None].float(), size=(32, 32), mode="nearest")[0, 0].long())
        if not any(name == "color_jitter" for name, _ in steps):
            labelled = out_mask != 255
            decoded = (out_image[0] * 255 / 80).round().long()
            agree = (decoded[labelled] == out_mask[labelled]).float().mean()
            assert agree > 0.9, f"image and mask were transformed differently ({agree:.2f} agree)"
    if not colour_only:
        assert changed > 0, "the geometric transform never changed anything"


def test_colour_jitter_never_touches_the_mask() -> None:
    image, mask = striped(32)
    steps, _ = parse([STRONG[-1]])
    pipe = SamplePipeline(steps, 32, Normalization(), seed=SEED)
    outs = [pipe(image, mask, 0, i) for i in range(5)]
    assert all(torch.equal(m, mask) for _, m in outs)
    assert not torch.equal(outs[0][0], outs[1][0])


def generated_config(augment: object = STRONG, workers: int = 0) -> Config:
    cfg = Config()
    cfg.run.seed = SEED
    cfg.data.image_size = 32
    cfg.data.train_samples = 24
    cfg.data.val_samples = 4
    cfg.data.num_workers = workers
    cfg.data.augment = augment
    return cfg


def test_a_sample_is_a_pure_function_of_seed_epoch_and_index() -> None:
    (a, val), (b, _) = build_datasets(generated_config()), build_datasets(generated_config())
    other = generated_config()
    other.run.seed = SEED + 1
    (c, _) = build_datasets(other)
    differs_by_epoch = differs_by_seed = 0
    for index in range(6):
        torch.manual_seed(index)  # whatever the global RNGs hold
        random.seed(index + 100)
        np.random.seed(index + 200)
        first = a[(1, index)]
        torch.manual_seed(999)
        random.seed(0)
        again = b[(1, index)]
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        differs_by_epoch += not torch.equal(first[0], a[(2, index)][0])
        differs_by_seed += not torch.equal(first[0], c[(1, index)][0])
        assert torch.equal(val[(0, index % 4)][0], val[(7, index % 4)][0])  # validation never augments
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a[(3, 0)], a[(3, 1)]
    assert torch.equal(torch.get_rng_state(), state), "augmenting moved the training process's RNG"
    assert differs_by_epoch == 6 and differs_by_seed == 6


def samples_by_key(world_size: int, workers: int) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """Every (epoch, index) key of epoch 2 loaded through each rank's sampler and DataLoader."""
    cfg = generated_config(workers=workers)
    train, _ = build_datasets(cfg)
    found = {}
    for rank in range(world_size):
        sampler = ResumableSampler(len(train), SEED, rank, world_size, micro_batch=8 // world_size // 2, accum_steps=2)
        sampler.set_position(2, 0)
        keys = list(sampler)
        loader = DataLoader(train, batch_size=sampler.micro_batch, sampler=sampler, num_workers=workers,
                            generator=torch.Generator().manual_seed(rank + 17 * workers))
        loaded = [(img, msk) for images, masks in loader for img, msk in zip(images, masks)]
        found.update(zip(keys, loaded))
    return found


def test_the_same_sample_at_every_world_size_and_in_every_worker() -> None:
    one = samples_by_key(world_size=1, workers=0)
    two = samples_by_key(world_size=2, workers=2)
    four = samples_by_key(world_size=4, workers=0)
    assert one.keys() == two.keys() == four.keys() and len(one) == 24
    for key in one:
        for other in (two, four):
            assert torch.equal(one[key][0], other[key][0]) and torch.equal(one[key][1], other[key][1]), key


def test_the_vocabulary_is_documented() -> None:
    import elastictrain.augment as module

    for name, spec in VOCABULARY.items():
        assert name in module.__doc__, name
        for arg in spec:
            assert arg in module.__doc__, (name, arg)

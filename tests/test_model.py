"""elastictrain.model: the loss and metrics honour ignore_index, per-class scores, and pretrained encoder
weights: one clear message offline (before any process group), loaded from a cache filled here with a
locally made file. No test touches the network: HF_HUB_OFFLINE is on wherever weights are asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch

from elastictrain.config import ModelConfig
from elastictrain.errors import UserError
from elastictrain.model import (SegmentationLoss, build_model, confusion_stats, encoder_normalization,
                                fetch_encoder_weights, scores)
from helpers import base_env, run_cli, tiny_args

NAMES = ["background", "road", "car"]


def test_loss_ignores_pixels_marked_ignore_index() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    mask = torch.randint(0, 3, (2, 8, 8))
    mask[:, :2] = 255
    loss = SegmentationLoss(ignore_index=255)
    other = logits.clone()
    other[:, :, :2] = torch.randn(2, 3, 2, 8) * 10  # whatever the model says where nothing is labelled
    assert torch.equal(loss(logits, mask), loss(other, mask))
    assert torch.isfinite(loss(logits, torch.full_like(mask, 255)))  # a crop of only ignored pixels
    with pytest.raises((IndexError, RuntimeError)):  # without ignore_index, 255 is not a class
        SegmentationLoss()(logits, mask)


def test_metrics_ignore_pixels_and_score_each_class() -> None:
    truth = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 1]]])
    stats = confusion_stats(pred, truth, 3, ignore_index=255)
    # class 0: tp 1 (pixel 0), fp 1 (pixel 5), fn 1 (pixel 1); class 1: tp 2, fp 1; class 2: tp 1, fn 1
    assert stats[:3].T.tolist() == [[1, 1, 1], [2, 1, 0], [1, 0, 1]]
    result = scores(stats, NAMES)
    assert result["iou/background"] == pytest.approx(1 / 3) and result["dice/background"] == pytest.approx(0.5)
    assert result["iou/road"] == pytest.approx(2 / 3) and result["iou/car"] == pytest.approx(1 / 2)
    assert result["iou"] == pytest.approx(4 / 8)  # micro: 4 tp over 4 tp + 2 fp + 2 fn; ignored pixels left out
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    assert torch.equal(confusion_stats(logits, truth, 3, 255), stats)  # logits or class ids alike
    absent = scores(confusion_stats(pred.clamp(max=1), truth.clamp(max=1), 3), NAMES)
    assert absent["iou/car"] is None and absent["dice/car"] is None  # in neither truth nor prediction


def offline_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """This process's huggingface_hub (smp's and timm's downloader) reads only ``cache`` and never the network."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))


def test_offline_without_weights_is_one_message_naming_the_setting(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    offline_hub(monkeypatch, tmp_path / "empty")
    with pytest.raises(UserError) as err:
        fetch_encoder_weights(ModelConfig(encoder="resnet34", encoder_weights="imagenet"))
    message = str(err.value)
    assert message.startswith("--model.encoder_weights imagenet: cannot get the pretrained weights of encoder resnet34")
    assert "get_encoder('resnet34', weights='imagenet')" in message and str(tmp_path / "empty") in message
    assert "--model.encoder_weights none" in message and "\n" not in message
    with pytest.raises(UserError, match="Wrong pretrained weights `nope`"):
        fetch_encoder_weights(ModelConfig(encoder="resnet34", encoder_weights="nope"))
    fetch_encoder_weights(ModelConfig())  # no weights asked for: nothing to fetch, nothing raised


def test_pretrained_weights_load_from_a_filled_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """smp's own encoders: a local config.json + model.safetensors placed where smp 0.6's hf_hub_download looks
    (HF_HUB_CACHE/models--smp-hub--NAME/snapshots/REVISION/, the revision pinned in smp)."""
    from safetensors.torch import save_file

    settings = smp.encoders.encoders["mobilenet_v2"]["pretrained_settings"]["imagenet"]
    folder = (tmp_path / "hub" / f"models--{settings['repo_id'].replace('/', '--')}" / "snapshots"
              / settings["revision"])
    folder.mkdir(parents=True)
    torch.manual_seed(123)
    made = smp.encoders.get_encoder("mobilenet_v2").state_dict()  # "pretrained" here: a seeded init of our own
    save_file({k: v.contiguous() for k, v in made.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25],
                                                    "input_space": "RGB", "input_range": [0, 1]}))
    offline_hub(monkeypatch, tmp_path / "hub")
    cfg = ModelConfig(arch="Unet", encoder="mobilenet_v2", encoder_weights="imagenet")
    fetch_encoder_weights(cfg)
    torch.manual_seed(7)  # another init: only the file can make the encoder equal to `made`
    model = build_model(cfg, num_classes=3)
    loaded = model.encoder.state_dict()
    assert all(torch.equal(loaded[k], made[k]) for k in made if not k.startswith("classifier"))
    normalization = encoder_normalization(cfg)  # the encoder's own statistics, from its config.json
    assert normalization.mean == (0.5, 0.4, 0.3) and normalization.std == (0.2, 0.2, 0.25)
    assert encoder_normalization(ModelConfig()).mean == (0.485, 0.456, 0.406)  # no weights: ImageNet, no lookup


def test_other_local_ranks_wait_for_local_rank_0s_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Local rank 1 never downloads: it reads the cache until local rank 0's files are there (here a thread
    plays local rank 0), and gives up with a message when they never come."""
    import threading

    offline_hub(monkeypatch, tmp_path / "hub")
    cfg = ModelConfig(encoder="tu-mobilenetv3_small_050", encoder_weights="imagenet", encoder_depth=5)
    with pytest.raises(UserError, match="local rank 0 did not bring the weights"):
        fetch_encoder_weights(cfg, local_rank=1, wait_s=0.5)
    made: dict[str, torch.Tensor] = {}
    filler = threading.Timer(1.5, lambda: made.update(fill_timm_cache(tmp_path / "hub")))
    filler.start()
    try:
        fetch_encoder_weights(cfg, local_rank=1, wait_s=60)  # returns once the files are complete
    finally:
        filler.cancel()
    model = build_model(cfg, 3)  # and the model is built from them
    assert torch.equal(model.encoder.model.conv_stem.weight, made["conv_stem.weight"])


def test_reading_the_cache_only_leaves_the_hub_setting_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter over huggingface_hub's offline switch: breaks loudly if an upgrade moves it."""
    import huggingface_hub.constants as hub

    from elastictrain.model import _hub_offline

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    with _hub_offline():
        assert hub.is_offline_mode()
    assert hub.HF_HUB_OFFLINE is False and not hub.is_offline_mode()


def fill_timm_cache(hub: Path) -> dict[str, torch.Tensor]:
    """tiny.yaml's timm encoder: HF_HUB_CACHE/models--timm--NAME/refs/main -> snapshots/HASH/model.safetensors."""
    import timm
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg("mobilenetv3_small_050").hf_hub_id
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    torch.manual_seed(321)
    made = {k: v.contiguous() for k, v in timm.create_model("mobilenetv3_small_050").state_dict().items()}
    save_file(made, root / "snapshots" / commit / "model.safetensors")
    return made


def test_cli_trains_from_cached_weights_and_fails_offline_before_starting(tmp_path: Path) -> None:
    fill_timm_cache(tmp_path / "home" / "hub")
    env = base_env(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch"))
    args = ["--model.encoder_weights", "imagenet", "--epochs", "1", "--checkpoint.mode", "off"]
    run_cli(tiny_args(tmp_path / "cached", *args), env=env, check=True)
    assert (tmp_path / "cached" / "final_model.pt").exists()

    env["HF_HOME"] = str(tmp_path / "empty")
    failed = run_cli(tiny_args(tmp_path / "offline", *args), env=env)
    assert failed.returncode == 2, failed.stdout[-3000:]
    assert "--model.encoder_weights imagenet: cannot get the pretrained weights" in failed.stdout
    assert "Traceback" not in failed.stdout
    assert not (tmp_path / "offline").exists()  # it stopped before start-up made anything

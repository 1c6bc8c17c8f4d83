"""FSDP2 (``--dist.strategy fsdp``) end to end under real torchrun (gloo, CPU), judged from what is on disk:
training through the same loop, sharded snapshots with both engines, a kill at the same world size
(bitwise), resumes at 1 and 3 ranks, DDP <-> FSDP2, and the exported full model.

Run directly under torchrun, this file is also the helper that evaluates the FSDP2 model restored from a
run's latest snapshot (``sharded_forward``), so the exported model is compared with the sharded one.

Both engines support every direction: FSDP2 -> FSDP2 at any world size, also where FSDP2 leaves a rank
without rows of some parameter (4 classes at 3 ranks: our torchsnapshot engine stores such tensors whole, as
replicated entries); FSDP2 -> DDP or one process (and ``ckpt export``); unsharded (DDP / one process) ->
FSDP2 (our torchsnapshot engine reads such entries whole and shards them locally).
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import (TINY, assert_bitwise_equal, load_final, read_jsonl, run_cli, run_script_under_torchrun,
                     tiny_args)

FSDP = ["--dist.strategy", "fsdp"]
# Every forward sees the same 2 samples at every world size (micro-batches of 2; accumulation 3 at 2 ranks,
# 6 at 1, 2 at 3), so runs at different world sizes differ only in the order sums are taken. 36 samples in
# global batches of 12 (divisible by 1, 2, 3) give 3 optimizer steps an epoch, 9 in all; 9 validation samples
# split 5/4 at 2 ranks, so the ranks run different numbers of validation batches (FSDP2 must keep in step).
COMMON = ["--train.batch_size", "12", "--train.micro_batch_size", "2", "--data.train_samples", "36",
          "--data.val_samples", "9", "--checkpoint.keep", "3"]
STEPS_PER_EPOCH = 3
EPOCH1 = "epoch00001-step00000003"
EPOCH2 = "epoch00002-step00000006"
# Tolerances for a continuation at another world size or strategy, against the reference:
# - the first step after the resume: its loss depends only on the restored weights and the same micro-batches,
#   so it matches up to the order of summation (~1e-7); 1e-5 relative catches any state not restored.
# - later steps: float rounding differences (reduction order: all-reduce vs reduce-scatter, 1 vs 2 vs 3 ranks)
#   grow through the updates at lr 3e-3; measured up to 0.9% after 6 steps, so 4%.
# - validation loss is not compared: it also depends on batch-norm running statistics, which legitimately
#   differ with the world size (each rank updates its own from its micro-batches and rank 0's are kept at a
#   snapshot; one process updates them from all). Measured 2-9% apart; training never reads them.
FIRST_STEP_RTOL = 1e-5
LATER_STEPS_RTOL = 0.04


def fsdp_args(run_dir: Path, *extra: str) -> list[str]:
    return tiny_args(run_dir, *COMMON, *FSDP, *extra)


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> train loss; a replayed step (after a restart) keeps its last value."""
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir) if r["kind"] == "train"}


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["epoch"]: r["val_loss"] for r in read_jsonl(run_dir) if r["kind"] == "val"}


def assert_continues_like(run_dir: Path, reference: Path, resumed_at: int) -> None:
    """The resumed run's losses follow the reference's (tolerances and why: see the top of this file)."""
    ours, ref = train_losses(run_dir), train_losses(reference)
    steps = sorted(s for s in ours if s > resumed_at)
    assert steps == list(range(resumed_at + 1, 3 * STEPS_PER_EPOCH + 1)), steps
    first = steps[0]
    assert ours[first] == pytest.approx(ref[first], rel=FIRST_STEP_RTOL), (first, ours[first], ref[first])
    for s in steps[1:]:
        assert ours[s] == pytest.approx(ref[s], rel=LATER_STEPS_RTOL), (s, ours[s], ref[s])
    resumed_epoch = resumed_at // STEPS_PER_EPOCH
    assert sorted(val_losses(run_dir)) == list(range(resumed_epoch + 1, 4))
    assert all(math.isfinite(v) for v in val_losses(run_dir).values())


# ------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def reference(runs: Path) -> Path:
    """The uninterrupted FSDP2 run at 2 ranks, with DCP snapshots. Neither engine touches the trajectory, so it
    is the reference for torchsnapshot runs too."""
    run_dir = runs / "reference"
    run_cli(fsdp_args(run_dir, "--checkpoint.engine", "dcp"), nproc=2, check=True)
    return run_dir


@pytest.fixture(scope="module")
def killed(runs: Path) -> Path:
    """torchsnapshot engine (the default); rank 0 SIGKILLs itself once the epoch-1 snapshot is committed (in
    epoch 2: it is written in the background while epoch 2 trains; a kill at step 5 could come before the
    commit on a loaded machine, and the run then resumed from nothing) and torchrun
    restarts both workers in the same command. Its snapshots are the torchsnapshot FSDP2 sources below."""
    run_dir = runs / "killed"
    run_cli(fsdp_args(run_dir, "--debug.fault", "sigkill@saved=3:rank=0"), nproc=2, max_restarts=1, check=True)
    return run_dir


@pytest.fixture(scope="module")
def one_process(runs: Path, killed: Path) -> Path:
    """What a user with one device types: the same command without torchrun (so unsharded), from the 2-rank
    FSDP2 torchsnapshot snapshot. Its own snapshots are unsharded torchsnapshot ones."""
    run_dir = runs / "one-process"
    run_cli(fsdp_args(run_dir, "--checkpoint.resume_from", str(killed / "snapshots" / EPOCH1)), check=True)
    return run_dir


@pytest.fixture(scope="module")
def ddp_from_fsdp(runs: Path, reference: Path) -> Path:
    """FSDP2 -> DDP at 2 ranks through a DCP snapshot; its own snapshots are DCP too (for DDP -> FSDP2)."""
    run_dir = runs / "ddp-from-fsdp"
    run_cli(tiny_args(run_dir, *COMMON, "--dist.strategy", "ddp", "--checkpoint.engine", "dcp",
                      "--checkpoint.resume_from", str(reference / "snapshots" / EPOCH1)), nproc=2, check=True)
    return run_dir


# ------------------------------------------------------------------------------------------ same world size


@pytest.mark.slow
def test_killed_fsdp_run_resumes_bitwise(killed: Path, reference: Path) -> None:
    resumes = [r for r in read_jsonl(killed) if r["kind"] == "event" and r.get("event") == "resume"]
    assert [(r["step"], r["world_size"]) for r in resumes] == [(STEPS_PER_EPOCH, 2)]
    assert "resuming from epoch 1 step 3" in (killed / "train.log").read_text()
    assert_bitwise_equal(load_final(killed), load_final(reference))


@pytest.mark.slow
def test_dcp_restore_at_the_same_world_size_is_bitwise(sharded: dict[str, Any], reference: Path) -> None:
    """The restored shards, gathered, are the weights the run ended with. (Trajectory-level, the killed run
    covers torchsnapshot; DCP's optimizer and counters are covered by DDP -> FSDP2, equal to 1e-6.)"""
    assert_bitwise_equal(sharded["state"], load_final(reference))


@pytest.mark.slow
def test_torchsnapshot_ranks_write_only_their_shards(killed: Path) -> None:
    from torchsnapshot import Snapshot
    from torchsnapshot.manifest import DTensorEntry

    manifest = Snapshot(str(killed / "snapshots" / EPOCH2)).get_manifest()
    files: dict[int, set[str]] = {0: set(), 1: set()}
    sharded = 0
    for key, entry in manifest.items():
        rank, name = key.split("/", 1)
        if not isinstance(entry, DTensorEntry) or not name.startswith("model/"):
            continue
        sharded += 1
        peer = manifest[f"{1 - int(rank)}/{name}"]
        stored = sum(torch.Size(s.sizes).numel() for s in entry.shards + peer.shards)
        full = torch.Size([sum(s.sizes[0] for s in entry.shards + peer.shards), *entry.shards[0].sizes[1:]])
        assert stored == full.numel(), f"{name}: every element stored exactly once"
        dim0 = (full[0] + 1) // 2  # FSDP2 shards dim 0 in chunks of ceil(n / world size)
        assert all(s.offsets[0] // dim0 == int(rank) for s in entry.shards), f"{key} holds another rank's rows"
        files[int(rank)].update(s.tensor.location for s in entry.shards)
    assert sharded > 100 and files[0] and files[1] and not files[0] & files[1], files


@pytest.mark.slow
def test_dcp_ranks_write_only_their_shards(reference: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(reference / "snapshots" / EPOCH2)).read_metadata()
    sharded = 0
    for index, info in metadata.storage_data.items():
        chunks = getattr(metadata.state_dict_metadata[index.fqn], "chunks", [])
        if len(chunks) < 2:
            continue  # replicated (buffers, step counters): written once, by one rank
        sharded += 1
        rank = sorted(c.offsets[0] for c in chunks).index(index.offset[0])
        assert info.relative_path.startswith(f"__{rank}_"), (index, info)
    assert sharded > 100


# ------------------------------------------------------------------------------------------ other world sizes


@pytest.mark.slow
def test_resume_at_one_process(one_process: Path, reference: Path) -> None:
    log = (one_process / "train.log").read_text()
    assert "resuming from epoch 1 step 3" in log and "taken at world size 2, now 1" in log
    assert "--dist.strategy fsdp: launched without torchrun" in log
    assert_continues_like(one_process, reference, resumed_at=STEPS_PER_EPOCH)


@pytest.mark.slow
def test_torchsnapshot_resumes_at_three_ranks_and_back_at_two(runs: Path, killed: Path, reference: Path) -> None:
    """With the default engine, the 2-rank snapshot continues at 3 ranks, where 4 classes leave rank 2 without
    rows of the head (stored whole); a 3-rank snapshot continues at 2 ranks again."""
    run_dir = runs / "three-ranks"
    out = run_cli(fsdp_args(run_dir, "--checkpoint.resume_from", str(killed / "snapshots" / EPOCH1)), nproc=3,
                  check=True)
    assert "taken at world size 2, now 3" in out.stdout
    assert_continues_like(run_dir, reference, resumed_at=STEPS_PER_EPOCH)
    from torchsnapshot import Snapshot
    from torchsnapshot.manifest import DTensorEntry

    entries = Snapshot(str(run_dir / "snapshots" / EPOCH2)).get_manifest()
    head = [e for k, e in entries.items() if k.endswith("model/segmentation_head.0.weight")]
    assert head and not any(isinstance(e, DTensorEntry) for e in head), "the head is stored whole"
    back = runs / "three-then-two"
    back.mkdir()
    shutil.copytree(run_dir / "snapshots" / EPOCH2, back / "snapshots" / EPOCH2)
    out = run_cli(fsdp_args(back), nproc=2, check=True)
    assert "taken at world size 3, now 2" in out.stdout
    assert_continues_like(back, run_dir, resumed_at=2 * STEPS_PER_EPOCH)  # from the 3-rank weights


# ------------------------------------------------------------------------------------------ DDP <-> FSDP2


@pytest.mark.slow
def test_fsdp_to_ddp_with_dcp(ddp_from_fsdp: Path, reference: Path) -> None:
    assert "resuming from epoch 1 step 3" in (ddp_from_fsdp / "train.log").read_text()
    assert_continues_like(ddp_from_fsdp, reference, resumed_at=STEPS_PER_EPOCH)


@pytest.mark.slow
def test_ddp_to_fsdp_with_dcp(runs: Path, ddp_from_fsdp: Path) -> None:
    run_dir = runs / "fsdp-from-ddp"
    run_cli(fsdp_args(run_dir, "--checkpoint.engine", "dcp",
                      "--checkpoint.resume_from", str(ddp_from_fsdp / "snapshots" / EPOCH2)), nproc=2, check=True)
    assert "resuming from epoch 2 step 6" in (run_dir / "train.log").read_text()
    assert_continues_like(run_dir, ddp_from_fsdp, resumed_at=2 * STEPS_PER_EPOCH)


@pytest.mark.slow
def test_torchsnapshot_unsharded_snapshot_continues_under_fsdp(runs: Path, one_process: Path) -> None:
    """A one-process torchsnapshot snapshot continues as FSDP2 at 2 ranks (torchsnapshot itself would lose
    this failure in a background task and train on from fresh weights: the proof of the read would catch it)."""
    run_dir = runs / "ts-plain-to-fsdp"
    out = run_cli(fsdp_args(run_dir, "--checkpoint.resume_from", str(one_process / "snapshots" / EPOCH2)),
                  nproc=2, check=True)
    assert "resuming from epoch 2 step 6" in out.stdout and "taken at world size 1, now 2" in out.stdout
    assert_continues_like(run_dir, one_process, resumed_at=2 * STEPS_PER_EPOCH)  # from the one-process weights


# ------------------------------------------------------------------------------------------ the exported model


@pytest.fixture(scope="module")
def sharded(runs: Path, reference: Path) -> dict[str, Any]:
    """A fresh 2-rank FSDP2 process restores the reference's last (DCP) snapshot: its logits on
    ``fixed_input()`` and its gathered full state (see ``sharded_forward``)."""
    out = runs / "sharded.pt"
    result = run_script_under_torchrun(Path(__file__), [str(out), *fsdp_args(reference)])
    assert result.returncode == 0, result.stdout[-4000:]
    result = torch.load(out, weights_only=True)
    assert result["snapshot"].endswith("epoch00003-step00000009")
    return result


@pytest.mark.slow
def test_exported_model_gives_the_sharded_models_outputs(sharded: dict[str, Any], reference: Path) -> None:
    """final_model.pt (written by the FSDP2 run) in a fresh smp model on one device gives the restored FSDP2
    model's logits."""
    from elastictrain.config import load_config
    from elastictrain.model import build_model

    cfg = load_config(["--config", str(TINY)])
    model = build_model(cfg.model, cfg.data.num_classes)
    model.load_state_dict(load_final(reference))  # strict, weights_only, CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks (OMP_NUM_THREADS=1): a conv's sums in the same order
    try:
        with torch.no_grad():
            logits = model.eval()(fixed_input())
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(logits, sharded["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ckpt_export_of_a_sharded_torchsnapshot_snapshot(runs: Path, killed: Path, reference: Path) -> None:
    """``ckpt export`` of the last FSDP2 snapshot, in one process, equals the run's final_model.pt. (DCP's
    FSDP2 -> unsharded path is the one test_fsdp_to_ddp_with_dcp takes.)"""
    target = runs / "exported.pt"
    run_cli(["ckpt", "export", str(killed / "snapshots" / "epoch00003-step00000009"), str(target)], check=True)
    assert_bitwise_equal(torch.load(target, weights_only=True), load_final(reference))


def fixed_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def sharded_forward(out: Path, argv: list[str]) -> None:
    """Under torchrun: build the FSDP2 model as the trainer does, restore the latest snapshot of --run.dir into
    it, and (rank 0) save its logits on ``fixed_input()``, its gathered full state and the snapshot's path."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from elastictrain.snapshot import SnapshotManager
    from elastictrain.snapshot.appstate import ModelState
    from elastictrain.config import load_config
    from elastictrain.dist import init_distributed, teardown
    from elastictrain.model import build_model
    from elastictrain.parallelize import wrap

    cfg = load_config(argv)
    ctx = init_distributed(cfg)
    try:
        model = wrap(build_model(cfg.model, cfg.data.num_classes), "fsdp", ctx)
        manager = SnapshotManager(cfg.checkpoint, ctx, Path(cfg.run.dir), cfg.train.epochs)
        resumed = manager.restore_latest({"model": ModelState(model)})
        assert resumed is not None
        snapshot = resumed.path
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        with torch.no_grad():
            logits = model.eval()(fixed_input())
        if ctx.is_main:
            torch.save({"snapshot": str(snapshot), "logits": logits.detach().clone(), "state": state}, out)
    finally:
        teardown(ctx)


# ------------------------------------------------------------------------------------------ pure logic


@pytest.mark.parametrize("device,amp,expected", [("cuda", torch.bfloat16, torch.bfloat16),
                                                 ("cpu", torch.bfloat16, None), ("cuda", None, None),
                                                 ("cuda", torch.float16, None)])
def test_fsdp_gathers_in_bf16_only_on_cuda(device: str, amp: Any, expected: Any) -> None:
    from elastictrain.parallelize import fsdp_mixed_precision

    policy = fsdp_mixed_precision(torch.device(device), amp)
    assert policy.param_dtype == expected
    assert policy.reduce_dtype == (torch.float32 if expected else None)


def test_fsdp_units_are_the_blocks() -> None:
    from elastictrain.config import load_config
    from elastictrain.model import build_model
    from elastictrain.parallelize import model_blocks

    cfg = load_config(["--config", str(TINY)])
    model = build_model(cfg.model, cfg.data.num_classes)
    names = {id(m): n for n, m in model.named_modules()}
    blocks = [names[id(b)] for b in model_blocks(model)]
    assert blocks[0] == "encoder.model.blocks.0.0" and blocks[-1] == "decoder.blocks.4"
    assert sum(n.startswith("decoder.blocks.") for n in blocks) == 5
    covered = sum(p.numel() for b in model_blocks(model) for p in b.parameters())
    assert covered > 0.95 * sum(p.numel() for p in model.parameters())  # the stem and the head stay at the root


if __name__ == "__main__":
    sharded_forward(Path(sys.argv[1]), sys.argv[2:])

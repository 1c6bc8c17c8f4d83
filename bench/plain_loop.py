"""The same job as elastictrain, written as the plain loop a user would write by hand: the baseline of
bench/bench_overhead.py. Same model, loss, optimizer, LR schedule, gradient clipping and generated data;
DDP under torchrun; one ``torch.save`` (rank 0, temp file + rename) at every epoch end and ``torch.load``
(weights_only) at start-up when the file exists. No fault tolerance beyond that.

    python bench/plain_loop.py RUN_DIR EPOCHS IMAGE_SIZE TRAIN_SAMPLES BATCH [SAVE]
    torchrun --nproc-per-node 2 bench/plain_loop.py ...

Writes RUN_DIR/plain.jsonl: a 'first_step' record (the first step of this process completed) and a
'last_step' record per epoch (its last step completed, before the save), as bench_overhead.py reads them.
SAVE 0 skips the torch.save (bench_snapshots.py: what one synchronous save costs an epoch).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler


def main() -> None:
    run_dir, epochs, size, samples, batch = Path(sys.argv[1]), *map(int, sys.argv[2:6])
    save = len(sys.argv) < 7 or sys.argv[6] != "0"
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from elastictrain.config import from_dict  # the trainer's own data set, so the data path costs the same
    from elastictrain.data import build_datasets

    torch.manual_seed(0)
    model = smp.create_model("Unet", encoder_name="resnet34", encoder_weights=None, classes=4)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    steps_per_epoch = samples // batch
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    dice = smp.losses.DiceLoss(smp.losses.MULTICLASS_MODE, from_logits=True)
    data, _ = build_datasets(from_dict({"data": {"train_samples": samples, "val_samples": batch,
                                                 "image_size": size, "num_classes": 4}}))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(data, batch_size=batch // world, sampler=sampler, num_workers=0, drop_last=True)
    ckpt, start_epoch = run_dir / "plain.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True, map_location="cpu")
        (model.module if distributed else model).load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        start_epoch = state["epoch"]
    log = open(run_dir / "plain.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    first = True
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        model.train()
        for image, mask in loader:
            logits = model(image)
            loss = dice(logits, mask) + F.cross_entropy(logits, mask)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if first and log:
                log.write(json.dumps({"kind": "first_step", "time": time.time()}) + "\n")
                log.flush()
            first = False
        if log:
            log.write(json.dumps({"kind": "last_step", "epoch": epoch + 1, "time": time.time(),
                                  "steps": steps_per_epoch}) + "\n")
            log.flush()
        if rank == 0 and save:
            tmp = ckpt.with_name(".plain.pt.tmp")
            torch.save({"model": (model.module if distributed else model).state_dict(), "optim": opt.state_dict(),
                        "sched": sched.state_dict(), "epoch": epoch + 1}, tmp)
            os.replace(tmp, ckpt)
        if distributed:
            dist.barrier()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

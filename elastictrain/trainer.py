"""The training loop. Policy lives in the components; this file reads top to bottom."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from elastictrain import device as devices
from elastictrain import viz
from elastictrain.config import Config, save_config, to_dict
from elastictrain.data import build_loaders, class_names, sample_order_changes, sample_order_key
from elastictrain.data_wait import DataWait
from elastictrain.dist import DistContext, all_gather_object, all_reduce_sum, any_rank_each, broadcast_object
from elastictrain.errors import UserError
from elastictrain.export import export_model
from elastictrain.estimate import RunEstimate
from elastictrain.faults import FaultInjector
from elastictrain.console import progress
from elastictrain.liveness import Progress
from elastictrain.metrics import MetricsLogger
from elastictrain.summary import write_summary
from elastictrain.model import SegmentationLoss, build_model, confusion_stats, encoder_normalization, scores
from elastictrain.osutil import cores_per_rank, launcher, process_age
from elastictrain.parallelize import grad_sync, resolve_strategy, sync_buffers, wrap
from elastictrain.preemption import Preemption
from elastictrain.snapshot import ResumeInfo, SnapshotManager
from elastictrain.state import TrainState, capture_rng, restore_rng, seed_everything

log = logging.getLogger(__name__)

FINISHED = 0
PREDICTION_SAMPLES = 4
"""Validation samples drawn in RUN_DIR/predictions/epochNNNNN.png (the first ones of the validation set)."""


def batch_geometry(batch_size: int, micro_batch_size: int, world_size: int) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) giving exactly ``batch_size`` samples per optimizer
    step at this world size, so a restart at another world size keeps the same optimization."""
    if batch_size % world_size:
        raise UserError(f"--train.batch_size {batch_size} (global) is not divisible by the world size "
                         f"{world_size}; choose a multiple of {world_size}")
    per_rank = batch_size // world_size
    micro = micro_batch_size or per_rank
    if per_rank % micro:
        raise UserError(f"--train.micro_batch_size {micro} does not divide the per-rank batch {per_rank} "
                         f"(--train.batch_size {batch_size} / world size {world_size})")
    return micro, per_rank // micro


def lr_factor(schedule: str, warmup: int, total: int) -> Any:
    """Multiplier of the peak LR at a given optimizer step: linear warmup, then cosine to 0 or constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress_))

    return factor


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext, preemption: Preemption,
                 progress: Progress | None = None) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.progress = progress or Progress()
        """Step boundaries and phases, which the liveness watchdog reads (liveness.py)."""
        self.run_dir = Path(cfg.run.dir)
        self.state = TrainState(config=to_dict(cfg), world_size=ctx.world_size)
        if cfg.debug.deterministic:
            devices.make_deterministic(ctx.device)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (FSDP2 shards them)
        model = build_model(cfg.model, cfg.data.num_classes)
        self.strategy = resolve_strategy(cfg.dist.strategy, ctx)
        self.amp_dtype = devices.autocast_dtype(ctx.device, cfg.train.precision)
        self.model: nn.Module = wrap(model, self.strategy, ctx, self.amp_dtype)
        seed_everything(cfg.run.seed, ctx.rank)
        self.micro_batch, self.accum = batch_geometry(cfg.train.batch_size, cfg.train.micro_batch_size,
                                                      ctx.world_size)
        self.normalization = encoder_normalization(cfg.model)
        self.class_names = class_names(cfg.data)
        with self.progress.phase_of("data scan"):
            self.loaders = build_loaders(cfg, ctx, self.micro_batch, self.accum, self.normalization)
        self.steps_per_epoch = self.loaders.train_sampler.steps_per_epoch  # >= 1: the sampler checks
        self.state.data_order = sample_order_key(self.loaders.train_set, cfg.run.seed)
        self.data_wait = DataWait(self.loaders.num_workers, cores_per_rank())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr,
                                           weight_decay=cfg.optim.weight_decay)
        total = self.steps_per_epoch * cfg.train.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg.optim.schedule, cfg.optim.warmup_steps, total))
        self.scaler = torch.amp.GradScaler("cuda") if devices.needs_grad_scaler(ctx.device, self.amp_dtype) else None
        self.loss_fn = SegmentationLoss(cfg.data.ignore_index)
        self.faults = FaultInjector(cfg.debug.fault, self.run_dir, ctx.rank)
        self.checkpointer = SnapshotManager(cfg.checkpoint, ctx, self.run_dir, cfg.train.epochs, to_dict(cfg),
                                            prepare=self._prepare_snapshot, faults=self.faults,
                                            on_event=lambda name, step, fields: self.metrics.log(
                                                "event", step, event=name, **fields))
        self.app_state = self.checkpointer.app_state(self.model, self.optimizer, self.scheduler, self.scaler,
                                                     self.state)
        self.metrics = MetricsLogger(cfg, self.run_dir, ctx.rank, ctx.world_size)
        self.preemption = preemption
        self.stepped = False
        """Whether this process has completed a training step."""
        self.estimate = RunEstimate(cfg, ctx.device.type, self.steps_per_epoch,
                                    -(-len(self.loaders.val_loader) // self.accum),
                                    ctx.is_main)
        self.examples: list[viz.Example] = []
        """This validation's prediction samples, gathered on rank 0 (empty elsewhere)."""
        self.weights_config = to_dict(cfg)
        """The config the model's weights were trained with: the restored snapshot's until this process steps."""
        self.data_changed = ""
        """How the sample order changed since a mid-epoch snapshot, which made its epoch start over (resume event)."""

    # ---------- start-up ----------
    def resume(self) -> dict[str, Any] | None:
        """Continue from the latest complete snapshot if there is one; there is no separate resume mode."""
        resumed = self.checkpointer.restore_latest(self.app_state)
        if resumed is not None:
            self._after_restore(resumed)
        self._save_run_config(at_start=True)
        if resumed is None:
            return None
        env = launcher()
        got = resumed.transfer
        log.info("resuming from epoch %d step %d (%ssnapshot %s%s, taken at world size %d, now %d)",
                 resumed.epoch, resumed.step, "local " if resumed.tier == "local" else "", resumed.path,
                 "" if not got else f", copied from rank {got['from_rank']} on host {got['from_host']}"
                 if "from_host" in got else f", completed from the parts on {', '.join(got['from_hosts'])}",
                 resumed.world_size, self.ctx.world_size)
        return {"epoch": resumed.epoch, "step": resumed.step, "sample_offset": self.state.sample_offset,
                "snapshot": str(resumed.path), "tier": resumed.tier, "world_size": self.ctx.world_size,
                "previous_world_size": resumed.world_size, "attempt": env.torchrun_restarts,
                "restart_count": env.slurm_restarts,
                **({"data_changed": self.data_changed} if self.data_changed else {}),
                **({"transfer": resumed.transfer} if resumed.transfer else {})}

    def _save_run_config(self, at_start: bool) -> None:
        """Rank 0: RUN_DIR/config.yaml, what `elastictrain predict` rebuilds the model of final_model.pt from.

        Written only once a start is accepted (a refused one leaves it alone), and then only where it cannot
        come apart from final_model.pt: at start-up when the run has no final model yet, and beside every new
        final model, with the config its weights were trained with. A finished run started again with other
        settings trains nothing, so its final model and config.yaml stay as they were.
        """
        if not self.ctx.is_main or (at_start and (self.run_dir / "final_model.pt").exists()):
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(to_dict(self.cfg) if self.stepped or at_start else self.weights_config,
                    self.run_dir / "config.yaml")

    def _restart_epoch_if_data_changed(self, resumed: ResumeInfo) -> None:
        """A mid-epoch snapshot continues its epoch only in the same sample order. With another seed or other
        data (more or fewer samples, other files) offset k of the new order holds other samples, and the rest
        of the epoch would silently repeat some and skip others; so the epoch starts over in its new order,
        with a warning. Not refused: data that grows while a requeued job runs is normal, and exit 2 would
        end the requeue loop. Every rank decides alike (the key comes from the broadcast scan)."""
        now = sample_order_key(self.loaders.train_set, self.cfg.run.seed)
        # A snapshot from before the key was stored restores none: the current one stays, nothing to compare.
        before, self.state.data_order = self.state.data_order, now
        changed = "; ".join(sample_order_changes(before, now))
        if not changed or self.state.sample_offset == 0:  # at an epoch boundary the next epoch is new anyway
            return
        if self.ctx.is_main:
            log.warning("the training data changed since the snapshot %s, taken %d samples into epoch %d (%s): "
                        "continuing there would repeat some samples and skip others, so epoch %d starts over in "
                        "its new order", resumed.path, self.state.sample_offset, self.state.epoch + 1, changed,
                        self.state.epoch + 1)
        self.data_changed = changed
        self.state.sample_offset = 0

    def _after_restore(self, resumed: ResumeInfo) -> None:
        self.weights_config = resumed.config
        if resumed.config["optim"]["lr"] != self.cfg.optim.lr:
            self.scheduler.base_lrs = [self.cfg.optim.lr for _ in self.scheduler.base_lrs]
        self._restart_epoch_if_data_changed(resumed)
        if self.state.sample_offset % self.loaders.train_sampler.global_batch:
            raise UserError(f"the snapshot {resumed.path} stopped mid-epoch after {self.state.sample_offset} "
                            f"samples, which is not a whole number of --train.batch_size {self.cfg.train.batch_size} "
                            f"batches: finish that epoch with the batch size it had "
                            f"({resumed.config['train']['batch_size']}), then change it")
        rng = self.state.rng
        if self.ctx.rank < len(rng):
            restore_rng(rng[self.ctx.rank], self.ctx.device)
        else:  # a rank that did not exist before: a fresh, distinct stream
            seed_everything(self.cfg.run.seed + 1000 * self.state.step, self.ctx.rank)
        self.state.config = to_dict(self.cfg)

    # ---------- the loop ----------
    def train(self) -> int:
        """Train to ``train.epochs``; returns 0 when finished, ``preemption.exit_code`` when preempted."""
        self.preemption.install()  # no-op when the CLI installed it first; must precede the restore either way
        with self.progress.phase_of("restore"):
            resumed = self.resume()
        run_id = self.metrics.start(self.state.run_id or None, resumed) or self.state.run_id
        # Only rank 0 talks to wandb, but the train state is a replicated snapshot entry: every rank holds its id.
        self.state.run_id = broadcast_object(self.ctx, run_id)
        self.faults.maybe_fire("start", 0)
        self.progress.enter("step")
        for epoch in range(self.state.epoch, self.cfg.train.epochs):
            if not self.train_epoch(epoch):
                return self.stop_for_preemption()
            with self.progress.phase_of("validation"):
                val = self.validate()
            self.end_epoch(epoch, val)
        with self.progress.phase_of("snapshot"):
            self.checkpointer.finish()  # waits for every snapshot, then removes the local tier
        with self.progress.phase_of("export"):
            self.finish()
        return FINISHED

    def train_epoch(self, epoch: int) -> bool:
        """One epoch from the current sample offset; False when preemption stopped it at a step boundary."""
        self.model.train()
        loader = self.loaders.train_loader(epoch, self.state.sample_offset)
        remaining = self.steps_per_epoch - self.state.sample_offset // self.loaders.train_sampler.global_batch
        losses: list[float] = []
        steps = self.data_wait.timed(self._steps(loader))  # times each wait for the next step's batches
        for batches in progress(steps, remaining, f"epoch {epoch + 1}", self.cfg, self.ctx.rank):
            self.progress.beat()  # progress the watchdog sees; no collective, no store call on this thread
            # The one collective of a step boundary: a preemption signal, a mid-epoch snapshot due by any
            # rank's clock, or a loss that is no longer finite on any rank means every rank acts on it.
            stop, snapshot, local, no_room, diverged = any_rank_each(
                self.ctx, self.preemption.requested is not None, self.checkpointer.wants_snapshot(self.state),
                *self.checkpointer.wants_local_snapshot(self.state), bool(losses) and not math.isfinite(losses[-1]))
            if diverged:  # before any snapshot of the wrecked weights, a preemption's included
                self._diverged()
            if stop:
                return False
            if snapshot:
                with self.progress.phase_of("snapshot"):
                    self.checkpointer.save_mid_epoch(self.app_state, self.state)
            elif local:
                with self.progress.phase_of("snapshot"):
                    self.checkpointer.save_local(self.app_state, self.state, no_room)
            losses.append(self.train_step(batches))
            self.state.step += 1
            self.state.sample_offset += self.loaders.train_sampler.global_batch
            if not self.stepped:  # how long start-up (and a restore) took, to the first step done
                self.stepped = True
                self.metrics.log("event", self.state.step, event="first_step", since_start=process_age())
            self.estimate.step_done(self.state.step)
            self.faults.maybe_fire("step", self.state.step)
            if self.state.step % self.cfg.train.log_every == 0:
                self.log_train(losses[-self.cfg.train.log_every:])
        self.epoch_train_loss = self._finite_mean(losses)
        return True

    def _steps(self, loader: Any) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Group micro-batches into optimizer steps."""
        group: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in loader:
            group.append(batch)
            if len(group) == self.accum:
                yield group
                group = []

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Forward/backward over the micro-batches of one optimizer step, then clip and step."""
        total = 0.0
        for i, (image, mask) in enumerate(batches):
            # non_blocking: from pinned memory (CUDA) the copy overlaps; elsewhere it is an ordinary copy.
            image, mask = image.to(self.ctx.device, non_blocking=True), mask.to(self.ctx.device, non_blocking=True)
            # Gradients are reduced across ranks only on the last micro-batch of the step.
            with grad_sync(self.model, enabled=i == len(batches) - 1):
                with devices.autocast(self.ctx.device, self.amp_dtype):
                    loss = self.loss_fn(self.model(image), mask) / len(batches)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.checkpointer.before_optimizer_step()  # a snapshot being staged must have copied what changes now
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.checkpointer.after_optimizer_step()  # the local snapshot of this step's start is committed now
        return total

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss, IoU and Dice (overall and per class) over the whole validation set, summed across
        ranks; the fixed prediction samples are gathered on rank 0 on the way."""
        started = time.monotonic()
        self.faults.maybe_fire("validate", self.state.step)
        self.model.eval()
        stats = torch.zeros(4, self.cfg.data.num_classes, dtype=torch.long)
        loss_sum = torch.zeros(2, dtype=torch.float64)
        examples = viz.ExampleCollector(self.ctx.rank, self.ctx.world_size, PREDICTION_SAMPLES, self.normalization)
        for image, mask in self._val_batches():
            image = image.to(self.ctx.device)
            with devices.autocast(self.ctx.device, self.amp_dtype):
                logits = self.model(image)
            if mask is None:
                continue  # a blank forward that only keeps FSDP2 ranks in step
            mask = mask.to(self.ctx.device)
            loss_sum += torch.tensor([self.loss_fn(logits, mask).item() * len(image), len(image)], dtype=torch.float64)
            stats += confusion_stats(logits, mask, self.cfg.data.num_classes, self.cfg.data.ignore_index).cpu()
            examples.add(image, logits, mask)
        stats, loss_sum = all_reduce_sum(self.ctx, stats), all_reduce_sum(self.ctx, loss_sum)
        gathered = all_gather_object(self.ctx, examples.examples)
        self.examples = [e for part in gathered for e in part] if self.ctx.is_main else []
        self.estimate.validated(self.state.step, time.monotonic() - started)
        return {"val_loss": float(loss_sum[0] / loss_sum[1]), **scores(stats, self.class_names)}

    def _val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """This rank's validation batches, then under FSDP2 blank ones (mask None) up to the largest shard's
        batch count: every FSDP2 forward all-gathers parameters with every rank, and shards differ by up to
        one sample. The count is agreed before the first forward, since agreeing is itself a collective;
        eval mode leaves batch-norm buffers untouched by the blanks."""
        loader = self.loaders.val_loader
        blanks = max(all_gather_object(self.ctx, len(loader))) - len(loader) if self.strategy == "fsdp" else 0
        yield from loader
        size = self.cfg.data.image_size
        for _ in range(blanks):
            yield torch.zeros(1, self.cfg.model.in_channels, size, size), None

    def end_epoch(self, epoch: int, val: dict[str, float]) -> None:
        self.state.epoch = epoch + 1
        self.state.sample_offset = 0
        record = {"epoch": self.state.epoch, "step": self.state.step, "train_loss": self.epoch_train_loss, **val}
        self.state.history.append(record)
        self.metrics.log("val", **record, world_size=self.ctx.world_size)
        log.info("epoch %d/%d step %d: train loss %.4f, val loss %.4f, IoU %.4f", self.state.epoch,
                 self.cfg.train.epochs, self.state.step, self.epoch_train_loss, val["val_loss"], val["iou"])
        log.info("per class IoU / Dice: %s", ", ".join(
            f"{name} {_fmt(val[f'iou/{name}'])} / {_fmt(val[f'dice/{name}'])}" for name in self.class_names))
        self._show_predictions(val)
        with self.progress.phase_of("snapshot"):
            self.checkpointer.maybe_save(self.app_state, self.state, val["val_loss"])

    def _show_predictions(self, val: dict[str, Any]) -> None:
        """Rank 0: the fixed validation samples with truth and prediction, as a PNG and in wandb."""
        if not self.examples:
            return
        title = (f"{self.run_dir.name}: epoch {self.state.epoch}, step {self.state.step}, "
                 f"val IoU {val['iou']:.3f}, val loss {val['val_loss']:.3f}")
        path = self.run_dir / "predictions" / f"epoch{self.state.epoch:05d}.png"
        try:
            viz.write_prediction_grid(self.examples, path, self.class_names, self.cfg.data.ignore_index, title)
        except OSError as e:  # a picture must never take the training job down (e.g. a full disk)
            log.warning("could not write %s: %s", path, e)
        self.metrics.log_predictions(self.state.step, self.examples, self.class_names, self.cfg.data.ignore_index)

    def log_train(self, recent: list[float]) -> None:
        loss = self._mean_across_ranks(recent)
        data_wait = self.data_wait.share()  # this rank's; rank 0's is the one logged
        self.metrics.log("train", self.state.step, epoch=self.state.epoch, loss=loss,
                         lr=self.scheduler.get_last_lr()[0],
                         sample_offset=self.state.sample_offset, world_size=self.ctx.world_size,
                         data_wait=round(data_wait, 4), **devices.memory_peaks(self.ctx.device))
        if self.ctx.is_main:
            self.data_wait.advise(data_wait)

    def _mean_across_ranks(self, values: list[float]) -> float:
        t = all_reduce_sum(self.ctx, torch.tensor([sum(values), len(values)], dtype=torch.float64))
        return float(t[0] / max(1.0, float(t[1])))

    def _finite_mean(self, losses: list[float]) -> float:
        """The epoch's mean loss across ranks, which also checks its last step (no step boundary follows it):
        a NaN on any rank makes the all-reduced sum NaN on every rank, so all ranks stop together."""
        loss = self._mean_across_ranks(losses)
        if not math.isfinite(loss):
            self._diverged()
        return loss

    def _diverged(self) -> None:
        """Stop a run whose loss is NaN or inf (checked on every rank at once, in the step boundary's one
        collective and at the epoch's end) before anything snapshots the weights it wrecked."""
        raise UserError(f"training diverged: the loss is not finite at step {self.state.step} (epoch "
                        f"{self.state.epoch + 1}); nothing was snapshotted after the last finite loss. Lower "
                        f"--optim.lr ({self.cfg.optim.lr}), keep --optim.grad_clip on, or check the data")

    def _prepare_snapshot(self) -> None:
        """Make replicated state identical on every rank and gather per-rank RNG states."""
        sync_buffers(self.model, self.ctx.distributed)
        self.state.world_size = self.ctx.world_size
        self.state.rng = all_gather_object(self.ctx, capture_rng(self.ctx.device))

    # ---------- the end ----------
    def stop_for_preemption(self) -> int:
        """Snapshot at this step boundary (after the one in flight), then exit with the documented code."""
        deadline = self.preemption.start_deadline()
        log.warning("preemption requested (%s): snapshot at epoch %d step %d, then exit %d",
                    self.preemption.requested or "a signal on another rank", self.state.epoch, self.state.step,
                    self.cfg.preemption.exit_code)
        with self.progress.phase_of("snapshot"):
            name = self.checkpointer.save_now(self.app_state, self.state)  # a no-op where it holds this step already
        deadline.cancel()
        self.metrics.log("event", self.state.step, event="preempted", epoch=self.state.epoch, snapshot=name or "",
                         signal=self.preemption.requested or "", world_size=self.ctx.world_size,
                         exit_code=self.cfg.preemption.exit_code)
        self.preemption.answered()
        return self.cfg.preemption.exit_code

    def finish(self) -> None:
        path = self.run_dir / "final_model.pt"
        export_model(self.model, path, self.ctx)
        self._save_run_config(at_start=False)
        best = self.state.best_snapshot
        summary = {"epochs": self.state.epoch, "steps": self.state.step, "best_val_loss": self.state.best_val_loss,
                   "final_model": str(path), "best_snapshot": str(self.checkpointer.root / best) if best else "",
                   "snapshot_blocked_seconds": self.checkpointer.blocked_seconds,
                   "local_snapshot_blocked_seconds": list(self.checkpointer.local_blocked_seconds),
                   "local_snapshot_part_seconds": list(self.checkpointer.local_part_seconds)}
        self.metrics.log("event", self.state.step, event="finished", epoch=self.state.epoch)
        self.preemption.answered()
        if self.ctx.is_main:
            self.metrics.close(write_summary(self.run_dir, summary))  # the summary lands in wandb's too

    def close(self) -> None:
        self.preemption.uninstall(keep_if_answered=True)
        with contextlib.suppress(Exception):
            self.checkpointer.close(timeout=5.0)
        self.metrics.close()
        self.preemption.end_if_unanswered()
        # The process ends next. Interpreter shutdown would walk the whole heap of torch objects with the
        # cyclic GC, 3.7-4.2 s on the loaded 2-core CI machine (0.4-0.8 s frozen), while torchrun waits to
        # restart the group; the OS frees it all anyway.
        gc.freeze()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"

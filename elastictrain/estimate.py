"""The first minutes: how long will this run take, and on CPU, when that is hours, what to run instead.

The first optimizer step of a process pays for start-up (DataLoader workers, allocator, lazy init), so the
estimate times the next ``MEASURED_STEPS`` steps and logs once; the first validation then refines it with
every step timed since and the measured validation time (the first steps after start-up run slower than
the rest: 4.6 s against 1.1-2.5 s on configs/quick.yaml here). Only rank 0 logs; the clock never enters a
collective.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time

from elastictrain.config import Config
from elastictrain.console import duration

log = logging.getLogger(__name__)

MEASURED_STEPS = 2
LONG_ON_CPU_S = 30 * 60
"""A CPU run longer than this gets the command for a short run with its estimate."""
SHORT_RUN_S = 10 * 60
"""What the suggested short run aims at."""


def short_run_command(cfg: Config, seconds_per_epoch: float, argv: list[str] | None = None) -> str:
    """A command that shows training working in minutes: configs/quick.yaml for the generated data, else
    the user's own command at half the image side (about a quarter of the time per step) and fewer epochs."""
    if cfg.data.source == "generated":
        return "python -m elastictrain --config configs/quick.yaml --run.dir runs/quick"
    size = max(2 ** cfg.model.encoder_depth, cfg.data.image_size // 2 // 2 ** cfg.model.encoder_depth
               * 2 ** cfg.model.encoder_depth)
    per_epoch = seconds_per_epoch * (size / cfg.data.image_size) ** 2
    epochs = max(1, min(cfg.train.epochs, int(SHORT_RUN_S // max(per_epoch, 1e-9))))
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", "elastictrain", *args, "--data.image_size", str(size),
                       "--train.epochs", str(epochs), "--run.dir", f"{cfg.run.dir.rstrip('/')}-short"])


def estimate_message(cfg: Config, device_type: str, seconds: float, detail: str, seconds_per_epoch: float) -> str:
    """The line to log: the estimate, and on CPU when it is long, the command for a short run."""
    line = f"estimate: about {duration(seconds)} to finish ({detail})"
    if device_type == "cpu" and seconds > LONG_ON_CPU_S:
        line += (f". That is long on CPU; to see training work in a few minutes first, run "
                 f"{short_run_command(cfg, seconds_per_epoch)}")
    return line


class RunEstimate:
    """Call :meth:`step_done` after each optimizer step and :meth:`validated` after each validation."""

    def __init__(self, cfg: Config, device_type: str, steps_per_epoch: int, val_batches: int,
                 is_main: bool) -> None:
        self.cfg, self.device_type, self.is_main = cfg, device_type, is_main
        self.steps_per_epoch, self.val_batches = steps_per_epoch, val_batches
        self.total_steps = steps_per_epoch * cfg.train.epochs
        self._steps = 0
        self._clock: float | None = None
        self.seconds_per_step: float | None = None
        self._refined = False

    def step_done(self, step: int) -> None:
        if not self.is_main or self._refined:
            return
        now = time.monotonic()
        self._steps += 1
        if self._clock is None:
            self._clock = now  # the first step of this process ends here; the measured ones start
            return
        if self.seconds_per_step is not None or (self._steps <= MEASURED_STEPS and step < self.total_steps):
            return
        self.seconds_per_step = (now - self._clock) / (self._steps - 1)
        left = self.total_steps - step
        # A validation batch is a forward pass only: roughly a third of a training step's work.
        val = self.val_batches * self.seconds_per_step / 3 * self._epochs_left(step)
        detail = (f"{self.seconds_per_step:.2f} s per step x {left} steps left, plus about {duration(val)} of "
                  f"validation; measured on steps {step - self._steps + 2}-{step}")
        log.info(estimate_message(self.cfg, self.device_type, left * self.seconds_per_step + val, detail,
                                  self.steps_per_epoch * self.seconds_per_step * 4 / 3))

    def validated(self, step: int, val_seconds: float) -> None:
        """After the first validation of this process, estimate again with the validation time measured."""
        if not self.is_main or self._refined or self.seconds_per_step is None or self._clock is None:
            return
        self._refined = True
        epochs_left = self._epochs_left(step)
        if epochs_left == 0:
            return
        per_step = (time.monotonic() - val_seconds - self._clock) / (self._steps - 1)
        per_epoch = self.steps_per_epoch * per_step + val_seconds
        detail = (f"{epochs_left} epoch(s) left at {duration(per_epoch)} each: "
                  f"{self.steps_per_epoch} steps + {val_seconds:.1f} s of validation")
        log.info(estimate_message(self.cfg, self.device_type, epochs_left * per_epoch, detail, per_epoch))

    def _epochs_left(self, step: int) -> int:
        return max(0, self.cfg.train.epochs - step // self.steps_per_epoch)

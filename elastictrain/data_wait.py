"""How long the training loop waits for data: the share of each logging window spent in ``next(loader)``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
LARGE_SHARE = 0.25
"""A window where the loop waits this share of the time or more gets the one-time advice."""


class DataWait:
    """Times the loop's waits for its next batch and reports them per logging window.

    Args:
        num_workers: The loader workers per rank now (for the advice).
        cores: The cores per rank (for the advice).
    """

    def __init__(self, num_workers: int, cores: int) -> None:
        self.num_workers, self.cores = num_workers, cores
        self.waited = 0.0
        self.window_start = time.perf_counter()
        self.windows = 0
        self.advised = False

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """``batches``, adding the time each ``next`` takes to the current window. A new epoch starts a new
        window: the validation between epochs is neither step nor wait."""
        self.waited, self.window_start = 0.0, time.perf_counter()
        iterator = iter(batches)
        while True:
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - started
            yield item

    def share(self) -> float:
        """The share of the time since the last call (or the epoch's start) spent waiting; starts a new window."""
        now = time.perf_counter()
        share = self.waited / max(now - self.window_start, 1e-9)
        self.waited, self.window_start = 0.0, now
        self.windows += 1
        return min(1.0, share)

    def advise(self, share: float) -> None:
        """Say once, when a window (not this process's first: it holds the workers' start) waited a large share."""
        if self.advised or self.windows < 2 or share < LARGE_SHARE:
            return
        self.advised = True
        if self.num_workers < self.cores:
            fix = f"raise --data.num_workers (now {self.num_workers}; {self.cores} cores per rank)"
        else:
            fix = (f"--data.num_workers {self.num_workers} already uses the {self.cores} cores per rank: lower "
                   "--data.image_size, store the images smaller, or give each rank more cores")
        log.warning("data loading takes %.0f%% of each step: %s", 100 * share, fix)

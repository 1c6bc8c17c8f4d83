"""The worker's error file for torchrun (``TORCHELASTIC_ERROR_FILE``), written whole or not at all.

torch's ``@record`` writes it with its ErrorHandler, which opens the file for writing and then
``json.dump``s into it. A rank that exits between the two (our liveness watchdog, the launcher lifeline
and the preemption deadline all ``os._exit`` from another thread) leaves an empty file, and torchrun's agent
then dies on it with a JSONDecodeError instead of restarting the workers (seen in CI: the stalled-worker test
in tests/test_liveness.py). Written beside it and renamed into place, the file is either absent (torchrun
reports the exit code) or complete.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

from elastictrain.osutil import write_atomic

R = TypeVar("R")


class AtomicErrorHandler(ErrorHandler):
    """torch's ErrorHandler with the same JSON, replaced atomically."""

    def record_exception(self, e: BaseException) -> None:
        file = self._get_error_file_path()
        if not file:
            return
        data = {
            "message": {
                "message": f"{type(e).__name__}: {e}",
                "extraInfo": {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))},
            }
        }
        write_atomic(Path(file), json.dumps(data))


def record_atomically(fn: Callable[..., R]) -> Callable[..., R]:
    """torch's ``@record`` with :class:`AtomicErrorHandler`."""
    return record(fn, error_handler=AtomicErrorHandler())

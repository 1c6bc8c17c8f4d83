"""A snapshot's engine write, fingerprints and checksums in a process of its own, beside the rank that trains.

A write in a thread of the training process shares its GIL: a training step beside DCP's write took 2.2x its
time alone here, beside torchsnapshot's more (bench/profile_local_snapshot.py --beside-process); beside the
same write in a process at nice 19, 1.2x. So at world size 1 on CPU the saver stages the state into buffers
in shared memory (allocated once, :class:`SharedStager`), hands them to this process once, and then each job
says "write the staged state into PATH": the process has the engine write it, fingerprints every entry
(proof.local_record) and checksums every file (SHA-256, fsynced), and answers; the saver's writer thread only
waits for the answer (releasing the GIL) and commits as before.

The process is started once, early (its import of torch takes seconds), at the lowest CPU and idle I/O
priority (writer.lower_priority), and dies with its rank (parent-death signal; it exits when its pipe
closes). Killed alone, the snapshot it was writing is lost (:class:`EngineProcessDied`): the saver removes
its debris and the next snapshot starts a new process (from the training thread: see ensure_started).

Why world size 1 without a process group only: the engines' writes are collectives over the process group
(torchsnapshot's Snapshot.take, DCP's save), so writer processes of several ranks would need a process group
of their own; torchrun's ranks (DDP, FSDP2's DTensors, even one of them) keep the writer thread.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from elastictrain.snapshot.engines import StateDicts

log = logging.getLogger(__name__)


class EngineProcessDied(RuntimeError):
    """The engine process died (killed alone, or out of memory) before answering: its snapshot is lost."""


class SharedStager:
    """Copies the state into CPU buffers in shared memory, allocated on the first snapshot and reused as long
    as the state's tensors keep their shapes and dtypes (new ones otherwise). The copy runs on a thread of its
    own when ``background`` (the result is then a Future), as DefaultStager's async staging does."""

    def __init__(self, background: bool) -> None:
        self._buffers: list[torch.Tensor] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stage") if background else None

    def stage(self, live: StateDicts) -> StateDicts | Future:
        if self._pool is not None:
            return self._pool.submit(self._copy, live)
        return self._copy(live)

    def _copy(self, live: StateDicts) -> StateDicts:
        skeleton, tensors = split(live)
        if [(t.shape, t.dtype) for t in tensors] != [(b.shape, b.dtype) for b in self._buffers]:
            self._buffers = [torch.empty_like(t, device="cpu").share_memory_() for t in tensors]
        with torch.no_grad():
            for buffer, tensor in zip(self._buffers, tensors):
                buffer.copy_(tensor.detach())
        return join(skeleton, self._buffers)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._buffers = []


class EngineProcess:
    """The training side's handle on one engine process (see the module doc)."""

    def __init__(self, engine_name: str) -> None:
        self.engine_name = engine_name
        self._proc: Any = None
        self._conn: Any = None
        self._sent: list[torch.Tensor] = []
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ensure_started(self) -> None:
        """Start the process unless it runs (it imports torch in the background while training goes on).
        Only from the training thread: Linux's parent-death signal fires when the *thread* that started the
        process ends, and the writer threads end after every snapshot."""
        if self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                self._death()
            self.start()

    def start(self) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(self.engine_name, child, os.getpid()),
                                 name="snapshot-engine", daemon=True)
        self._proc.start()
        child.close()
        self._sent = []
        log.debug("snapshot engine process started (pid %d, %s)", self._proc.pid, self.engine_name)

    def write(self, path: Path, staged: StateDicts, fault: str | None) -> dict[str, Any]:
        """Have the process write ``staged`` (tensors in shared memory) into ``path``; its answer: the entry
        fingerprints (``complete``, ``partial``), the files' ``size`` and ``sha256``, the seconds of each
        part. Raise EngineProcessDied when it died, RuntimeError with its message when the write failed."""
        with self._lock:
            if self._proc is None:
                raise EngineProcessDied("the snapshot engine process was not running")
            skeleton, tensors = split(staged)
            # The shared buffers go over once (file descriptors); later jobs name them by position.
            new = len(tensors) != len(self._sent) or any(a is not b for a, b in zip(tensors, self._sent))
            try:
                self._conn.send({"path": str(path), "skeleton": skeleton, "tensors": tensors if new else None,
                                 "fault": fault})
                self._sent = tensors
                answer = self._conn.recv()  # releases the GIL while it waits
            except (EOFError, OSError, BrokenPipeError):
                raise EngineProcessDied(self._death()) from None
            if "error" in answer:  # with its errno: a full disk is the user's error (saver.py)
                raise OSError(answer["errno"], answer["error"]) if answer["errno"] else RuntimeError(answer["error"])
            return answer

    def _death(self) -> str:
        self._proc.join(5)
        code = self._proc.exitcode
        self._proc, self._sent = None, []
        if code is not None and code < 0:
            return f"the snapshot engine process died (signal {signal.Signals(-code).name})"
        return f"the snapshot engine process died (exit code {code})"

    def close(self) -> None:
        """Close its pipe (it exits) and reap it; a process still writing is killed after a few seconds."""
        if self._proc is None:
            return
        self._conn.close()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._proc = None


def _serve(engine_name: str, conn: Any, parent: int) -> None:
    """The process: one job at a time until the pipe closes."""
    from elastictrain.dist import world_of_one
    from elastictrain.snapshot import manifest, proof
    from elastictrain.snapshot.engines import build_engine
    from elastictrain.snapshot.writer import die_with_parent, lower_priority

    die_with_parent(parent)
    lower_priority()
    torch.set_num_threads(1)
    engine, ctx, tensors = build_engine(engine_name), world_of_one(), []
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job["tensors"] is not None:
            tensors = job["tensors"]
        path = Path(job["path"])
        try:
            staged = join(job["skeleton"], tensors)
            parts, lap = {}, time.perf_counter()
            engine.write(path, staged, ctx)
            parts["engine"], lap = time.perf_counter() - lap, time.perf_counter()
            if job["fault"] == "sigkill":  # test-only (--debug.fault sigkill@engine=N): killed mid-snapshot
                os.kill(os.getpid(), signal.SIGKILL)
            complete, partial = proof.local_record(staged)
            parts["fingerprints"], lap = time.perf_counter() - lap, time.perf_counter()
            files = manifest.checksum_files(path)
            parts["checksums"] = time.perf_counter() - lap
            conn.send({"complete": complete, "partial": partial, "files": files,
                       "parts": {k: round(v, 4) for k, v in parts.items()}})
        except BaseException as e:  # noqa: BLE001 - answered, raised by the saver (DCP's CheckpointException
            # is a BaseException: a process that ended on it would pass for one killed alone, a full disk unseen)
            conn.send({"error": f"{type(e).__name__}: {e}", "errno": getattr(e, "errno", None)})


class _Slot:
    """Where the i-th tensor goes back into a skeleton."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i

    def __reduce__(self) -> tuple[Any, ...]:
        return _Slot, (self.i,)


def split(tree: Any) -> tuple[Any, list[torch.Tensor]]:
    """``tree`` with every tensor replaced by a slot, and the tensors in slot order."""
    tensors: list[torch.Tensor] = []

    def walk(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            tensors.append(node)
            return _Slot(len(tensors) - 1)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, tuple) and not hasattr(node, "_fields"):
            return tuple(walk(v) for v in node)
        return node

    return walk(tree), tensors


def join(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of :func:`split`."""
    if isinstance(skeleton, _Slot):
        return tensors[skeleton.i]
    if isinstance(skeleton, dict):
        return {k: join(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple) and not hasattr(skeleton, "_fields"):
        return tuple(join(v, tensors) for v in skeleton)
    return skeleton

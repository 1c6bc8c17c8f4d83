"""A snapshot's engine write, fingerprints and checksums in a process of its own, beside the rank that trains.

A write in a thread of the training process shares its GIL: a training step beside DCP's write took 2.2x its
time alone here, beside torchsnapshot's more (bench/profile_local_snapshot.py --beside-process); beside the
same write in a process at nice 19, 1.2x. So at world size 1 on CPU the saver stages the state into buffers
in shared memory (allocated once, :class:`SharedStager`), hands them to this process once, and then each job
says "write the staged state into PATH": the process has the engine write it, fingerprints every entry
(proof.local_record) and checksums every file (SHA-256, fsynced), and answers; the saver's writer thread only
waits for the answer (releasing the GIL) and commits as before.

The process is started once, early (its import of torch takes seconds), in the idle I/O class and, where
the node has a core to spare beside each rank, at the lowest CPU priority (writer.lower_priority: without
a spare core it starved at nice 19, and snapshots waited for it), and dies with its rank (parent-death
signal; it exits when its pipe closes). It ignores the preemption signals, which SLURM sends every process
of the job and torchrun the rank's process group: they are its rank's to handle (writer.signals_held). Killed alone, the snapshot it was writing is lost (:class:`EngineProcessDied`): the saver removes
its debris and the next snapshot starts a new process (from the training thread: see ensure_started).

Several ranks (torchrun, on CPU): the engines' writes are collectives (torchsnapshot's Snapshot.take, DCP's
save), so the ranks' engine processes form a gloo process group of their own (:class:`EngineGroup`), met
through the job's store (MASTER_ADDR, MASTER_PORT) under a prefix of their own. FSDP2's DTensors travel as
their local shards and are rebuilt there on a device mesh of the same shape over that group. One rank's
engine process dying loses that snapshot on every rank (the saver agrees on it), and every rank then starts
a new one, in a new group (a new generation of the prefix).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import torch

from elastictrain.snapshot.engines import StateDicts

log = logging.getLogger(__name__)


class EngineGroup(NamedTuple):
    """How the engine processes of several ranks meet: the job's store, a prefix of their own in it."""

    host: str
    port: int
    prefix: str
    rank: int
    world_size: int
    timeout_s: float


class EngineProcessDied(RuntimeError):
    """The engine process died (killed alone, or out of memory) before answering: its snapshot is lost."""


class Staged(NamedTuple):
    """A staged state as the engine process gets it: its skeleton (:func:`split`) and the shared buffers."""

    skeleton: Any
    tensors: list[torch.Tensor]


class SharedStager:
    """Copies the state into CPU buffers in shared memory, allocated on the first snapshot and reused as long
    as the state's tensors keep their shapes and dtypes (new ones otherwise). The copy runs on a thread of its
    own when ``background`` (the result is then a Future), as DefaultStager's async staging does."""

    def __init__(self, background: bool) -> None:
        self._buffers: list[torch.Tensor] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stage") if background else None

    def stage(self, live: StateDicts) -> Staged | Future:
        if self._pool is not None:
            return self._pool.submit(self._copy, live)
        return self._copy(live)

    def _copy(self, live: StateDicts) -> Staged:
        skeleton, tensors = split(live)
        if [(t.shape, t.dtype) for t in tensors] != [(b.shape, b.dtype) for b in self._buffers]:
            self._buffers = [torch.empty_like(t, device="cpu").share_memory_() for t in tensors]
        with torch.no_grad():
            for buffer, tensor in zip(self._buffers, tensors):
                buffer.copy_(tensor.detach())
        return Staged(skeleton, self._buffers)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._buffers = []


class EngineProcess:
    """The training side's handle on one engine process (see the module doc)."""

    def __init__(self, engine_name: str, group: EngineGroup | None = None) -> None:
        self.engine_name = engine_name
        self.group = group
        self.generation = 0
        """Of the engine processes' group: every rank starts a new one together after a death (restart)."""
        self._proc: Any = None
        self._conn: Any = None
        self._sent: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._ready = False
        """It said it is ready (imported torch, joined its group)."""
        self.ready_everywhere = False
        """Every rank's engine process is ready (the saver's agreement; reset by a start)."""

    @property
    def ready(self) -> bool:
        """Whether the process has started up (it says so once; training thread, between snapshots)."""
        if not self._ready and self._proc is not None:
            try:
                if self._conn.poll():
                    self._ready = bool(self._conn.recv().get("ready"))
            except (EOFError, OSError):
                return False  # it died: the next write finds out
        return self._ready

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the process has started up (or died, or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while not self.ready and self._proc is not None and self._proc.is_alive() and time.monotonic() < deadline:
            self._conn.poll(0.1)

    def ensure_started(self) -> None:
        """Start the process unless it runs (it imports torch in the background while training goes on).
        Only from the training thread: Linux's parent-death signal fires when the *thread* that started the
        process ends, and the writer threads end after every snapshot. In a group, only the first time: one
        rank alone cannot join its peers' group; a death there is found by the next write (restart)."""
        if self.group is not None and self._proc is not None:
            return
        if self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                self._death()
            self.start()

    def restart(self) -> None:
        """Every rank of a group together (training thread): end this rank's process, start the next
        generation's."""
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()  # it may wait in its group's collective for the one that died
            self._proc.join(5)
        self._proc, self._sent = None, []
        self.generation += 1
        self.start()

    def start(self) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        group = self.group._replace(prefix=f"{self.group.prefix}/{self.generation}") if self.group else None
        from multiprocessing import resource_tracker

        from elastictrain.snapshot.writer import signals_held, spare_cores

        # Spawning starts multiprocessing's resource tracker the first time, and that unblocks SIGINT and
        # SIGTERM on this thread (CPython 3.11: SIG_UNBLOCK, not the mask it found): start it first.
        resource_tracker.ensure_running()
        nice = spare_cores(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self._ready = self.ready_everywhere = False
        self._proc = ctx.Process(target=_serve, args=(self.engine_name, child, os.getpid(), group, nice),
                                 name="snapshot-engine", daemon=True)
        with signals_held():
            self._proc.start()
        child.close()
        self._sent = []
        log.debug("snapshot engine process started (pid %d, %s)", self._proc.pid, self.engine_name)

    def write(self, path: Path, staged: Staged, fault: str | None) -> dict[str, Any]:
        """Have the process write ``staged`` (tensors in shared memory) into ``path``; its answer: the entry
        fingerprints (``complete``, ``partial``), the files' ``size`` and ``sha256``, the seconds of each
        part. Raise EngineProcessDied when it died, RuntimeError with its message when the write failed."""
        with self._lock:
            if self._proc is None:
                raise EngineProcessDied("the snapshot engine process was not running")
            skeleton, tensors = staged
            try:
                while not self._ready:  # its start-up message first
                    self._ready = bool(self._conn.recv().get("ready"))
            except (EOFError, OSError):
                raise EngineProcessDied(self._death()) from None
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


def _serve(engine_name: str, conn: Any, parent: int, group: EngineGroup | None = None, nice: bool = True) -> None:
    """The process: one job at a time until the pipe closes."""
    from elastictrain.dist import DistContext, world_of_one
    from elastictrain.snapshot import manifest, proof
    from elastictrain.snapshot.engines import build_engine
    from elastictrain.snapshot.writer import die_with_parent, ignore_preemption_signals, lower_priority

    ignore_preemption_signals()
    die_with_parent(parent)
    lower_priority(cpu=nice)
    torch.set_num_threads(1)
    engine, ctx, tensors = build_engine(engine_name), world_of_one(), []
    if group is not None:  # the ranks' engine processes meet in the job's store (see the module doc)
        import torch.distributed as dist

        timeout = timedelta(seconds=group.timeout_s)
        store = dist.PrefixStore(group.prefix, dist.TCPStore(group.host, group.port, is_master=False,
                                                             timeout=timeout))
        dist.init_process_group("gloo", store=store, rank=group.rank, world_size=group.world_size,
                                timeout=timeout)
        ctx = DistContext(group.rank, group.world_size, 0, torch.device("cpu"), "gloo")
    try:
        conn.send({"ready": True})
    except OSError:  # its rank ended before it had started up (a short run, a start-up error)
        return
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


class _DSlot:
    """Where the i-th tensor goes back as the local shard of a DTensor: its mesh (on the training side; in the
    engine process one of the same shape over the engine processes' group), placements, shape and stride."""

    __slots__ = ("i", "mesh", "mesh_shape", "dim_names", "placements", "shape", "stride")

    def __init__(self, i: int, mesh: Any, mesh_shape: tuple[int, ...], dim_names: tuple[str, ...] | None,
                 placements: tuple[Any, ...], shape: torch.Size, stride: tuple[int, ...]) -> None:
        self.i, self.mesh, self.mesh_shape, self.dim_names = i, mesh, mesh_shape, dim_names
        self.placements, self.shape, self.stride = placements, shape, stride

    def __reduce__(self) -> tuple[Any, ...]:  # the mesh stays behind: it belongs to the training group
        return _DSlot, (self.i, None, self.mesh_shape, self.dim_names, self.placements, self.shape, self.stride)


_meshes: dict[tuple[Any, ...], Any] = {}


def _engine_mesh(shape: tuple[int, ...], names: tuple[str, ...] | None) -> Any:
    """A CPU device mesh of ``shape`` over the engine processes' group (ranks laid out as init_device_mesh
    lays out the training ranks), made once."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (shape, names)
    if key not in _meshes:
        _meshes[key] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return _meshes[key]


def split(tree: Any) -> tuple[Any, list[torch.Tensor]]:
    """``tree`` with every tensor replaced by a slot (a DTensor: its local shard), and the tensors in slot
    order."""
    from torch.distributed.tensor import DTensor

    tensors: list[torch.Tensor] = []

    def walk(node: Any) -> Any:
        if isinstance(node, DTensor):
            mesh = node.device_mesh
            tensors.append(node.to_local())
            return _DSlot(len(tensors) - 1, mesh, tuple(mesh.shape), mesh.mesh_dim_names, tuple(node.placements),
                          node.shape, node.stride())
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
    if isinstance(skeleton, _DSlot):
        from torch.distributed.tensor import DTensor

        mesh = skeleton.mesh if skeleton.mesh is not None else _engine_mesh(skeleton.mesh_shape, skeleton.dim_names)
        return DTensor.from_local(tensors[skeleton.i], mesh, skeleton.placements, run_check=False,
                                  shape=skeleton.shape, stride=skeleton.stride)
    if isinstance(skeleton, dict):
        return {k: join(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple) and not hasattr(skeleton, "_fields"):
        return tuple(join(v, tensors) for v in skeleton)
    return skeleton

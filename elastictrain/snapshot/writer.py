"""The durable writer: a separate process that makes the durable copy of a committed local snapshot.

The training process (rank 0) starts it once (:class:`WriterProcess`) and hands it one job at a time, a JSON
line on its stdin: copy local snapshot SRC to DST in the run directory with the commit record RECORD. The
writer copies every file the local commit record lists, hashing the bytes it writes and comparing them with
the local record's SHA-256 (the same bytes, or an error naming the file), fsyncs each file and the
directories, then writes COMMIT.json last (temp file, fsync, rename), then BEST.json and retention, exactly
as an in-process commit does. A kill at any moment leaves DST without a commit record: incomplete, never
complete-looking. It answers with one JSON line on its stdout.

It runs at the lowest CPU priority (nice 19) and idle I/O priority, so training steps come first, and dies
with its rank: Linux's parent-death signal SIGKILLs it when the rank dies, and it exits when its stdin
closes. It imports no torch (the package's ``__init__`` is lazy): it starts in a fraction of a second and
holds no model memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from elastictrain.osutil import fsync_dir, write_json_atomic
from elastictrain.snapshot import manifest

_CHUNK = 8 * 2**20
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}
"""ioprio_set's syscall number (glibc has no wrapper)."""
_IOPRIO_IDLE = 3 << 13  # IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT
_PR_SET_PDEATHSIG = 1


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""What SLURM sends every process of a job, torchrun a worker's process group, a terminal its foreground group."""


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Block the preemption signals on this thread while it starts a helper process. The child inherits the
    mask across fork and exec, so such a signal reaching it while it starts up (seconds, for one that imports
    torch) stays pending there instead of killing it in the middle of the rank's preemption snapshot; the
    helper then ignores them for good (:func:`ignore_preemption_signals`). The rank loses none: a signal sent
    to the process meanwhile goes to another thread or waits until this one unblocks it."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_preemption_signals() -> None:
    """In a helper process: the preemption signals are its rank's to handle (it snapshots, then exits, and
    the helper dies with it), as in the DataLoader workers (data.py)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def spare_cores(ranks_here: int) -> bool:
    """Whether this node has a core to spare beside each of its training ranks."""
    return cores() >= 2 * ranks_here


def lower_priority(cpu: bool = True) -> None:
    """Idle I/O class where the kernel offers it (Linux); with ``cpu``, also the lowest CPU priority. (A
    helper that must keep up with training on a node without a spare core keeps its CPU priority: at nice 19
    beside ranks that use every core it starved, and a snapshot waited for it for seconds.)"""
    if cpu:
        os.nice(19)
    number = _IOPRIO_SET.get(platform.machine())
    if sys.platform == "linux" and number is not None:
        ctypes.CDLL(None, use_errno=True).syscall(number, 1, 0, _IOPRIO_IDLE)  # IOPRIO_WHO_PROCESS, self


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent (the rank) dies; exit at once if it already has."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)


def copy_verified(src: Path, dst: Path, size: int, sha256: str) -> None:
    """Copy one file, hashing the bytes as they are written; fsync it. Raise ValueError naming SRC when its
    bytes are not the committed ones."""
    digest = hashlib.sha256()
    written = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            written += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    if written != size or digest.hexdigest() != sha256:
        raise ValueError(f"{src}: {written} bytes, not the {size} committed, or their checksum differs "
                         f"(the local snapshot changed after its commit); not copied")


def copy_snapshot(job: dict[str, Any]) -> dict[str, Any]:
    """Do one job (see the module doc); the answer: {"ok": true, "removed": [...]} or {"ok": false, "error":
    one line, "enospc": bool}. A job with ``files`` (several nodes: copier.py) copies only those into DST,
    which exists, and with ``commit`` false leaves the commit to rank 0 once every node's share is copied."""
    src, dst, record = Path(job["src"]), Path(job["dst"]), dict(job["record"])
    start = time.time()
    share = job.get("files")
    try:
        if share is None:
            manifest.make_room(dst)
            dst.mkdir(parents=True)
        names = record["files"] if share is None else share
        for i, rel in enumerate(sorted(names, key=lambda r: -record["files"][r]["size"])):
            if Path(rel).is_absolute() or ".." in Path(rel).parts:  # a tampered record: never outside DST
                raise ValueError(f"{src / manifest.COMMIT}: file name {rel!r} leaves the snapshot; not copied")
            entry = record["files"][rel]
            copy_verified(src / rel, dst / rel, entry["size"], entry["sha256"])
            if i == 0 and job.get("fault") == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)  # test-only: --debug.fault sigkill@writer=N[:rank=R]
        for folder in sorted({(dst / rel).parent for rel in names}, key=lambda p: -len(p.parts)):
            fsync_dir(folder)
        if not job.get("commit", True):
            return {"ok": True, "seconds": round(time.time() - start, 4), "removed": [], "copied": list(names)}
        return commit_copy(dst, record, start, job["keep"])
    except (OSError, ValueError, KeyError) as e:
        enospc = isinstance(e, OSError) and e.errno == errno.ENOSPC
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "enospc": enospc}


def commit_copy(dst: Path, record: dict[str, Any], start: float, keep: int) -> dict[str, Any]:
    """Write the commit record into DST, last (every file it lists is there: copied, checked and fsynced),
    then retention in DST's parent. The answer of a job (see copy_snapshot)."""
    record = dict(record)
    for rel, entry in record["files"].items():  # a share copied by another node: at least its size is checked
        size = (dst / rel).stat().st_size
        if size != entry["size"]:
            raise ValueError(f"{dst / rel}: {size} bytes, not the {entry['size']} of the local snapshot; not "
                             "committed")
    record.update(committed_at=time.time(), checksum_seconds=round(time.time() - start, 4),
                  write_seconds=round(time.time() - record["started_at"], 4))
    record["record_sha256"] = manifest.record_digest(record)
    write_json_atomic(dst / manifest.COMMIT, record)  # last: from here on the snapshot is complete
    return {"ok": True, "seconds": round(time.time() - start, 4),
            "removed": manifest.apply_retention(dst.parent, keep)}


def main() -> None:
    """``python -m elastictrain.snapshot.writer PARENT_PID``: one job a line until stdin closes."""
    ignore_preemption_signals()
    die_with_parent(int(sys.argv[1]))
    lower_priority()
    for line in sys.stdin:
        answer = copy_snapshot(json.loads(line))
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


class WriterProcess:
    """The training process's handle on its writer: start it, hand it a job, collect the answer on a thread
    of its own (which only waits on a pipe), and notice when it died."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self.answer: dict[str, Any] | None = None

    def start(self) -> None:
        """Start the process (on the training process's main thread: Linux sends the parent-death signal
        when the thread that started it ends)."""
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH"))
                                                              if p)}
        with signals_held():
            self.proc = subprocess.Popen([sys.executable, "-m", "elastictrain.snapshot.writer", str(os.getpid())],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                         close_fds=True)

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: dict[str, Any]) -> None:
        """Hand over one job (the previous one must have been collected)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.answer = None
        self._thread = threading.Thread(target=self._exchange, args=(job,), name="durable-writer", daemon=True)
        self._thread.start()

    def _exchange(self, job: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            self.answer = json.loads(line) if line else None
        except (OSError, ValueError):
            self.answer = None
        if self.answer is None:  # the writer died (killed, out of memory): say how
            code = self.proc.wait()
            self.answer = {"ok": False, "died": True, "error": f"the durable writer process died "
                                                               f"({_how(code)})"}

    def collect(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Wait for the answer to the job in flight; None when there is none (or still none at ``timeout``)."""
        if self._thread is None:
            return None
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        self._thread = None
        return self.answer

    def stop(self, timeout: float) -> None:
        """Close its stdin (it exits after the job in flight) and wait ``timeout`` seconds, then kill it."""
        if self.proc is None:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _how(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


if __name__ == "__main__":
    main()

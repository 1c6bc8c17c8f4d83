"""Peer liveness and progress (hang) detection: a lost host or a hung rank noticed in seconds, not at the
collective timeout (``dist.timeout_s``, 300 s by default).

* **Heartbeat.** A daemon thread on every rank writes ``{seq, progress, phase, stalled_s, limit_s, host, pid}``
  to the job's existing c10d store (the TCPStore at MASTER_ADDR:MASTER_PORT that torchrun, and SLURM through
  torchrun, set up for the process group: no new server, no new port) every ``dist.heartbeat_s``, over a
  store client of its own (a store client is not safe to share across threads mid-call), and reads every
  peer's record in one ``multi_get``. Nothing is added to the training step: no collective, no store call.
* **Peer lost.** A peer whose ``seq`` has not changed for ``dist.peer_timeout_s`` (measured on this rank's
  own clock, so no clock sync is needed) is lost: a dead or cut-off host, a SIGSTOPped process. This worker
  logs one line naming the rank, its host and the silence, and exits 1 at once, so torchrun's agents
  re-rendezvous without the lost node and every rank resumes from the newest complete snapshot, as today.
* **Store lost.** When this rank cannot complete a store round trip for ``dist.peer_timeout_s`` (the host
  of rank 0, which hosts the store, died or is cut off), it exits 1 naming the store.
* **Hang.** The heartbeat carries the *progress* counter, which only the training thread moves (at each step
  boundary and at each phase change), so a live heartbeat never keeps a hung rank "alive": liveness and
  progress are separate checks. A rank whose progress has not moved for its phase's limit, and that no peer
  is further behind, writes its Python stack (faulthandler, every thread) into its rank log and exits 1;
  the ranks waiting for it in a collective then fail at once and torchrun restarts the job. If such a rank
  does not report itself (a watcher that cannot run), the others exit ``dist.peer_timeout_s`` later.
  The limit is ``dist.hang_timeout_s`` when set, else learned: ``max(HANG_FLOOR_S, HANG_MULTIPLE x the
  slowest time this phase took so far in this process)``; a phase not seen yet (start-up, the first step,
  the first validation or snapshot) waits as long as the collective timeout would.

A SIGSTOPped process cannot write its own stack: its heartbeat thread is stopped too, so its peers report it
as lost; a peer on the same host that finds it stopped asks for its stack (SIGUSR2, faulthandler: the stack
as it is continued, a moment after the stop), continues it, and kills it. With no process group (``python -m elastictrain``)
only the progress check runs.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

from elastictrain.console import rank_log
from elastictrain.osutil import launcher, proc_stat

log = logging.getLogger(__name__)

PHASES = ("start-up", "data scan", "restore", "step", "validation", "snapshot", "export")
HANG_FLOOR_S = 60.0
"""The shortest learned hang limit: a step of 0.1 s must not make a 10 s GC pause or page-cache miss a hang."""
HANG_MULTIPLE = 5.0
"""How many times the slowest time of a phase so far a rank may take before it is called hung."""
EXIT_CODE = 1
"""A failure: torchrun restarts the workers (re-rendezvous without a lost node)."""


# ------------------------------------------------------------------------------------ progress (trainer side)


class Progress:
    """What the training thread has done lately: a counter that moves at each step boundary and phase change,
    the current phase, and the slowest time each phase took. Written by one thread, read by the watchdog;
    every field is replaced whole, so a reader never sees a torn value."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.count = 0
        self.phase = "start-up"
        self.last = clock()
        """When the counter last moved."""
        self.slowest: dict[str, float] = {}
        """Phase -> the longest time between two progress marks within it, this process."""

    def beat(self) -> None:
        """A step boundary: record how long the step took and move the counter."""
        now = self.clock()
        self._record(self.phase, now - self.last)
        self.count, self.last = self.count + 1, now

    @contextlib.contextmanager
    def phase_of(self, name: str) -> Iterator[None]:
        """Mark a phase (validation, snapshot, ...): progress when it starts and when it ends."""
        assert name in PHASES, name
        outer = self.phase
        self._move(name)
        try:
            yield
        finally:
            self._record(name, self.clock() - self.last)
            self._move(outer)

    def enter(self, phase: str) -> None:
        """Move to ``phase`` for good (the training loop after start-up): progress."""
        assert phase in PHASES, phase
        self._move(phase)

    def _move(self, phase: str) -> None:
        self.count, self.phase, self.last = self.count + 1, phase, self.clock()

    def _record(self, phase: str, seconds: float) -> None:
        self.slowest[phase] = max(seconds, self.slowest.get(phase, 0.0))


def hang_limit(phase: str, slowest: dict[str, float], fixed_s: float, unseen_s: float) -> float:
    """Seconds without progress after which a rank in ``phase`` is hung: ``fixed_s`` when set (> 0); else
    learned from the slowest time of this phase so far, with a floor; ``unseen_s`` (the collective timeout)
    for a phase this process has not finished once."""
    if fixed_s > 0:
        return fixed_s
    if phase not in slowest:
        return max(HANG_FLOOR_S, unseen_s)
    return max(HANG_FLOOR_S, HANG_MULTIPLE * slowest[phase])


# ------------------------------------------------------------------------------------------- decisions


@dataclass
class Peer:
    """What this rank knows of one peer: its last heartbeat record and when (our clock) its seq last moved."""

    seen: float
    beat: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """Why this worker must stop now (one log line), and whether to dump its own stack first."""

    message: str
    dump_stack: bool = False
    stopped_peer: int | None = None
    stopped_rank: int = -1
    """The pid of a lost peer that is a stopped process on this host: continued (its faulthandler writes its
    stack), then killed, so its agent does not wait 30 s for it to handle SIGTERM before it re-rendezvouses."""


class Judge:
    """The pure decisions of the watchdog, on an injected clock: fed each tick's heartbeats, it says when a
    peer is lost, the store is gone, this rank hangs, or a peer hangs without reporting itself."""

    def __init__(self, rank: int, world_size: int, peer_timeout_s: float, now: float, store: str = "") -> None:
        self.rank, self.peer_timeout_s, self.store = rank, peer_timeout_s, store
        self.peers = {r: Peer(seen=now) for r in range(world_size) if r != rank}
        self.store_ok = now
        self.longest = (0.0, -1)
        """(seconds, rank): the longest a peer's heartbeat was silent and then came back, for the log at the
        end (how close a healthy run came to ``peer_timeout_s``)."""

    def forgive(self, now: float) -> None:
        """This watchdog itself did not run for a while (the whole process was stopped, e.g. SLURM's suspend,
        Ctrl-Z, or starved): what it missed meanwhile is no evidence against the peers or the store."""
        self.store_ok = now
        for peer in self.peers.values():
            peer.seen = now

    def store_answered(self, now: float, beats: dict[int, dict[str, Any] | None]) -> None:
        """A store round trip worked; ``beats`` holds each peer's latest record (None: none written yet)."""
        self.store_ok = now
        for r, beat in beats.items():
            peer = self.peers.get(r)
            if peer is None or beat is None:
                continue
            if beat.get("seq") != peer.beat.get("seq"):
                if peer.beat and now - peer.seen > self.longest[0]:
                    self.longest = (now - peer.seen, r)
                peer.seen = now
            peer.beat = beat

    def verdict(self, now: float, mine: dict[str, Any]) -> Verdict | None:
        """The reason to stop now, if any; ``mine`` is this rank's own record (stalled_s, limit_s, phase)."""
        # A peer's silence read through a store that has stopped answering is the store's silence: a
        # peer's seq moves at most once a heartbeat, so it can look silent for its timeout a beat before
        # the store does. A store silent for half the timeout is the thing to name.
        store_silent = now - self.store_ok
        peer_silent = max((now - p.seen for p in self.peers.values() if not p.beat.get("done")), default=0.0)
        if self.peers and (store_silent >= self.peer_timeout_s
                           or (peer_silent >= self.peer_timeout_s and store_silent >= self.peer_timeout_s / 2)):
            return Verdict(f"lost the c10d store {self.store}: no answer for {store_silent:.1f} s "
                           f"(its host, the host of rank 0, is down or cut off); exiting {EXIT_CODE}")
        for r, peer in self.peers.items():
            if not peer.beat.get("done") and now - peer.seen >= self.peer_timeout_s:
                stopped = _stopped_here(peer.beat)
                note = f", its process {stopped} on this host is stopped (its stack goes to its log)" if stopped else ""
                return Verdict(f"lost rank {r} on host {peer.beat.get('host', '?')}: no heartbeat for "
                               f"{now - peer.seen:.1f} s{note}; exiting {EXIT_CODE}", stopped_peer=stopped,
                               stopped_rank=r)
        live = [(r, p.beat) for r, p in self.peers.items() if p.beat and not p.beat.get("done")]
        behind = [(r, b) for r, b in live if _behind(b, _stalled(b, now, self.peers[r].seen), mine)]
        if mine["stalled_s"] >= mine["limit_s"] and not behind:
            return Verdict(f"rank {self.rank} hung: no progress for {mine['stalled_s']:.1f} s in phase "
                           f"{mine['phase']!r} (limit {mine['limit_s']:.0f} s); its stack follows; exiting "
                           f"{EXIT_CODE}", dump_stack=True)
        for r, b in behind:
            if _stalled(b, now, self.peers[r].seen) >= b["limit_s"] + self.peer_timeout_s:
                return Verdict(f"rank {r} on host {b.get('host', '?')} hung: no progress for "
                               f"{_stalled(b, now, self.peers[r].seen):.1f} s in phase {b.get('phase')!r} and it "
                               f"did not report itself; exiting {EXIT_CODE}")
        return None


def _behind(beat: dict[str, Any], stalled: float, mine: dict[str, Any]) -> bool:
    """Whether a peer is further behind than this rank: not waiting in a torch.distributed call while we
    are (we wait for it); else fewer progress marks (every rank passes the same
    boundaries and phases, so the counts compare), or as many and stalled longer. The count decides first
    because a stall seen through a heartbeat is only known to within a heartbeat period, while the rank
    that hangs and those that wait for it in a collective differ by a single step boundary."""
    if bool(beat.get("waiting")) != bool(mine.get("waiting")):
        return bool(mine.get("waiting"))  # we wait in a collective for the one that does not
    if beat.get("progress", 0) != mine.get("progress", 0):
        return beat.get("progress", 0) < mine.get("progress", 0)
    return stalled > mine["stalled_s"]


def _stalled(beat: dict[str, Any], now: float, p_seen: float) -> float:
    """A peer's time without progress now: what it reported, plus the age of that report on our clock."""
    return float(beat.get("stalled_s", 0.0)) + max(0.0, now - p_seen)


def _stopped_here(beat: dict[str, Any]) -> int | None:
    """The pid of a silent peer that runs on this host and is stopped (SIGSTOP, state T), else None."""
    if beat.get("host") != socket.gethostname() or not beat.get("pid"):
        return None
    stat = proc_stat(beat["pid"])
    return int(beat["pid"]) if stat and stat[0] in ("T", "t") else None


# -------------------------------------------------------------------------------------------- watchdog


class Watchdog:
    """Two daemon threads of one worker: the heartbeat (store I/O over a client of its own) and the watcher
    (decisions). Apart, because a store call to a host that vanished can block past its timeout (seen: a
    reconnect to a host whose link is down), and the watcher must still end the worker in time."""

    def __init__(self, progress: Progress, rank: int, world_size: int, heartbeat_s: float, peer_timeout_s: float,
                 hang_timeout_s: float, unseen_s: float, connect: Callable[[], Any] | None = None, store_name: str = "",
                 prefix: str = "elastictrain/liveness", logs: Callable[[int], Path] | None = None) -> None:
        self.progress, self.rank, self.world_size = progress, rank, world_size
        self.heartbeat_s, self.hang_timeout_s, self.unseen_s = heartbeat_s, hang_timeout_s, unseen_s
        self.connect, self.prefix, self.logs = connect, prefix, logs
        """Where rank r's log is (this rank's stack goes to its own, a stopped peer's to its)."""
        self.store: Any = None
        """The heartbeat thread's own store client (None until connected, and again after a failed round trip)."""
        self.judge = Judge(rank, world_size if connect is not None else 1, peer_timeout_s, time.monotonic(),
                           store_name)
        self.lock = threading.Lock()
        """Guards the judge, which both threads touch."""
        self.seq = 0
        self.paused = (0, 0.0)
        """(progress count, seconds): time the watcher did not run while progress stood at that count, which is
        not held against this rank (a stopped and continued process is not a hung one)."""
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._watch, name="liveness-watch", daemon=True)]
        if connect is not None:
            self.threads.append(threading.Thread(target=self._heartbeat, name="liveness-heartbeat", daemon=True))

    def start(self) -> Watchdog:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        """This rank is finishing: say so to the peers (so its silence is no loss) and stop watching."""
        if self.done.is_set():
            return
        self.done.set()
        silence, peer = self.judge.longest
        if peer >= 0 and self.rank == 0:
            log.info("liveness: the longest silence of a peer's heartbeat was %.1f s (rank %d; "
                     "--dist.peer_timeout_s %g)", silence, peer, self.judge.peer_timeout_s)
        for thread in self.threads:
            thread.join(timeout=1.0)
        if self.connect is not None and not any(t.is_alive() for t in self.threads):
            with contextlib.suppress(Exception):
                store = self.store or self.connect()
                store.set(self._key(self.rank), json.dumps({**self.mine(), "done": True}))

    def mine(self) -> dict[str, Any]:
        p, now = self.progress, time.monotonic()
        phase, count = p.phase, p.count
        excused = self.paused[1] if self.paused[0] == count else 0.0
        return {"seq": self.seq, "progress": count, "phase": phase, "stalled_s": round(now - p.last - excused, 3),
                "limit_s": hang_limit(phase, dict(p.slowest), self.hang_timeout_s, self.unseen_s),
                "host": socket.gethostname(), "pid": os.getpid(), "waiting": main_thread_waits()}

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/{rank}"

    def _heartbeat(self) -> None:
        # The first beat at once: a rank that stops before it ever beat would be lost without its host and pid,
        # so its peers could not find it stopped and ask for its stack.
        while True:
            self.seq += 1
            self._exchange(self.mine())
            if self.done.wait(self.heartbeat_s):
                return

    def _watch(self) -> None:
        tick = time.monotonic()
        while not self.done.wait(self.heartbeat_s):
            now = time.monotonic()
            gap, tick = now - tick, now
            with self.lock:
                if gap > max(3 * self.heartbeat_s, self.judge.peer_timeout_s / 2):  # we were not running
                    self.judge.forgive(now)
                    count = self.progress.count
                    self.paused = (count, (self.paused[1] if self.paused[0] == count else 0.0) + gap)
                verdict = self.judge.verdict(now, self.mine())
            if verdict is not None and not self.done.is_set():
                self._stop_worker(verdict)

    def _exchange(self, mine: dict[str, Any]) -> None:
        """Write our record and read every peer's; a store that fails or times out just does not answer, and
        the client is dropped (a reply that comes late would be read as the answer to the next request)."""
        try:
            if self.store is None:
                self.store = self.connect()  # type: ignore[misc]
            self.store.set(self._key(self.rank), json.dumps(mine))
            peers = [r for r in range(self.world_size) if r != self.rank]
            keys = [self._key(r) for r in peers]
            values = self.store.multi_get(keys) if self.store.check(keys) else [
                self.store.get(k) if self.store.check([k]) else None for k in keys]
            beats = {r: json.loads(v) if v is not None else None for r, v in zip(peers, values)}
        except Exception:  # noqa: BLE001 - DistStoreError, a timeout, a reset connection: all mean "no answer"
            self.store = None
            return
        with self.lock:
            self.judge.store_answered(time.monotonic(), beats)

    def _stop_worker(self, verdict: Verdict) -> None:
        log.error("%s", verdict.message)
        if verdict.dump_stack:
            dump_stacks(self.logs(self.rank) if self.logs else None)
        if verdict.stopped_peer:
            peer_log = self.logs(verdict.stopped_rank) if self.logs else None
            before = _size(peer_log)
            with contextlib.suppress(OSError):
                os.kill(verdict.stopped_peer, STACK_SIGNAL)  # pending until continued: then it writes its stack
                os.kill(verdict.stopped_peer, signal.SIGCONT)
                # Until its stack is in its log (a continued process on a loaded machine may take a while to
                # run its handler), at most 3 s; then it goes, so its agent does not wait for it.
                deadline = time.monotonic() + 3.0
                while time.monotonic() < deadline and _size(peer_log) <= before:
                    time.sleep(0.05)
                time.sleep(0.2)
                os.kill(verdict.stopped_peer, signal.SIGKILL)
        for handler in logging.getLogger("elastictrain").handlers + logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(EXIT_CODE)  # at once: the training thread may be wedged in a collective or in C code


def main_thread_waits() -> bool:
    """Whether the training (main) thread is inside torch.distributed now, called from our code: a collective
    or a store call, i.e. waiting for its peers rather than stuck on its own work. Only the innermost frames
    up to the first of ours count: torchrun's @record wrapper is on every worker's stack, far outside."""
    ours = f"{os.sep}elastictrain{os.sep}"
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    while frame is not None and ours not in frame.f_code.co_filename:
        if f"{os.sep}torch{os.sep}distributed{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def dump_stacks(path: Path | None) -> None:
    """Every thread's Python stack into ``path`` (the rank log) and onto stderr."""
    if path is not None:
        with contextlib.suppress(OSError), open(path, "a", encoding="utf-8") as f:
            f.write("Python stacks of the hung rank (faulthandler):\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


STACK_SIGNAL = signal.SIGUSR2
"""Asks a worker for its stacks (faulthandler, into its rank log): sent by a peer that found it stopped on the
same host, before it continues and kills it. Not SIGCONT itself: a process held to a CPU share by
stop/continue cycles (a test, a gang scheduler) would dump at every cycle (seen to crash the interpreter)."""
_STACK_FILE: list[Any] = []
"""The open rank log faulthandler writes to on STACK_SIGNAL (it must stay open for the process's life)."""


def stacks_on_request(path: Path, taken: list[str]) -> None:
    """Write every thread's stack into ``path`` on :data:`STACK_SIGNAL`, unless the user gave that signal
    another job (``taken``: the preemption signals)."""
    if STACK_SIGNAL.name in taken:
        return
    existed = path.exists()
    try:
        f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open on purpose, see _STACK_FILE
    except OSError:
        return
    _STACK_FILE[:] = [f]
    if not existed:  # faulthandler needs the file open in advance; a rank log means trouble, so no empty one
        atexit.register(_remove_if_empty, path)
    faulthandler.register(STACK_SIGNAL, file=f, all_threads=True, chain=False)


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:
            path.unlink()


# ----------------------------------------------------------------------------------------------- setup


def start(cfg_dist: Any, rank: int, world_size: int, distributed: bool, progress: Progress,
          generation: str = "", logs: Callable[[int], Path] | None = None) -> Watchdog | None:
    """Start this worker's watchdog (None when ``dist.heartbeat_s`` is 0: off). Under torchrun it talks to the
    process group's store at MASTER_ADDR:MASTER_PORT through a client of its own; without a process group it
    checks this rank's progress only."""
    if cfg_dist.heartbeat_s <= 0:
        return None
    connect, name = None, ""
    env = launcher()
    if distributed and world_size > 1 and env.master_addr and env.master_port:
        from torch.distributed import TCPStore

        host, port = env.master_addr, env.master_port
        name = f"{host}:{port}"
        # A short client timeout: a round trip to a store that stopped answering fails within the window.
        timeout = timedelta(seconds=max(1.0, min(cfg_dist.peer_timeout_s / 2, 5.0)))

        def connect() -> Any:
            return TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=timeout)

    dog = Watchdog(progress, rank, world_size, cfg_dist.heartbeat_s, cfg_dist.peer_timeout_s,
                   cfg_dist.hang_timeout_s, cfg_dist.timeout_s, connect, name,
                   f"elastictrain/liveness/{generation}", logs)
    return dog.start()


def start_for(cfg: Any, ctx: Any, progress: Progress) -> Watchdog | None:
    """:func:`start` for a trainer's config and :class:`~elastictrain.dist.DistContext`; the key prefix is
    unique to this process group (rank 0's random token), so a store that outlives a restart (torchrun's
    shared one) never shows this attempt a previous one's heartbeats. Stacks go to the rank's log."""
    import uuid

    from elastictrain.dist import broadcast_object

    generation = broadcast_object(ctx, uuid.uuid4().hex[:12]) if ctx.distributed else "local"
    run_dir = Path(cfg.run.dir)
    stack_file = rank_log(run_dir, ctx.rank)
    stack_file.parent.mkdir(parents=True, exist_ok=True)
    stacks_on_request(stack_file, list(cfg.preemption.signals))
    return start(cfg.dist, ctx.rank, ctx.world_size, ctx.distributed, progress, generation,
                 lambda r: rank_log(run_dir, r))

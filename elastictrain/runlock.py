"""One run at a time in a run directory: a lock file, ``RUN_DIR/.lock``, with a lease.

Two commands on one ``--run.dir`` would destroy each other's work (the second moves the first's in-flight
snapshots aside as incomplete). So at start-up, right after the process group exists and before the
snapshot manager looks at anything, every rank checks that the run directory and ``snapshots/`` are
writable, and global rank 0 takes the lock; all ranks raise together (exit 2) when either fails.

The lock file is JSON: host, pid and its start time, job identity (SLURM job id and restart count,
torchrun's run id), ``since``, ``heartbeat``, ``lease_s`` and a random token. It is written to a temp
file and hard-linked into place (atomic on local and network file systems alike: NFS, Lustre, GPFS; with
O_EXCL where hard links are not supported), so a reader never sees half a lock.

A lock already there is judged by :func:`decide` (pure; tests/test_runlock.py):

1. Same machine (boot id and pid namespace equal, so that pids mean the same thing, whatever the host
   names: network-namespace "hosts" on one machine share them): the holder's process is gone -> take it
   over at once (a torchrun restart on one host, the next command after a SIGKILL, never wait); alive
   (same pid, same start time, not a zombie) and an earlier attempt of our own job (a partitioned
   worker that has not yet timed out) -> wait for it to exit; alive and anybody else -> refuse, naming it.
2. Same SLURM job with a newer restart count (a requeue, on any node) -> take over at once: SLURM ends
   every process of a job before it runs it again.
3. Another machine whose lease ran out (now - heartbeat > the holder's own lease_s) -> take over.
4. Another machine with a live lease: our own job's earlier attempt (same torchrun run id, or same SLURM
   job and restart count; e.g. rank 0 moved to another node at an elastic restart) -> wait for the
   lease to end; anybody else -> refuse, naming the holder.

Waiting lasts at most ``run.lock_lease_s``, and in a process group at most half of ``dist.timeout_s`` (the
other ranks wait in a collective meanwhile); then the command is refused like any other (exit 2; torchrun
may restart it and it waits again).

Taking over is atomic too: the stale file is renamed to a unique name (one contender wins), checked to
be the very lock that was judged stale (else it is put back), removed, and ours is linked in its place.

While the run lasts, rank 0 renews the lease every ``lease_s / 5`` seconds (``--run.lock_lease_s``, 30 s by
default) and every other rank re-reads the lock as often. Fencing: a rank that finds another token in
the lock (it was taken over: our lease looked expired to another host), or rank 0 when it could not renew
for ``lease_s / 2``, stops writing at once: it logs why and exits 1 with ``os._exit``, so that an old world
(a partitioned node, say) and a new one never both write one run directory. Lease expiry compares one
host's clock with another's: hosts sharing a run directory need clocks that agree well within the lease
(NTP does). The lock is released (removed) when the run ends, cleanly or not; a lock left by a killed run
is taken over by rules 1-3.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import stat
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from elastictrain.config import Config
from elastictrain.dist import DistContext, broadcast_object, on_main_together, raise_together
from elastictrain.errors import UserError
from elastictrain.osutil import launcher, proc_stat, process_started, read_text, write_atomic

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
EXIT_FENCED = 1
"""Exit status of a rank that lost the lock: a failure (torchrun may restart it; the lock then decides)."""


@dataclass(frozen=True)
class Holder:
    """What a lock file says about the process that holds it."""

    host: str
    machine: str
    """Boot id and pid namespace: two holders with the same host and machine can compare pids."""
    pid: int
    started: str
    """The process's start time (/proc/PID/stat), telling a reused pid from the holder; '' if unknown."""
    job: dict[str, str] = field(default_factory=dict)
    since: float = 0.0
    heartbeat: float = 0.0
    lease_s: float = 30.0
    token: str = ""

    def describe(self, now: float) -> str:
        job = ", ".join(f"{k} {v}" for k, v in self.job.items() if v) or "no SLURM or torchrun job"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return (f"pid {self.pid} on host {self.host} since {since} ({job}; lease renewed "
                f"{max(0.0, now - self.heartbeat):.0f} s ago)")


@dataclass(frozen=True)
class Decision:
    action: str
    """'take' (free, or stale: take it over), 'wait' (until ``until``) or 'refuse'."""
    why: str
    until: float = 0.0


def decide(holder: Holder, me: Holder, now: float, alive: Callable[[int, str], bool]) -> Decision:
    """What to do about the lock ``holder`` holds, for ``me`` at time ``now``; ``alive(pid, started)``
    tells whether a process on this machine still runs. The rules are the module docstring's."""
    mine, theirs = me.job, holder.job
    same_run = mine.get("torchelastic_run_id") and mine.get("torchelastic_run_id") == theirs.get("torchelastic_run_id")
    same_allocation = (mine.get("slurm_job_id") and mine.get("slurm_job_id") == theirs.get("slurm_job_id")
                       and mine.get("slurm_restart_count") == theirs.get("slurm_restart_count"))
    if holder.machine == me.machine:
        if not alive(holder.pid, holder.started):
            return Decision("take", f"its holder, pid {holder.pid} on host {holder.host} (this machine), is gone")
        if same_run or same_allocation:
            return Decision("wait", f"it is locked by an earlier attempt of this job, {holder.describe(now)}, "
                                    f"which is still running", now)
        return Decision("refuse", f"it is locked by {holder.describe(now)}, which is still running")
    if mine.get("slurm_job_id") and mine.get("slurm_job_id") == theirs.get("slurm_job_id"):
        if int(theirs.get("slurm_restart_count") or 0) < int(mine.get("slurm_restart_count") or 0):
            return Decision("take", f"its holder is the previous run of SLURM job {mine['slurm_job_id']} "
                                    f"(restart {theirs.get('slurm_restart_count') or 0}), which SLURM ended")
    expires = holder.heartbeat + holder.lease_s
    if now > expires:
        return Decision("take", f"the lease of {holder.describe(now)} ran out ({holder.lease_s:.0f} s)")
    if same_run or same_allocation:
        return Decision("wait", f"it is locked by an earlier attempt of this job, {holder.describe(now)}", expires)
    return Decision("refuse", f"it is locked by {holder.describe(now)}; if that host is down, the lock "
                              f"expires {holder.lease_s:.0f} s after its last renewal")


# ------------------------------------------------------------------------------------- this process


def process_alive(pid: int, started: str) -> bool:
    """Is ``pid`` running on this machine and the same process that started at ``started``?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    stat = proc_stat(pid)
    if stat is None:
        return True  # no /proc (macOS): trust the pid
    return stat[0] not in ("Z", "X") and (not started or stat[19] == started)


def myself(lease_s: float) -> Holder:
    """This process as a lock holder (heartbeat and token filled in when it takes the lock)."""
    boot = read_text("/proc/sys/kernel/random/boot_id")
    # Without a boot id (not Linux) only the host name tells machines apart.
    machine = f"{boot}/{_pid_namespace()}" if boot else f"host {socket.gethostname()}"
    env = launcher()
    job = {"slurm_job_id": env.slurm_job_id, "slurm_restart_count": str(env.slurm_restarts) if env.in_slurm else "",
           "torchelastic_run_id": env.torchrun_run_id}
    now = time.time()
    return Holder(socket.gethostname(), machine, os.getpid(), process_started(os.getpid()), job, now, now, lease_s,
                  secrets.token_hex(8))


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------- the lock


def read_lock(path: Path) -> Holder | None:
    """The holder a lock file names; None when there is no lock file.

    Raises:
        ValueError: the file is not a lock this version wrote (edited by hand, or from elsewhere).
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    # A directory or a dangling symlink reads as an error or as "no lock" forever: neither is a lock.
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode) else "a special file"
        raise ValueError(f"{path} is not a run lock ({kind}, not a regular file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        holder = Holder(**data)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{path} is not a run lock ({e})") from None
    wrong = _wrong_fields(holder)
    if wrong:
        raise ValueError(f"{path} is not a run lock (wrong type of {', '.join(wrong)})")
    return holder


def _wrong_fields(holder: Holder) -> list[str]:
    """Fields whose value is not of the type a lock holds (compared later as numbers, joined as text)."""
    number = (int, float)
    kinds = {"host": str, "machine": str, "pid": int, "started": str, "job": dict, "since": number,
             "heartbeat": number, "lease_s": number, "token": str}
    wrong = [k for k, t in kinds.items() if not isinstance(getattr(holder, k), t)
             or isinstance(getattr(holder, k), bool)]
    if isinstance(holder.job, dict) and not all(isinstance(v, str) for v in holder.job.values()):
        wrong.append("job")
    return wrong


class RunLock:
    """The lock on one run directory, as seen by one rank. Rank 0 :meth:`acquire` s it; every rank then
    :meth:`start` s its heartbeat (rank 0) or watch (the others) and :meth:`release` s it at the end."""

    def __init__(self, run_dir: Path, lease_s: float, rank: int = 0) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.rank = rank
        self.me = myself(lease_s)
        self.token = self.me.token
        self.interval = lease_s / 5
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False

    # ---------- taking it (rank 0) ----------
    def acquire(self, max_wait_s: float) -> None:
        """Take the lock, taking a stale one over; raise UserError naming the holder when it is not ours
        to take. Waits (up to ``max_wait_s``) only for an earlier attempt of our own job."""
        give_up, waited = time.time() + max_wait_s, False
        # Each pass wins, waits, refuses, or lost a race to another contender (then looks again).
        for _ in range(100 + int(max_wait_s / 0.05)):
            if self._link_new():
                self._held = True
                return
            try:
                holder = read_lock(self.path)
            except ValueError as e:
                raise UserError(f"--run.dir {self.path.parent}: {e}; remove it if no other run uses this "
                                f"directory") from None
            if holder is None:
                continue  # released while we looked
            now = time.time()
            decision = decide(holder, self.me, now, process_alive)
            if decision.action == "take":
                if self._take_over(holder):
                    log.warning("took over the lock on %s: %s", self.path.parent, decision.why)
                    self._held = True
                    return
            elif decision.action == "wait" and now < give_up:
                if not waited:
                    log.warning("waiting up to %.0f s for the lock on %s: %s", give_up - now, self.path.parent,
                                decision.why)
                waited = True
                time.sleep(min(self.interval, 0.5, max(0.05, decision.until - now + 0.05)))
            else:
                raise UserError(f"--run.dir {self.path.parent} is in use: {decision.why}. Two runs must never "
                                f"share a run directory: wait for that one to end, stop it, or choose another "
                                f"--run.dir (lock file {self.path})")
        raise UserError(f"--run.dir {self.path.parent}: could not take the lock {self.path}; other runs keep "
                        f"taking it")

    def _content(self, since: float) -> str:
        now = time.time()
        holder = Holder(**{**asdict(self.me), "since": since, "heartbeat": now, "token": self.token})
        return json.dumps(asdict(holder))

    def _link_new(self) -> bool:
        """Create the lock atomically with our content; False if a lock file exists."""
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}.tmp")
        _write_synced(tmp, self._content(time.time()))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return self._create_exclusive()  # a file system without hard links
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(self._content(time.time()))
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, stale: Holder) -> bool:
        """Replace the lock ``stale`` holds by ours; False when another contender got there first."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = read_lock(aside)
        except ValueError:
            moved = None
        if moved is None or moved.token != stale.token:  # we moved a lock somebody took meanwhile: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._link_new()

    # ---------- holding it ----------
    def start(self, token: str) -> None:
        """Rank 0 renews the lease, the other ranks watch the lock; ``token`` is rank 0's."""
        self.token = token
        target = self._heartbeat if self._held else self._watch
        self._thread = threading.Thread(target=target, name="run-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        since, last_ok = self.me.since, time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                current = read_lock(self.path)
                if current is None:  # removed by hand: ours again if nobody else has it
                    if not self._link_new():
                        continue  # somebody else's now: the next pass reads it and fences
                elif current.token != self.token:
                    self._fence(f"the lock {self.path} was taken over by {current.describe(time.time())}")
                else:
                    since = current.since
                    tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}.tmp")
                    write_atomic(self.path, self._content(since), fsync=True, tmp=tmp)
                last_ok = time.monotonic()
            except (OSError, ValueError) as e:
                if time.monotonic() - last_ok > self.me.lease_s / 2:
                    self._fence(f"could not renew the lock {self.path} for {self.me.lease_s / 2:.0f} s ({e}); "
                                f"another host may take it over")

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                current = read_lock(self.path)
            except (OSError, ValueError):
                continue  # rank 0 renews it; a missing or unreadable lock is its business
            if current is not None and current.token != self.token:
                self._fence(f"the lock {self.path} was taken over by {current.describe(time.time())}")

    def _fence(self, why: str) -> None:
        if self._stop.is_set():
            return  # released meanwhile: the run is over
        log.error("%s: stopping at once, so that two runs never write one run directory", why)
        for handler in logging.getLogger("elastictrain").handlers:
            handler.flush()
        os._exit(EXIT_FENCED)

    def release(self) -> None:
        """Stop renewing or watching; rank 0 removes the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        if not self._held:
            return
        self._held = False
        try:
            current = read_lock(self.path)
            if current is not None and current.token == self.token:
                self.path.unlink()
        except (OSError, ValueError) as e:
            log.warning("could not release the lock %s: %s", self.path, e)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------ start-up


def check_writable(run_dir: Path) -> UserError | None:
    """The run directory and its snapshots/ exist (created if need be) and take new files."""
    for folder, setting in ((run_dir, "--run.dir"), (run_dir / "snapshots", "--run.dir")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            return UserError(f"{setting} {run_dir}: {folder} exists and is not a directory")
        except OSError as e:
            return UserError(f"{setting} {run_dir}: cannot create {folder}: {e.strerror or e}")
        probe = folder / f".write-probe-{socket.gethostname()}-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            return UserError(f"{setting} {run_dir}: {folder} is not writable ({e.strerror or e}); a run writes "
                             f"its snapshots, metrics and logs there")
    return None


def acquire(cfg: Config, ctx: DistContext) -> RunLock:
    """Check that the run directory is writable (every rank) and lock it (rank 0); raise on every rank
    together when either fails. Returns the started lock; call :meth:`RunLock.release` at the end."""
    run_dir = Path(cfg.run.dir)
    raise_together(ctx, check_writable(run_dir))
    lock = RunLock(run_dir, cfg.run.lock_lease_s, ctx.rank)
    # The other ranks wait in a collective meanwhile: never longer than half their timeout.
    max_wait = min(cfg.run.lock_lease_s, cfg.dist.timeout_s / 2) if ctx.distributed else cfg.run.lock_lease_s
    on_main_together(ctx, lambda: lock.acquire(max_wait))
    lock.start(broadcast_object(ctx, lock.token))
    return lock

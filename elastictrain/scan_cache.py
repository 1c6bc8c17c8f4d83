"""The folder scan's per-pair checks, spread over ranks and processes and cached across starts.

Checking a pair opens its image and decodes its whole mask (about 10 ms for a 2048x1024 mask), so a scan of a
large folder set costs minutes. Its outcome only depends on the two files' contents and on the settings the
check reads (``data.num_classes``, ``data.ignore_index``), so it is recorded per pair with each file's size
and mtime in RUN_DIR/data_scan_cache.json; the next start stats the files and opens only those whose size or
mtime changed, or that are new.

The cache is untrusted input: it is JSON (never pickle), its body must match the SHA-256 in its header, and
anything unexpected in it (format, types, settings, the check's code or Pillow's version) discards it whole,
with one warning: the scan then checks every pair again and writes a new cache. A file written in the same
second as it was checked is not recorded (a later write in the same mtime tick would look unchanged), the
"racy" entry problem git's index has. A file that changes after the scan is still caught when it is loaded.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import inspect
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL

from elastictrain import lifeline
from elastictrain.dist import DistContext, all_gather_object, on_main_together, raise_together
from elastictrain.osutil import cores_per_rank, write_atomic

log = logging.getLogger(__name__)

FORMAT = "elastictrain-scan-cache"
VERSION = 1
RACY_S = 2.0
"""A file modified less than this long before it was checked is checked again next time (see the docstring)."""
POOL_MIN_PAIRS = 256
"""Fewer pairs to check than this on a rank are checked in the rank's own process (a pool costs ~0.1 s)."""

Check = Callable[[Path, Path], "str | None"]
Stamp = tuple[int, int, int, int]
"""(image size, image mtime_ns, mask size, mask mtime_ns)."""


@dataclass
class CheckResult:
    """The outcome of :func:`check_pairs`, the same on every rank."""

    problems: list[str]
    """One line per bad pair, in the order of the pairs."""
    checked: int
    """Pairs whose files were opened, on all ranks together."""
    reused: int
    """Pairs answered by the cache."""


def check_pairs(pairs: list[tuple[Path, Path]], check: Check, root: Path, settings: dict[str, Any],
                ctx: DistContext, cache_file: Path | None, bar: Callable[[list, int, str], Iterable],
                processes: int | None = None) -> CheckResult:
    """Check every pair, opening only the files the cache does not vouch for; each rank checks every
    ``world_size``-th pair and the results are gathered, so any failure is raised on every rank.

    Args:
        pairs: (image, mask) files under ``root``, the same list on every rank.
        check: Why a pair cannot be trained on, or None (``data.check_pair`` with the settings bound).
        root: ``data.root``; the cache names files relative to it.
        settings: What the check reads besides the files; a cache made under others is discarded.
        ctx: Who this rank is.
        cache_file: Where the cache is read and (by rank 0) written; None = no cache.
        bar: Wraps this rank's checks in a progress bar (rank 0 only shows one).
        processes: Processes checking this rank's share; None = the cores of this rank.
    """
    key_of = functools.partial(_key, Path(root))
    full_settings = {**settings, "root": str(Path(root).resolve()), "check": _code_digest(check),
                     "pillow": PIL.__version__}
    cached = on_main_together(ctx, lambda: read_cache(cache_file, full_settings) if cache_file else {})
    mine: tuple[dict[str, tuple[Stamp | None, str | None]], int, int] = ({}, 0, 0)
    error: BaseException | None = None
    try:
        mine = _check_share(pairs[ctx.rank::ctx.world_size], check, key_of, cached, bar,
                            processes or cores_per_rank())
    except Exception as e:  # noqa: BLE001 - raised on every rank together below
        error = e
    raise_together(ctx, error)
    results: dict[str, tuple[Stamp | None, str | None]] = {}
    checked = reused = 0
    for part, part_checked, part_reused in all_gather_object(ctx, mine):
        results.update(part)
        checked += part_checked
        reused += part_reused
    problems = [p for p in (results[key_of(image, mask)][1] for image, mask in pairs) if p]
    if ctx.is_main and cache_file and results != cached:
        write_cache(cache_file, full_settings, results)
    return CheckResult(problems, checked, reused)


def _check_share(pairs: list[tuple[Path, Path]], check: Check, key_of: Callable[[Path, Path], str],
                 cached: dict[str, tuple[Stamp, str | None]], bar: Callable[[list, int, str], Iterable],
                 processes: int) -> tuple[dict[str, tuple[Stamp | None, str | None]], int, int]:
    """This rank's pairs: stat each; reuse the cached outcome when its stamp is unchanged, check the rest.
    Returns the outcomes, how many pairs were checked (opened) and how many the cache answered.

    A result's stamp is None when it must not be cached: a file that could not be statted, or one modified
    within :data:`RACY_S` of the check."""
    out: dict[str, tuple[Stamp | None, str | None]] = {}
    todo: list[tuple[str, Path, Path, Stamp | None]] = []
    now = time.time()
    reused = 0
    for image, mask in pairs:
        key = key_of(image, mask)
        stamp, problem = _stamp(image, mask)
        if stamp is not None and key in cached and cached[key][0] == stamp:
            out[key] = cached[key]
            reused += 1
        elif problem:
            out[key] = (None, problem)
        else:
            racy = max(stamp[1], stamp[3]) / 1e9 > now - RACY_S  # type: ignore[index]
            todo.append((key, image, mask, None if racy else stamp))
    found = _run_checks(check, [(image, mask) for _, image, mask, _ in todo], processes)
    for (key, _, _, stamp), problem in zip(todo, bar(found, len(todo), "checking data")):
        out[key] = (stamp, problem)
    return out, len(todo), reused


def _run_checks(check: Check, pairs: list[tuple[Path, Path]], processes: int) -> Iterable[str | None]:
    """``check`` over ``pairs`` in order, lazily; in a pool of forked processes when that is worth it."""
    if processes < 2 or len(pairs) < POOL_MIN_PAIRS:
        return (check(image, mask) for image, mask in pairs)
    return _pooled(check, pairs, processes)


def _pooled(check: Check, pairs: list[tuple[Path, Path]], processes: int) -> Iterable[str | None]:
    # fork, as DataLoader workers do: the children start at once, without importing torch again.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
    chunk = max(1, min(64, len(pairs) // (processes * 8)))
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context, initializer=_pool_worker_init,
                                                initargs=(os.getpid(),)) as pool:
        yield from pool.map(_apply, [(check, image, mask) for image, mask in pairs], chunksize=chunk)


def _apply(job: tuple[Check, Path, Path]) -> str | None:
    check, image, mask = job
    return check(image, mask)


def _pool_worker_init(parent: int) -> None:
    """A pool worker leaves preemption signals to its parent and dies with it (a SIGKILLed rank must not
    leave its checkers running)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    lifeline.die_with_parent(parent)


def _stamp(image: Path, mask: Path) -> tuple[Stamp | None, str | None]:
    """(size, mtime) of both files, or a problem naming the one that cannot be statted."""
    stats = []
    for path in (image, mask):
        try:
            st = os.stat(path)
        except OSError as e:
            return None, f"{path}: {e.strerror or e}"
        stats += [st.st_size, st.st_mtime_ns]
    return tuple(stats), None  # type: ignore[return-value]


def _key(root: Path, image: Path, mask: Path) -> str:
    return f"{os.path.relpath(image, root)}\n{os.path.relpath(mask, root)}"


def _code_digest(check: Check) -> str:
    """A digest of the check's source: a changed check (a new rule) must not trust the old outcomes."""
    func = check.func if isinstance(check, functools.partial) else check
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        source = getattr(func, "__qualname__", repr(func))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- the file


def read_cache(path: Path, settings: dict[str, Any]) -> dict[str, tuple[Stamp, str | None]]:
    """The cached outcomes in ``path`` if it is a well-formed cache made under ``settings``, else {}.

    Line 1 is a JSON header (format, version, the SHA-256 of line 2), line 2 the JSON body (settings and
    entries ``key: [image size, image mtime_ns, mask size, mask mtime_ns, problem or null]``).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("cannot read the data scan cache %s (%s): checking every pair", path, e.strerror or e)
        return {}
    try:
        return _parse(raw, settings)
    except _Stale as e:
        log.info("data scan cache %s: %s; checking every pair", path, e)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        log.warning("ignoring the damaged data scan cache %s (%s): checking every pair and writing it again",
                    path, e)
    return {}


class _Stale(Exception):
    """A sound cache made under other settings."""


def _parse(raw: bytes, settings: dict[str, Any]) -> dict[str, tuple[Stamp, str | None]]:
    head, sep, body = raw.partition(b"\n")
    header = json.loads(head)
    if not sep or not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError("not a data scan cache")
    if header.get("version") != VERSION:
        raise _Stale(f"written by cache version {header.get('version')!r}, this is {VERSION}")
    if header.get("sha256") != hashlib.sha256(body).hexdigest():
        raise ValueError("its checksum does not match its contents")
    content = json.loads(body)
    if not isinstance(content, dict) or not isinstance(content.get("entries"), dict):
        raise ValueError("no entries")
    if content.get("settings") != settings:
        raise _Stale("made under other settings")
    entries: dict[str, tuple[Stamp, str | None]] = {}
    for key, value in content["entries"].items():
        if not (isinstance(value, list) and len(value) == 5 and all(type(v) is int for v in value[:4])
                and (value[4] is None or isinstance(value[4], str))):
            raise ValueError(f"a malformed entry for {key!r}")
        entries[key] = (tuple(value[:4]), value[4])  # type: ignore[assignment]
    return entries


def write_cache(path: Path, settings: dict[str, Any], results: dict[str, tuple[Stamp | None, str | None]]) -> None:
    """Write the cacheable ``results`` atomically (temp file, fsync, rename); a failure only costs the next
    start a full check, so it is logged, never raised."""
    entries = {key: [*stamp, problem] for key, (stamp, problem) in results.items() if stamp is not None}
    body = json.dumps({"settings": settings, "entries": entries}, separators=(",", ":")).encode()
    header = json.dumps({"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(body).hexdigest()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, header.encode() + b"\n" + body, fsync=True)
    except OSError as e:
        log.warning("could not write the data scan cache %s (%s): the next start checks every pair again",
                    path, e.strerror or e)

"""Node copies of local snapshots, in a ring of nodes: each node's local tier holds its own ranks' files and
its predecessor's, so the loss of any one node leaves every file of the snapshot in the memory of a survivor.

On several nodes the engine leaves each node's local directory with its own ranks' files only (torchsnapshot
spreads even replicated entries over ranks). After the engine write, the node leaders (the lowest rank on
each host) learn each other's file lists and each sends its node's files to the next node in the ring (point
to point on a gloo group of their own, in chunks), hashed by the sender and checked by the receiver as they
are written. Rank 0 then makes the commit record of the whole snapshot, and every leader writes it into its
node's copy, last: with two nodes the ring gives each node every file, so that is a commit record (COMMIT.json)
and each node's copy is complete; with three or more it is a PART.json (the whole snapshot's record and the
files this node holds), which never looks complete (manifest.py).

At a restore the leaders first complete the newest local snapshot that their parts hold together
(:func:`assemble`: each file a node lacks is sent by a node that holds it), and a node that lacks the newest
local snapshot altogether (a replaced node with empty memory, a node that joined a grown world) receives its
files and commit record from a node that has it (:func:`send_snapshot`), instead of everyone falling back to an
older durable snapshot.

Memory: two generations of this node's ranks' state and its predecessor's (``Nodes.ranks_held``; with two
nodes that is every rank's), and at a restore one whole snapshot, where there is room (else the restore falls
back to the durable tier, with a warning). One node: nothing here runs.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from elastictrain.dist import DistContext, all_gather_object, raise_together
from elastictrain.osutil import fsync_dir, write_json_atomic
from elastictrain.snapshot import localtier, manifest

CHUNK_BYTES = 64 * 2**20
"""Bytes per message: a file is never held in memory whole."""
Files = dict[str, dict[str, Any]]
"""A commit record's file list: {relative path: {"size", "sha256"}}."""


@dataclass
class Nodes:
    """Which ranks share a node (by host name), learned once at start-up, and the leaders' own group."""

    rank: int
    hosts: list[str]
    """The host of every rank, in rank order."""
    leaders: list[int] = field(default_factory=list)
    """The lowest rank on each host, ascending."""
    group: Any = None
    """A gloo group of the leaders (None on one node)."""

    @property
    def several(self) -> bool:
        return len(self.leaders) > 1

    @property
    def is_leader(self) -> bool:
        return self.rank in self.leaders

    def leader_of(self, rank: int) -> int:
        return min(r for r, h in enumerate(self.hosts) if h == self.hosts[rank])

    def neighbour(self, offset: int) -> int:
        """The leader ``offset`` places after this rank's node in the ring (-1: the predecessor)."""
        i = self.leaders.index(self.leader_of(self.rank))
        return self.leaders[(i + offset) % len(self.leaders)]

    @property
    def ranks_held(self) -> int:
        """Ranks whose files this node's copy of a local snapshot holds: its own and its predecessor's."""
        hosts = {self.hosts[self.rank], self.hosts[self.neighbour(-1)]}
        return sum(h in hosts for h in self.hosts)


def learn(ctx: DistContext) -> Nodes:
    """Every rank (collective): the hosts of all ranks; on several nodes, the leaders' group."""
    hosts = all_gather_object(ctx, socket.gethostname())
    nodes = Nodes(ctx.rank, hosts)
    nodes.leaders = sorted({nodes.leader_of(r) for r in range(len(hosts))})
    if nodes.several:
        import torch.distributed as dist

        nodes.group = dist.new_group(ranks=nodes.leaders, backend="gloo")  # every rank calls it, members or not
    return nodes


def on_leaders_together(ctx: DistContext, nodes: Nodes, fn: Callable[[], object]) -> None:
    """Run ``fn`` on every node leader (a file operation on its node's copy), its failure raised on every rank."""
    error: BaseException | None = None
    if nodes.is_leader:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - shared, then raised on every rank
            error = e
    raise_together(ctx, error)


def hash_files(path: Path) -> Files:
    """This node's files of the snapshot at ``path``, with sizes and checksums (each fsynced first)."""
    return {str(p.relative_to(path)): {"size": p.stat().st_size, "sha256": manifest.file_digest(p, fsync=True)}
            for p in manifest.data_files(path)}


def share(path: Path, nodes: Nodes) -> tuple[Files, Files, str | None]:
    """Node leaders (collective on their group): learn every node's files of snapshot ``path``, send this
    node's to the next node in the ring and receive the previous node's; (every file of the snapshot, the files
    this node now holds, the first problem on any leader or None). Even ring positions send first and odd ones
    receive first, so no two leaders wait on each other. A receiver that fails keeps taking part (discarding),
    so no sender waits on it; the problem is agreed on afterwards."""
    problem: str | None = None
    try:
        own = hash_files(path)
    except OSError as e:  # still take part: the others would wait for this node's files
        own, problem = {}, f"{path}: {e}"
    lists: list[Files] = all_gather_object(_leader_ctx(nodes), own, group=nodes.group)
    everything: Files = {}
    for theirs in lists:
        for rel, entry in theirs.items():
            if everything.setdefault(rel, entry) != entry:
                problem = problem or f"{path / rel}: written differently on two nodes"
    succ, pred = nodes.neighbour(1), nodes.neighbour(-1)
    held: Files = dict(own)
    incoming = lists[nodes.leaders.index(pred)]
    send_first = nodes.leaders.index(nodes.rank) % 2 == 0
    for sending in (send_first, not send_first):
        if sending:
            for rel in sorted(own):
                _transfer(path, rel, own[rel], nodes.rank, nodes, write=False, dst=succ)
            continue
        for rel in sorted(incoming):
            keep = rel not in held and problem is None
            problem = _transfer(path, rel, incoming[rel], pred, nodes, write=keep, dst=nodes.rank) or problem
            if keep:
                held[rel] = incoming[rel]
    problems = [p for p in all_gather_object(_leader_ctx(nodes), problem, group=nodes.group) if p]
    return everything, held, (problems[0] if problems else None)


def send_snapshot(root: Path, name: str, src: int, nodes: Nodes,
                  make_tier: Callable[[], None]) -> tuple[int, str | None]:
    """Node leaders (collective on their group): leader ``src`` sends its complete local snapshot ``name``
    (its files, then its commit record) to every leader that lacks it; a receiver makes its tier
    (``make_tier``: owner-only, with its owner record), writes the files into ROOT/NAME, checks each against
    the record, and writes the record last. (bytes sent, the first problem among the receivers or None)."""
    path = root / name
    box = [manifest.read_commit(path) if src == nodes.rank else None]
    _broadcast_object(box, src, nodes)
    record: dict[str, Any] = box[0]
    wants = src != nodes.rank and manifest.read_commit(path) is None
    problem = None
    if wants:
        try:
            make_tier()
            manifest.make_room(path)  # debris of a cut-off copy goes; a damaged one is moved aside
            path.mkdir()
        except (OSError, RuntimeError) as e:  # still take part: the sender waits for every receiver
            problem, wants = f"{path}: {e}", False
    for rel in sorted(record["files"]):
        problem = _transfer(path, rel, record["files"][rel], src, nodes, write=wants and problem is None) or problem
    if wants and problem is None:
        fsync_dir(path)
        write_json_atomic(path / manifest.COMMIT, record)
    problems = [p for p in all_gather_object(_leader_ctx(nodes), problem, group=nodes.group) if p]
    return sum(f["size"] for f in record["files"].values()), (problems[0] if problems else None)


def assemble(root: Path, nodes: Nodes, not_older_than: tuple[int, int] | None,
             make_tier: Callable[[], None]) -> dict[str, Any] | None:
    """Node leaders (collective on their group), at a restore: complete the newest local snapshot that the
    nodes' copies hold together when some node holds only a part of it (three nodes or more), and that is not
    older than ``not_older_than`` (the durable choice). Each file a leader lacks comes from the first leader
    that holds it; every leader then writes the commit record into its copy. A leader without room for the
    files it lacks, or whose files arrive damaged, keeps its part (the restore then finds no common local
    snapshot and takes the durable one). What the resume event says, or None when nothing was needed."""
    views: list[dict[str, tuple[str, list[str], dict[str, Any]]]] = all_gather_object(
        _leader_ctx(nodes), _held_here(root), group=nodes.group)
    chosen = None
    for name in sorted({n for v in views for n in v}, key=lambda n: manifest.parse_name(n)[::-1], reverse=True):
        records = {v[name][0] for v in views if name in v}
        held = {rel for v in views if name in v for rel in v[name][1]}
        record = next(v[name][2] for v in views if name in v)
        if len(records) == 1 and held >= set(record["files"]):
            chosen = (name, record)
            break
    if chosen is None:
        return None
    name, record = chosen
    order = (record["step"], record["epoch"])
    whole = set(record["files"])
    if (not_older_than is not None and not_older_than > order) or \
            not any(name in v and set(v[name][1]) != whole for v in views):  # no part: send_snapshot's case
        return None
    start = time.perf_counter()
    path = root / name
    mine = set(views[nodes.leaders.index(nodes.rank)].get(name, ("", [], {}))[1])
    lacking = sorted(whole - mine)
    problem = None
    if lacking:
        try:
            make_tier()
            if not mine:
                manifest.make_room(path)
                path.mkdir()
            for rel in lacking:  # what an assembly cut off earlier received (the part's record never lists it)
                (path / rel).unlink(missing_ok=True)
            if not localtier.has_room(root, sum(record["files"][rel]["size"] for rel in lacking)):
                problem = f"{root}: no room for the {len(lacking)} file(s) of {name} this node lacks"
        except (OSError, RuntimeError) as e:
            problem = f"{path}: {e}"
    sources: set[str] = set()
    sent = 0
    for rel in sorted(whole):
        holders = [leader for leader, v in zip(nodes.leaders, views) if name in v and rel in v[name][1]]
        if len(holders) == len(nodes.leaders):
            continue
        src = holders[0]
        sources.add(nodes.hosts[src])
        sent += record["files"][rel]["size"]
        write = rel in lacking and problem is None
        problem = _transfer(path, rel, record["files"][rel], src, nodes, write=write) or problem
    if lacking and problem is None:
        try:
            fsync_dir(path)
            commit_copy(path, record)
        except (OSError, RuntimeError) as e:
            problem = f"{path}: {e}"
    problems = [p for p in all_gather_object(_leader_ctx(nodes), problem, group=nodes.group) if p]
    return {"assembled": name, "from_hosts": sorted(sources), "bytes": sent,
            "seconds": round(time.perf_counter() - start, 3), "problem": problems[0] if problems else None}


def _held_here(root: Path) -> dict[str, tuple[str, list[str], dict[str, Any]]]:
    """This node's local snapshots, complete or parts: {name: (record digest, files held, record)}."""
    found = {}
    for snap in manifest.list_snapshots(root):
        record = snap.commit if snap.complete else (snap.part or {}).get("record")
        if record is None or (snap.complete and snap.verify(checksums=False) is not None):
            continue
        held = list(record["files"]) if snap.complete else snap.part["held"]  # type: ignore[index]
        found[snap.name] = (record.get("record_sha256", ""), held, record)
    return found


def commit_copy(path: Path, record: dict[str, Any], held: Files | None = None) -> None:
    """A leader: write ``record`` into this node's copy, once every file it lists is there with its size; with
    ``held`` (a part: not every file is here), a PART.json with the record and the files held instead."""
    for rel in held if held is not None else record["files"]:
        entry = record["files"][rel]
        if (path / rel).stat().st_size != entry["size"]:
            raise RuntimeError(f"{path / rel}: {(path / rel).stat().st_size} bytes, not the {entry['size']} committed")
    if held is None or set(held) == set(record["files"]):
        write_json_atomic(path / manifest.COMMIT, record)
        (path / manifest.PART).unlink(missing_ok=True)  # a completed part (assemble): its record wins anyway
    else:
        write_json_atomic(path / manifest.PART, {"record": record, "held": sorted(held)})


def broadcast_record(record: dict[str, Any] | None, nodes: Nodes) -> dict[str, Any]:
    """Rank 0's commit record on every leader."""
    box = [record]
    _broadcast_object(box, 0, nodes)
    return box[0]


def _transfer(path: Path, rel: str, entry: dict[str, Any], src: int, nodes: Nodes, write: bool,
              dst: int | None = None) -> str | None:
    """One file from leader ``src`` to every other leader (or, with ``dst``, to that leader only: a step of the
    ring, called by those two), in chunks; a receiver that ``write``s it checks its size and checksum. The
    problem, or None."""
    import torch.distributed as dist

    sending = src == nodes.rank
    digest = hashlib.sha256()
    problem = None
    out = None
    if Path(rel).is_absolute() or ".." in Path(rel).parts:  # a tampered record: never outside the snapshot
        problem, write = f"{path}: file name {rel!r} leaves the snapshot; not copied", False
    try:
        if write:
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            out = open(path / rel, "xb")
    except OSError as e:
        problem, out = f"{path / rel}: {e}", None
    with open(path / rel, "rb") if sending else _nothing() as fin:
        for offset in range(0, entry["size"], CHUNK_BYTES):
            n = min(CHUNK_BYTES, entry["size"] - offset)
            chunk = torch.frombuffer(bytearray(fin.read(n)), dtype=torch.uint8) if sending else \
                torch.empty(n, dtype=torch.uint8)
            if dst is None:
                dist.broadcast(chunk, src=src, group=nodes.group)
            elif sending:
                dist.send(chunk, dst=dst, group=nodes.group)
            else:
                dist.recv(chunk, src=src, group=nodes.group)
            if out is not None:
                data = chunk.numpy().tobytes()
                digest.update(data)
                try:
                    out.write(data)
                except OSError as e:
                    problem = problem or f"{path / rel}: {e}"
    if out is not None:
        out.flush()
        os.fsync(out.fileno())
        out.close()
        if problem is None and digest.hexdigest() != entry["sha256"]:
            problem = f"{path / rel}: received bytes differ from the sender's checksum"
    return problem


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: Any) -> None:
        return None


def _broadcast_object(box: list[Any], src: int, nodes: Nodes) -> None:
    import torch.distributed as dist

    dist.broadcast_object_list(box, src=src, group=nodes.group)


def _leader_ctx(nodes: Nodes) -> DistContext:
    """A context for all_gather_object on the leaders' group (its size is the number of leaders)."""
    return DistContext(nodes.leaders.index(nodes.rank), len(nodes.leaders), 0, torch.device("cpu"), "gloo")


def timed_send(root: Path, name: str, src: int, nodes: Nodes, make_tier: Callable[[], None]) -> dict[str, Any]:
    """:func:`send_snapshot`, with what the resume event says about it."""
    start = time.perf_counter()
    sent, problem = send_snapshot(root, name, src, nodes, make_tier)
    return {"from_rank": src, "from_host": nodes.hosts[src], "bytes": sent,
            "seconds": round(time.perf_counter() - start, 3), "problem": problem}

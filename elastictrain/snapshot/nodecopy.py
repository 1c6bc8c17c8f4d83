"""Node copies of local snapshots: every node's local tier holds the whole snapshot, not only the files its own
ranks wrote, so a node that survives the loss of another restores from memory.

On several nodes the engine leaves each node's local directory with its own ranks' files only (torchsnapshot
spreads even replicated entries over ranks). After the engine write, the node leaders (the lowest rank on
each host) exchange their nodes' files on a gloo group of their own (broadcasts of uint8 tensors, in chunks),
each file hashed by its sender and checked by every receiver as it is written. Rank 0 then makes the commit
record of the whole snapshot, and every leader writes that same record into its node's copy, last: a node copy
that holds only part of the files never has a commit record, so it never looks complete.

At a restore, a node that lacks the newest local snapshot (a replaced node with empty memory, a node that
joined a grown world) receives its files and commit record from a node that has it (:func:`send_snapshot`),
instead of everyone falling back to an older durable snapshot.

With two nodes this is the ring of the issue (each node holds its predecessor's files); with more, every node
holds every file (memory: the whole snapshot per node, two generations; see ``localtier.place``).
One node: nothing here runs.
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
from elastictrain.snapshot import manifest

CHUNK_BYTES = 64 * 2**20
"""Bytes per broadcast: a file is never held in memory whole."""
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


def share(path: Path, nodes: Nodes) -> tuple[Files, str | None]:
    """Node leaders (collective on their group): send this node's files of snapshot ``path`` to every other
    node, receive theirs; (every file of the snapshot, the first problem or None). A receiver that fails
    keeps taking part (discarding), so no sender waits on it; the problem is agreed on afterwards."""
    problem: str | None = None
    try:
        own = hash_files(path)
    except OSError as e:  # still take part: the others would wait for this node's files
        own, problem = {}, f"{path}: {e}"
    everything: Files = dict(own)
    for src in nodes.leaders:
        box = [own if src == nodes.rank else None]
        _broadcast_object(box, src, nodes)
        theirs: Files = box[0]
        for rel in sorted(theirs):
            entry = theirs[rel]
            had = rel in everything
            if src != nodes.rank and had and everything[rel] != entry:
                problem = problem or f"{path / rel}: written differently on two nodes"
            everything.setdefault(rel, entry)
            keep = src != nodes.rank and not had
            problem = _transfer(path, rel, entry, src, nodes, write=keep and problem is None) or problem
    problems = [p for p in all_gather_object(_leader_ctx(nodes), problem, group=nodes.group) if p]
    return everything, (problems[0] if problems else None)


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


def commit_copy(path: Path, record: dict[str, Any]) -> None:
    """A leader: write ``record`` into this node's copy, once every file it lists is there with its size."""
    for rel, entry in record["files"].items():
        if (path / rel).stat().st_size != entry["size"]:
            raise RuntimeError(f"{path / rel}: {(path / rel).stat().st_size} bytes, not the {entry['size']} committed")
    write_json_atomic(path / manifest.COMMIT, record)


def broadcast_record(record: dict[str, Any] | None, nodes: Nodes) -> dict[str, Any]:
    """Rank 0's commit record on every leader."""
    box = [record]
    _broadcast_object(box, 0, nodes)
    return box[0]


def _transfer(path: Path, rel: str, entry: dict[str, Any], src: int, nodes: Nodes, write: bool) -> str | None:
    """One file from leader ``src`` to every other leader, in chunks; a receiver that ``write``s it checks its
    size and checksum. The problem, or None."""
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
            dist.broadcast(chunk, src=src, group=nodes.group)
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

"""A reader of wandb's own transaction log (``run-ID.wandb``): which steps a wandb run really holds.

wandb offers no public API for this offline; the format is LevelDB's log format around wandb's protobuf
records, read here by hand (the protobuf module is wandb's: tests/test_metrics.py breaks if it moves).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path


def last_wandb_step(wandb_dir: Path, run_id: str) -> int:
    """The highest history step in run ``run_id``'s transaction logs under ``wandb_dir`` (-1: none).

    Every attempt of a run writes its own ``offline-run-TIME-ID/run-ID.wandb`` (``run-TIME-ID`` online);
    what ``wandb sync`` would upload from them is what wandb has.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    last = -1
    for path in Path(wandb_dir).glob(f"*run-*-{run_id}/run-{run_id}.wandb"):
        for payload in wandb_log_records(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            if record.HasField("history"):
                last = max(last, record.history.step.num)
    return last


_WANDB_LOG_BLOCK = 32768
_WANDB_CHUNK_HEADER = 7  # crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last)


def wandb_log_records(data: bytes) -> Iterator[bytes]:
    """The record payloads of a wandb transaction log (``run-ID.wandb``), up to the first bad chunk.

    Layout (LevelDB's log format): a 7-byte header (':W&B', magic 0xBEE1, version), then 32 KiB blocks of
    chunks, each a 7-byte chunk header and its bytes; the crc covers the type byte and the bytes. A process
    killed mid-write leaves a short or unwritten tail, which ends the scan.
    """
    if data[:4] != b":W&B":
        return
    pos, payload = 7, b""
    while pos + _WANDB_CHUNK_HEADER <= len(data):
        room = _WANDB_LOG_BLOCK - pos % _WANDB_LOG_BLOCK
        if room < _WANDB_CHUNK_HEADER:  # no room for a chunk header: the block is padded with zeroes
            pos += room
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        end = pos + _WANDB_CHUNK_HEADER + length
        if kind not in (1, 2, 3, 4) or end > len(data) or zlib.crc32(data[pos + 6:end]) != crc:
            return
        chunk = data[pos + _WANDB_CHUNK_HEADER:end]
        pos = end
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            yield payload

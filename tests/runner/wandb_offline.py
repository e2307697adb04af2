"""Read an offline W&B run's transaction log (``run-<id>.wandb``) back, for tests.

The file is W&B's "datastore": a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then
LevelDB-log blocks of 32 KiB whose records (crc32, length, type FULL/FIRST/MIDDLE/LAST)
carry serialised ``wandb_internal_pb2.Record`` protobufs. Written from that format so the
test reads what W&B wrote, not what we asked it to write.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = struct.Struct("<4sHB")
RECORD = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, _ = HEADER.unpack_from(data, 0)
    assert ident == b":W&B" and magic == 0xBEE1, "not a W&B datastore file"
    out, pos, chunks = [], HEADER.size, []
    while pos + RECORD.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD.size:        # block trailer: zero padding
            pos += left
            continue
        _, length, kind = RECORD.unpack_from(data, pos)
        if kind == 0 and length == 0:
            pos += left
            continue
        chunks.append(data[pos + RECORD.size: pos + RECORD.size + length])
        pos += RECORD.size + length
        if kind in (FULL, LAST):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(b"".join(chunks))
            out.append(rec)
            chunks = []
    return out


def summary(path: Path) -> dict:
    """The run's final summary: the last value written for each key."""
    values: dict = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                values[key] = json.loads(item.value_json)
    return values

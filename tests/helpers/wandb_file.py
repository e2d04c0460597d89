"""Reads an offline W&B run file (``run-<id>.wandb``) with W&B's own record schema.

wandb 0.31 dropped its Python reader of this file (the Go core writes it), so this is the
record framing of W&B's ``datastore`` (LevelDB log format: 32 KiB blocks, each chunk a 7-byte
header of CRC-32C, length and type; a 7-byte file header ``:W&B``, 0xBEE1, version 0) and the
records are parsed by ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    """Every ``Record`` of the file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B run file (header {data[:HEADER]!r})")
    position, pending, parsed = HEADER, b"", []
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # block trailer: zero padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        chunk = data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            parsed.append(record)
            pending = b""
    return parsed


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """:func:`records` once the file holds the run's ``exit`` record: ``wandb.finish()`` can return
    before W&B's core process has written the file out (a race seen in about one run in three)."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            parsed = records(path)
            if any(record.WhichOneof("record_type") == "exit" for record in parsed):
                return parsed
        except DecodeError:  # a record still being written
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout} s; did the run call wandb.finish()?")
        time.sleep(0.2)


def history_rows(path: Path) -> list[dict]:
    """The logged history rows of a finished run: ``{key: value}`` with values decoded from JSON."""
    rows = []
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows

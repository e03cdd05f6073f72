"""The row checksum file of a store: the CRC-32C of every stored row, checked by the reader on each read.

One little-endian uint32 per row (format.ROW_CHECKSUMS): group g's rows are entries
[g.row_checksum_index, g.row_checksum_index + g.rows). The manifest lists the file under `files` with
crc32 block checksums like any other, and they are checked every time the file is loaded, so a
damaged table is reported as such instead of as damaged rows. At 4 bytes per row it is small (3.3 MB
for the backbone of a 7B model) and is held in RAM while the store is open.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nchunk_core.store.format import CHECKSUM_BLOCK_BYTES, BlockCrc, StoreCorruptError

__all__ = ["load", "write"]

DTYPE = np.dtype("<u4")


def write(root: Path, name: str, table: np.ndarray) -> dict:
    """Write `table` (uint32 [rows]) to root/name atomically and durably; returns its `files` entry."""
    data = np.ascontiguousarray(table, dtype=DTYPE).reshape(-1).view(np.uint8)
    crc = BlockCrc(CHECKSUM_BLOCK_BYTES)
    crc.update(data)
    tmp = root / (name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"size": int(data.size), "checksum": crc.finish()}


def load(root: Path, name: str, entry: dict) -> np.ndarray:
    """The table in root/name, its size and block checksums checked against `entry`: uint32 [rows]."""
    try:
        data = (root / name).read_bytes()
    except OSError as exc:
        raise StoreCorruptError(f"{name}: cannot read the row checksums: {exc}") from exc
    if len(data) != entry["size"]:
        raise StoreCorruptError(f"{name}: {len(data)} bytes, the manifest records {entry['size']}")
    crc = BlockCrc(entry["checksum"]["block_bytes"])
    crc.update(data)
    for k, (actual, expected) in enumerate(zip(crc.finish()["blocks"], entry["checksum"]["blocks"])):
        if actual != expected:
            start = k * crc.block_bytes
            raise StoreCorruptError(f"{name}: bytes [{start}, {min(len(data), start + crc.block_bytes)})"
                                    f": crc32 {actual:08x}, expected {expected:08x}; the row "
                                    f"checksums are damaged (rewrite them with a copy of the store, "
                                    f"or convert it again)")
    return np.frombuffer(data, dtype=DTYPE).astype(np.uint32)

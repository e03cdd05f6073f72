"""CRC-32C of buffers and of rows, as the reader checks them (nchunk_core/csrc/crc32c.hpp).

The CPU's CRC instruction is used where present (SSE4.2 on x86-64, CRC32 on aarch64), chosen at run
time; ``path="table"`` forces the portable table, ``path="hardware"`` demands the instruction
(ValueError where there is none). Both give the standard CRC-32C: ``crc32c(b"123456789") == 0xE3069283``.
"""
from __future__ import annotations

import numpy as np

from nchunk_core import _native

__all__ = ["crc32c", "crc32c_rows", "hardware"]


def _bytes(data) -> np.ndarray:
    """A flat uint8 view of a bytes-like object or array (a copy only when not contiguous)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def hardware() -> str:
    """The instruction the automatic path uses here: 'sse4.2', 'armv8-crc', or '' (table only)."""
    return _native.crc32c_hardware()


def crc32c(data, crc: int = 0, path: str = "auto") -> int:
    """CRC-32C of ``data``, continuing from ``crc`` (chain pieces: ``crc32c(b, crc32c(a))``)."""
    return _native.crc32c(_bytes(data), crc, path)


def crc32c_rows(data, row_bytes: int, path: str = "auto") -> np.ndarray:
    """uint32 [rows]: the CRC-32C of each ``row_bytes``-byte row of ``data`` (whole rows only)."""
    return _native.crc32c_rows(_bytes(data), int(row_bytes), path)

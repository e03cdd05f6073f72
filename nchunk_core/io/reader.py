"""Threaded direct-I/O reads of file extents into NumPy arrays or CPU torch tensors.

A thin wrapper over the C++ reader (``nchunk_core/csrc/reader.hpp``)::

    with Reader(threads=6) as r:
        f = r.open(path)                      # .path .size .direct .alignment
        out = r.empty(nbytes)                 # 4096-aligned: aligned extents need no copy
        stats = r.read(f, extents, out)       # extents: int64 [n, 3] = (file_offset, length, dest_offset)
        req = r.submit(f, more_extents, out2) # returns at once; overlap I/O with compute
        stats = req.wait()

Offsets and lengths are in bytes, whatever the dtype of ``out``. Zero-length extents are allowed and
read nothing. Destination ranges of one request must not overlap (not checked).

A span goes straight from the drive into ``out`` when its file offset and its destination address
agree with the alignment (``f.alignment``), e.g. 4096-aligned offsets into ``r.empty()``; anything else
goes through a per-thread aligned buffer and a copy, which costs memory bandwidth.

Errors: an errno from open or read raises ``OSError`` of the matching subclass (``FileNotFoundError``,
``PermissionError``, ``IsADirectoryError``...) with ``.errno``, ``.filename`` = path and a message naming
the offset and length; an extent past the end of the file (or a file that shrank while being read)
raises ``EOFError``; a malformed extent or a destination range outside ``out`` raises ``ValueError``.
Where the file system refuses O_DIRECT (e.g. ramfs) the file is read with buffered I/O, ``f.direct``
is False, and a ``RuntimeWarning`` is issued once per process.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from nchunk_core import _native

__all__ = ["DioAlignment", "OpenFile", "ReadRequest", "ReadStats", "Reader", "dio_alignment"]

BUFFER_ALIGNMENT = 4096

_fallback_warned = False


class DioAlignment(NamedTuple):
    """Direct-I/O alignment in bytes for buffer addresses (memory) and file offsets/lengths (offset).

    ``direct`` is False where the file system does not do direct I/O; both sizes are then 1.
    """

    memory: int
    offset: int
    direct: bool


@dataclass(frozen=True)
class ReadStats:
    """What one read did. ``bytes_read`` counts what pread returned, alignment padding included."""

    bytes: int
    bytes_read: int
    reads: int  # extents, each one contiguous read
    tasks: int  # pieces of at most max_task_bytes handed to the threads
    wall_s: float


def dio_alignment(path) -> DioAlignment:
    """Direct-I/O alignment of the file at ``path``; for a directory, of new files created in it.

    Asks the kernel (statx STATX_DIOALIGN) and otherwise probes with small O_DIRECT reads.
    """
    return DioAlignment(*_native.dio_alignment(os.fsdecode(path)))


class OpenFile:
    """A file opened by :meth:`Reader.open`. Closed when it and every request reading it are gone."""

    def __init__(self, native):
        self._native = native
        self.path: str = native.path
        self.size: int = native.size
        self.direct: bool = native.direct
        self.alignment = DioAlignment(*native.alignment)

    def fileno(self) -> int:
        return self._native.fileno()

    def __repr__(self):
        return f"OpenFile({self.path!r}, size={self.size}, direct={self.direct})"


class ReadRequest:
    """A read in flight. ``wait()`` may be called more than once; dropping it unwaited waits."""

    def __init__(self, native):
        self._native = native  # holds the destination buffer until the read is over

    def wait(self) -> ReadStats:
        return ReadStats(*self._native.wait())

    def done(self) -> bool:
        return self._native.done()


def _destination(out):
    """(address, nbytes, owner) of a writable C-contiguous NumPy array, CPU torch tensor or buffer.

    ``owner`` is what a request must keep alive: the array or tensor itself, or for other buffers
    (bytearray, memoryview) an array over them, whose buffer export also stops a bytearray resizing.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(out, torch.Tensor):
        if out.device.type != "cpu":
            raise ValueError(f"out is a tensor on {out.device}; the reader fills CPU memory only "
                             "(read into a pinned CPU tensor and copy it to the device)")
        if not out.is_contiguous():
            raise ValueError("out must be a contiguous tensor")
        return out.data_ptr(), out.numel() * out.element_size(), out
    if not isinstance(out, np.ndarray):
        out = np.frombuffer(out, dtype=np.uint8)  # bytearray, memoryview, ...
    if not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous array")
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    return out.__array_interface__["data"][0], out.nbytes, out


def _extent_array(extents) -> np.ndarray:
    rows = np.asarray(extents)
    if rows.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if rows.dtype.kind not in "iu":
        raise ValueError(f"extents must be integers, got dtype {rows.dtype}")
    if rows.dtype.kind == "u" and rows.max() > np.iinfo(np.int64).max:
        raise ValueError("extent values do not fit in int64")
    if rows.ndim != 2 or rows.shape[1] != 3:
        raise ValueError(f"extents must have shape [n, 3] (file_offset, length, dest_offset), got {rows.shape}")
    return np.ascontiguousarray(rows, dtype=np.int64)


class Reader:
    """A fixed pool of threads reading extents of files into caller buffers (see module docstring)."""

    def __init__(self, threads: int = 6, max_task_bytes: int = 1 << 20):
        self._native = _native.Reader(threads, max_task_bytes)

    @property
    def threads(self) -> int:
        return self._native.threads

    @property
    def max_task_bytes(self) -> int:
        return self._native.max_task_bytes

    def open(self, path) -> OpenFile:
        global _fallback_warned
        f = OpenFile(self._native.open(os.fsdecode(path)))
        if not f.direct and not _fallback_warned:
            _fallback_warned = True
            warnings.warn(f"direct I/O is not available for {f.path}; reading through the page cache "
                          "(said once per process)", RuntimeWarning, stacklevel=2)
        return f

    def read(self, f: OpenFile, extents, out) -> ReadStats:
        """Read ``extents`` of ``f`` into ``out`` and wait for them."""
        address, nbytes, _ = _destination(out)
        return ReadStats(*self._native.read(f._native, _extent_array(extents), address, nbytes))

    def submit(self, f: OpenFile, extents, out) -> ReadRequest:
        """Queue a read and return at once; ``out`` is kept alive until the read is over."""
        address, nbytes, owner = _destination(out)
        return ReadRequest(self._native.submit(f._native, _extent_array(extents), address, nbytes, owner))

    @staticmethod
    def empty(nbytes: int) -> np.ndarray:
        """An uninitialised uint8 array whose address is a multiple of 4096 (no copies on aligned reads)."""
        raw = np.empty(nbytes + BUFFER_ALIGNMENT, dtype=np.uint8)
        start = -raw.__array_interface__["data"][0] % BUFFER_ALIGNMENT
        return raw[start:start + nbytes]

    def close(self) -> None:
        """Finish queued reads and stop the threads."""
        self._native.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""Direct-I/O reads of file extents into NumPy arrays or CPU torch tensors.

A thin wrapper over the C++ reader (``nchunk_core/csrc/reader.hpp``)::

    with Reader(threads=6) as r:              # backend="auto": the drive profile's choice
        f = r.open(path)                      # .path .size .direct .alignment
        out = r.empty(nbytes)                 # 4096-aligned: aligned extents need no copy
        stats = r.read(f, extents, out)       # extents: int64 [n, 3] = (file_offset, length, dest_offset)
        req = r.submit(f, more_extents, out2) # returns at once; overlap I/O with compute
        stats = req.wait()
        r.read(f, extents, out, checksums=RowChecksums(table, first_row, row_bytes))  # rows checked

Offsets and lengths are in bytes, whatever the dtype of ``out``. Zero-length extents are allowed and
read nothing. Destination ranges of one request must not overlap (not checked).

A span goes straight from the drive into ``out`` when its file offset and its destination address
agree with the alignment (``f.alignment``), e.g. 4096-aligned offsets into ``r.empty()``; anything else
goes through a per-thread aligned buffer and a copy, which costs memory bandwidth.

Row checksums: with ``checksums`` (a :class:`RowChecksums`), the thread that read a piece of an extent
computes the CRC-32C of every row in it (the CPU's instruction where present) and compares it with the
table; a mismatch raises :class:`ChecksumError` naming the file, row and offset. ``Reader(verify=False)``
or ``verify=False`` on one call skips the checks (for measuring what they cost).

Backends: ``"threads"`` (a pool of threads calling pread) or ``"io_uring"`` (one thread driving a ring
over the raw system calls, rows checked on a few threads as reads complete); both keep ``threads``
reads in flight and behave alike in everything but speed. ``"auto"`` (the default) takes the one the
drive profile ``profile`` recorded as faster (``meta["reader_backend"]``), else the thread pool. Where
no ring can be set up (old kernel, seccomp, ``kernel.io_uring_disabled``, ``NCHUNK_IO_URING=off``)
the thread pool reads instead: ``backend`` says which one reads, ``backend_note`` why, and a
``RuntimeWarning`` says so once per process.

Errors (nchunk_core/io/errors.py): every failed open or read raises an :class:`IoError`, an ``OSError``
with ``.path``, ``.offset``, ``.length`` and ``.errno``, which is also of the built-in subclass for its
errno (``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``...; ``.filename`` = path); an
extent past the end of the file (or a file that shrank while being read) raises :class:`EndOfFileError`,
also an ``EOFError``; a malformed extent or a destination range outside ``out`` raises ``ValueError``.
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
from nchunk_core.io.errors import ChecksumError, EndOfFileError, IoError

__all__ = ["BACKENDS", "ChecksumError", "DioAlignment", "EndOfFileError", "IoError", "OpenFile", "ReadRequest",
           "ReadStats", "Reader", "RowChecksums", "dio_alignment", "io_uring_unavailable", "resolve_backend"]

BUFFER_ALIGNMENT = 4096
BACKENDS = ("auto", "threads", "io_uring")

_fallback_warned = False
_backend_notes_warned: set[str] = set()


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
    tasks: int  # pieces of at most max_task_bytes (whole rows when checked) handed to the threads
    wall_s: float
    rows_checked: int = 0  # rows whose CRC-32C was checked


@dataclass(frozen=True)
class RowChecksums:
    """The expected CRC-32C of the rows a request's extents read.

    Extent i is whole rows of ``row_bytes[i]`` bytes, whose CRCs are ``table[first_row[i]]``,
    ``table[first_row[i] + 1]``, ...; ``row_bytes`` may be one size for every extent, and a size of 0
    leaves that extent unchecked.
    """

    table: np.ndarray  # uint32 [rows]
    first_row: np.ndarray  # int64 [n]
    row_bytes: np.ndarray | int  # int64 [n], or one size

    def checks(self, n: int) -> np.ndarray:
        """int64 [n, 2] of (row_bytes, first_row) per extent, as the native reader takes them."""
        out = np.empty((n, 2), dtype=np.int64)
        out[:, 0] = self.row_bytes
        out[:, 1] = self.first_row
        return out


def io_uring_unavailable() -> str:
    """'' when this process can set up an io_uring, otherwise why not."""
    return _native.io_uring_unavailable()


def resolve_backend(backend: str, profile=None) -> str:
    """The backend a Reader asks for: ``backend`` itself, or for "auto" the one the drive profile
    (a LatencyTable) recorded as faster; a profile without that record, or none, means "threads"."""
    if backend not in BACKENDS:
        raise ValueError(f"reader backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend != "auto":
        return backend
    recorded = profile.meta.get("reader_backend") if profile is not None else None
    return recorded if recorded in ("threads", "io_uring") else "threads"


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


def _check_args(extents: np.ndarray, checksums: RowChecksums | None, verify: bool) -> dict:
    """Keyword arguments of the native read for the row checks of a request (none when not verifying)."""
    if checksums is None or not verify:
        return {}
    table = np.ascontiguousarray(checksums.table, dtype=np.uint32)
    if table.ndim != 1:
        raise ValueError(f"the row checksum table must be 1-D, got shape {table.shape}")
    return {"row_table": table, "row_checks": checksums.checks(len(extents))}


class Reader:
    """Reads extents of files into caller buffers, ``threads`` reads in flight (see module docstring).

    ``verify`` (default True) is whether reads given row checksums check them; a call's own
    ``verify`` overrides it. ``backend``: "auto", "threads" or "io_uring"; ``profile``: the drive's
    LatencyTable, which "auto" consults.
    """

    def __init__(self, threads: int = 6, max_task_bytes: int = 1 << 20, verify: bool = True,
                 backend: str = "auto", profile=None):
        self._native = _native.Reader(threads, max_task_bytes, backend=resolve_backend(backend, profile))
        self.verify = bool(verify)
        note = self.backend_note
        if note and note not in _backend_notes_warned:
            _backend_notes_warned.add(note)
            warnings.warn(f"io_uring is not available ({note}); reading with the thread pool (said once "
                          "per process)", RuntimeWarning, stacklevel=2)

    @property
    def threads(self) -> int:
        return self._native.threads

    @property
    def backend(self) -> str:
        """The backend reading: "threads" or "io_uring"."""
        return self._native.backend

    @property
    def backend_note(self) -> str:
        """Why ``backend`` is not the one asked for ('' when it is)."""
        return self._native.backend_note

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

    def read(self, f: OpenFile, extents, out, checksums: RowChecksums | None = None,
             verify: bool | None = None) -> ReadStats:
        """Read ``extents`` of ``f`` into ``out`` (checking rows against ``checksums``) and wait."""
        address, nbytes, _ = _destination(out)
        rows = _extent_array(extents)
        checks = _check_args(rows, checksums, self.verify if verify is None else verify)
        return ReadStats(*self._native.read(f._native, rows, address, nbytes, **checks))

    def submit(self, f: OpenFile, extents, out, checksums: RowChecksums | None = None,
               verify: bool | None = None) -> ReadRequest:
        """Queue a read and return at once; ``out`` is kept alive until the read is over."""
        address, nbytes, owner = _destination(out)
        rows = _extent_array(extents)
        checks = _check_args(rows, checksums, self.verify if verify is None else verify)
        return ReadRequest(self._native.submit(f._native, rows, address, nbytes, owner, **checks))

    @staticmethod
    def empty(nbytes: int) -> np.ndarray:
        """An uninitialised uint8 array whose address is a multiple of 4096 (no copies on aligned reads)."""
        raw = np.empty(nbytes + BUFFER_ALIGNMENT, dtype=np.uint8)
        start = -raw.__array_interface__["data"][0] % BUFFER_ALIGNMENT
        return raw[start:start + nbytes]

    def close(self) -> None:
        """Finish queued reads and stop the threads (and the ring)."""
        self._native.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

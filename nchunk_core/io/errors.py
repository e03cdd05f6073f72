"""Errors of the direct-I/O reader: each names the file and the byte range that failed.

Every failed open or read raises an :class:`IoError` (an ``OSError``) with the attributes

    path      the file
    offset    first byte of the range being read (None for open)
    length    bytes in that range (None for open)
    errno     the system error (None for a file that ended early; EBADMSG for a checksum mismatch)

An error with an errno that Python maps to a built-in subclass is also of that subclass: a missing
file raises an IoError that is a ``FileNotFoundError``, a directory one that is an
``IsADirectoryError``. :class:`EndOfFileError` (also an ``EOFError``) is a read past the end of the
file or a file that ended early; :class:`ChecksumError` is a row whose bytes do not match their
recorded CRC-32C. The native reader builds these through :func:`from_native`.
"""
from __future__ import annotations

import errno as errno_codes
import os

__all__ = ["ChecksumError", "EndOfFileError", "IoError", "from_native"]


class IoError(OSError):
    """A failed open or read of ``path``: bytes [offset, offset + length), with ``errno``."""

    path: str
    offset: int | None
    length: int | None


class EndOfFileError(IoError, EOFError):
    """A read past the end of the file: rejected before reading, or the file shrank since it was opened."""


class ChecksumError(IoError):
    """A row whose CRC-32C, as read, differs from the recorded one: the file is damaged.

    ``offset``/``length`` are the row's bytes in ``path``; ``row`` is its index in the checksum table
    of the request (for a store read, the row of the group); ``expected``/``actual`` are the CRCs.
    ``group`` names the store's matrix group where the caller knows it (None otherwise).
    """

    row: int
    expected: int
    actual: int
    group: str | None = None

    def __str__(self) -> str:
        group = f"group {self.group!r}, " if self.group else ""
        return (f"{self.path}: {group}row {self.row} ({self.length} bytes at offset {self.offset}): "
                f"CRC-32C {self.actual:08x} read, {self.expected:08x} recorded; the file is damaged "
                f"(`nchunk verify` lists every damaged block)")


_ERRNO_CLASSES: dict[type, type] = {}


def _errno_class(code: int) -> type:
    """IoError, or a subclass of IoError and of the built-in OSError subclass for `code`."""
    builtin = type(OSError(code, ""))  # OSError picks FileNotFoundError, PermissionError, ...
    if builtin is OSError:
        return IoError
    cls = _ERRNO_CLASSES.get(builtin)
    if cls is None:
        cls = type(builtin.__name__, (IoError, builtin),
                   {"__module__": __name__, "__doc__": f"An IoError that is a {builtin.__name__}."})
        _ERRNO_CLASSES[builtin] = cls
    return cls


def from_native(kind: str, code: int, message: str, detail: str, path: str, offset: int, length: int,
                row: int | None = None, expected: int | None = None, actual: int | None = None) -> IoError:
    """The exception for an error of the C++ reader (its kind, errno, message and fields)."""
    if kind == "checksum":
        error = ChecksumError(errno_codes.EBADMSG, message, path)
        error.row, error.expected, error.actual = row, expected, actual
    elif kind == "end_of_file":
        error = EndOfFileError(message)
    else:
        error = _errno_class(code)(code, f"{os.strerror(code)} ({detail})", path)
    error.path = path
    error.offset = None if offset < 0 else offset
    error.length = None if length < 0 else length
    return error

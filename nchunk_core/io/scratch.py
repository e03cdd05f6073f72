"""Scratch files for measuring a drive: where one may go, and the file itself.

The drive profile and the reader benchmark read a file of random bytes on the drive under test. That
drive is named by a directory, usually a store, which may be read-only (a store shipped inside an
installed package, a read-only mount) and is never the place for 128 MiB of scratch. So the file
goes into the first writable folder on the same file system (same device id), in this order:

1. the system temp folder (where temporary files belong, and cleaned at boot should a killed
   process leave one behind),
2. the ancestors of the directory, from its parent up to its mount point,
3. the caller's fallback folder when it is on that file system.

When none is, the caller's fallback folder is used, and that is then the drive measured; without a
fallback, OSError. Names are unique per file, so concurrent measurements never share one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

SCRATCH_NAME = ".nchunk-profile-scratch.bin"  # each file is named <stem>-<random><suffix>
MIB = 1024 * 1024


def _writable(folder: Path) -> bool:
    """Whether a file can be created in `folder`, asked by creating one (a read-only mount refuses
    even root, which permission bits do not)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".nchunk-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def scratch_place(directory, fallback=None) -> tuple[Path, bool]:
    """(folder for a scratch file, whether it is on the file system holding `directory`).

    Never `directory` itself unless it is the system temp folder (see the module docstring). With no
    writable folder on that file system: (`fallback`, False) when `fallback` is a writable folder
    (created if missing), else OSError.
    """
    directory = Path(directory).absolute()
    device = os.stat(directory).st_dev
    candidates = [Path(tempfile.gettempdir())]
    for parent in directory.parents:
        try:
            if os.stat(parent).st_dev != device:
                break  # above the mount point
        except OSError:
            break
        candidates.append(parent)
    if fallback is not None:
        fallback = Path(fallback)
        with contextlib.suppress(OSError):
            fallback.mkdir(parents=True, exist_ok=True)
        candidates.append(fallback)
    for place in candidates:
        with contextlib.suppress(OSError):
            if os.stat(place).st_dev == device and _writable(place):
                return place, True
    if fallback is not None and fallback.is_dir() and _writable(fallback):
        return fallback, False
    raise OSError(f"no writable folder for a scratch file on the drive holding {directory}"
                  + (f", nor in {fallback}" if fallback is not None else ""))


class ScratchFile(contextlib.AbstractContextManager):
    """A file of `size_bytes` random bytes on the drive holding `directory` (never in it: see
    `scratch_place`; `same_drive` False when it went to `fallback`'s drive instead). Removed on exit,
    and when writing it fails or is interrupted (an exception from `progress` included)."""

    def __init__(self, directory, size_bytes: int, progress: Callable[[float, str], None] | None = None,
                 fallback=None):
        folder, self.same_drive = scratch_place(directory, fallback)
        stem, suffix = os.path.splitext(SCRATCH_NAME)
        fd, name = tempfile.mkstemp(dir=folder, prefix=stem + "-", suffix=suffix)
        self.path = Path(name)
        self.size = int(size_bytes)
        try:
            with open(fd, "wb") as f:
                self._write(f, progress)
        except BaseException:
            self._remove()
            raise

    def _write(self, f, progress) -> None:
        rng = np.random.default_rng(0)
        block = 8 * MIB
        for done in range(0, self.size, block):
            n = min(block, self.size - done)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            if progress:
                progress(done / self.size, "writing scratch file")
        f.flush()
        os.fsync(f.fileno())

    def _remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()

    def __exit__(self, *exc) -> None:
        self._remove()

"""Which drive and file system a path lives on: the key under which drive profiles are cached.

A profile is only valid for the drive it was measured on, so the key combines the block device
(model, serial, size, logical block size), the file system type, and the reader's thread count. On
machines without sysfs (containers, other OSes) the key degrades to the device number and fs type.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

_SYS = Path("/sys/dev/block")


@dataclasses.dataclass(frozen=True)
class DriveInfo:
    device: str  # "major:minor" of the file system holding the path
    name: str  # kernel name of the whole disk, e.g. "nvme0n1", or "" when unknown
    model: str
    serial: str
    size_bytes: int
    logical_block: int
    rotational: bool | None
    fs_type: str
    mount_point: str

    def key(self, threads: int) -> str:
        """A file-name-safe cache key: readable prefix plus a hash of every identifying field."""
        ident = "|".join(str(v) for v in dataclasses.astuple(self)[:-1]) + f"|threads={threads}"
        digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.name or self.device}-{self.fs_type}")
        return f"{label}-t{threads}-{digest}"

    def describe(self) -> str:
        model = f" {self.model}" if self.model else ""
        size = f", {self.size_bytes / 1e9:.0f} GB" if self.size_bytes else ""
        return f"{self.name or self.device}{model}{size}, {self.fs_type} at {self.mount_point}"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _mount_of(path: Path, dev: str) -> tuple[str, str]:
    """(fs type, mount point) of the mount with device number `dev` containing `path`."""
    best = ("unknown", "/")
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best
    resolved = str(path.resolve())
    best_len = -1
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or fields[2] != dev:
            continue
        mount = fields[4].replace("\\040", " ")
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) > best_len:
            best, best_len = (right.split()[0] if right else "unknown", mount), len(mount)
    return best


def drive_info(path) -> DriveInfo:
    """Describe the drive holding `path` (a file or directory that exists)."""
    path = Path(path)
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    dev = f"{major}:{minor}"
    fs_type, mount = _mount_of(path, dev)
    node = _SYS / dev
    name = model = serial = ""
    size = block = 0
    rotational = None
    if node.exists():
        real = node.resolve()
        disk = real.parent if (real / "partition").exists() else real  # a partition's parent is its disk
        name = disk.name
        model = _read(disk / "device" / "model")
        serial = _read(disk / "serial") or _read(disk / "device" / "serial") or _read(disk / "wwid")
        sectors = _read(disk / "size")
        size = int(sectors) * 512 if sectors.isdigit() else 0
        lb = _read(disk / "queue" / "logical_block_size")
        block = int(lb) if lb.isdigit() else 0
        rot = _read(disk / "queue" / "rotational")
        rotational = rot == "1" if rot else None
    return DriveInfo(dev, name, model, serial, size, block, rotational, fs_type, mount)

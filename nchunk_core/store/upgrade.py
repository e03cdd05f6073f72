"""`nchunk upgrade`: bring a store of an older format version to the current one, in place.

Version 2 added the CRC-32C of every row. The upgrade reads the whole store once: it checks every
block checksum the manifest records and computes the row checksums from the same bytes. A damaged
store is refused, since row checksums computed from damaged bytes would vouch for them. Then it writes
the row checksum file and rewrites the manifest atomically: the new version, the row checksum file
(listed under `files` with its block checksums) and each group's index into it. Every other field is
kept as it was. Interrupted at any point, the store is either still the old version (perhaps with a
row checksum file that the next upgrade replaces) or the new one.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np

from nchunk_core.store import row_checksums
from nchunk_core.store.format import ROW_CHECKSUM_ALGO, ROW_CHECKSUMS, VERSION, StoreCorruptError
from nchunk_core.store.loader import Store
from nchunk_core.store.verify import verify_store
from nchunk_core.store.writer import write_manifest


@dataclasses.dataclass(frozen=True)
class UpgradeResult:
    path: Path
    old_version: int
    version: int
    rows: int  # row checksums computed (0 when the store was current already)
    bytes_checked: int

    def __str__(self) -> str:
        if self.old_version == self.version:
            return f"{self.path}: already format version {self.version}; nothing to do"
        return (f"{self.path}: upgraded from format version {self.old_version} to {self.version}: "
                f"{self.bytes_checked / 2**20:.1f} MiB checked against the block checksums, "
                f"CRC-32C of {self.rows} rows written to {ROW_CHECKSUMS}")


def upgrade(path, progress: bool | None = None) -> UpgradeResult:
    """Upgrade the store in directory `path` in place (see the module docstring)."""
    store = Store.open(path, check_alignment=False, oldest_version=1)
    if store.version >= VERSION:
        return UpgradeResult(store.path, store.version, store.version, 0, 0)
    scans = {}
    report = verify_store(store, progress, scans)
    if not report.ok:
        raise StoreCorruptError(f"not upgraded: the store is damaged (restore it from a copy, or "
                                f"convert the model again)\n{report}")
    manifest = copy.deepcopy(store.manifest)
    tables, index = [], 0
    for entry in manifest["groups"]:
        rows = scans[entry["name"]].rows  # uint32 [rows] of this group
        entry["row_checksum_index"] = index
        tables.append(rows)
        index += rows.size
    table = np.concatenate(tables) if tables else np.zeros(0, np.uint32)
    manifest["files"][ROW_CHECKSUMS] = row_checksums.write(store.path, ROW_CHECKSUMS, table)
    manifest["row_checksums"] = {"file": ROW_CHECKSUMS, "algo": ROW_CHECKSUM_ALGO}
    manifest["version"] = VERSION
    write_manifest(store.path, manifest)
    Store.open(store.path, check_alignment=False)  # what was written opens as the current version
    return UpgradeResult(store.path, store.version, VERSION, int(table.size), report.bytes_checked)

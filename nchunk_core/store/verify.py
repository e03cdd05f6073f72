"""Read every byte of a store and check it against its checksums (`nchunk verify`, `nchunk upgrade`).

A weight group is read once, in pieces of whole rows; each piece feeds both the crc32 of the blocks
the manifest records and the CRC-32C of each row, which a version-2 store also records. A bad block is
reported with the rows in it that fail too; a row that fails while its block matches (a damaged or
mismatched row checksum file) is reported on its own. The other files (resident tensors,
permutations, row checksums) are checked block by block.
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from pathlib import Path

import numpy as np

from nchunk_core.io.checksum import crc32c_rows
from nchunk_core.store.format import BlockCrc, GroupInfo, StoreCorruptError, StoreError, safetensors_header

PIECE_BYTES = 4 << 20  # bytes read at a time (rounded down to whole rows)
MAX_ROWS_NAMED = 8  # bad rows listed per bad block


@dataclasses.dataclass
class BadBlock:
    """A checksum block (or row) whose bytes do not match (or could not be read)."""

    file: str
    group: str | None  # None for resident / permutation / row checksum files
    offset: int  # byte offset in `file`
    length: int
    reason: str

    def __str__(self) -> str:
        owner = f"group {self.group!r}" if self.group else "file"
        return f"{self.file}: {owner}, bytes [{self.offset}, {self.offset + self.length}): {self.reason}"


@dataclasses.dataclass
class VerifyReport:
    path: Path
    groups: int = 0
    bytes_checked: int = 0
    rows_checked: int = 0
    bad: list[BadBlock] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def __str__(self) -> str:
        rows = f", {self.rows_checked} row CRC-32C" if self.rows_checked else ""
        head = (f"{self.path}: {self.groups} groups, {self.bytes_checked / 2**20:.1f} MiB checked{rows}, "
                + ("all checksums match" if self.ok else f"{len(self.bad)} bad block(s)"))
        return "\n".join([head, *(f"  {b}" for b in self.bad)])

    def raise_if_bad(self) -> None:
        if self.bad:
            raise StoreCorruptError(str(self))


@dataclasses.dataclass
class GroupScan:
    """What one pass over a group's bytes found."""

    nbytes: int  # bytes read: less than the group's when its file ends early
    blocks: list[int]  # crc32 per block (the last one partial when the file ended early)
    rows: np.ndarray  # uint32 [whole rows read]: CRC-32C of each


def scan_group(g: GroupInfo, bar=None) -> GroupScan:
    """Read the group's bytes with plain reads, computing block crc32 and row CRC-32C. Raises OSError."""
    blocks = BlockCrc(g.checksum["block_bytes"])
    rows = [np.zeros(0, np.uint32)]
    step = max(1, PIECE_BYTES // g.row_bytes) * g.row_bytes
    done = 0
    with open(g.file, "rb") as f:
        f.seek(g.offset)
        while done < g.nbytes:
            want = min(step, g.nbytes - done)
            data = f.read(want)
            if bar is not None:
                bar.update(len(data))
            blocks.update(data)
            whole = len(data) // g.row_bytes * g.row_bytes
            rows.append(crc32c_rows(np.frombuffer(data, np.uint8)[:whole], g.row_bytes))
            done += len(data)
            if len(data) < want:
                break  # the file ended early
    return GroupScan(done, blocks.finish()["blocks"], np.concatenate(rows))


def _rows_text(rows) -> str:
    named = ", ".join(str(r) for r in rows[:MAX_ROWS_NAMED])
    more = f" and {len(rows) - MAX_ROWS_NAMED} more" if len(rows) > MAX_ROWS_NAMED else ""
    return f"row{'s' if len(rows) > 1 else ''} {named}{more}"


def check_group(report: VerifyReport, g: GroupInfo, scan: GroupScan) -> None:
    """Compare a scan with the group's recorded block and row checksums; add what differs to `report`."""
    name, block = os.path.basename(g.file), g.checksum["block_bytes"]
    bad_rows = np.zeros(0, np.int64)
    if g.row_checksums is not None:
        bad_rows = np.flatnonzero(scan.rows != g.row_checksums[:scan.rows.size])
        report.rows_checked += scan.rows.size
    named = np.zeros(bad_rows.size, bool)
    for k, expected in enumerate(g.checksum["blocks"]):
        start, n = k * block, min(block, g.nbytes - k * block)
        if scan.nbytes < start + n:
            report.bad.append(BadBlock(name, g.name, g.offset + start, n,
                                       f"file ends after {max(0, scan.nbytes - start)} of {n} bytes"))
            break
        if scan.blocks[k] == expected:
            continue
        inside = (bad_rows * g.row_bytes < start + n) & ((bad_rows + 1) * g.row_bytes > start)
        named |= inside
        rows = f"; {_rows_text(bad_rows[inside])} fail their CRC-32C" if inside.any() else ""
        report.bad.append(BadBlock(name, g.name, g.offset + start, n,
                                   f"crc32 {scan.blocks[k]:08x}, expected {expected:08x}{rows}"))
    for r in bad_rows[~named]:
        report.bad.append(BadBlock(name, g.name, g.offset + int(r) * g.row_bytes, g.row_bytes,
                                   f"row {r}: CRC-32C {scan.rows[r]:08x}, recorded "
                                   f"{g.row_checksums[r]:08x} (its block matches: the row checksum "
                                   f"file disagrees with the weights)"))


def _verify_file(report: VerifyReport, path: Path, checksum: dict, nbytes: int, bar) -> None:
    """Block crc32 of a whole file (resident tensors, permutations, row checksums)."""
    block, name = checksum["block_bytes"], path.name
    try:
        f = open(path, "rb")
    except OSError as exc:
        report.bad.append(BadBlock(name, None, 0, nbytes, f"cannot open: {exc}"))
        return
    with f:
        for k, expected in enumerate(checksum["blocks"]):
            start, n = k * block, min(block, nbytes - k * block)
            data = f.read(n)
            report.bytes_checked += len(data)
            if bar is not None:
                bar.update(len(data))
            if len(data) < n:
                report.bad.append(BadBlock(name, None, start, n, f"file ends after {len(data)} of {n} bytes"))
                return
            actual = zlib.crc32(data)
            if actual != expected:
                report.bad.append(BadBlock(name, None, start, n, f"crc32 {actual:08x}, expected {expected:08x}"))


def verify_store(store, progress: bool | None = None, scans: dict | None = None) -> VerifyReport:
    """Check every checksum of an open `Store`; with `scans`, also keep each group's GroupScan there."""
    from nchunk_core.store.loader import load_permutations

    report = VerifyReport(store.path)
    files = store.manifest["files"]
    groups = sorted(store.groups.values(), key=lambda g: (g.file, g.offset))
    extra = [n for n in files if n in (store.resident_file, store.permutations_file)
             or n == store.manifest.get("row_checksums", {}).get("file")]
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(g.nbytes for g in groups) + sum(files[n]["size"] for n in extra)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {store.path.name}")
    try:
        for g in groups:
            report.groups += 1
            try:
                scan = scan_group(g, bar)
            except OSError as exc:
                report.bad.append(BadBlock(os.path.basename(g.file), g.name, g.offset, g.nbytes,
                                           f"cannot read: {exc}"))
                continue
            report.bytes_checked += scan.nbytes
            check_group(report, g, scan)
            if scans is not None:
                scans[g.name] = scan
        for name in extra:
            entry = files[name]
            if "checksum" in entry:
                _verify_file(report, store.path / name, entry["checksum"], entry["size"], bar)
            if name not in (store.resident_file, store.permutations_file):
                continue
            try:
                safetensors_header(str(store.path / name))
                if name == store.permutations_file:
                    load_permutations(store.path, name)
            except StoreError as exc:
                report.bad.append(BadBlock(name, None, 0, entry["size"], str(exc)))
    finally:
        if bar is not None:
            bar.close()
    return report

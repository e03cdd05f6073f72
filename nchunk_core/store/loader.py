"""Open a store, validate it completely, and check its bytes against the recorded checksums.

`Store.open` reads only the manifest and file headers, yet catches every inconsistency it can see
(keys, types, sizes, alignment, overlap, truncation) and reports it as a StoreError naming the file,
group and offset. `Store.verify` reads everything and checks crc32 per block. Row reads for inference
go through the direct-I/O reader; the plain reads here are for verification and tests.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zlib
from pathlib import Path

import numpy as np

from nchunk_core.store.format import (MANIFEST, GroupInfo, StoreCorruptError, StoreError, StoreFormatError, _field,
                     check_header, check_sizes_on_disk, parse_files, parse_groups,
                     safetensors_header)
from nchunk_core.store.recommended import Recommended


@dataclasses.dataclass
class BadBlock:
    """A checksum block whose bytes do not match (or could not be read)."""

    file: str
    group: str | None  # None for resident / permutation files
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
    bad: list[BadBlock] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def __str__(self) -> str:
        head = (f"{self.path}: {self.groups} groups, {self.bytes_checked / 2**20:.1f} MiB checked, "
                + ("all checksums match" if self.ok else f"{len(self.bad)} bad block(s)"))
        return "\n".join([head, *(f"  {b}" for b in self.bad)])

    def raise_if_bad(self) -> None:
        if self.bad:
            raise StoreCorruptError(str(self))


def group_rows_to_torch(rows, group: GroupInfo):
    """Rows of `group` (numpy array or bytes-like, whole rows) as a torch tensor [n, row_width] of
    the group's dtype, sharing memory where possible (bfloat16 is reinterpreted from uint16)."""
    import torch

    arr = rows if isinstance(rows, np.ndarray) else np.frombuffer(rows, dtype=np.uint8)
    arr = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    if arr.size % group.row_bytes:
        raise ValueError(f"{arr.size} bytes are not whole rows of group {group.name!r} "
                         f"({group.row_bytes} bytes each)")
    if not arr.flags.writeable:
        arr = arr.copy()
    t = torch.from_numpy(arr.view(group.storage_dtype).reshape(-1, group.row_width))
    return t.view(torch.bfloat16) if group.dtype == "bfloat16" else t


def _optional_file(manifest: dict, key: str, root: Path, sizes: dict) -> tuple[str | None, dict]:
    """(name, safetensors header) of the resident or permutations file, or (None, {})."""
    name = _field(manifest, key, str, MANIFEST, nullable=True)
    if name is None:
        return None, {}
    if name not in sizes:
        raise StoreFormatError(f"{MANIFEST}: {key} file {name!r} is not listed in files")
    return name, safetensors_header(str(root / name))


class Store:
    """A validated store; build with `Store.open(path)`."""

    def __init__(self, path: Path, manifest: dict, groups: dict[str, GroupInfo],
                 resident_file: str | None, resident_header: dict,
                 permutations_file: str | None, permutations: dict[str, np.ndarray]):
        self.path = path
        self.manifest = manifest
        self.groups = groups
        self.alignment: int = manifest["alignment"]
        self.model_info: dict = manifest["model"]
        # settings the store was validated at (recommended.py); None for stores written before
        self.recommended: Recommended | None = Recommended.from_manifest(manifest)
        self._resident_file = resident_file
        self._resident_header = resident_header
        self._permutations_file = permutations_file
        self._permutations = permutations

    @classmethod
    def open(cls, path, check_alignment: bool = True) -> "Store":
        """Open and validate the store in directory `path`.

        With `check_alignment`, the store's alignment must be a multiple of the direct-I/O offset
        alignment of the drive it is on now (a store copied to a drive with larger blocks cannot be
        read with direct I/O); pass False for tools that use plain reads only.
        """
        root = Path(path).absolute()
        manifest_path = root / MANIFEST
        if not root.is_dir():
            raise StoreFormatError(f"{root}: no such store directory")
        if not manifest_path.is_file():
            raise StoreFormatError(f"{root}: no {MANIFEST}; not an nchunk store, or its conversion "
                                   f"did not finish")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise StoreFormatError(f"{manifest_path}: cannot parse: {exc}") from exc
        check_header(manifest)
        alignment = _field(manifest, "alignment", "int", MANIFEST)
        if alignment <= 0 or alignment & (alignment - 1):
            raise StoreFormatError(f"{MANIFEST}: alignment {alignment} is not a power of two")
        _field(manifest, "model", dict, MANIFEST)
        sizes = parse_files(manifest, str(root))
        resident_file, resident_header = _optional_file(manifest, "resident", root, sizes)
        perm_file, perm_header = _optional_file(manifest, "permutations", root, sizes)
        for key, entry in perm_header.items():
            if entry.get("dtype") != "I64" or len(entry["shape"]) != 1:
                raise StoreFormatError(f"{perm_file}: permutation {key!r} must be a 1-D int64 "
                                       f"tensor, got {entry.get('dtype')} {entry['shape']}")
        shapes = {k: e["shape"] for k, e in perm_header.items()}
        groups = parse_groups(manifest, str(root), alignment, sizes, shapes)
        check_sizes_on_disk(str(root), sizes, groups)
        for name, size in sizes.items():
            if name not in (resident_file, perm_file) and size % alignment:
                raise StoreFormatError(f"{name}: size {size} is not a multiple of the store "
                                       f"alignment {alignment}")
        permutations = _load_permutations(root, perm_file)
        if check_alignment:
            _check_drive_alignment(root, alignment)
        return cls(root, manifest, groups, resident_file, resident_header, perm_file, permutations)

    # -- description -------------------------------------------------------------------------------
    def inputs(self) -> list[str]:
        """Input names in manifest order; each is one activation, one selection, one permutation."""
        return list(dict.fromkeys(g.input for g in self.groups.values()))

    def groups_for_input(self, input_name: str) -> list[GroupInfo]:
        return [g for g in self.groups.values() if g.input == input_name]

    def permutation(self, input_name: str) -> np.ndarray | None:
        """Stored row j of every group reading `input_name` holds input channel p[j]; None: identity."""
        groups = self.groups_for_input(input_name)
        if not groups:
            raise KeyError(f"no group reads input {input_name!r}")
        key = groups[0].permutation
        return None if key is None else self._permutations[key]

    def resident_names(self) -> list[str]:
        return list(self._resident_header)

    def resident(self, device="cpu", names=None) -> dict:
        """Resident tensors as torch tensors on `device` (all, or only `names`)."""
        if self._resident_file is None:
            if names:
                raise KeyError(f"store has no resident tensors, asked for {list(names)[:3]}")
            return {}
        names = self.resident_names() if names is None else list(names)
        missing = [n for n in names if n not in self._resident_header]
        if missing:
            raise KeyError(f"no resident tensor {missing[0]!r} in {self._resident_file}")
        from safetensors import safe_open

        path = self.path / self._resident_file
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                return {n: f.get_tensor(n) for n in names}
        except Exception as exc:  # safetensors raises its own error type for damaged files
            raise StoreCorruptError(f"{self._resident_file}: cannot load: {exc}") from exc

    # -- plain reads ---------------------------------------------------------------------------------
    def read_group_dense(self, name: str) -> np.ndarray:
        """All rows of a group, [rows, row_width] in its storage dtype (uint16 for bfloat16)."""
        g = self.groups[name]
        with _open_weights(g) as f:
            f.seek(g.offset)
            data = f.read(g.nbytes)
        if len(data) != g.nbytes:
            raise StoreCorruptError(f"{os.path.basename(g.file)}: group {name!r}: read "
                                    f"{len(data)} of {g.nbytes} bytes at offset {g.offset}: "
                                    f"truncated")
        return np.frombuffer(bytearray(data), dtype=g.storage_dtype).reshape(g.rows, g.row_width)

    def verify(self, progress: bool | None = None) -> VerifyReport:
        """Read every byte the manifest checksums and compare crc32 block by block.

        Returns a report listing every bad block with file, group and byte offset; `progress=True`
        shows a tqdm bar.
        """
        report = VerifyReport(self.path)
        files = self.manifest["files"]
        extra = [n for n in (self._resident_file, self._permutations_file) if n]
        total = sum(g.nbytes for g in self.groups.values()) + sum(files[n]["size"] for n in extra)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {self.path.name}")
        try:
            for g in sorted(self.groups.values(), key=lambda g: (g.file, g.offset)):
                report.groups += 1
                self._verify_span(report, g.file, g.name, g.offset, g.checksum, g.nbytes, bar)
            for name in extra:
                entry = files[name]
                if "checksum" in entry:
                    self._verify_span(report, str(self.path / name), None, 0, entry["checksum"],
                                      entry["size"], bar)
                try:
                    safetensors_header(str(self.path / name))
                    if name == self._permutations_file:
                        _load_permutations(self.path, name)
                except StoreError as exc:
                    report.bad.append(BadBlock(name, None, 0, entry["size"], str(exc)))
        finally:
            if bar is not None:
                bar.close()
        return report

    def _verify_span(self, report: VerifyReport, path: str, group: str | None, offset: int,
                     checksum: dict, nbytes: int, bar) -> None:
        block, name = checksum["block_bytes"], os.path.basename(path)
        try:
            f = open(path, "rb")
        except OSError as exc:
            report.bad.append(BadBlock(name, group, offset, nbytes, f"cannot open: {exc}"))
            return
        with f:
            f.seek(offset)
            for k, expected in enumerate(checksum["blocks"]):
                start, n = offset + k * block, min(block, nbytes - k * block)
                data = f.read(n)
                report.bytes_checked += len(data)
                if bar is not None:
                    bar.update(len(data))
                if len(data) < n:
                    report.bad.append(BadBlock(name, group, start, n,
                                               f"file ends after {len(data)} of {n} bytes"))
                    return
                actual = zlib.crc32(data)
                if actual != expected:
                    report.bad.append(BadBlock(name, group, start, n,
                                               f"crc32 {actual:08x}, expected {expected:08x}"))


def _open_weights(g: GroupInfo):
    try:
        return open(g.file, "rb")
    except OSError as exc:
        raise StoreCorruptError(f"{os.path.basename(g.file)}: group {g.name!r}: cannot open: "
                                f"{exc}") from exc


def _load_permutations(root: Path, name: str | None) -> dict[str, np.ndarray]:
    if name is None:
        return {}
    from safetensors.numpy import load_file

    try:
        perms = load_file(str(root / name))
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise StoreCorruptError(f"{name}: cannot load: {exc}") from exc
    for key, p in perms.items():
        if not np.array_equal(np.sort(p), np.arange(p.size)):
            raise StoreCorruptError(f"{name}: {key!r} is not a permutation of 0..{p.size - 1}")
    return perms


def _check_drive_alignment(root: Path, alignment: int) -> None:
    from nchunk_core.io.reader import dio_alignment

    try:
        dio = dio_alignment(str(root))
    except OSError as exc:
        raise StoreError(f"{root}: cannot query the drive's direct-I/O alignment: {exc}") from exc
    if dio.direct and dio.offset > 0 and alignment % dio.offset:
        raise StoreError(f"{root}: store alignment {alignment} is not a multiple of this drive's "
                         f"direct-I/O alignment {dio.offset}; rewrite the store with alignment="
                         f"{max(alignment, dio.offset)} to read it with direct I/O")

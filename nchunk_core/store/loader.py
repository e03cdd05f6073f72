"""Open a store and validate it completely; load its row checksums.

`Store.open` reads only the manifest, file headers and the row checksum file (whose own block
checksums it checks), yet catches every inconsistency it can see (keys, types, sizes, alignment,
overlap, truncation) and reports it as a StoreError naming the file, group and offset. Each group
then carries the expected CRC-32C of its rows, which the direct-I/O reader checks on every read.
`Store.verify` (verify.py) reads everything and checks every checksum. The plain reads here are for
verification and tests.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from nchunk_core.store import row_checksums
from nchunk_core.store.format import (MANIFEST, VERSION, GroupInfo, StoreCorruptError, StoreError, StoreFormatError,
                     _field, check_header, check_sizes_on_disk, parse_files, parse_groups,
                     parse_row_checksums, safetensors_header)
from nchunk_core.store.recommended import Recommended
from nchunk_core.store.verify import VerifyReport, verify_store


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
        self.version: int = manifest["version"]
        self.alignment: int = manifest["alignment"]
        self.model_info: dict = manifest["model"]
        # settings the store was validated at (recommended.py); None for stores written before
        self.recommended: Recommended | None = Recommended.from_manifest(manifest)
        self._resident_file = resident_file
        self._resident_header = resident_header
        self._permutations_file = permutations_file
        self._permutations = permutations

    @property
    def resident_file(self) -> str | None:
        return self._resident_file

    @property
    def permutations_file(self) -> str | None:
        return self._permutations_file

    @classmethod
    def open(cls, path, check_alignment: bool = True, oldest_version: int = VERSION) -> "Store":
        """Open and validate the store in directory `path`.

        With `check_alignment`, the store's alignment must be a multiple of the direct-I/O offset
        alignment of the drive it is on now (a store copied to a drive with larger blocks cannot be
        read with direct I/O); pass False for tools that use plain reads only. A store older than
        `oldest_version` is refused with the command that upgrades it; `nchunk upgrade` opens
        version 1 (whose groups have no row checksums) with oldest_version=1.
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
        version = check_header(manifest, str(path), oldest_version)
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
        crc_file, crc_rows = parse_row_checksums(manifest, sizes) if version >= 2 else (None, None)
        groups = parse_groups(manifest, str(root), alignment, sizes, shapes, crc_rows)
        check_sizes_on_disk(str(root), sizes, groups)
        for name, size in sizes.items():
            if name not in (resident_file, perm_file, crc_file) and size % alignment:
                raise StoreFormatError(f"{name}: size {size} is not a multiple of the store "
                                       f"alignment {alignment}")
        if crc_file is not None:
            table = row_checksums.load(root, crc_file, manifest["files"][crc_file])
            groups = {name: dataclasses.replace(g, row_checksums=table[g.row_checksum_index:][:g.rows])
                      for name, g in groups.items()}
        permutations = load_permutations(root, perm_file)
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
        """Read every byte the manifest checksums: crc32 per block, and CRC-32C per row.

        Returns a report listing every bad block (and row) with file, group and byte offset;
        `progress=True` shows a tqdm bar.
        """
        return verify_store(self, progress)


def _open_weights(g: GroupInfo):
    try:
        return open(g.file, "rb")
    except OSError as exc:
        raise StoreCorruptError(f"{os.path.basename(g.file)}: group {g.name!r}: cannot open: "
                                f"{exc}") from exc


def load_permutations(root: Path, name: str | None) -> dict[str, np.ndarray]:
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

"""The store's on-disk format: constants, errors, group descriptions and manifest validation.

Everything here is pure: it parses and checks a manifest dictionary against the files it names, and
never reads weight rows. The writer builds manifests with the same helpers, so what one writes the
other accepts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from nchunk_core.store.naming import STORAGE_DTYPES

FORMAT = "nchunk-store"
VERSION = 2  # 2: CRC-32C per row (ROW_CHECKSUMS); 1 had block checksums only (`nchunk upgrade`)
MANIFEST = "manifest.json"
RESIDENT = "resident.safetensors"
PERMUTATIONS = "permutations.safetensors"
ROW_CHECKSUMS = "row-crc32c.bin"  # little-endian uint32 CRC-32C of every stored row
ROW_CHECKSUM_ALGO = "crc32c"
WEIGHTS_PATTERN = "weights-{:05d}.bin"
CHECKSUM_ALGO = "crc32"
CHECKSUM_BLOCK_BYTES = 1 << 20
MIN_ALIGNMENT = 4096  # page size: keeps a store valid when copied to a drive with 4 KiB blocks


class StoreError(Exception):
    """A store cannot be written, opened or read; the message names the file, group and offset."""


class StoreFormatError(StoreError):
    """The manifest or the layout it describes is malformed, unknown or inconsistent."""


class StoreCorruptError(StoreError):
    """The bytes on disk do not match the manifest: a truncated file or a checksum mismatch."""


@dataclasses.dataclass(frozen=True, eq=False)
class GroupInfo:
    """One offloaded matrix group: `rows` rows of `row_bytes` bytes at `offset` in `file`.

    Stored row j holds input channel permutation[j] (identity when `permutation` is None) of every
    matrix in `outputs`, concatenated.
    """

    name: str
    input: str  # groups that read the same activation share this key (and its permutation)
    layer: int | None
    rows: int  # in_features
    dtype: str  # "float16" | "bfloat16" | "float32"
    itemsize: int
    outputs: tuple[dict, ...]  # {"name", "out_features", "offset" (first column in the row)}
    row_bytes: int
    file: str  # absolute path of the weight file
    offset: int  # byte offset of row 0 in `file`, a multiple of the store's alignment
    nbytes: int
    permutation: str | None  # key in permutations.safetensors (the input name), or None
    checksum: dict  # {"algo": "crc32", "block_bytes": int, "blocks": [int, ...]}
    row_checksum_index: int | None = None  # entry of row 0 in the row checksum file; None: version 1
    row_checksums: np.ndarray | None = None  # uint32 [rows]: CRC-32C of each stored row, as loaded

    @property
    def row_width(self) -> int:
        """Elements per stored row: the sum of out_features over `outputs`."""
        return self.row_bytes // self.itemsize

    @property
    def storage_dtype(self) -> np.dtype:
        """numpy dtype of the stored elements (uint16 for bfloat16)."""
        return STORAGE_DTYPES[self.dtype]


def block_count(nbytes: int, block_bytes: int) -> int:
    return math.ceil(nbytes / block_bytes)


class BlockCrc:
    """crc32 of consecutive fixed-size blocks of a byte stream fed in pieces of any size."""

    def __init__(self, block_bytes: int = CHECKSUM_BLOCK_BYTES):
        self.block_bytes = block_bytes
        self.blocks: list[int] = []
        self._crc = 0
        self._filled = 0  # bytes in the current, unfinished block

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), self.block_bytes - self._filled)
            self._crc = zlib.crc32(view[:take], self._crc)
            self._filled += take
            view = view[take:]
            if self._filled == self.block_bytes:
                self.blocks.append(self._crc)
                self._crc, self._filled = 0, 0

    def finish(self) -> dict:
        if self._filled:
            self.blocks.append(self._crc)
            self._crc, self._filled = 0, 0
        return {"algo": CHECKSUM_ALGO, "block_bytes": self.block_bytes, "blocks": self.blocks}


def safetensors_header(path: str) -> dict:
    """Parse and check the header of a safetensors file without loading tensors.

    Returns {name: {"dtype", "shape", "data_offsets"}}; raises StoreFormatError when the header is
    unreadable or the data it describes does not fit the file.
    """
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise StoreCorruptError(f"{name}: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise StoreCorruptError(f"{name}: header of {n} bytes runs past the end of the "
                                        f"file ({size} bytes): truncated")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise StoreFormatError(f"{name}: cannot read: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreFormatError(f"{name}: header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise StoreFormatError(f"{name}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for key, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            ok = 0 <= begin <= end and isinstance(entry["shape"], list)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise StoreFormatError(f"{name}: malformed header entry for tensor {key!r}")
        if end > data_bytes:
            raise StoreCorruptError(f"{name}: tensor {key!r} ends at data byte {end} but the file "
                                    f"holds {data_bytes} data bytes: truncated")
    return header


# ---- manifest validation ------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field(obj: dict, key: str, kind, where: str, nullable: bool = False):
    """obj[key] checked against `kind` ("int", or a Python type); errors say where and what."""
    if key not in obj:
        raise StoreFormatError(f"{where}: missing key {key!r}")
    value = obj[key]
    if value is None and nullable:
        return None
    ok = _is_int(value) if kind == "int" else isinstance(value, kind)
    if not ok:
        want = "an integer" if kind == "int" else kind.__name__
        raise StoreFormatError(f"{where}: {key!r} must be {want}"
                               f"{' or null' if nullable else ''}, got {value!r:.60}")
    return value


def check_header(manifest, store: str = "STORE", oldest: int = VERSION) -> int:
    """Format name and version: the first thing checked, so an older or newer store gets a clear
    message (naming `store` in the command that upgrades it). Returns the version."""
    if not isinstance(manifest, dict):
        raise StoreFormatError(f"{MANIFEST}: not a JSON object")
    if manifest.get("format") != FORMAT:
        raise StoreFormatError(f"{MANIFEST}: format is {manifest.get('format')!r}, "
                               f"expected {FORMAT!r}: not an nchunk store")
    version = _field(manifest, "version", "int", MANIFEST)
    if version > VERSION:
        raise StoreFormatError(f"{MANIFEST}: store format version {version} is newer than this "
                               f"nchunk reads (version {VERSION}); upgrade nchunk to open it")
    if version < 1:
        raise StoreFormatError(f"{MANIFEST}: invalid format version {version}")
    if version < oldest:
        raise StoreFormatError(f"{MANIFEST}: store format version {version} has no row checksums, "
                               f"which nchunk checks on every read (format version {VERSION}); run "
                               f"`nchunk upgrade {store}` to add them in place (it checks the "
                               f"store's block checksums first)")
    return version


def _plain_name(name: str, where: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise StoreFormatError(f"{where}: {name!r} is not a plain file name inside the store")
    return name


def _check_checksum(entry: dict, nbytes: int, where: str) -> dict:
    checksum = _field(entry, "checksum", dict, where)
    if _field(checksum, "algo", str, where + " checksum") != CHECKSUM_ALGO:
        raise StoreFormatError(f"{where}: unknown checksum algorithm {checksum['algo']!r}")
    block = _field(checksum, "block_bytes", "int", where + " checksum")
    blocks = _field(checksum, "blocks", list, where + " checksum")
    if block <= 0:
        raise StoreFormatError(f"{where}: checksum block_bytes must be positive")
    if len(blocks) != block_count(nbytes, block):
        raise StoreFormatError(f"{where}: {len(blocks)} checksum blocks for {nbytes} bytes, "
                               f"expected {block_count(nbytes, block)}")
    if not all(_is_int(b) and 0 <= b < 1 << 32 for b in blocks):
        raise StoreFormatError(f"{where}: checksum blocks must be unsigned 32-bit integers")
    return checksum


def parse_files(manifest: dict, root: str) -> dict[str, int]:
    """{file name: size} from the manifest, each checked against the file on disk."""
    files = _field(manifest, "files", dict, MANIFEST)
    sizes = {}
    for name, entry in files.items():
        where = f"{MANIFEST} files[{name!r}]"
        _plain_name(name, where)
        if not isinstance(entry, dict):
            raise StoreFormatError(f"{where}: must be an object")
        size = _field(entry, "size", "int", where)
        if "checksum" in entry:
            _check_checksum(entry, size, where)
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise StoreCorruptError(f"{name}: listed in {MANIFEST} but missing from {root}")
        sizes[name] = size
    return sizes


def parse_row_checksums(manifest: dict, sizes: dict[str, int]) -> tuple[str, int]:
    """(file name, number of rows) of the row checksum file a version-2 manifest names."""
    where = f"{MANIFEST} row_checksums"
    entry = _field(manifest, "row_checksums", dict, MANIFEST)
    name = _plain_name(_field(entry, "file", str, where), where)
    if _field(entry, "algo", str, where) != ROW_CHECKSUM_ALGO:
        raise StoreFormatError(f"{where}: unknown row checksum algorithm {entry['algo']!r}")
    if name not in sizes:
        raise StoreFormatError(f"{where}: file {name!r} is not listed in files")
    if "checksum" not in manifest["files"][name]:
        raise StoreFormatError(f"{where}: file {name!r} has no checksum in files")
    if sizes[name] % 4:
        raise StoreFormatError(f"{where}: {name} is {sizes[name]} bytes, not whole uint32 values")
    return name, sizes[name] // 4


def _check_row_checksum_spans(groups: dict[str, GroupInfo], table_rows: int) -> None:
    """Every group's rows have their own entries in the row checksum file."""
    spans = sorted((g.row_checksum_index, g.rows, g.name) for g in groups.values())
    end, previous = 0, None
    for index, rows, name in spans:
        if index < 0 or index + rows > table_rows:
            raise StoreFormatError(f"{MANIFEST} group {name!r}: row checksums [{index}, {index + rows}) "
                                   f"lie outside the {table_rows} of the row checksum file")
        if index < end:
            raise StoreFormatError(f"{MANIFEST}: groups {previous!r} and {name!r} share row checksum "
                                   f"entries from {index}")
        end, previous = index + rows, name


def parse_groups(manifest: dict, root: str, alignment: int, sizes: dict[str, int],
                 permutation_shapes: dict[str, list],
                 table_rows: int | None = None) -> dict[str, GroupInfo]:
    """GroupInfo per group, checked for consistency, alignment, bounds and overlap.

    `sizes` are the file sizes the manifest records; `permutation_shapes` maps each permutation key
    to its shape as the permutations file declares it; `table_rows` is the number of entries of the
    row checksum file (None for a version-1 store, which has none).
    """
    entries = _field(manifest, "groups", list, MANIFEST)
    groups: dict[str, GroupInfo] = {}
    for i, entry in enumerate(entries):
        where = f"{MANIFEST} groups[{i}]"
        if not isinstance(entry, dict):
            raise StoreFormatError(f"{where}: must be an object")
        name = _field(entry, "name", str, where)
        where = f"{MANIFEST} group {name!r}"
        if name in groups:
            raise StoreFormatError(f"{where}: duplicate group name")
        dtype = _field(entry, "dtype", str, where)
        if dtype not in STORAGE_DTYPES:
            raise StoreFormatError(f"{where}: unknown dtype {dtype!r} "
                                   f"(known: {', '.join(STORAGE_DTYPES)})")
        itemsize = STORAGE_DTYPES[dtype].itemsize
        rows = _field(entry, "rows", "int", where)
        row_bytes = _field(entry, "row_bytes", "int", where)
        nbytes = _field(entry, "nbytes", "int", where)
        offset = _field(entry, "offset", "int", where)
        file = _plain_name(_field(entry, "file", str, where), where)
        outputs = []
        for j, out in enumerate(_field(entry, "outputs", list, where)):
            ow = f"{where} outputs[{j}]"
            if not isinstance(out, dict):
                raise StoreFormatError(f"{ow}: must be an object")
            o = {"name": _field(out, "name", str, ow),
                 "out_features": _field(out, "out_features", "int", ow),
                 "offset": _field(out, "offset", "int", ow)}
            expected = sum(p["out_features"] for p in outputs)
            if o["out_features"] <= 0 or o["offset"] != expected:
                raise StoreFormatError(f"{ow}: out_features {o['out_features']} at column "
                                       f"{o['offset']}; expected a positive width at column "
                                       f"{expected}")
            outputs.append(o)
        width = sum(o["out_features"] for o in outputs)
        if not outputs or len({o["name"] for o in outputs}) != len(outputs):
            raise StoreFormatError(f"{where}: outputs must be non-empty with distinct names")
        if rows <= 0 or row_bytes != width * itemsize:
            raise StoreFormatError(f"{where}: rows={rows}, row_bytes={row_bytes}; expected a "
                                   f"positive row count and row_bytes={width}*{itemsize}")
        if nbytes != rows * row_bytes:
            raise StoreFormatError(f"{where}: nbytes={nbytes}, expected rows*row_bytes="
                                   f"{rows * row_bytes}")
        if file not in sizes:
            raise StoreFormatError(f"{where}: file {file!r} is not listed in files")
        if offset < 0 or offset % alignment:
            raise StoreFormatError(f"{where}: offset {offset} in {file} is not a multiple of the "
                                   f"store alignment {alignment}")
        if offset + nbytes > sizes[file]:
            raise StoreFormatError(f"{where}: bytes [{offset}, {offset + nbytes}) lie beyond the "
                                   f"end of {file} ({sizes[file]} bytes)")
        permutation = _field(entry, "permutation", str, where, nullable=True)
        if permutation is not None:
            shape = permutation_shapes.get(permutation)
            if shape is None:
                raise StoreFormatError(f"{where}: permutation {permutation!r} is not in "
                                       f"{PERMUTATIONS}")
            if list(shape) != [rows]:
                raise StoreFormatError(f"{where}: permutation {permutation!r} has shape "
                                       f"{shape}, expected [{rows}]")
        layer = _field(entry, "layer", "int", where, nullable=True)
        index = None if table_rows is None else _field(entry, "row_checksum_index", "int", where)
        groups[name] = GroupInfo(
            name=name, input=_field(entry, "input", str, where), layer=layer, rows=rows,
            dtype=dtype, itemsize=itemsize, outputs=tuple(outputs), row_bytes=row_bytes,
            file=os.path.join(root, file), offset=offset, nbytes=nbytes, permutation=permutation,
            checksum=_check_checksum(entry, nbytes, where), row_checksum_index=index)
    _check_inputs(groups)
    _check_overlap(groups)
    if table_rows is not None:
        _check_row_checksum_spans(groups, table_rows)
    return groups


def _check_inputs(groups: dict[str, GroupInfo]) -> None:
    """Groups sharing an input read the same activation: same row count, same permutation."""
    first: dict[str, GroupInfo] = {}
    for g in groups.values():
        f = first.setdefault(g.input, g)
        if (f.rows, f.permutation) != (g.rows, g.permutation):
            raise StoreFormatError(
                f"{MANIFEST}: groups {f.name!r} and {g.name!r} share input {g.input!r} but differ "
                f"in rows ({f.rows} vs {g.rows}) or permutation ({f.permutation} vs {g.permutation})")


def _check_overlap(groups: dict[str, GroupInfo]) -> None:
    spans = sorted((g.file, g.offset, g.offset + g.nbytes, g.name) for g in groups.values())
    for (fa, _, end_a, a), (fb, start_b, _, b) in zip(spans, spans[1:]):
        if fa == fb and start_b < end_a:
            raise StoreFormatError(f"{MANIFEST}: groups {a!r} and {b!r} overlap in "
                                   f"{os.path.basename(fa)} at offset {start_b}")


def check_sizes_on_disk(root: str, sizes: dict[str, int], groups: dict[str, GroupInfo]) -> None:
    """Every file has exactly the size the manifest records; a short file names the cut group."""
    for name, size in sizes.items():
        try:
            actual = os.path.getsize(os.path.join(root, name))
        except OSError as exc:
            raise StoreCorruptError(f"{name}: cannot stat: {exc}") from exc
        if actual == size:
            continue
        if actual > size:
            raise StoreCorruptError(f"{name}: {actual} bytes on disk, but {MANIFEST} records "
                                    f"{size}: the file was changed after the store was written")
        cut = sorted((g.offset, g.name, g.offset + g.nbytes) for g in groups.values()
                     if os.path.basename(g.file) == name and g.offset + g.nbytes > actual)
        what = (f"; group {cut[0][1]!r} at bytes [{cut[0][0]}, {cut[0][2]}) is cut off" if cut
                else "")
        raise StoreCorruptError(f"{name}: truncated: {actual} bytes on disk, {MANIFEST} records "
                                f"{size}{what}")


def write_text_atomically(path, text: str) -> None:
    """Write `text` to `path` atomically and durably: a temporary file beside it, fsync, rename over
    `path`, fsync of the folder. On failure the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

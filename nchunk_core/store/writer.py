"""Streaming writer of a store: one matrix group at a time, transposed to rows as it is written.

A converter feeds groups one by one (each matrix in nn.Linear layout [out_features, in_features]);
the writer turns them into rows of Wᵀ in blocks of a few MiB, so it never holds more than the group
it is given plus one block, and computes the CRC-32C of every row as it goes. Resident tensors are kept
until `close` and written to safetensors, the row checksums to their own file; the manifest is
written last, atomically, so an interrupted conversion never leaves a store that opens.
"""
from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path

import numpy as np

from nchunk_core.io.checksum import crc32c_rows
from nchunk_core.store import row_checksums
from nchunk_core.store.format import (CHECKSUM_BLOCK_BYTES, FORMAT, MANIFEST, MIN_ALIGNMENT, PERMUTATIONS, RESIDENT,
                     ROW_CHECKSUM_ALGO, ROW_CHECKSUMS, VERSION, WEIGHTS_PATTERN, BlockCrc, StoreError,
                                       write_text_atomically)
from nchunk_core.store.naming import STORAGE_DTYPES

DEFAULT_FILE_SIZE_CAP = 4 << 30
_STORE_FILE = re.compile(r"(manifest\.json(\.tmp)?|weights-\d{5}\.bin|resident\.safetensors"
                         r"|permutations\.safetensors|row-crc32c\.bin(\.tmp)?)")


def write_manifest(root: Path, manifest: dict) -> None:
    """Write root/manifest.json atomically and durably (temporary file, fsync, rename, fsync dir)."""
    write_text_atomically(root / MANIFEST, json.dumps(manifest, indent=1))


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _as_rows_source(x, what: str) -> tuple[np.ndarray, str]:
    """A 2-D numpy view of a numpy array or torch tensor (bfloat16 as uint16) and its dtype name."""
    if _is_torch(x):
        import torch

        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            arr, name = t.view(torch.uint16).numpy(), "bfloat16"
        elif t.dtype in (torch.float16, torch.float32):
            arr, name = t.numpy(), str(t.dtype).removeprefix("torch.")
        else:
            raise TypeError(f"{what}: unsupported dtype {t.dtype}")
    else:
        arr = np.asarray(x)
        if arr.dtype.name == "bfloat16":  # ml_dtypes arrays
            arr, name = arr.view(np.uint16), "bfloat16"
        elif arr.dtype in (np.float16, np.float32):
            name = arr.dtype.name
        else:
            raise TypeError(f"{what}: unsupported dtype {arr.dtype}")
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"{what}: expected a non-empty [out_features, in_features] matrix, "
                         f"got shape {tuple(arr.shape)}")
    return arr, name


def _check_permutation(permutation, rows: int, what: str) -> np.ndarray:
    p = np.asarray(permutation)
    if p.shape != (rows,) or p.dtype.kind not in "iu":
        raise ValueError(f"{what}: permutation must be an integer array of shape ({rows},), "
                         f"got {p.dtype} {p.shape}")
    p = p.astype(np.int64)
    if not np.array_equal(np.sort(p), np.arange(rows)):
        raise ValueError(f"{what}: permutation is not a permutation of 0..{rows - 1}")
    return p


def _align_up(n: int, a: int) -> int:
    return -(-n // a) * a


def _query_alignment(path: Path):
    from nchunk_core.io.reader import dio_alignment

    return dio_alignment(str(path))


class StoreWriter:
    """Write a store into directory `path`; use as a context manager.

    `alignment=None` uses max(4096, the drive's direct-I/O offset alignment); an explicit value
    must be a power of two and a multiple of that drive alignment. A group never spans two weight
    files; a new file starts when the next group would take the current one past `file_size_cap`.
    """

    def __init__(self, path, model_info: dict | None = None, alignment: int | None = None,
                 file_size_cap: int = DEFAULT_FILE_SIZE_CAP, overwrite: bool = False,
                 block_bytes: int = 4 << 20):
        self.path = Path(path).absolute()
        self.model_info = dict(model_info or {})
        try:
            json.dumps(self.model_info)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"model_info must be JSON-serialisable: {exc}") from exc
        self.file_size_cap = int(file_size_cap)
        self.block_bytes = int(block_bytes)
        if self.file_size_cap <= 0 or self.block_bytes <= 0:
            raise ValueError("file_size_cap and block_bytes must be positive")
        self._groups: list[dict] = []
        self._row_crcs: list[np.ndarray] = []  # uint32 [rows] per group, in manifest order
        self._inputs: dict[str, tuple[int, np.ndarray | None]] = {}  # input -> (rows, permutation)
        self._resident: dict[str, object] = {}
        self._files: dict[str, dict] = {}
        self._written: list[Path] = []  # every file this writer created, removed on abort
        self._file = None  # open weight file
        self._pos = 0  # bytes written to it
        self._closed = False
        self._created_dir = self._prepare_dir(overwrite)
        try:
            self.alignment, self.dio = self._choose_alignment(alignment)
        except BaseException:
            self._abort()
            raise

    def _choose_alignment(self, alignment: int | None) -> tuple[int, dict]:
        dio = _query_alignment(self.path)
        queried = {"offset": int(dio.offset), "memory": int(dio.memory), "direct": bool(dio.direct)}
        drive = queried["offset"] if queried["direct"] and queried["offset"] > 0 else 1
        if alignment is None:
            alignment = max(MIN_ALIGNMENT, drive)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) \
                or alignment % drive:
            raise ValueError(f"alignment {alignment} must be a power of two and a multiple of the "
                             f"drive's direct-I/O alignment {drive}")
        return alignment, queried

    # -- directory ---------------------------------------------------------------------------------
    def _prepare_dir(self, overwrite: bool) -> bool:
        """Create the store directory, or empty an existing store in it when `overwrite` is set."""
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} exists and is not a directory")
        if not self.path.exists():
            self.path.mkdir(parents=True)
            return True
        entries = sorted(p.name for p in self.path.iterdir())
        if not entries:
            return False
        if not overwrite:
            raise StoreError(f"{self.path} is not empty; pass overwrite=True to replace the store "
                             f"in it")
        foreign = [n for n in entries if not _STORE_FILE.fullmatch(n)]
        if foreign:
            raise StoreError(f"refusing to overwrite {self.path}: it holds files that are not part "
                             f"of a store ({', '.join(foreign[:5])})")
        # the manifest goes first, so a crash below never leaves a manifest over missing files
        for name in sorted(entries, key=lambda n: not n.startswith(MANIFEST)):
            (self.path / name).unlink()
        return False

    # -- groups ------------------------------------------------------------------------------------
    def add_group(self, name: str, input: str, matrices, layer: int | None = None,
                  permutation=None) -> dict:
        """Write one group: the matrices [(output name, W[out, in]), ...] that share `input`.

        Stored row j is the concatenation of W[:, p[j]] over the matrices, where p is `permutation`
        (identity when None). Returns the group's manifest entry.
        """
        self._check_open()
        what = f"group {name!r}"
        if not isinstance(name, str) or not name or any(g["name"] == name for g in self._groups):
            raise ValueError(f"{what}: the name must be a new non-empty string")
        if not isinstance(input, str) or not input:
            raise ValueError(f"{what}: input must be a non-empty string")
        if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
            raise ValueError(f"{what}: layer must be an int or None")
        sources = [(str(out), *_as_rows_source(w, f"{what} matrix {out!r}")) for out, w in matrices]
        if not sources or len({s[0] for s in sources}) != len(sources):
            raise ValueError(f"{what}: give at least one matrix, with distinct output names")
        rows, dtype = sources[0][1].shape[1], sources[0][2]
        for out, arr, dt in sources:
            if arr.shape[1] != rows or dt != dtype:
                raise ValueError(f"{what}: matrix {out!r} is {dt} with {arr.shape[1]} inputs; the "
                                 f"group's first matrix is {dtype} with {rows}")
        perm = None if permutation is None else _check_permutation(permutation, rows, what)
        if input in self._inputs:
            seen_rows, seen_perm = self._inputs[input]
            same = (seen_perm is None and perm is None) or (
                seen_perm is not None and perm is not None and np.array_equal(seen_perm, perm))
            if seen_rows != rows or not same:
                raise ValueError(f"{what}: input {input!r} was already written with {seen_rows} "
                                 f"rows and a different permutation; groups sharing an input "
                                 f"need the same rows and permutation")

        outputs, col = [], 0
        for out, arr, _ in sources:
            outputs.append({"name": out, "out_features": int(arr.shape[0]), "offset": col})
            col += arr.shape[0]
        storage = STORAGE_DTYPES[dtype]
        row_bytes = col * storage.itemsize
        nbytes = rows * row_bytes
        try:
            file, offset = self._place(nbytes)
            checksum, row_crcs = self._write_rows(sources, outputs, perm, rows, storage)
        except BaseException:
            self._abort()  # a half-written group leaves the files unusable
            raise
        self._pos += nbytes
        self._inputs[input] = (rows, perm)
        entry = {"name": name, "input": input, "layer": layer, "rows": rows, "dtype": dtype,
                 "outputs": outputs, "row_bytes": row_bytes, "file": file, "offset": offset,
                 "nbytes": nbytes, "permutation": None if perm is None else input,
                 "checksum": checksum, "row_checksum_index": sum(c.size for c in self._row_crcs)}
        self._groups.append(entry)
        self._row_crcs.append(row_crcs)
        return entry

    def _write_rows(self, sources, outputs, perm, rows: int, storage: np.dtype) -> tuple[dict, np.ndarray]:
        """Stream the rows of Wᵀ (gathered by `perm`) in blocks; returns their block checksum entry
        and the CRC-32C of each row (uint32 [rows])."""
        width = sum(o["out_features"] for o in outputs)
        crc = BlockCrc(CHECKSUM_BLOCK_BYTES)
        row_crcs = np.empty(rows, dtype=np.uint32)
        step = max(1, self.block_bytes // (width * storage.itemsize))
        for j0 in range(0, rows, step):
            j1 = min(rows, j0 + step)
            channels = slice(j0, j1) if perm is None else perm[j0:j1]
            block = np.empty((j1 - j0, width), dtype=storage)  # [rows in block, row width]
            for (_, arr, _), o in zip(sources, outputs):
                block[:, o["offset"]:o["offset"] + o["out_features"]] = arr[:, channels].T
            data = block.reshape(-1).view(np.uint8)
            crc.update(data)
            row_crcs[j0:j1] = crc32c_rows(data, width * storage.itemsize)
            self._file.write(data)
        return crc.finish(), row_crcs

    def _place(self, nbytes: int) -> tuple[str, int]:
        """(file name, aligned offset) for the next group; pads the current file up to it."""
        start = _align_up(self._pos, self.alignment)
        if self._file is None or (self._pos > 0 and start + nbytes > self.file_size_cap):
            self._finish_file()
            name = WEIGHTS_PATTERN.format(len(self._files))
            path = self.path / name
            self._written.append(path)
            self._file = open(path, "wb")
            self._files[name] = {"size": 0}
            self._pos = start = 0
        self._pad_to(start)
        return os.path.basename(self._file.name), start

    def _pad_to(self, pos: int) -> None:
        if pos > self._pos:
            self._file.write(bytes(pos - self._pos))
            self._pos = pos

    def _finish_file(self) -> None:
        """Pad the open weight file to a multiple of the alignment, sync it and close it."""
        if self._file is None:
            return
        self._pad_to(_align_up(self._pos, self.alignment))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._files[os.path.basename(self._file.name)]["size"] = self._pos
        self._file = None

    # -- resident tensors --------------------------------------------------------------------------
    def add_resident(self, name: str, tensor) -> None:
        """Keep a tensor in RAM at run time (embeddings, norms, biases, vision tower, ...)."""
        self._check_open()
        if not isinstance(name, str) or not name or name in self._resident:
            raise ValueError(f"resident tensor {name!r}: the name must be a new non-empty string")
        if not (_is_torch(tensor) or isinstance(tensor, np.ndarray)):
            raise TypeError(f"resident tensor {name!r}: expected a torch tensor or numpy array, "
                            f"got {type(tensor).__name__}")
        self._resident[name] = tensor

    def _write_resident(self) -> str | None:
        if not self._resident:
            return None
        path = self.path / RESIDENT
        self._written.append(path)
        if any(_is_torch(t) for t in self._resident.values()):
            import torch
            from safetensors.torch import save_file

            tensors, seen = {}, set()
            for name, t in self._resident.items():
                t = torch.from_numpy(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) else t
                t = t.detach().cpu().contiguous()
                storage = t.untyped_storage()
                if storage.data_ptr() in seen or storage.nbytes() != t.nbytes:
                    t = t.clone()  # safetensors refuses tensors that share or view a storage
                seen.add(t.untyped_storage().data_ptr())
                tensors[name] = t
        else:
            from safetensors.numpy import save_file

            tensors = {n: np.ascontiguousarray(t) for n, t in self._resident.items()}
        save_file(tensors, str(path))
        return RESIDENT

    def _write_permutations(self) -> str | None:
        perms = {inp: p for inp, (_, p) in self._inputs.items() if p is not None}
        if not perms:
            return None
        from safetensors.numpy import save_file

        path = self.path / PERMUTATIONS
        self._written.append(path)
        save_file(perms, str(path))
        return PERMUTATIONS

    def _file_entry(self, name: str) -> dict:
        """Size and block checksums of a file written whole (resident, permutations)."""
        crc = BlockCrc(CHECKSUM_BLOCK_BYTES)
        with open(self.path / name, "rb") as f:
            while chunk := f.read(CHECKSUM_BLOCK_BYTES):
                crc.update(chunk)
        return {"size": (self.path / name).stat().st_size, "checksum": crc.finish()}

    # -- finishing ---------------------------------------------------------------------------------
    def close(self) -> Path:
        """Finish every file, then write the manifest atomically. Returns the store path."""
        if self._closed:
            return self.path
        try:
            self._finish_store()
        except BaseException:
            self._abort()
            raise
        self._closed = True
        return self.path

    def _finish_store(self) -> None:
        self._finish_file()
        resident = self._write_resident()
        permutations = self._write_permutations()
        for name in filter(None, (resident, permutations)):
            self._files[name] = self._file_entry(name)
        table = np.concatenate(self._row_crcs) if self._row_crcs else np.zeros(0, np.uint32)
        self._written.append(self.path / ROW_CHECKSUMS)
        self._files[ROW_CHECKSUMS] = row_checksums.write(self.path, ROW_CHECKSUMS, table)
        manifest = {
            "format": FORMAT, "version": VERSION, "alignment": self.alignment,
            "dio_alignment": self.dio,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": self.model_info, "files": self._files, "resident": resident,
            "permutations": permutations,
            "row_checksums": {"file": ROW_CHECKSUMS, "algo": ROW_CHECKSUM_ALGO}, "groups": self._groups,
        }
        self._written += [self.path / (MANIFEST + ".tmp"), self.path / MANIFEST]
        write_manifest(self.path, manifest)

    def _abort(self) -> None:
        """Remove what this writer created; no manifest is ever left behind."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        for path in sorted(self._written, key=lambda p: p.name != MANIFEST):  # manifest first
            path.unlink(missing_ok=True)
        if self._created_dir and not any(self.path.iterdir()):
            self.path.rmdir()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"writer for {self.path} is already closed")

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

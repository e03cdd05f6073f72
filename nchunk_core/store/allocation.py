"""Layer-wise sparsity: how a store spreads an average sparsity over its streamed inputs.

A store may hold `sparsity_allocation.json` next to its manifest (written by `nchunk calibrate` or
`nchunk convert`; convert/sensitivity.py measures it). For a grid of average sparsities it gives
every input (one selection: q|k|v, o, gate|up or down of one layer) its own sparsity, more rows for
inputs whose loss hurts the model's output most:

    {"format": "nchunk-sparsity-allocation", "version": 1,
     "inputs": ["layers.0.attn_in", ...],          # N input names of the store
     "weights": [131072, ...],                     # bytes of each input's rows (all its groups)
     "averages": [0.0, 0.025, ..., 0.95],          # G grid points, increasing, first 0
     "sparsity": [[0.0, ...], ...],                # G x N, each row's weighted mean = its average
     "basis": {...}}                               # for people: frames, levels, error measure

The average is weighted by bytes, so at any average the model reads as many bytes as a uniform
sparsity would. Between grid points the allocation is interpolated linearly (which keeps the
weighted mean exact); beyond the last point, which is uniform, every input takes the average.
The file is optional: a store without one runs with uniform sparsity.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from nchunk_core.store.format import StoreFormatError, write_text_atomically

FILE = "sparsity_allocation.json"
FORMAT = "nchunk-sparsity-allocation"
VERSION = 1


@dataclasses.dataclass(frozen=True, eq=False)
class SparsityAllocation:
    """Per-input sparsity on a grid of byte-weighted average sparsities (see the module docstring)."""

    inputs: tuple[str, ...]
    weights: np.ndarray  # [N] float64, bytes per input
    averages: np.ndarray  # [G] float64, increasing, averages[0] == 0
    sparsity: np.ndarray  # [G, N] float64 in [0, 1)
    basis: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n, where = len(self.inputs), FILE
        w = np.asarray(self.weights, dtype=np.float64)
        a = np.asarray(self.averages, dtype=np.float64)
        s = np.asarray(self.sparsity, dtype=np.float64)
        if n == 0 or len(set(self.inputs)) != n:
            raise StoreFormatError(f"{where}: inputs must be distinct names, at least one")
        if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise StoreFormatError(f"{where}: weights must be {n} positive numbers")
        if a.ndim != 1 or a.size < 2 or a[0] != 0.0 or np.any(np.diff(a) <= 0) or a[-1] >= 1.0:
            raise StoreFormatError(f"{where}: averages must increase from 0 and stay below 1")
        if s.shape != (a.size, n) or not np.all(np.isfinite(s)) or s.min() < 0 or s.max() >= 1.0:
            raise StoreFormatError(f"{where}: sparsity must be {a.size} x {n} numbers in [0, 1)")
        if not np.allclose(s @ w / w.sum(), a, atol=1e-6):
            raise StoreFormatError(f"{where}: a row's weighted mean differs from its average")
        if not np.allclose(s[-1], a[-1], atol=1e-6):
            raise StoreFormatError(f"{where}: the last grid point must be uniform")
        for name, value in (("weights", w), ("averages", a), ("sparsity", s)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "inputs", tuple(str(i) for i in self.inputs))

    def at(self, average: float) -> dict[str, float]:
        """input name -> sparsity for a byte-weighted `average` in [0, 1)."""
        if not 0.0 <= average < 1.0:
            raise ValueError(f"average sparsity must be in [0, 1), got {average!r}")
        a = self.averages
        if average >= a[-1]:
            row = np.full(len(self.inputs), float(average))
        else:
            k = int(np.searchsorted(a, average, side="right")) - 1  # a[k] <= average < a[k + 1]
            t = (average - a[k]) / (a[k + 1] - a[k])
            row = (1.0 - t) * self.sparsity[k] + t * self.sparsity[k + 1]
        return {name: float(min(max(v, 0.0), 0.999)) for name, v in zip(self.inputs, row)}

    def mean(self, per_input: dict[str, float]) -> float:
        """Byte-weighted mean of a per-input sparsity mapping over this allocation's inputs."""
        return float(sum(per_input[n] * w for n, w in zip(self.inputs, self.weights)) / self.weights.sum())

    # -- persistence -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "inputs": list(self.inputs),
                "weights": [int(w) if float(w).is_integer() else float(w) for w in self.weights],
                "averages": [round(float(a), 9) for a in self.averages],
                "sparsity": [[round(float(v), 9) for v in row] for row in self.sparsity], "basis": self.basis}

    @classmethod
    def from_json(cls, obj) -> "SparsityAllocation":
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise StoreFormatError(f"{FILE}: not a sparsity allocation (format must be {FORMAT!r})")
        if obj.get("version") != VERSION:
            raise StoreFormatError(f"{FILE}: version {obj.get('version')!r} is not supported (this nchunk "
                                   f"reads version {VERSION})")
        try:
            return cls(tuple(obj["inputs"]), np.asarray(obj["weights"], dtype=np.float64),
                       np.asarray(obj["averages"], dtype=np.float64),
                       np.asarray(obj["sparsity"], dtype=np.float64), dict(obj.get("basis") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreFormatError(f"{FILE}: malformed: {exc}") from exc


def input_bytes(store) -> dict[str, int]:
    """input name -> bytes of its rows over all its groups, for an open Store."""
    return {name: int(sum(g.nbytes for g in store.groups_for_input(name))) for name in store.inputs()}


def load_allocation(store) -> SparsityAllocation | None:
    """The allocation of an open Store; None when it has none; StoreFormatError when it does not fit."""
    path = Path(store.path) / FILE
    if not path.is_file():
        return None
    try:
        allocation = SparsityAllocation.from_json(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise StoreFormatError(f"{path}: not JSON: {exc}") from exc
    sizes = input_bytes(store)
    if set(allocation.inputs) != set(sizes) or any(
            sizes[n] != w for n, w in zip(allocation.inputs, allocation.weights)):
        raise StoreFormatError(f"{path}: its inputs or their sizes do not match the store's groups "
                               f"(from another store? run `nchunk calibrate` again)")
    return allocation


def write_allocation(store_dir, allocation: SparsityAllocation) -> Path:
    """Write `allocation` into the store directory atomically (temporary file, fsync, rename)."""
    path = Path(store_dir) / FILE
    write_text_atomically(path, json.dumps(allocation.to_json(), indent=1) + "\n")
    return path

"""Run-time row selection for one weight matrix and one input (Neuron Chunking, arXiv 2511.18692).

Given the importance of every stored row of a matrix (mean |x_i| of the input channel, in stored-row
order) and a budget of R rows, pick which rows to read. Every method selects exactly R rows (dense:
all of them) and returns them as sorted, maximal, non-overlapping runs, with the estimated read time
Σ T[run bytes] from the drive's latency table:

- ``dense``: every row.
- ``magnitude``: the R most important rows (TEAL / LLM-in-a-flash), adjacent ones read as one run.
- ``chunking``: the paper's greedy over candidate windows ranked by importance per unit of T.
- ``dp``: an exact dynamic program over row positions that maximises importance minus a price on
  estimated time; the price is searched until R rows are chosen (the nearest solution is trimmed or
  grown at its run ends). Its selections lie on the best importance-versus-time frontier: at equal
  estimated time it keeps more importance than ``chunking`` (docs/selection.md has the study).

The kernels live in the native extension (csrc/select.cpp); nchunk_core/testing/select_reference.py
holds plain NumPy implementations of the same rules that the tests compare them with.

    sel = select(importance, budget_rows, "chunking", table, row_bytes)
    sel.runs            # int64 [k, 2] (start, length)
    sel.row_indices()   # int64 [R]
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
from typing import NamedTuple

import numpy as np

from nchunk_core.io.latency import LatencyTable

METHODS = ("dense", "magnitude", "chunking", "dp")
# How the sparsity is spread over a model's matrices: "layerwise" follows the store's calibrated
# allocation (store/allocation.py; uniform when the store has none), "uniform" gives every matrix
# the same sparsity.
ALLOCATIONS = ("layerwise", "uniform")
# Which rows the row cache (row_cache.py) keeps, the first the default: "static" keeps the planned
# front rows; "frame" lets the rows each call read replace cached rows of lower decayed importance
# (RowCache.observe). "frame" reads fewer bytes for the same importance, "static" appends frames
# faster (docs/design.md, "Cache policies").
CACHE_POLICIES = ("static", "frame")


def check_cache_policy(value) -> str:
    """`value` if it is one of CACHE_POLICIES; ValueError otherwise (the one check of a policy name)."""
    if value not in CACHE_POLICIES:
        raise ValueError(f"cache_policy must be one of {', '.join(CACHE_POLICIES)}, got {value!r}")
    return value


class WindowRows(NamedTuple):
    """Chunking window sizes converted to rows of one matrix."""

    r_min: int
    r_max: int
    r_step: int
    jump_cap: int


def check_method(method) -> str:
    """`method` if it is one of METHODS; ValueError otherwise (the one check of a method name)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def _kib_to_rows(kib: float, row_bytes: int) -> int:
    """Nearest whole number of rows (halves round up), at least one."""
    return max(1, int(math.floor(kib * 1024.0 / row_bytes + 0.5)))


@dataclasses.dataclass(frozen=True)
class ChunkParams:
    """Candidate windows of the chunking method, in KiB (independent of the matrix).

    Window sizes run from ``start_kib`` to ``max_kib`` (None: the drive's saturation size) in steps
    of ``step_kib``; a window of r rows slides with stride min(r, jump cap).
    """

    start_kib: float = 32.0
    step_kib: float = 32.0
    max_kib: float | None = None
    jump_cap_kib: float = 32.0

    def __post_init__(self):
        for name in ("start_kib", "step_kib", "jump_cap_kib", "max_kib"):
            value = getattr(self, name)
            if value is None and name == "max_kib":
                continue
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not math.isfinite(value) or value <= 0):
                raise ValueError(f"ChunkParams.{name} must be a positive number, got {value!r}")
        if self.max_kib is not None and self.max_kib < self.start_kib:
            raise ValueError(f"ChunkParams.max_kib ({self.max_kib}) is below start_kib "
                             f"({self.start_kib})")

    def for_matrix(self, row_bytes: int, rows: int, table: LatencyTable) -> WindowRows:
        """Window sizes in rows of `row_bytes` each, for a matrix of `rows` rows."""
        if row_bytes <= 0:
            raise ValueError(f"row_bytes must be positive, got {row_bytes}")
        max_kib = self.max_kib if self.max_kib is not None else table.saturation_bytes / 1024.0
        r_min = _kib_to_rows(self.start_kib, row_bytes)
        r_max = max(r_min, _kib_to_rows(max_kib, row_bytes))
        if rows > 0:
            r_max = min(r_max, max(rows, r_min))
        return WindowRows(r_min, r_max, _kib_to_rows(self.step_kib, row_bytes),
                          _kib_to_rows(self.jump_cap_kib, row_bytes))


# Chosen by the window sweeps (tables and method in docs/selection.md). select_sweep.py, on a 7B
# model's rows: the best mean retained importance at 10-50 % of the dense read time whose selection
# stays under half the 2 ms budget at 18 944 rows: 32/32/32 KiB for its small rows (q+k+v, q,
# down: 7-9 KiB), one-row windows at every row for large rows (gate+up: 74 KiB; 32/32/32 KiB
# converts to the same above 64 KiB). row_size_sweep.py, on the rows of smaller models (0.5-4
# KiB; there a 32 KiB window is a large part of a matrix and, at the runtime's fixed row budget,
# loses up to a tenth of magnitude's importance): among the settings never below magnitude at equal
# estimated time, the one keeping the most importance at equal rows: windows of exactly 2 rows,
# 3 rows for matrices of at most FEW_ROWS rows (there 2-row windows lose to magnitude's long runs).
SMALL_ROWS = ChunkParams(start_kib=32.0, step_kib=32.0, max_kib=None, jump_cap_kib=32.0)
LARGE_ROWS = ChunkParams(start_kib=4.0, step_kib=4.0, max_kib=None, jump_cap_kib=8.0)
LARGE_ROW_BYTES = 32 * 1024  # rows above this use LARGE_ROWS
FINE_ROW_BYTES = 6 * 1024  # rows below this use windows of a few rows
FEW_ROWS = 256


def default_params(row_bytes: int, rows: int) -> ChunkParams:
    """Chunking windows for a matrix of `rows` rows of `row_bytes` bytes (see the sweeps above)."""
    if row_bytes > LARGE_ROW_BYTES:
        return LARGE_ROWS
    if row_bytes >= FINE_ROW_BYTES:
        return SMALL_ROWS
    kib = (3 if rows <= FEW_ROWS else 2) * row_bytes / 1024.0  # one window size, placed on its own grid
    return ChunkParams(start_kib=kib, step_kib=kib, max_kib=kib, jump_cap_kib=kib)


@dataclasses.dataclass(frozen=True)
class SelectionSettings:
    """How every streamed matrix picks its rows: the one value for these settings, from the ROS
    parameters (or the Session's caller) down to `select`. Validated here, on construction
    (ValueError naming the field), and passed through unchanged.
    """

    sparsity: float = 0.0  # fraction of the input rows NOT read, in [0, 1): the byte-weighted average
    method: str = "chunking"  # one of METHODS
    windows: ChunkParams | None = None  # chunking's candidate windows; None: default_params per matrix
    allocation: str = "layerwise"  # one of ALLOCATIONS: how `sparsity` is spread over the matrices

    def __post_init__(self):
        value = self.sparsity
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                or not 0.0 <= float(value) < 1.0):
            raise ValueError(f"sparsity must be a number in [0, 1), got {value!r}")
        object.__setattr__(self, "sparsity", float(value))
        check_method(self.method)
        if self.windows is not None and not isinstance(self.windows, ChunkParams):
            raise ValueError(f"windows must be a ChunkParams or None, got {type(self.windows).__name__}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")

    @classmethod
    def from_kib(cls, sparsity: float, method: str, start_kib: float = 0.0, step_kib: float = 0.0,
                 max_kib: float = 0.0, jump_cap_kib: float = 0.0,
                 allocation: str = "layerwise") -> "SelectionSettings":
        """From the node's flat parameters: window sizes in KiB where 0 means "the default".

        All four 0: windows None (per-matrix defaults). Otherwise explicit windows for every matrix,
        a 0 field taking ChunkParams' default (max_kib 0: the drive's saturation size).
        """
        fields = {"start_kib": start_kib, "step_kib": step_kib, "max_kib": max_kib,
                  "jump_cap_kib": jump_cap_kib}
        for name, value in fields.items():
            if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                    or value < 0):
                raise ValueError(f"chunk_{name.removesuffix('_kib')}_kib must be a number >= 0, got {value!r}")
        explicit = {k: float(v) for k, v in fields.items() if v > 0}
        if not explicit:
            return cls(sparsity, method, None, allocation)
        start = explicit.get("start_kib", ChunkParams.start_kib)
        if "max_kib" in explicit and explicit["max_kib"] < start:
            raise ValueError(f"chunk_max_kib ({explicit['max_kib']:g}) is below the smallest window "
                             f"({start:g} KiB): raise chunk_max_kib or set it to 0 (saturation size)")
        return cls(sparsity, method, ChunkParams(**explicit), allocation)

    def budget(self, rows: int) -> int:
        """Rows to read for a matrix with `rows` input channels."""
        if self.method == "dense":
            return rows
        return max(1, rows - int(round(self.sparsity * rows)))


@dataclasses.dataclass
class Selection:
    """Selected rows of one matrix as maximal runs, with what they cost and keep."""

    runs: np.ndarray  # [k, 2] int64 (start, length), sorted, maximal, non-overlapping
    rows: int  # total selected rows (== budget)
    est_latency_s: float  # Σ T[length * row_bytes] over runs
    retained: float  # Σ importance selected / Σ importance (1.0 if the total is 0)
    select_s: float  # wall time of the selection call
    method: str = ""

    def row_indices(self) -> np.ndarray:
        """Selected row indices, ascending: int64 [rows]."""
        if len(self.runs) == 0:
            return np.zeros(0, dtype=np.int64)
        starts, lengths = self.runs[:, 0], self.runs[:, 1]
        offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
        return offsets + np.arange(int(lengths.sum()), dtype=np.int64)

    @property
    def n_runs(self) -> int:
        return int(len(self.runs))

    @property
    def mean_run_rows(self) -> float:
        return self.rows / self.n_runs if self.n_runs else 0.0


def selection_arguments(importance, budget_rows: int, method: str, table: LatencyTable, row_bytes: int,
                        params: ChunkParams | None = None) -> tuple[np.ndarray, int, int, WindowRows]:
    """The arguments of `select`, checked: importance float32 [rows], budget, row bytes and the
    chunking windows in rows (all ones for the other methods). ValueError naming the argument."""
    check_method(method)
    v = np.ascontiguousarray(importance, dtype=np.float32)
    if v.ndim != 1:
        raise ValueError(f"importance must be 1-D, got shape {v.shape}")
    rows = int(v.shape[0])
    if isinstance(budget_rows, bool) or not isinstance(budget_rows, (int, np.integer)):
        raise ValueError(f"budget_rows must be an integer, got {budget_rows!r}")
    budget = int(budget_rows)
    if not 0 <= budget <= rows:
        raise ValueError(f"budget_rows must be in [0, {rows}], got {budget}")
    if (isinstance(row_bytes, bool) or not isinstance(row_bytes, (int, np.integer))
            or row_bytes <= 0):
        raise ValueError(f"row_bytes must be a positive integer, got {row_bytes!r}")
    row_bytes = int(row_bytes)
    windows = WindowRows(1, 1, 1, 1)  # used by "chunking" only
    if method == "chunking":
        windows = (params or default_params(row_bytes, rows)).for_matrix(row_bytes, rows, table)
    return v, budget, row_bytes, windows


def select(importance, budget_rows: int, method: str, table: LatencyTable, row_bytes: int,
           params: ChunkParams | None = None) -> Selection:
    """Choose `budget_rows` rows of a matrix to read for one input.

    importance: float32 [rows], finite and >= 0, in stored-row order. ``params`` (chunking only)
    defaults to default_params(row_bytes, rows).
    """
    t0 = time.perf_counter()
    v, budget, row_bytes, windows = selection_arguments(importance, budget_rows, method, table, row_bytes,
                                                        params)
    from nchunk_core import _native
    runs, latency, retained = _native.select_rows(
        v, budget, method, table.latency_s, table.step_bytes, row_bytes, *windows)
    return Selection(runs=runs, rows=v.size if method == "dense" else budget,
                     est_latency_s=float(latency), retained=float(retained),
                     select_s=time.perf_counter() - t0, method=method)


def optimal_runs(importance, lam: float, table: LatencyTable, row_bytes: int) -> np.ndarray:
    """Runs maximising Σ selected importance - lam * Σ T[run bytes], with no row budget.

    Each lam >= 0 (importance per second) gives one point of the best importance-versus-estimated-
    time frontier; used by studies. Returns int64 [k, 2] (start, length).
    """
    from nchunk_core import _native
    v = np.ascontiguousarray(importance, dtype=np.float32)
    return _native.lagrangian_runs(v, float(lam), table.latency_s, table.step_bytes, int(row_bytes))

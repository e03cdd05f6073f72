"""Run-time row selection for one weight matrix and one input (Neuron Chunking, arXiv 2511.18692).

Given the importance of every stored row of a matrix (mean |x_i| of the input channel, in stored-row
order) and a budget of R rows, pick which rows to read. Every method selects exactly R rows (dense:
all of them) and returns them as sorted, maximal, non-overlapping runs, with the estimated read time
Σ T[run bytes] from the drive's latency table:

- ``dense``: every row.
- ``magnitude``: the R most important rows (TEAL / LLM-in-a-flash), adjacent ones read as one run.
- ``chunking``: the paper's greedy over candidate windows ranked by importance per unit of T.
- ``dp``: a Lagrangian dynamic program over row positions that maximises importance minus a price
  on estimated time, with a row price bisected so that exactly R rows are chosen.

The kernels live in the native extension (csrc/select.cpp); the ``_*_numpy`` functions here are plain
reference implementations of the same rules that the tests compare with (``impl="numpy"``).

    sel = select(importance, budget_rows, "chunking", table, row_bytes)
    sel.runs            # int64 [k, 2] (start, length)
    sel.row_indices()   # int64 [R]
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple

import numpy as np

from nchunk_core.latency import LatencyTable

METHODS = ("dense", "magnitude", "chunking", "dp")
IMPLS = ("native", "numpy")


class WindowRows(NamedTuple):
    """Chunking window sizes converted to rows of one matrix."""

    r_min: int
    r_max: int
    r_step: int
    jump_cap: int


def _kib_to_rows(kib: float, row_bytes: int) -> int:
    """Nearest whole number of rows (halves round up), at least one."""
    return max(1, int(math.floor(kib * 1024.0 / row_bytes + 0.5)))


@dataclasses.dataclass(frozen=True)
class ChunkParams:
    """Candidate windows of the chunking method, in KiB (independent of the matrix).

    Window sizes run from ``start_kib`` to ``max_kib`` (None: the drive's saturation size) in steps
    of ``step_kib``; a window of r rows slides with stride min(r, jump cap).
    """

    start_kib: float = 8.0
    step_kib: float = 8.0
    max_kib: float | None = None
    jump_cap_kib: float = 32.0

    def __post_init__(self):
        for name in ("start_kib", "step_kib", "jump_cap_kib", "max_kib"):
            value = getattr(self, name)
            if value is None and name == "max_kib":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                    value) or value <= 0:
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


def default_params(row_bytes: int, rows: int) -> ChunkParams:
    """Chunking windows for a matrix of `rows` rows of `row_bytes` bytes (placeholder)."""
    del row_bytes, rows
    return ChunkParams()


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


def dp_lambda(importance: np.ndarray, table: LatencyTable, row_bytes: int, lam_rel: float) -> float:
    """Price of one second, in importance, for the ``dp`` method.

    lam_rel = 1 prices the time to read one row at the drive's peak throughput like one row of mean
    importance; larger values favour fewer, longer runs.
    """
    t_row = float(table.estimate(table.saturation_bytes)) / table.saturation_bytes * row_bytes
    mean = float(np.mean(importance, dtype=np.float64)) if importance.size else 0.0
    return lam_rel * mean / t_row


DP_LAM_REL = 1.0


def select(importance, budget_rows: int, method: str, table: LatencyTable, row_bytes: int,
           params: ChunkParams | None = None, impl: str = "native",
           lam_rel: float | None = None) -> Selection:
    """Choose `budget_rows` rows of a matrix to read for one input.

    importance: float32 [rows], finite and >= 0, in stored-row order. ``params`` (chunking) defaults
    to default_params(row_bytes, rows); ``lam_rel`` (dp) to DP_LAM_REL.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {METHODS}")
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}")
    v = np.ascontiguousarray(importance, dtype=np.float32)
    if v.ndim != 1:
        raise ValueError(f"importance must be 1-D, got shape {v.shape}")
    rows = int(v.shape[0])
    if isinstance(budget_rows, bool) or not isinstance(budget_rows, (int, np.integer)):
        raise ValueError(f"budget_rows must be an integer, got {budget_rows!r}")
    budget = int(budget_rows)
    if not 0 <= budget <= rows:
        raise ValueError(f"budget_rows must be in [0, {rows}], got {budget}")
    if isinstance(row_bytes, bool) or not isinstance(row_bytes, (int, np.integer)) or row_bytes <= 0:
        raise ValueError(f"row_bytes must be a positive integer, got {row_bytes!r}")
    row_bytes = int(row_bytes)
    windows = (params or default_params(row_bytes, rows)).for_matrix(row_bytes, rows, table)
    lam = 0.0
    if method == "dp":
        lam = dp_lambda(v, table, row_bytes, DP_LAM_REL if lam_rel is None else lam_rel)

    if impl == "native":
        from nchunk_core import _native
        runs, latency, retained = _native.select_rows(
            v, budget, method, table.latency_s, table.step_bytes, row_bytes, *windows, lam)
    else:
        _check_importance_numpy(v)
        runs = _select_numpy(v, budget, method, table, row_bytes, windows, lam)
        latency = table.estimate_runs(runs[:, 1], row_bytes)
        total = float(v.sum(dtype=np.float64))
        kept = float(v[_mask_of(runs, rows)].sum(dtype=np.float64))
        retained = kept / total if total > 0 else 1.0
    return Selection(runs=runs, rows=budget if method != "dense" else rows,
                     est_latency_s=float(latency), retained=float(retained),
                     select_s=time.perf_counter() - t0, method=method)


# ---- NumPy reference implementations ---------------------------------------------------------------

def _check_importance_numpy(v: np.ndarray) -> None:
    bad = ~(np.isfinite(v) & (v >= 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"importance must be finite and >= 0 (row {i} is {v[i]})")


def _order_keys(scores: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """uint64 keys that sort like (score descending, index ascending) when sorted descending.

    scores: float32 [n] >= 0; index: [n] distinct ints < 2**32 (default: position).
    """
    bits = np.asarray(scores, dtype=np.float32).view(np.uint32).astype(np.uint64)
    if index is None:
        index = np.arange(bits.size)
    return (bits << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - np.asarray(index, dtype=np.uint64))


def _runs_of(mask: np.ndarray) -> np.ndarray:
    """Maximal runs of True in a bool [rows] mask: int64 [k, 2] (start, length)."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return np.stack([starts, ends - starts], axis=1).astype(np.int64).reshape(-1, 2)


def _mask_of(runs: np.ndarray, rows: int) -> np.ndarray:
    mask = np.zeros(rows, dtype=bool)
    for start, length in runs:
        mask[start:start + length] = True
    return mask


def _fill_best_rows(v: np.ndarray, count: int, mask: np.ndarray) -> None:
    """Select the `count` unselected rows of highest importance (ties: lower index)."""
    if count <= 0:
        return
    free = np.flatnonzero(~mask)
    keys = _order_keys(v[free])  # position within `free` orders like the row index
    best = free[np.argsort(keys)[::-1][:count]]
    mask[best] = True


def _chunking_numpy(v: np.ndarray, budget: int, table: LatencyTable, row_bytes: int,
                    w: WindowRows) -> np.ndarray:
    rows = v.size
    mask = np.zeros(rows, dtype=bool)
    remaining = budget
    if w.r_min <= min(rows, remaining):
        prefix = np.concatenate(([0.0], np.cumsum(v, dtype=np.float64)))  # [rows + 1]
        sizes = np.arange(w.r_min, min(w.r_max, rows) + 1, w.r_step)
        size_bits = int(sizes.size - 1).bit_length()
        starts, lengths, scores, index = [], [], [], []
        for k, r in enumerate(sizes.tolist()):
            pos = np.arange(0, rows - r + 1, min(r, w.jump_cap))
            if pos[-1] + r < rows:  # a window ending at the last row keeps the tail reachable
                pos = np.append(pos, rows - r)
            inv_t = 1.0 / float(table.estimate(r * row_bytes))
            starts.append(pos)
            lengths.append(np.full(pos.size, r))
            scores.append(((prefix[pos + r] - prefix[pos]) * inv_t).astype(np.float32))
            index.append((pos << size_bits) | k)  # ties: lower start, then smaller window
        starts, lengths = np.concatenate(starts), np.concatenate(lengths)
        order = np.argsort(_order_keys(np.concatenate(scores), np.concatenate(index)))[::-1]
        for c in order:
            if remaining < w.r_min:
                break
            p, r = int(starts[c]), int(lengths[c])
            if r <= remaining and not mask[p:p + r].any():
                mask[p:p + r] = True
                remaining -= r
    _fill_best_rows(v, remaining, mask)
    return _runs_of(mask)


def _piece_costs(rows: int, lam: float, table: LatencyTable, row_bytes: int) -> np.ndarray:
    """lam * T[L * row_bytes] for L = 0..max_len (max_len = 2m - 1, m rows fill the table)."""
    m = max(1, -(-table.max_bytes // row_bytes))
    max_len = max(1, min(rows, 2 * m - 1))
    cost = lam * table.estimate(np.arange(max_len + 1) * float(row_bytes))
    cost[0] = 0.0
    return cost


def _solve_pieces_numpy(prefix: np.ndarray, cost: np.ndarray, mu: float) -> np.ndarray:
    """Rows maximising Σ(v - mu) - Σ cost[piece length] (pieces of 1..len(cost)-1 rows): bool mask."""
    rows = prefix.size - 1
    max_len = cost.size - 1
    f = np.zeros(rows + 1)
    g = np.zeros(rows + 1)  # g[j] = f[j] - prefix[j] + mu * j
    pick = np.zeros(rows + 1, dtype=np.int64)  # length of the piece ending at row i - 1, 0 = skip
    for i in range(1, rows + 1):
        lengths = np.arange(1, min(i, max_len) + 1)
        values = g[i - lengths] - cost[lengths]
        k = int(np.argmax(values))
        take = prefix[i] - mu * i + values[k]
        if take > f[i - 1]:
            f[i], pick[i] = take, lengths[k]
        else:
            f[i] = f[i - 1]
        g[i] = f[i] - prefix[i] + mu * i
    mask = np.zeros(rows, dtype=bool)
    i = rows
    while i > 0:
        if pick[i] == 0:
            i -= 1
        else:
            mask[i - pick[i]:i] = True
            i -= pick[i]
    return mask


def _dp_numpy(v: np.ndarray, budget: int, table: LatencyTable, row_bytes: int,
              lam: float) -> np.ndarray:
    rows = v.size
    if budget == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if budget == rows:
        return np.array([[0, rows]], dtype=np.int64)
    prefix = np.concatenate(([0.0], np.cumsum(v, dtype=np.float64)))
    cost = _piece_costs(rows, lam, table, row_bytes)
    mu_lo, mu_hi = -cost[1] - 1.0, float(v.max())
    chosen = np.zeros(rows, dtype=bool)
    for _ in range(40):
        if mu_hi - mu_lo <= 1e-12 * (1.0 + abs(mu_hi)):
            break
        mu = 0.5 * (mu_lo + mu_hi)
        mask = _solve_pieces_numpy(prefix, cost, mu)
        count = int(mask.sum())
        if count > budget:
            mu_lo = mu
        else:
            mu_hi, chosen = mu, mask
            if count == budget:
                break
    _fill_best_rows(v, budget - int(chosen.sum()), chosen)
    return _runs_of(chosen)


def _select_numpy(v: np.ndarray, budget: int, method: str, table: LatencyTable, row_bytes: int,
                  windows: WindowRows, lam: float) -> np.ndarray:
    rows = v.size
    if method == "dense" or budget == rows:
        return np.array([[0, rows]] if rows else [], dtype=np.int64).reshape(-1, 2)
    if method == "magnitude":
        mask = np.zeros(rows, dtype=bool)
        _fill_best_rows(v, budget, mask)
        return _runs_of(mask)
    if method == "chunking":
        return _chunking_numpy(v, budget, table, row_bytes, windows)
    return _dp_numpy(v, budget, table, row_bytes, lam)

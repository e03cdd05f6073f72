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

The kernels live in the native extension (csrc/select.cpp); the ``_*_numpy`` functions here are
plain reference implementations of the same rules that the tests compare with (``impl="numpy"``).

    sel = select(importance, budget_rows, "chunking", table, row_bytes)
    sel.runs            # int64 [k, 2] (start, length)
    sel.row_indices()   # int64 [R]
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import numbers
import time
from typing import NamedTuple

import numpy as np

from nchunk_core.io.latency import LatencyTable

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


# Chosen by the window sweep of nchunk_core/bench/select_sweep.py (table and method in
# docs/selection.md): the best mean retained importance at 10-50 % of the dense read time whose
# selection stays under half the 2 ms budget at 18 944 rows. Small rows (q+k+v, q, down of a 7B
# model: 7-9 KiB) gave 32/32/32 KiB; large rows (gate+up: 74 KiB) gave one-row windows at every
# row, which 32/32/32 KiB also converts to for any row above 64 KiB.
SMALL_ROWS = ChunkParams(start_kib=32.0, step_kib=32.0, max_kib=None, jump_cap_kib=32.0)
LARGE_ROWS = ChunkParams(start_kib=4.0, step_kib=4.0, max_kib=None, jump_cap_kib=8.0)
LARGE_ROW_BYTES = 32 * 1024  # rows above this use LARGE_ROWS


def default_params(row_bytes: int, rows: int) -> ChunkParams:
    """Chunking windows for a matrix of `rows` rows of `row_bytes` bytes (see the sweep above)."""
    del rows  # the sweep found no dependence on the row count beyond selection time
    return LARGE_ROWS if row_bytes > LARGE_ROW_BYTES else SMALL_ROWS


@dataclasses.dataclass(frozen=True)
class SelectionSettings:
    """How every streamed matrix picks its rows: the one value for these settings, from the ROS
    parameters (or the Session's caller) down to `select`. Validated here, on construction
    (ValueError naming the field), and passed through unchanged.
    """

    sparsity: float = 0.0  # fraction of each matrix's input rows NOT read, in [0, 1)
    method: str = "chunking"  # one of METHODS
    windows: ChunkParams | None = None  # chunking's candidate windows; None: default_params per matrix

    def __post_init__(self):
        value = self.sparsity
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                or not 0.0 <= float(value) < 1.0):
            raise ValueError(f"sparsity must be a number in [0, 1), got {value!r}")
        object.__setattr__(self, "sparsity", float(value))
        if self.method not in METHODS:
            raise ValueError(f"unknown selection method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.windows is not None and not isinstance(self.windows, ChunkParams):
            raise ValueError(f"windows must be a ChunkParams or None, got {type(self.windows).__name__}")

    @classmethod
    def from_kib(cls, sparsity: float, method: str, start_kib: float = 0.0, step_kib: float = 0.0,
                 max_kib: float = 0.0, jump_cap_kib: float = 0.0) -> "SelectionSettings":
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
            return cls(sparsity, method, None)
        start = explicit.get("start_kib", ChunkParams.start_kib)
        if "max_kib" in explicit and explicit["max_kib"] < start:
            raise ValueError(f"chunk_max_kib ({explicit['max_kib']:g}) is below the smallest window "
                             f"({start:g} KiB): raise chunk_max_kib or set it to 0 (saturation size)")
        return cls(sparsity, method, ChunkParams(**explicit))

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


# Search limits of the "dp" method, as kDpMaxSolves and kDpPriceTolerance in select.hpp.
DP_MAX_SOLVES = 8
DP_PRICE_TOLERANCE = 1e-3


def select(importance, budget_rows: int, method: str, table: LatencyTable, row_bytes: int,
           params: ChunkParams | None = None, impl: str = "native") -> Selection:
    """Choose `budget_rows` rows of a matrix to read for one input.

    importance: float32 [rows], finite and >= 0, in stored-row order. ``params`` (chunking only)
    defaults to default_params(row_bytes, rows). ``impl="numpy"`` runs the reference code.
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
    if (isinstance(row_bytes, bool) or not isinstance(row_bytes, (int, np.integer))
            or row_bytes <= 0):
        raise ValueError(f"row_bytes must be a positive integer, got {row_bytes!r}")
    row_bytes = int(row_bytes)
    windows = WindowRows(1, 1, 1, 1)  # used by "chunking" only
    if method == "chunking":
        windows = (params or default_params(row_bytes, rows)).for_matrix(row_bytes, rows, table)

    if impl == "native":
        from nchunk_core import _native
        runs, latency, retained = _native.select_rows(
            v, budget, method, table.latency_s, table.step_bytes, row_bytes, *windows)
    else:
        _check_importance_numpy(v)
        runs = _select_numpy(v, budget, method, table, row_bytes, windows)
        latency = table.estimate_runs(runs[:, 1], row_bytes)
        total = float(v.sum(dtype=np.float64))
        kept = float(v[_mask_of(runs, rows)].sum(dtype=np.float64))
        retained = kept / total if total > 0 else 1.0
    return Selection(runs=runs, rows=rows if method == "dense" else budget,
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


# ---- NumPy reference implementations -------------------------------------------------------

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


class _RunProgram:
    """NumPy twin of RunProgram in select.cpp (same recurrences, same floating-point order)."""

    def __init__(self, v: np.ndarray, table: LatencyTable, row_bytes: int):
        self.v = v
        rows = v.size
        self.prefix = np.concatenate(([0.0], np.cumsum(v, dtype=np.float64)))  # [rows + 1]
        m = max(1, -(-table.max_bytes // row_bytes))  # rows that fill the latency table
        self.m = min(m, rows + 1)
        self.piece_t = np.zeros(self.m)  # [m] T of a piece of L rows, L < m
        self.piece_t[1:] = table.estimate(np.arange(1, self.m) * float(row_bytes))
        self.t_long = float(table.estimate(self.m * row_bytes))

    def solve(self, lam: float) -> np.ndarray:
        """Rows maximising Σ v - lam Σ T[run bytes]: bool [rows]."""
        v, prefix, m, n = self.v, self.prefix, self.m, self.v.size
        cost_rev = np.zeros(m)  # cost_rev[t] = lam * T[m - 1 - t]
        cost_rev[:m - 1] = (lam * self.piece_t[1:])[::-1]
        long_cost = lam * self.t_long
        per_row = long_cost / m
        one_cost = float(cost_rev[m - 2]) if m > 1 else math.inf
        f, g = np.zeros(n + 1), np.zeros(n + 1)
        e, best = np.full(n + 1, -math.inf), np.full(n + 1, -math.inf)
        f_prev, e_prev = 0.0, -math.inf
        for i in range(1, n + 1):
            x = float(v[i - 1])
            k = min(i, m - 1)
            b = float(np.max(g[i - k:i - 1] - cost_rev[m - 1 - k:m - 2])) if k > 1 else -math.inf
            e_i = -math.inf
            if i >= m:
                e_i = max(e_prev + x - per_row, g[i - m] + prefix[i] - long_cost)
            f_prev = max(f_prev + max(0.0, x - one_cost), max(e_i, prefix[i] + b))
            best[i], e[i], f[i] = b, e_i, f_prev
            e_prev = e_i
            g[i] = f_prev - prefix[i]
        mask = np.zeros(n, dtype=bool)
        i = n
        while i > 0:
            if f[i] == f[i - 1]:
                i -= 1
                continue
            if f[i] == e[i]:
                j = i
                while e[j] != g[j - m] + prefix[j] - long_cost:
                    j -= 1
                start = j - m
            elif f[i] == f[i - 1] + max(0.0, float(v[i - 1]) - one_cost):
                start = i - 1
            else:
                length = 2
                while g[i - length] - cost_rev[m - 1 - length] != best[i]:
                    length += 1
                start = i - length
            mask[start:i] = True
            i = start
        return mask


def _trim_run_ends(mask: np.ndarray, v: np.ndarray, count: int) -> None:
    """Unselect `count` rows, each time the least important run end (ties: lower row)."""
    ends = []
    for start, length in _runs_of(mask):
        ends.append((float(v[start]), int(start)))
        if length > 1:
            ends.append((float(v[start + length - 1]), int(start + length - 1)))
    heapq.heapify(ends)
    while count > 0 and ends:
        _, row = heapq.heappop(ends)
        if not mask[row]:
            continue
        mask[row] = False
        count -= 1
        for nxt in (row - 1, row + 1):
            if 0 <= nxt < mask.size and mask[nxt]:
                heapq.heappush(ends, (float(v[nxt]), nxt))


def _grow_run_ends(mask: np.ndarray, v: np.ndarray, count: int) -> None:
    """Select `count` rows, each time the most important row next to a run (ties: lower row)."""
    rows = mask.size
    next_to = []  # (-importance, row)
    for start, length in _runs_of(mask):
        if start > 0:
            next_to.append((-float(v[start - 1]), int(start - 1)))
        if start + length < rows:
            next_to.append((-float(v[start + length]), int(start + length)))
    if not next_to and rows:
        best = int(np.argmax(v))  # first of the largest
        next_to.append((-float(v[best]), best))
    heapq.heapify(next_to)
    while count > 0 and next_to:
        _, row = heapq.heappop(next_to)
        if mask[row]:
            continue
        mask[row] = True
        count -= 1
        for nxt in (row - 1, row + 1):
            if 0 <= nxt < rows and not mask[nxt]:
                heapq.heappush(next_to, (-float(v[nxt]), nxt))


def _dp_numpy(v: np.ndarray, budget: int, table: LatencyTable, row_bytes: int) -> np.ndarray:
    rows = v.size
    if budget == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if budget == rows:
        return np.array([[0, rows]], dtype=np.int64)
    program = _RunProgram(v, table, row_bytes)
    total = float(program.prefix[-1])
    if not total > 0:
        mask = np.zeros(rows, dtype=bool)
        _fill_best_rows(v, budget, mask)
        return _runs_of(mask)
    t_row = float(table.estimate(table.max_bytes)) / table.max_bytes * row_bytes
    x0 = math.log(total / rows / t_row)
    close = max(program.m, budget // 32)
    def logit(count):  # of the selected fraction, kept finite at 0 and rows
        return math.log((count + 1.0) / (rows - count + 1.0))

    f_budget = logit(budget)
    have_lo = have_hi = False
    x_lo = x_hi = f_lo = f_hi = x_prev = f_prev = 0.0
    count_lo = count_hi = 0
    side = 0
    above = below = None
    x, n = x0, 0
    while n < DP_MAX_SOLVES:
        mask = program.solve(math.exp(x))
        n += 1
        count = int(mask.sum())
        if count == budget:
            return _runs_of(mask)
        fx = logit(count) - f_budget
        if count > budget:
            if have_lo and have_hi and side == 1:
                f_hi *= 0.5
            have_lo, x_lo, f_lo, count_lo, above, side = True, x, fx, count, mask, 1
        else:
            if have_lo and have_hi and side == -1:
                f_lo *= 0.5
            have_hi, x_hi, f_hi, count_hi, below, side = True, x, fx, count, mask, -1
        if (have_lo and count_lo - budget <= close) or (have_hi and budget - count_hi <= close):
            break
        if have_lo and have_hi:
            if x_hi - x_lo <= DP_PRICE_TOLERANCE:
                break
            t = min(0.98, max(0.02, f_lo / (f_lo - f_hi)))
            nxt = x_lo + t * (x_hi - x_lo)
        else:
            slope = (fx - f_prev) / (x - x_prev) if n > 1 and x != x_prev else -2.0
            sign = 1.0 if fx > 0.0 else -1.0
            step = -1.2 * fx / slope if slope < 0.0 else sign * math.log(8.0)
            step = sign * min(math.log(8.0), max(math.log(1.25), abs(step)))
            nxt = x + step
            if abs(nxt - x0) > 30.0:
                break
        x_prev, f_prev, x = x, fx, nxt
    if have_lo and (not have_hi or count_lo - budget <= budget - count_hi):
        _trim_run_ends(above, v, count_lo - budget)
        return _runs_of(above)
    _grow_run_ends(below, v, budget - count_hi)
    return _runs_of(below)


def _select_numpy(v: np.ndarray, budget: int, method: str, table: LatencyTable, row_bytes: int,
                  windows: WindowRows) -> np.ndarray:
    rows = v.size
    if method == "dense" or budget == rows:
        return np.array([[0, rows]] if rows else [], dtype=np.int64).reshape(-1, 2)
    if method == "magnitude":
        mask = np.zeros(rows, dtype=bool)
        _fill_best_rows(v, budget, mask)
        return _runs_of(mask)
    if method == "chunking":
        return _chunking_numpy(v, budget, table, row_bytes, windows)
    return _dp_numpy(v, budget, table, row_bytes)

"""NumPy reference of row selection: the rules of the native kernels (csrc/select.cpp), written
plainly, for tests that compare the two (runtime/select.py is the run-time API).

    ref = select_reference(importance, budget_rows, "dp", table, row_bytes)
    native = select(importance, budget_rows, "dp", table, row_bytes)
    # same runs, latency and retained importance
"""
from __future__ import annotations

import heapq
import math
import time

import numpy as np

from nchunk_core.io.latency import LatencyTable
from nchunk_core.runtime.select import ChunkParams, Selection, WindowRows, selection_arguments

# Search limits of the "dp" method, as kDpMaxSolves and kDpPriceTolerance in select.hpp.
DP_MAX_SOLVES = 8
DP_PRICE_TOLERANCE = 1e-3


def select_reference(importance, budget_rows: int, method: str, table: LatencyTable, row_bytes: int,
                     params: ChunkParams | None = None) -> Selection:
    """`select` computed in NumPy: same arguments, same checks, same result."""
    t0 = time.perf_counter()
    v, budget, row_bytes, windows = selection_arguments(importance, budget_rows, method, table, row_bytes,
                                                        params)
    _check_importance(v)
    rows = v.size
    runs = _select_runs(v, budget, method, table, row_bytes, windows)
    latency = table.estimate_runs(runs[:, 1], row_bytes)
    total = float(v.sum(dtype=np.float64))
    kept = float(v[_mask_of(runs, rows)].sum(dtype=np.float64))
    return Selection(runs=runs, rows=rows if method == "dense" else budget, est_latency_s=float(latency),
                     retained=kept / total if total > 0 else 1.0, select_s=time.perf_counter() - t0,
                     method=method)


def _check_importance(v: np.ndarray) -> None:
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


def _chunking(v: np.ndarray, budget: int, table: LatencyTable, row_bytes: int,
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


def _dp(v: np.ndarray, budget: int, table: LatencyTable, row_bytes: int) -> np.ndarray:
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


def _select_runs(v: np.ndarray, budget: int, method: str, table: LatencyTable, row_bytes: int,
                  windows: WindowRows) -> np.ndarray:
    rows = v.size
    if method == "dense" or budget == rows:
        return np.array([[0, rows]] if rows else [], dtype=np.int64).reshape(-1, 2)
    if method == "magnitude":
        mask = np.zeros(rows, dtype=bool)
        _fill_best_rows(v, budget, mask)
        return _runs_of(mask)
    if method == "chunking":
        return _chunking(v, budget, table, row_bytes, windows)
    return _dp(v, budget, table, row_bytes)

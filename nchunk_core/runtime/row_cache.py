"""Hot rows in RAM under a byte budget: at first the front of every streamed matrix, read once.

After hot–cold reordering the rows most often selected sit at the front of each input's groups, so
the cache of an input starts as its first `c` stored rows (every group of the input, storage dtype, on the
compute device). Selection treats cached rows as free, zero I/O and full importance (`select_cached`):
they are always used, and the method spends the rest of the row budget on the uncached rows, so the
drive reads only those. A budget at or below the cache takes the most important rows of all.

How the budget is split (`plan_rows`): a cached row saves its bytes whenever it would have been
read, so rows are ranked across all matrices by how often they are selected, most often first. The
plan takes that frequency from the store's calibration statistics (the fraction of calibration
inputs in which the channel was in the top half: `hotness`); without them every row counts the same
and the budget goes to the front of every matrix in proportion to its size.

Which rows stay (`select.CACHE_POLICIES`): both policies start from the planned front rows and keep
each input's row count. "static" keeps them. "frame" scores every row by its importance, decayed by
SCORE_DECAY at every call, and after each call lets the rows that call read replace cached rows of
lower score (`RowCache.observe`): frames of a video are similar, so the rows that mattered for the
last frames are cached for the next, at no read of their own. Its cache is any set of rows:
`select_cached` then runs the method on the uncached rows side by side and maps the runs back.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.reader import Reader
from nchunk_core.runtime.overlap import Block, row_runs, run_rows
from nchunk_core.runtime.select import CACHE_POLICIES, ChunkParams, Selection, check_cache_policy, select
from nchunk_core.store import GroupInfo, Store
from nchunk_core.store.naming import CALIBRATION_PREFIX, torch_dtype

SCORE_DECAY = 0.5  # weight of the earlier calls in the "frame" policy's score


def hotness(store: Store, input_name: str) -> np.ndarray | None:
    """float64 [rows] in stored-row order: how often each row's channel was active in calibration
    (None when the store has no calibration statistics for the input)."""
    key = f"{CALIBRATION_PREFIX}{input_name}/active_fraction"
    if key not in store.resident_names():
        return None
    active = store.resident("cpu", [key])[key].double().numpy()  # [rows] original channel order
    perm = store.permutation(input_name)
    return active if perm is None else active[perm]


def plan_rows(entries: dict[str, tuple[int, np.ndarray]], budget_bytes: int) -> dict[str, int]:
    """Rows to cache per input: {key: (row_bytes, benefit [rows] non-increasing)} -> {key: c}.

    Rows are taken across inputs in order of benefit (ties: front rows first, smaller rows first)
    while the bytes fit in the budget; each input's cache is a prefix of its rows.
    """
    keys = list(entries)
    if budget_bytes <= 0 or not keys:
        return {k: 0 for k in keys}
    benefit = np.concatenate([np.asarray(entries[k][1], dtype=np.float64) for k in keys])
    sizes = np.concatenate([np.full(len(entries[k][1]), entries[k][0], dtype=np.int64) for k in keys])
    owner = np.concatenate([np.full(len(entries[k][1]), i, dtype=np.int64) for i, k in enumerate(keys)])
    position = np.concatenate([np.arange(len(entries[k][1]), dtype=np.int64) for k in keys])
    order = np.lexsort((sizes, position, -benefit))
    fits = np.cumsum(sizes[order]) <= budget_bytes
    taken = order[fits] if fits.all() else order[:int(np.argmin(fits))]
    counts = np.bincount(owner[taken], minlength=len(keys))
    # prefixes: an input's cache is its first counts[i] rows (benefit is non-increasing per input)
    return {k: int(counts[i]) for i, k in enumerate(keys)}


def select_cached(importance: np.ndarray, budget_rows: int, cached, method: str,
                  table: LatencyTable, row_bytes: int, windows: ChunkParams | None) -> Selection:
    """Select `budget_rows` rows when the cached rows cost nothing to read (module docstring).

    cached: the number of cached front rows (int), or the cached stored-row indices (int64 [c]).
    The cached rows are all used when they fit in the budget and the method picks the others among
    the uncached rows. A budget at or below the cache takes the budget's most important rows of all
    (magnitude, as with every row in RAM): mostly cached rows, and the few uncached ones that matter
    more are read (restricting it to the cached rows dropped rows that matter: a cache planned by
    calibration can be larger than an input's budget at a layer-wise sparsity). est_latency_s counts
    the uncached reads only.
    """
    if isinstance(cached, (int, np.integer)):
        held = np.arange(min(int(cached), importance.size), dtype=np.int64)
    else:
        held = np.asarray(cached, dtype=np.int64)
    c = held.size
    if c == 0:
        return select(importance, budget_rows, method, table, row_bytes, windows)
    t0 = time.perf_counter()
    total = float(importance.sum())
    if budget_rows <= c:  # the budget's most important rows of all: a cache never hides a row that matters
        keep = np.sort(np.argpartition(-importance, budget_rows - 1)[:budget_rows]) if budget_rows else []
        keep = np.asarray(keep, dtype=np.int64)
        lengths = row_runs(keep[~np.isin(keep, held)])[:, 1]
        est = float(table.estimate(lengths * row_bytes).sum()) if len(lengths) else 0.0
        kept = float(importance[keep].sum()) if budget_rows else 0.0
        return Selection(row_runs(keep), budget_rows, est, kept / total if total > 0 else 1.0,
                         time.perf_counter() - t0, method)
    prefix = int(held[-1]) == c - 1 and bool(np.all(np.diff(held) == 1)) and int(held[0]) == 0
    if prefix:  # the front rows: the method selects on the rows behind them, runs shift by c
        free = None
        rest = select(importance[c:], budget_rows - c, method, table, row_bytes, windows)
        chosen = rest.row_indices() + c
        est = rest.est_latency_s
    else:  # any set: the method selects on the uncached rows side by side; reads split around cached rows
        mask = np.ones(importance.size, dtype=bool)
        mask[held] = False
        free = np.flatnonzero(mask)
        rest = select(importance[free], budget_rows - c, method, table, row_bytes, windows)
        chosen = free[rest.row_indices()]
        lengths = row_runs(chosen)[:, 1]
        est = float(table.estimate(lengths * row_bytes).sum()) if len(lengths) else 0.0
    runs = row_runs(np.union1d(held, chosen))
    head = float(importance[held].sum())
    retained = (head + float(importance[chosen].sum())) / total if total > 0 else 1.0
    return Selection(runs, budget_rows, est, retained, time.perf_counter() - t0, method)


class RowCache:
    """The cached rows of every streamed input, and the policy that picks them (module docstring).

    `rows(key)` is the number of cached rows of an input, `indices(key)` which stored rows they are
    (int64 [c], slot order), `weights(key)` their values, one tensor [c, out_g] per group in the
    storage dtype on the compute device (slot order).
    """

    def __init__(self, budget_bytes: int = 0, policy: str = CACHE_POLICIES[0]):
        self.budget_bytes = int(budget_bytes)
        self.policy = check_cache_policy(policy)
        self._index: dict[str, np.ndarray] = {}  # key -> int64 [c] stored rows, slot order
        self._weights: dict[str, list[torch.Tensor]] = {}
        self._score: dict[str, np.ndarray] = {}  # "frame": key -> float32 [rows] decayed importance
        self._pending: dict[str, np.ndarray] = {}  # "frame": key -> importance [rows] of the call in progress
        self.nbytes = 0
        self.swapped_rows = 0  # "frame": rows replaced since loading

    def rows(self, key: str) -> int:
        idx = self._index.get(key)
        return 0 if idx is None else int(idx.size)

    def indices(self, key: str) -> np.ndarray:
        return self._index.get(key, np.zeros(0, dtype=np.int64))

    def weights(self, key: str) -> list[torch.Tensor]:
        return self._weights[key]

    @property
    def plan(self) -> dict[str, int]:
        return {k: int(v.size) for k, v in self._index.items()}

    def select(self, key: str, importance: np.ndarray, budget_rows: int, method: str, table: LatencyTable,
               row_bytes: int, windows: ChunkParams | None) -> Selection:
        """`select_cached` on this input's cached rows; the "frame" policy keeps `importance` [rows]
        for `observe`."""
        if self.policy == "frame" and key in self._index:
            self._pending[key] = importance
        return select_cached(importance, budget_rows, self.indices(key), method, table, row_bytes, windows)

    def split(self, key: str, runs: np.ndarray) -> tuple[Block | None, np.ndarray, int]:
        """A selection's runs [k, 2] -> (block of its cached rows or None, runs [m, 2] to read, rows cached)."""
        held = self._index.get(key)
        if held is None or held.size == 0 or len(runs) == 0:
            return None, runs, 0
        wanted = run_rows(runs)  # [n] ascending
        in_cache = np.isin(wanted, held)
        use = np.isin(held, wanted)  # [c]
        cached = int(in_cache.sum())
        if cached == 0:
            return None, runs, 0
        block = Block(held, self._weights[key], None if use.all() else use)
        return block, row_runs(wanted[~in_cache]), cached

    def observe(self, key: str, blocks: list[Block]) -> np.ndarray:
        """The "frame" policy, after a call has computed and before its read buffers are reused:
        every row's score decays by SCORE_DECAY towards this call's importance, and the rows this
        call read (`blocks`) replace cached rows of lower score, so that the cache holds the
        best-scoring rows seen so far (no read of its own: only rows already read come in).
        Returns the rows that came in (int64 [k]; none with the "static" policy)."""
        none = np.zeros(0, dtype=np.int64)
        importance = self._pending.pop(key, None)
        if self.policy != "frame" or importance is None or not blocks:
            return none
        score = self._score.get(key)
        score = importance.astype(np.float32) if score is None else SCORE_DECAY * score + (1 - SCORE_DECAY) * importance
        self._score[key] = score
        held = self._index[key]
        c = held.size
        read = np.concatenate([b.rows for b in blocks])  # [m] rows whose weights are at hand
        origin = np.concatenate([np.full(len(b.rows), i) for i, b in enumerate(blocks)])
        local = np.concatenate([np.arange(len(b.rows)) for b in blocks])
        fresh = ~np.isin(read, held)
        read, origin, local = read[fresh], origin[fresh], local[fresh]
        if read.size == 0:
            return none
        candidates = np.concatenate([held, read])  # [c + m]
        best = np.argpartition(-score[candidates], c - 1)[:c] if candidates.size > c else np.arange(c)
        keep = np.zeros(candidates.size, dtype=bool)
        keep[best] = True
        incoming = np.flatnonzero(keep[c:])  # positions in `read`
        slots = np.flatnonzero(~keep[:c])  # evicted slots, as many as incoming
        if incoming.size == 0:
            return none
        weights = self._weights[key]
        for i, b in enumerate(blocks):
            mine = origin[incoming] == i
            if not mine.any():
                continue
            src = torch.as_tensor(local[incoming[mine]])
            dst = torch.as_tensor(slots[mine], device=weights[0].device)
            for w, bw in zip(weights, b.weights):
                w.index_copy_(0, dst, bw.index_select(0, src).to(w.device))
        held[slots] = read[incoming]
        self.swapped_rows += int(incoming.size)
        return read[incoming]

    @classmethod
    def load(cls, reader: Reader, inputs: dict[str, tuple[list[GroupInfo], list]], plan: dict[str, int],
             device, budget_bytes: int, policy: str = CACHE_POLICIES[0]) -> "RowCache":
        """Read the planned front rows of every input (one sequential read per group)."""
        cache = cls(budget_bytes, policy)
        device = torch.device(device)
        for key, c in plan.items():
            if c <= 0:
                continue
            groups, handles = inputs[key]
            tensors = []
            for g, h in zip(groups, handles):
                raw = reader.empty(c * g.row_bytes)
                reader.read(h, np.array([[g.offset, c * g.row_bytes, 0]], dtype=np.int64), raw)
                t = torch.from_numpy(raw).view(torch_dtype(g.dtype)).view(c, g.row_bytes // g.itemsize)  # [c, out_g]
                tensors.append(t if device.type == "cpu" else t.to(device))
                cache.nbytes += c * g.row_bytes
            cache._index[key], cache._weights[key] = np.arange(c, dtype=np.int64), tensors
        return cache


def build_cache(store: Store, reader: Reader, inputs: dict[str, tuple[list[GroupInfo], list]], device,
                budget_bytes: int, policy: str = CACHE_POLICIES[0]) -> RowCache:
    """Plan by calibration hotness, then load the front rows (both policies start from them)."""
    entries = {}
    for key, (groups, _) in inputs.items():
        hot = hotness(store, key)
        rows = groups[0].rows
        entries[key] = (sum(g.row_bytes for g in groups), np.ones(rows) if hot is None else hot)
    return RowCache.load(reader, inputs, plan_rows(entries, budget_bytes), device, budget_bytes, policy)

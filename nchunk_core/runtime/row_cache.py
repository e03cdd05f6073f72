"""Hot rows in RAM under a byte budget: the front of every streamed matrix, read once.

After hot–cold reordering the rows most often selected sit at the front of each input's groups, so
the cache of an input is its first `c` stored rows (every group of the input, storage dtype, on the
compute device). Selection treats cached rows as free, zero I/O and full importance (`select_cached`):
they are always used, and the method spends the rest of the row budget on the uncached rows, so the
drive reads only those. A budget at or below the cache takes the most important cached rows.

How the budget is split (`plan_rows`): a cached row saves its bytes whenever it would have been
read, so rows are ranked across all matrices by how often they are selected, most often first. The
static policy takes that frequency from the store's calibration statistics (the fraction of
calibration inputs in which the channel was in the top half: `hotness`); without them every row
counts the same and the budget goes to the front of every matrix in proportion to its size.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.reader import Reader
from nchunk_core.runtime.overlap import row_runs
from nchunk_core.runtime.select import ChunkParams, Selection, select
from nchunk_core.store import GroupInfo, Store
from nchunk_core.store.naming import CALIBRATION_PREFIX, torch_dtype


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


def select_cached(importance: np.ndarray, budget_rows: int, cached_rows: int, method: str,
                  table: LatencyTable, row_bytes: int, windows: ChunkParams | None) -> Selection:
    """Select `budget_rows` rows when the first `cached_rows` cost nothing to read (module docstring).

    The cached rows are all used when they fit in the budget and the method picks the others among
    the uncached rows; otherwise the budget's most important cached rows are used and nothing is read.
    est_latency_s counts the uncached reads only.
    """
    c = min(int(cached_rows), importance.size)
    if c == 0:
        return select(importance, budget_rows, method, table, row_bytes, windows)
    t0 = time.perf_counter()
    total = float(importance.sum())
    if budget_rows <= c:
        keep = np.sort(np.argpartition(-importance[:c], budget_rows - 1)[:budget_rows]) if budget_rows else []
        runs = row_runs(np.asarray(keep, dtype=np.int64))
        kept = float(importance[keep].sum()) if budget_rows else 0.0
        return Selection(runs, budget_rows, 0.0, kept / total if total > 0 else 1.0, time.perf_counter() - t0, method)
    rest = select(importance[c:], budget_rows - c, method, table, row_bytes, windows)
    runs = rest.runs.copy()
    runs[:, 0] += c
    if len(runs) and runs[0, 0] == c:
        runs[0] = (0, c + runs[0, 1])
    else:
        runs = np.concatenate([np.array([[0, c]], dtype=np.int64), runs.reshape(-1, 2)])
    head, tail = float(importance[:c].sum()), total - float(importance[:c].sum())
    retained = (head + rest.retained * tail) / total if total > 0 else 1.0
    return Selection(runs, budget_rows, rest.est_latency_s, retained, time.perf_counter() - t0, method)


class RowCache:
    """The cached front rows of every streamed input (see the module docstring).

    `rows(key)` is the number of cached rows of an input; `weights(key)` their values, one tensor
    [c, out_g] per group in the storage dtype on the compute device.
    """

    def __init__(self, budget_bytes: int = 0):
        self.budget_bytes = int(budget_bytes)
        self._rows: dict[str, int] = {}
        self._weights: dict[str, list[torch.Tensor]] = {}
        self.nbytes = 0

    def rows(self, key: str) -> int:
        return self._rows.get(key, 0)

    def weights(self, key: str) -> list[torch.Tensor]:
        return self._weights[key]

    @property
    def plan(self) -> dict[str, int]:
        return dict(self._rows)

    @classmethod
    def load(cls, reader: Reader, inputs: dict[str, tuple[list[GroupInfo], list]], plan: dict[str, int],
             device, budget_bytes: int) -> "RowCache":
        """Read the planned front rows of every input (one sequential read per group)."""
        cache = cls(budget_bytes)
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
            cache._rows[key], cache._weights[key] = c, tensors
        return cache


def build_cache(store: Store, reader: Reader, inputs: dict[str, tuple[list[GroupInfo], list]], device,
                budget_bytes: int) -> RowCache:
    """The static policy: plan by calibration hotness, then load."""
    entries = {}
    for key, (groups, _) in inputs.items():
        hot = hotness(store, key)
        rows = groups[0].rows
        entries[key] = (sum(g.row_bytes for g in groups), np.ones(rows) if hot is None else hot)
    return RowCache.load(reader, inputs, plan_rows(entries, budget_bytes), device, budget_bytes)

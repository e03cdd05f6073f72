"""Flash sparse linear layers: projections whose weights stay on the drive.

`FlashProjections` replaces a set of projections that share one input (q|k|v, gate|up, o, down).
For every call it

1. computes the importance of each input channel, the mean of |x| over the call's tokens (a whole
   frame shares one selection), in stored-row order (the hot–cold permutation),
2. selects rows with the configured method and sparsity (select.py),
3. takes the selected rows that are cached in RAM (row_cache.py) and reads the others through the
   direct-I/O reader into reusable buffers, in pieces (overlap.py), the reader checking each row
   against its CRC-32C, and
4. computes y = Σ_pieces x[..., piece] @ Wᵀ[piece] (+ bias) for each projection, multiplying each
   piece as soon as it has landed while the rest are still in flight: the piece's used rows are
   converted to the compute dtype in parts of about PART_BYTES and multiplied part by part
   (`Workspace.operands`).

No backbone weight is held in RAM between calls beyond the row cache's budget. Every call asks its `selection` source for the
current `SelectionSettings` (the flash model's, flash_model.py), so a change takes effect on the next
call.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.reader import ChecksumError, IoError, Reader, RowChecksums
from nchunk_core.runtime.overlap import Block, RowStream
from nchunk_core.runtime.row_cache import RowCache
from nchunk_core.runtime.select import Selection, SelectionSettings
from nchunk_core.store import GroupInfo, Store

PART_BYTES = 4 << 20  # converted weights per matmul on the CPU (Workspace.part_rows)
MAX_PARTS = 4  # per block: each part is a parallel region of the matmul, which a busy core stalls


@dataclasses.dataclass
class CallStats:
    """What one call of a flash layer did."""

    name: str
    tokens: int
    rows: int
    rows_total: int
    reads: int  # contiguous runs of rows read (one request per run and group of the input)
    bytes: int
    est_io_s: float
    io_s: float
    select_s: float
    compute_s: float
    retained: float  # fraction of importance covered by the selected rows
    wait_s: float = 0.0  # blocked waiting for reads (the part of the I/O that compute did not hide)
    cached_bytes: int = 0  # selected rows served from the row cache
    hit_bytes: int = 0  # selected rows that were prefetched
    wasted_bytes: int = 0  # prefetched rows the selection did not use (read on top of `bytes`)


class Workspace:
    """What the layers of one model share: the reader, the row stream (read buffers, pieces,
    prefetch; overlap.py), the row cache (row_cache.py) and scratch buffers (grown on demand, kept).

    `operands` turns a block of rows into what one matmul takes: the input columns of its used rows
    and their weights in the compute dtype. Weights are converted into a reused scratch buffer (one
    pass, no allocation); rows a block holds but the call does not use are left out by a gather
    first, so a matmul never runs over rows that do not count. On CUDA the host buffers are pinned so
    the copies to the device are asynchronous.
    """

    def __init__(self, reader: Reader, device: torch.device, overlap: bool | str = True):
        self.reader = reader
        self.device = torch.device(device)
        self.lock = threading.Lock()
        self.stream = RowStream(reader, self.device, overlap)
        self.cache = RowCache()
        self._scratch: dict[tuple, torch.Tensor] = {}  # (dtype, role, slot) -> flat buffer on the device

    def operands(self, x: torch.Tensor, perm: torch.Tensor | None, block: Block, dtype: torch.dtype,
                 slot: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(x [N, k], per group w [k, out_g] in `dtype`) for the k rows of `block` the call uses.

        x: [N, rows] the call's input in original channel order, `perm` [rows] the stored row ->
        channel map (None: identity). Scratch `slot` alternates so that a block's buffers are not
        overwritten while the previous block's matmul may still read them (CUDA streams).
        """
        rows, weights = block.rows, [self.on_device(w, (slot, g)) for g, w in enumerate(block.weights)]
        if block.use is not None:  # gather the used rows (storage dtype) before converting
            keep = np.flatnonzero(block.use)
            rows, index = rows[keep], torch.from_numpy(keep).to(self.device)
            weights = [torch.index_select(w, 0, index, out=self._flat((w.dtype, "gather", slot, g),
                                                                      len(keep) * w.shape[1]).view(len(keep), w.shape[1]))
                       for g, w in enumerate(weights)]  # [k, out_g]
        return self.columns(x, perm, rows), [self.compute_weights(w, dtype, (slot, g)) for g, w in enumerate(weights)]

    def part_rows(self, block: Block, dtype: torch.dtype) -> int:
        """Rows of `block` converted and multiplied at a time: on the CPU about PART_BYTES of converted
        weights, which the matmul then reads from the cache the conversion left them in (whole
        blocks of a few MiB and more went through memory twice and cost 5-20 % more)."""
        if self.device.type != "cpu" or all(w.dtype == dtype for w in block.weights):
            return max(1, len(block.rows))
        width = sum(w.shape[1] for w in block.weights)
        return max(16, PART_BYTES // (width * dtype.itemsize), -(-len(block.rows) // MAX_PARTS))

    @staticmethod
    def columns(x: torch.Tensor, perm: torch.Tensor | None, rows: np.ndarray) -> torch.Tensor:
        """x [N, rows] (original channel order) -> x [N, k] at stored rows `rows` [k] (ascending)."""
        if perm is None and len(rows) and rows[-1] - rows[0] + 1 == len(rows):
            return x[:, int(rows[0]):int(rows[0]) + len(rows)]  # a run: a view, no copy
        index = torch.from_numpy(rows)
        if perm is not None:
            index = perm.index_select(0, index.to(perm.device))
        return x.index_select(1, index.to(x.device))

    def on_device(self, w: torch.Tensor, slot) -> torch.Tensor:
        """w on the compute device: pinned host rows are copied asynchronously into a reused buffer."""
        if w.device == self.device:
            return w
        staged = self._flat((w.dtype, "stage", slot), w.numel()).view(w.shape)
        return staged.copy_(w, non_blocking=True)

    def compute_weights(self, w: torch.Tensor, dtype: torch.dtype, slot) -> torch.Tensor:
        """w [n, out] (storage dtype, on the device) in `dtype`, converted into a reused buffer."""
        if w.dtype == dtype:
            return w
        out = self._flat((dtype, "compute", slot), w.numel()).view(w.shape)
        return out.copy_(w)

    def _flat(self, key: tuple, numel: int) -> torch.Tensor:
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            buf = None  # free the old buffer before allocating the larger one
            self._scratch.pop(key, None)
            buf = torch.empty(numel, dtype=key[0], device=self.device)
            self._scratch[key] = buf
        return buf[:numel]


def combined_table(table: LatencyTable, row_bytes: list[int]) -> LatencyTable:
    """Cost of reading r rows from each of several groups, as a table over bytes of all groups.

    Unbundled projections sharing an input read the same rows from every group: a run of r rows
    costs Σ_g T[r · row_bytes_g]. Expressed on a grid of sum(row_bytes), selection sees one matrix.
    """
    if len(row_bytes) == 1:
        return table
    max_rows = max(1, -(-table.max_bytes // min(row_bytes)))  # past this, every group is beyond the table
    r = np.arange(1, max_rows + 1, dtype=np.float64)
    latency = sum(table.estimate(r * rb) for rb in row_bytes)
    return LatencyTable(latency_s=latency, step_bytes=int(sum(row_bytes)),
                        peak_bytes_per_s=table.peak_bytes_per_s,
                        saturation_bytes=int(sum(row_bytes)) * max_rows, meta={"combined": row_bytes})


def run_extents(groups: list[GroupInfo], runs: np.ndarray) -> list[np.ndarray]:
    """Per group, int64 [k, 3] extents that read runs [k, 2] (start row, length) of that group.

    The rows land packed in one buffer: all selected rows of the first group, then of the next.
    """
    rows = int(runs[:, 1].sum())
    dest_rows = np.concatenate([[0], np.cumsum(runs[:, 1])[:-1]]).astype(np.int64)
    out, base = [], 0
    for g in groups:
        e = np.empty((len(runs), 3), dtype=np.int64)
        e[:, 0] = g.offset + runs[:, 0] * g.row_bytes
        e[:, 1] = runs[:, 1] * g.row_bytes
        e[:, 2] = base + dest_rows * g.row_bytes
        out.append(e)
        base += rows * g.row_bytes
    return out


def run_checksums(groups: list[GroupInfo], runs: np.ndarray) -> list[RowChecksums | None]:
    """Per group, the expected CRC-32C of the rows `run_extents` reads (None: the group has none)."""
    return [None if g.row_checksums is None else RowChecksums(g.row_checksums, runs[:, 0], g.row_bytes)
            for g in groups]


def read_runs(reader: Reader, handles, groups: list[GroupInfo], runs: np.ndarray, buf,
              verify: bool | None = None) -> float:
    """Read the runs of every group (all requests in flight together); returns the wall seconds.

    Rows are checked against their CRC-32C unless `verify` (default: the reader's) is False. Every
    request finishes before an error is raised, so `buf` is free again; a ChecksumError names the group.
    """
    t0 = time.perf_counter()
    requests = [reader.submit(h, e, buf, checksums=c, verify=verify)
                for h, e, c in zip(handles, run_extents(groups, runs), run_checksums(groups, runs))]
    error = None
    for g, r in zip(groups, requests):
        try:
            r.wait()
        except IoError as exc:
            if isinstance(exc, ChecksumError):
                exc.group = g.name
            error = error or exc
    if error is not None:
        raise error
    return time.perf_counter() - t0


class FlashProjections(nn.Module):
    """All projections that read one input, streamed from the store (see the module docstring)."""

    def __init__(self, store: Store, input_name: str, table: LatencyTable,
                 selection: Callable[[], SelectionSettings], workspace: Workspace, dtype: torch.dtype = torch.float32, biases: dict | None = None,
                 stats_sink: list | None = None):
        super().__init__()
        self.input_name = input_name
        self.groups: list[GroupInfo] = store.groups_for_input(input_name)
        if not self.groups:
            raise ValueError(f"store has no matrix group for input {input_name!r}")
        self.rows = self.groups[0].rows
        if any(g.rows != self.rows for g in self.groups):
            raise ValueError(f"groups of input {input_name!r} disagree on input rows")
        self.selection = selection  # the settings in force, asked at every call
        self.workspace = workspace
        self.compute_dtype = dtype
        self.stats_sink = stats_sink
        self.last_stats: CallStats | None = None
        self.outputs = [o["name"] for g in self.groups for o in g.outputs]  # projection names, in order
        self.out_features = [o["out_features"] for g in self.groups for o in g.outputs]
        self.row_bytes = int(sum(g.row_bytes for g in self.groups))
        self.table = combined_table(table, [g.row_bytes for g in self.groups])
        self.handles = [workspace.reader.open(str(g.file)) for g in self.groups]
        workspace.stream.register(input_name, self.groups, self.handles)
        perm = store.permutation(input_name)
        self._stored_order = None if perm is None else np.asarray(perm, dtype=np.int64)  # [rows] channel of each stored row
        self.register_buffer("perm", None if perm is None else torch.as_tensor(perm, dtype=torch.long),
                             persistent=False)
        biases = biases or {}
        parts = [biases[n].to(dtype) if biases.get(n) is not None else torch.zeros(o, dtype=dtype)
                 for n, o in zip(self.outputs, self.out_features)]
        self.register_buffer("bias", torch.cat(parts) if any(biases.get(n) is not None for n in self.outputs)
                             else None, persistent=False)  # [Σout], zero where a projection has none

    # -- the three steps ------------------------------------------------------------------------
    def select(self, xs: torch.Tensor) -> Selection:
        """xs: [N, rows] input already in stored-row order."""
        return self._select(xs.abs().float().mean(dim=0).cpu().numpy())

    def _select(self, importance: np.ndarray) -> Selection:
        """importance: float32 [rows] in stored-row order."""
        settings = self.selection()
        return self.workspace.cache.select(self.input_name, importance, settings.budget(self.rows), settings.method,
                                           self.table, self.row_bytes, settings.windows)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: [..., rows] -> one tensor [..., out_j] per projection, in `self.outputs` order."""
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.rows)  # [N, rows] original channel order
        importance = xf.abs().float().mean(dim=0).cpu().numpy()  # [rows]
        sel = self._select(importance if self.perm is None else importance[self._stored_order])
        ws = self.workspace
        with ws.lock:
            cached_block, uncached, cached_rows = ws.cache.split(self.input_name, sel.runs)
            fetched = ws.stream.fetch(self.input_name, uncached, tokens=xf.shape[0])
            t0 = time.perf_counter()
            xc = xf.to(self.compute_dtype)  # [N, rows]
            blocks = fetched.blocks
            if cached_block is not None:
                blocks = [cached_block] + blocks
            ys: list[torch.Tensor] = []  # [N, out_g] per group
            wait_s, io_end = 0.0, fetched.first_submit
            slot = 0
            for block in blocks:
                waited, done = block.wait()
                wait_s, io_end = wait_s + waited, max(io_end, done)
                for part in block.parts(ws.part_rows(block, self.compute_dtype)):
                    xb, weights = ws.operands(xc, self.perm, part, self.compute_dtype, slot % 2)  # [N, k], [k, out_g]
                    slot += 1
                    if not ys:
                        ys = [torch.mm(xb, w) for w in weights]
                    else:
                        for y, w in zip(ys, weights):
                            y.addmm_(xb, w)
            if not ys:  # nothing selected
                ys = [torch.zeros(xc.shape[0], g.row_width, dtype=self.compute_dtype, device=x.device)
                      for g in self.groups]
            for inflight in fetched.owned:
                wait_s += inflight.settle()
            ws.stream.forget_rows(self.input_name, ws.cache.observe(self.input_name, fetched.blocks))
            ws.stream.release(fetched.owned)
        y = torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]  # [N, Σout]
        if self.bias is not None:
            y.add_(self.bias)
        outs = [part.reshape(*lead, part.shape[-1]).to(x.dtype) for part in torch.split(y, self.out_features, dim=1)]
        compute_s = time.perf_counter() - t0 - wait_s
        io_s = max(0.0, io_end - fetched.first_submit) if fetched.bytes_read else 0.0
        cached_bytes = cached_rows * self.row_bytes
        self.last_stats = CallStats(self.input_name, xf.shape[0], sel.rows, self.rows, len(sel.runs),
                                    fetched.bytes_read, sel.est_latency_s, io_s, sel.select_s, compute_s,
                                    sel.retained, wait_s, cached_bytes, fetched.hit_bytes, fetched.wasted_bytes)
        if self.stats_sink is not None:
            self.stats_sink.append(self.last_stats)
        return tuple(outs)


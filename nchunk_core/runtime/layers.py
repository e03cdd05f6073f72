"""Flash sparse linear layers: projections whose weights stay on the drive.

`FlashProjections` replaces a set of projections that share one input (q|k|v, gate|up, o, down).
For every call it

1. gathers the input into stored-row order (the hot–cold permutation) and computes the importance
   of each input channel, the mean of |x| over the call's tokens (a whole frame shares one selection),
2. selects rows with the configured method and sparsity (select.py),
3. reads exactly those rows of every group of this input through the direct-I/O reader into a
   reusable buffer (the `Workspace`), the reader checking each row against its CRC-32C, and
4. computes y = x[..., S] @ Wᵀ[S] (+ bias) for each projection.

No backbone weight is held in RAM between calls. Every call asks its `selection` source for the
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
from nchunk_core.runtime.select import Selection, SelectionSettings, select
from nchunk_core.store import GroupInfo, Store
from nchunk_core.store.naming import torch_dtype


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


class Workspace:
    """Reusable read buffers shared by the layers of one model (grown on demand, never shrunk).

    On CUDA the host buffer is pinned so the copy to the device can be asynchronous.
    """

    def __init__(self, reader: Reader, device: torch.device):
        self.reader = reader
        self.device = torch.device(device)
        self._buf: torch.Tensor | None = None  # [nbytes] uint8 host buffer
        self.lock = threading.Lock()

    def host(self, nbytes: int) -> torch.Tensor:
        if self._buf is None or self._buf.numel() < nbytes:
            size = max(nbytes, int(1.25 * (self._buf.numel() if self._buf is not None else 0)))
            size = (size + 4095) // 4096 * 4096
            if self.device.type == "cuda":
                self._buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            else:
                self._buf = torch.from_numpy(self.reader.empty(size))
        return self._buf[:nbytes]


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
        perm = store.permutation(input_name)
        self.register_buffer("perm", None if perm is None else torch.as_tensor(perm, dtype=torch.long),
                             persistent=False)
        biases = biases or {}
        self.biases = {n: biases[n].to(dtype) for n in self.outputs if biases.get(n) is not None}

    # -- the three steps ------------------------------------------------------------------------
    def select(self, xs: torch.Tensor) -> Selection:
        """xs: [N, rows] input already in stored-row order."""
        importance = xs.abs().float().mean(dim=0).cpu().numpy()  # [rows]
        settings = self.selection()
        return select(importance, settings.budget(self.rows), settings.method, self.table, self.row_bytes,
                      settings.windows)

    def read(self, sel: Selection) -> tuple[list[torch.Tensor], float, int]:
        """Rows of every group for the selection: list of [R, out_g] tensors, I/O seconds, bytes."""
        rows = sel.rows if len(sel.runs) else 0
        total = rows * self.row_bytes
        buf = self.workspace.host(total)
        io_s = read_runs(self.workspace.reader, self.handles, self.groups, sel.runs, buf)
        views, base = [], 0
        for g in self.groups:
            raw = buf[base:base + rows * g.row_bytes]
            views.append(raw.view(torch_dtype(g.dtype)).view(rows, g.row_bytes // g.itemsize))  # [R, out_g]
            base += rows * g.row_bytes
        return views, io_s, total

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: [..., rows] -> one tensor [..., out_j] per projection, in `self.outputs` order."""
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.rows)  # [N, rows]
        xs = xf if self.perm is None else xf.index_select(1, self.perm.to(x.device))  # stored-row order
        sel = self.select(xs)
        with self.workspace.lock:
            weights, io_s, nbytes = self.read(sel)
            t0 = time.perf_counter()
            idx = torch.as_tensor(sel.row_indices(), device=x.device)
            xsel = xs.index_select(1, idx).to(self.compute_dtype)  # [N, R]
            w = torch.cat(weights, dim=1) if len(weights) > 1 else weights[0]  # [R, Σout]
            w = w.to(device=x.device, dtype=self.compute_dtype, non_blocking=True)
            y = xsel @ w  # [N, Σout]
        outs = []
        for name, part in zip(self.outputs, torch.split(y, self.out_features, dim=1)):
            if name in self.biases:
                part = part + self.biases[name].to(part.device)
            outs.append(part.reshape(*lead, part.shape[-1]).to(x.dtype))
        compute_s = time.perf_counter() - t0
        self.last_stats = CallStats(self.input_name, xf.shape[0], sel.rows, self.rows, len(sel.runs), nbytes,
                                    sel.est_latency_s, io_s, sel.select_s, compute_s, sel.retained)
        if self.stats_sink is not None:
            self.stats_sink.append(self.last_stats)
        return tuple(outs)

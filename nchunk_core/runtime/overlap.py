"""I/O behind compute: the rows of a flash call arrive in pieces, and the next call's rows are read
while this one computes.

One `RowStream` per model (owned by its Workspace) serves every FlashProjections:

- **Pieces.** The rows a call must read are split into pieces of about PIECE_BYTES (at most
  MAX_PIECES), each its own request; the layer multiplies the pieces that have landed while the rest
  are in flight (y += x[:, piece] @ W[piece]). Pieces are few and large: every piece costs a pass
  over the output y and a parallel region of the matmul, and on a machine of few cores each extra
  region is a chance for a reader thread to stall one of the matmul's threads.
- **Prefetch.** The stream learns the order in which inputs are called (the decoder's layer order)
  and remembers the rows each input read at its last two calls. When input A is called it queues,
  behind A's own reads, the rows that the next input B read at both of its last two calls (frames
  of a video are similar; rows chosen twice in a row are the ones likely chosen again, and at
  sparsity 0 they are all of B's rows). When B is called, its selection is compared with what was
  prefetched: rows in both are hits (used from the prefetch buffer), rows only in the selection are
  read now, prefetched rows outside the selection are left out of the product (the layer gathers
  the used rows; they were only read). What is computed never depends on what was prefetched.
- **Buffers.** Reads land in host buffers of a small pool (pinned on CUDA), grown on demand and
  reused: at most one prefetch in flight besides the running call.

Without overlap (`overlap=False`) a call reads its rows as one piece and waits for all of them, as
the runtime did before. With `overlap="auto"` each pass through the layers runs with or without
overlap as measured faster (overlap_choice.py).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from nchunk_core.io.reader import ChecksumError, IoError, Reader
from nchunk_core.runtime.overlap_choice import OverlapChoice
from nchunk_core.store import GroupInfo
from nchunk_core.store.naming import torch_dtype

PIECE_BYTES = 8 << 20  # bytes of all groups of an input per piece (the matmul stays efficient)
MAX_PIECES = 4
POOL_BUFFERS = 4  # read buffers kept (a call's own reads, its prefetched rows, the next prefetch)
ALIGN = 4096


def run_rows(runs: np.ndarray) -> np.ndarray:
    """Row indices of runs [k, 2] (start, length), ascending: int64 [n]."""
    if len(runs) == 0:
        return np.zeros(0, dtype=np.int64)
    starts, lengths = runs[:, 0], runs[:, 1]
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def row_runs(rows: np.ndarray) -> np.ndarray:
    """Maximal runs [k, 2] (start, length) of ascending row indices [n]."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [rows.size]])
    return np.stack([rows[starts], ends - starts], axis=1).astype(np.int64)


def split_pieces(runs: np.ndarray, row_bytes: int, piece_bytes: int = PIECE_BYTES,
                 max_pieces: int = MAX_PIECES) -> list[np.ndarray]:
    """Runs [k, 2] cut into consecutive pieces of about `piece_bytes` (runs split where needed)."""
    total = int(runs[:, 1].sum()) if len(runs) else 0
    if total == 0:
        return []
    piece_rows = max(1, piece_bytes // row_bytes, -(-total // max_pieces))
    runs = runs[runs[:, 1] > 0]
    ends = np.cumsum(runs[:, 1])  # [k] rows up to the end of each run
    cuts = np.arange(piece_rows, total, piece_rows, dtype=np.int64)  # piece boundaries, in rows
    # every run split at the boundaries inside it: [run start, boundaries..., run end] in rows
    owner = np.searchsorted(ends, cuts, side="right")  # [c] run holding each boundary
    inside = cuts > ends[owner] - runs[owner, 1]  # not at the run's own start
    first = ends - runs[:, 1]  # [k] rows before each run
    points = np.sort(np.concatenate([first, cuts[inside]]))
    which = np.searchsorted(ends, points, side="right")  # [m] run of each sub-run
    lengths = np.diff(np.concatenate([points, [total]]))
    starts = runs[which, 0] + points - first[which]
    sub = np.stack([starts, lengths], axis=1).astype(np.int64)  # [m, 2]
    piece = points // piece_rows  # [m] piece of each sub-run
    bounds = np.flatnonzero(np.diff(piece)) + 1
    return np.split(sub, bounds)


@dataclasses.dataclass
class Block:
    """Rows of one input that can be multiplied together once their reads are done."""

    rows: np.ndarray  # int64 [n] stored-row indices
    weights: list[torch.Tensor]  # per group [n, out_g] in the storage dtype
    use: np.ndarray | None = None  # bool [n]: rows the selection uses (None: every row)
    requests: list = dataclasses.field(default_factory=list)  # ReadRequest, one per group
    submitted: float = 0.0
    groups: list[str] = dataclasses.field(default_factory=list)  # the group each request reads

    def parts(self, rows: int) -> list["Block"]:
        """This block (its reads done) as consecutive blocks of at most `rows` rows, leaving out
        those that hold no used row."""
        if len(self.rows) <= rows:
            return [self]
        out = []
        for i in range(0, len(self.rows), rows):
            use = None if self.use is None else self.use[i:i + rows]
            if use is None or use.any():
                out.append(Block(self.rows[i:i + rows], [w[i:i + rows] for w in self.weights],
                                 None if use is None or use.all() else use))
        return out

    def wait(self) -> tuple[float, float]:
        """Wait for the reads: (seconds blocked, time the last read finished on perf_counter's clock).

        Every request finishes before a read error is raised (so the buffer is free again); a
        ChecksumError gets the name of the group it was found in.
        """
        t0 = time.perf_counter()
        done, error = self.submitted, None
        for group, r in zip(self.groups, self.requests):
            try:
                done = max(done, self.submitted + r.wait().wall_s)
            except IoError as exc:
                if isinstance(exc, ChecksumError):
                    exc.group = group
                error = error or exc
        self.requests = []
        if error is not None:
            raise error
        return time.perf_counter() - t0, done


@dataclasses.dataclass
class Inflight:
    """Reads of one input into one pool buffer: its pieces as blocks."""

    key: str
    rows: np.ndarray  # int64 [m] every row read, ascending (piece after piece)
    buf: torch.Tensor  # uint8 host buffer from the pool
    blocks: list[Block]
    row_bytes: int

    def settle(self) -> float:
        """Wait for every read still in flight; returns the seconds blocked."""
        return sum(b.wait()[0] for b in self.blocks)


@dataclasses.dataclass
class Fetched:
    """What a call gets from the stream: blocks to multiply, in order, and what they cost."""

    blocks: list[Block]
    owned: list[Inflight]  # released by RowStream.release once the call has computed
    bytes_read: int  # selected rows read from the drive (ahead of time or now)
    hit_bytes: int  # prefetched rows the selection used
    wasted_bytes: int  # prefetched rows it did not use (read, on top of bytes_read)
    first_submit: float


class RowStream:
    """Pieces, prefetch and read buffers of one model's flash layers (see the module docstring)."""

    def __init__(self, reader: Reader, device: torch.device, overlap: bool | str = True):
        self.reader = reader
        self.device = torch.device(device)
        if overlap not in (True, False, "auto"):
            raise ValueError(f"overlap must be True, False or 'auto', got {overlap!r}")
        self.choice = OverlapChoice() if overlap == "auto" else None
        self.overlap = bool(overlap)  # the mode of the pass running now (fixed unless choice)
        self._first: str | None = None  # the input whose call starts a pass
        self._pass: tuple[int, bool, float] | None = None  # tokens, overlap, start of the running pass
        self._last_end = 0.0  # when the last call released its buffers
        self._inputs: dict[str, tuple[list[GroupInfo], list]] = {}  # key -> (groups, handles)
        self._pool: list[torch.Tensor] = []  # free host buffers
        self._copies: dict[int, object] = {}  # data_ptr -> CUDA event after the last copy from it
        self._last_rows: dict[str, list[np.ndarray]] = {}  # key -> uncached rows of its last two calls
        self._next: dict[str, str] = {}  # key -> the key called after it last time
        self._prev: str | None = None
        self._prefetch: dict[str, Inflight] = {}

    def register(self, key: str, groups: list[GroupInfo], handles: list) -> None:
        self._inputs[key] = (groups, handles)

    def forget(self, key: str | None = None) -> None:
        """Drop remembered selections (all, or one input's) and every prefetch in flight."""
        for inflight in list(self._prefetch.values()):
            inflight.settle()
            self.release([inflight])
        self._prefetch.clear()
        self._first, self._pass = None, None
        if key is None:
            self._last_rows.clear()
        else:
            self._last_rows.pop(key, None)

    def forget_rows(self, key: str, rows: np.ndarray) -> None:
        """Leave `rows` of input `key` out of its next prefetch (they moved into the row cache)."""
        if len(rows) and key in self._last_rows:
            self._last_rows[key] = [last[~np.isin(last, rows)] for last in self._last_rows[key]]

    # -- buffers ----------------------------------------------------------------------------------
    def _take(self, nbytes: int) -> torch.Tensor:
        best = None
        for i, b in enumerate(self._pool):
            if b.numel() >= nbytes and (best is None or b.numel() < self._pool[best].numel()):
                best = i
        if best is None and len(self._pool) >= POOL_BUFFERS:  # growing: drop the smallest, the pool stays small
            self._pool.pop(min(range(len(self._pool)), key=lambda i: self._pool[i].numel()))
        if best is not None:
            buf = self._pool.pop(best)
            event = self._copies.pop(buf.data_ptr(), None)
            if event is not None:
                event.synchronize()  # an asynchronous copy to the device may still read it
            return buf
        size = (max(nbytes, 1) + ALIGN - 1) // ALIGN * ALIGN
        if self.device.type == "cuda":
            return torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return torch.from_numpy(self.reader.empty(size))

    def release(self, owned: list[Inflight]) -> None:
        """Give the buffers of a finished call back to the pool (reads settled by the caller)."""
        self._last_end = time.perf_counter()
        for inflight in owned:
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
                self._copies[inflight.buf.data_ptr()] = event
            self._pool.append(inflight.buf)

    # -- reads ------------------------------------------------------------------------------------
    def _submit(self, key: str, runs: np.ndarray) -> Inflight:
        """Queue the reads of `runs` of every group of `key`, piece by piece, into one buffer."""
        from nchunk_core.runtime.layers import run_checksums, run_extents  # layers.py imports this module

        groups, handles = self._inputs[key]
        row_bytes = sum(g.row_bytes for g in groups)
        pieces = split_pieces(runs, row_bytes) if self.overlap else ([runs] if len(runs) else [])
        sizes = [int(p[:, 1].sum()) for p in pieces]
        span = [(n * row_bytes + ALIGN - 1) // ALIGN * ALIGN for n in sizes]
        buf = self._take(sum(span))
        blocks, offset = [], 0
        for piece, n, nbytes in zip(pieces, sizes, span):
            submitted = time.perf_counter()
            requests, weights, base = [], [], offset
            for g, h, extents, checksums in zip(groups, handles, run_extents(groups, piece),
                                                run_checksums(groups, piece)):
                extents[:, 2] += offset
                requests.append(self.reader.submit(h, extents, buf, checksums=checksums))
                raw = buf[base:base + n * g.row_bytes]
                weights.append(raw.view(torch_dtype(g.dtype)).view(n, g.row_bytes // g.itemsize))  # [n, out_g]
                base += n * g.row_bytes
            blocks.append(Block(run_rows(piece), weights, None, requests, submitted, [g.name for g in groups]))
            offset += nbytes
        rows = np.concatenate([b.rows for b in blocks]) if blocks else np.zeros(0, dtype=np.int64)
        return Inflight(key, rows, buf, blocks, row_bytes)

    def likely_runs(self, key: str) -> np.ndarray:
        """Runs [k, 2] worth prefetching for `key`: the rows its last two calls both read (one call: its rows)."""
        last = self._last_rows.get(key, [])
        if not last:
            return np.zeros((0, 2), dtype=np.int64)
        rows = last[0] if len(last) == 1 else np.intersect1d(last[0], last[1], assume_unique=True)
        return row_runs(rows)

    def _start_pass(self, key: str, tokens: int, now: float) -> None:
        """With a choice: at the first input's call, time the pass that ended and pick this one's mode."""
        if self._first is None:
            self._first = key
        if key != self._first:
            return
        if self._pass is not None:
            self.choice.record(self._pass[0], self._pass[1], self._last_end - self._pass[2])
        self.overlap = self.choice.choose(tokens)
        self._pass = (tokens, self.overlap, now)

    def fetch(self, key: str, runs: np.ndarray, tokens: int = 1) -> Fetched:
        """Blocks holding the rows `runs` [k, 2] of input `key` (prefetched or read now), and queue the
        prefetch of the input expected next. `tokens`: the call's tokens (what sizes a pass)."""
        t0 = time.perf_counter()
        if self.choice is not None:
            self._start_pass(key, tokens, t0)
        if self._prev is not None:
            self._next[self._prev] = key
        self._prev = key
        slot = self._prefetch.pop(key, None)
        for other in [k for k in self._prefetch if k != self._next.get(key)]:
            stale = self._prefetch.pop(other)  # the order changed: never used
            stale.settle()
            self.release([stale])
        blocks, owned, hit_bytes, wasted_bytes = [], [], 0, 0
        wanted = run_rows(runs)
        if slot is not None:
            owned.append(slot)
            hit = np.isin(slot.rows, wanted, assume_unique=True)  # [m]
            hit_bytes = int(hit.sum()) * slot.row_bytes
            wasted_bytes = len(slot.rows) * slot.row_bytes - hit_bytes
            start = 0
            for b in slot.blocks:
                use = hit[start:start + len(b.rows)]
                start += len(b.rows)
                if use.any():
                    b.use = None if use.all() else use
                    blocks.append(b)
            missing = row_runs(wanted[~np.isin(wanted, slot.rows, assume_unique=True)])
        else:
            missing = runs
        miss_bytes = 0
        if len(missing):
            inflight = self._submit(key, missing)
            owned.append(inflight)
            blocks.extend(inflight.blocks)
            miss_bytes = len(inflight.rows) * inflight.row_bytes
        self._last_rows[key] = (self._last_rows.get(key, []) + [wanted])[-2:]
        nxt = self._next.get(key)
        if self.overlap and nxt is not None and nxt not in self._prefetch:
            likely = self.likely_runs(nxt)
            if len(likely):
                self._prefetch[nxt] = self._submit(nxt, likely)
        return Fetched(blocks, owned, miss_bytes + hit_bytes, hit_bytes, wasted_bytes, t0)

"""Drive profiler: measures the latency table T[s] that chunk selection optimises against.

T[s] is the steady-state time per contiguous chunk of s bytes while many such chunks are in flight
through the same reader (the backend recorded below, direct I/O) the runtime uses. The profiler

1. writes a scratch file of random bytes on the drive under test (>= 128 MiB, removed afterwards;
   never inside the directory named, which may be a read-only store: see scratch.py), and compares
   the reader's backends on it (thread pool, io_uring: backends.py); the faster one is recorded
   (meta "reader_backend", "backend_comparison") and measures everything below,
2. finds the peak throughput with a coarse pass over chunk sizes 4 KiB .. 8 MiB (many bytes per point),
3. measures sizes up to twice the coarse saturation estimate, every KiB up to 256 KiB and every
   16 KiB beyond (quick mode: a sparser grid), interpolated onto the 1 KiB grid; every point reads
   at least 8 chunks per thread, so ramp-up and tail are a small part of the time; each point is
   repeated and the median taken,
4. smooths: median throughput of neighbouring sizes (±25 % in size), then a non-decreasing fit of
   latency (isotonic regression), and cuts the table at the saturation size, the smallest chunk that
   reaches 99 % of the peak throughput.

Tables are cached per drive (see drive.py) as JSON, so the node's start-up reuses them.
`validate` reads random selection patterns of mixed run lengths and correlates measured and
estimated latency, as the paper does to check its cost model.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np

from nchunk_core.io.backends import compare_backends
from nchunk_core.io.drive import drive_info
from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.reader import Reader
from nchunk_core.io.scratch import SCRATCH_NAME, ScratchFile, scratch_place  # noqa: F401 (re-exported)

KIB = 1024
MIB = 1024 * 1024
COARSE_KIB = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SATURATION_FRACTION = 0.99
BUFFER_CAP = 64 * MIB  # largest destination buffer a single measurement uses

Progress = Callable[[float, str], None]


def cache_dir() -> Path:
    """Where drive profiles live: $NCHUNK_CACHE_DIR, else $XDG_CACHE_HOME/nchunk, else ~/.cache/nchunk."""
    base = os.environ.get("NCHUNK_CACHE_DIR")
    if base:
        return Path(base) / "profiles"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "nchunk" / "profiles"


def scratch_fallback() -> Path:
    """Where the scratch file goes when the drive under test has no writable folder: the cache folder
    ($NCHUNK_CACHE_DIR, else ~/.cache/nchunk), whose drive is then the one measured."""
    return cache_dir().parent


def cache_path(directory, threads: int) -> Path:
    return cache_dir() / f"{drive_info(directory).key(threads)}.json"


def isotonic_increasing(y: np.ndarray) -> np.ndarray:
    """Least-squares non-decreasing fit of y (pool-adjacent-violators)."""
    values: list[float] = []
    weights: list[int] = []
    for v in np.asarray(y, dtype=np.float64):
        values.append(float(v))
        weights.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            w = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w
            weights[-2] = w
            values.pop()
            weights.pop()
    return np.repeat(values, weights)


def smooth_latency(sizes: np.ndarray, latency: np.ndarray, width: float = 0.25) -> np.ndarray:
    """Median of the throughput of neighbouring sizes (within ±width in log size), back to latency.

    Throughput varies slowly with chunk size while single measurements on a shared machine jump;
    the median over neighbours removes those jumps without bending the curve.
    """
    thr = sizes / latency
    logs = np.log(sizes)
    lo = np.searchsorted(logs, logs - width, side="left")
    hi = np.searchsorted(logs, logs + width, side="right")
    smoothed = np.array([np.median(thr[a:b]) for a, b in zip(lo, hi)])
    return sizes / smoothed


class _Bench:
    """Times batches of same-size chunks read at random aligned offsets of one file."""

    def __init__(self, reader: Reader, path: Path, seed: int = 0):
        self.reader = reader
        self.handle = reader.open(str(path))
        self.align = max(4096, self.handle.alignment.offset or 0)
        self.buf = reader.empty(BUFFER_CAP)
        self.rng = np.random.default_rng(seed)

    def seconds_per_chunk(self, size: int, target_bytes: int, min_chunks: int) -> float:
        """Wall time per chunk of a batch of at least `min_chunks` chunks (and `target_bytes`)."""
        n = max(min_chunks, target_bytes // size)
        slots = (self.handle.size - size) // self.align + 1
        extents = np.empty((n, 3), dtype=np.int64)
        extents[:, 0] = self.rng.integers(0, slots, n) * self.align
        extents[:, 1] = size
        # Destinations wrap around the buffer: only the timing matters here, not the bytes.
        extents[:, 2] = (np.arange(n) % max(1, BUFFER_CAP // size)) * size
        stats = self.reader.read(self.handle, extents, self.buf)
        return stats.wall_s / n

    def median(self, size: int, target_bytes: int, repeats: int, min_chunks: int) -> float:
        return float(np.median([self.seconds_per_chunk(size, target_bytes, min_chunks) for _ in range(repeats)]))


def _tqdm_progress(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=desc, unit="‰", leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(fraction: float, message: str):
        bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        bar.set_postfix_str(message, refresh=True)

    return bar, update


def profile_drive(
    directory,
    threads: int = 6,
    quick: bool = False,
    scratch_bytes: int | None = None,
    max_kib: int = 8192,
    progress: Progress | bool = False,
) -> LatencyTable:
    """Measure the latency table of the drive holding `directory` (see the module docstring); with no
    writable folder on that drive, of the cache folder's drive (scratch_place; meta["same_drive"]).

    quick: sparse grid and fewer repeats, for node start-up (about 10-20 s here).
    progress: True for a terminal progress bar, or a callable(fraction, message).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"profile directory does not exist: {directory}")
    bar = None
    if progress is True:
        bar, progress = _tqdm_progress("profiling drive")
    report: Progress = progress or (lambda f, m: None)
    scratch_bytes = scratch_bytes or (128 if quick else 256) * MIB
    repeats = 2 if quick else 3
    started = time.time()
    try:
        with ScratchFile(directory, scratch_bytes, progress=lambda f, m: report(0.1 * f, m),
                         fallback=scratch_fallback()) as scratch, \
                Reader(threads=threads, backend=(backends := compare_backends(
                    scratch.path, threads, repeats=repeats + 1))["reader_backend"]) as reader:
            bench = _Bench(reader, scratch.path)
            steady = 8 * threads  # chunks per batch: ramp-up and tail stay a small part of the time
            bench.seconds_per_chunk(64 * KIB, 4 * MIB, steady)  # warm the pool and the drive
            # Coarse pass, many bytes per point: the peak and a first idea of the saturation size.
            coarse_sizes = [k * KIB for k in COARSE_KIB if k <= max_kib]
            coarse = []
            for i, size in enumerate(coarse_sizes):
                report(0.1 + 0.2 * i / len(coarse_sizes), f"coarse pass {size // KIB} KiB")
                coarse.append(bench.median(size, 32 * MIB, repeats + 1, min_chunks=2 * steady))
            coarse_thr = isotonic_increasing(np.array(coarse_sizes) / np.array(coarse))
            peak = float(coarse_thr[-1])
            reach = np.nonzero(coarse_thr >= SATURATION_FRACTION * peak)[0]
            coarse_sat = coarse_sizes[int(reach[0])] if reach.size else coarse_sizes[-1]
            # Fine pass up to twice that, fewer bytes per point; the smoothing below removes the noise.
            top_kib = int(min(max_kib, max(64, 2 * coarse_sat // KIB)))
            if quick:  # every size where T bends most, then geometric steps of ~10 %
                geometric = np.unique(np.geomspace(64, max(64, top_kib), 48).astype(int))
                fine_kib = sorted(k for k in set(range(1, 17)) | set(range(16, 65, 4)) | set(geometric.tolist())
                                  if k <= top_kib)
            else:  # every KiB where the curve bends, every 16 KiB on its smooth tail
                fine_kib = list(range(1, min(top_kib, 256) + 1)) + list(range(272, top_kib + 1, 16))
            measured = []
            for i, k in enumerate(fine_kib):
                if i % 16 == 0:
                    report(0.3 + 0.7 * i / len(fine_kib), f"fine pass {k} KiB")
                measured.append(bench.median(k * KIB, 2 * MIB, repeats, min_chunks=steady))
            grid = np.arange(1, top_kib + 1)
            smoothed = np.interp(grid, fine_kib, smooth_latency(np.array(fine_kib, float), np.array(measured)))
            # Peak and saturation from the smoothed curve: on a flat stretch of the monotone fit below,
            # throughput would rise with size by construction, which says nothing about the drive.
            thr = grid * KIB / smoothed
            peak = float(thr.max())
            latency = isotonic_increasing(smoothed)
            hits = np.nonzero(thr >= SATURATION_FRACTION * peak)[0]
            sat_kib = int(grid[hits[0]]) if hits.size else int(grid[-1])
            info = drive_info(directory)
            measured = drive_info(scratch.path)
            return LatencyTable(
                latency_s=latency[:sat_kib],
                step_bytes=KIB,
                peak_bytes_per_s=peak,
                saturation_bytes=sat_kib * KIB,
                meta={
                    "drive": measured.describe(),  # the drive measured: see scratch_place
                    "profiled_for": info.describe(),  # the drive holding `directory`
                    "same_drive": scratch.same_drive,
                    "scratch_dir": str(scratch.path.parent),
                    "key": info.key(threads),
                    "threads": threads,
                    "direct_io": bool(bench.handle.direct),
                    "reader_backend": reader.backend,
                    "backend_comparison": backends,
                    "quick": quick,
                    "scratch_bytes": scratch_bytes,
                    "saturated": bool(hits.size),
                    "coarse_kib": list(COARSE_KIB[: len(coarse)]),
                    "coarse_s": coarse,
                    "host": socket.gethostname(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "seconds": round(time.time() - started, 1),
                },
            )
    finally:
        if bar is not None:
            bar.close()


def load_or_profile(
    directory,
    threads: int = 6,
    quick: bool = True,
    force: bool = False,
    progress: Progress | bool = False,
    log: Callable[[str], None] | None = None,
    **profile_options,
) -> LatencyTable:
    """The cached table of this drive and thread count, or a fresh profile saved to the cache.

    profile_options go to `profile_drive` (scratch_bytes, max_kib) when a profile is measured. The log
    names the drive measured, and says so when that is not the drive holding `directory`.
    """
    log = log or (lambda m: None)
    path = cache_path(directory, threads)
    if path.exists() and not force:
        try:
            table = LatencyTable.load(path)
            log(f"drive profile from cache {path}")
            return table
        except (OSError, ValueError) as exc:
            log(f"ignoring unreadable drive profile {path}: {exc}")
    place, same_drive = scratch_place(directory, scratch_fallback())
    mode = "quick" if quick else "full"
    if same_drive:
        log(f"profiling the drive holding {directory}, {drive_info(directory).describe()} ({mode}; scratch file "
            f"in {place}; cached at {path})")
    else:
        log(f"no writable folder on the drive holding {directory} ({drive_info(directory).describe()}): profiling "
            f"the drive holding {place} instead, {drive_info(place).describe()} ({mode}; cached at {path})")
    table = profile_drive(directory, threads=threads, quick=quick, progress=progress, **profile_options)
    tmp = path.with_suffix(".tmp")
    table.save(tmp)
    os.replace(tmp, path)
    return table


def random_pattern(rng: np.random.Generator, file_size: int, row_bytes: int, total_bytes: int) -> np.ndarray:
    """A selection-like pattern: runs of mixed lengths (1-64 rows) at random places. [k, 2] (offset, bytes)."""
    rows = file_size // row_bytes
    want = max(1, total_bytes // row_bytes)
    mean_run = rng.choice([1.5, 4, 16, 48])  # magnitude-like scatter up to chunky windows
    draws = np.minimum(64, rng.geometric(1.0 / mean_run, size=want))  # more than enough runs
    lengths = list(draws[: int(np.searchsorted(np.cumsum(draws), want)) + 1])
    k = len(lengths)
    free = rows - sum(lengths) - (k - 1)  # rows left once every run is separated by one empty row
    if free < 0:
        raise ValueError("scratch file too small for the pattern")
    rng.shuffle(lengths)
    lengths = np.array(lengths)
    starts = np.sort(rng.integers(0, free + 1, k)) + np.concatenate([[0], np.cumsum(lengths)[:-1]]) + np.arange(k)
    return np.stack([starts * row_bytes, lengths * row_bytes], axis=1).astype(np.int64)


def validate(
    directory,
    table: LatencyTable,
    threads: int = 6,
    patterns: int = 30,
    repeats: int = 3,
    seed: int = 1,
    progress: Progress | bool = False,
) -> dict:
    """Measured vs estimated latency of random selection patterns; returns rows and Pearson r."""
    rng = np.random.default_rng(seed)
    bar = None
    if progress is True:
        bar, progress = _tqdm_progress("validating estimates")
    report: Progress = progress or (lambda f, m: None)
    results = []
    try:
        with ScratchFile(directory, 256 * MIB, fallback=scratch_fallback()) as scratch, \
                Reader(threads=threads, profile=table) as reader:
            handle = reader.open(str(scratch.path))
            buf = reader.empty(BUFFER_CAP)
            for i in range(patterns):
                report(i / patterns, f"pattern {i + 1}/{patterns}")
                row_bytes = int(rng.choice([1024, 7168, 9216, 37888]))
                total = int(rng.integers(1, 32)) * MIB
                runs = random_pattern(rng, handle.size, row_bytes, total)
                extents = np.empty((len(runs), 3), dtype=np.int64)
                extents[:, :2] = runs
                extents[:, 2] = np.concatenate([[0], np.cumsum(runs[:, 1])[:-1]])
                walls = [reader.read(handle, extents, buf).wall_s for _ in range(repeats)]
                results.append({
                    "row_bytes": row_bytes,
                    "reads": int(len(runs)),
                    "bytes": int(runs[:, 1].sum()),
                    "mean_run_rows": float(runs[:, 1].mean() / row_bytes),
                    "measured_s": float(np.median(walls)),
                    "estimated_s": float(table.estimate(runs[:, 1]).sum()),
                })
    finally:
        if bar is not None:
            bar.close()
    measured = np.array([r["measured_s"] for r in results])
    estimated = np.array([r["estimated_s"] for r in results])
    return {
        "patterns": results,
        "pearson_r": float(np.corrcoef(measured, estimated)[0, 1]),
        "median_ratio": float(np.median(measured / estimated)),
    }


def plot_profile(table: LatencyTable, path, title: str | None = None) -> None:
    """PNG with throughput and T[s] against chunk size, saturation marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kib = np.arange(1, table.latency_s.size + 1) * table.step_bytes / KIB
    thr = kib * KIB / table.latency_s / 1e6
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(kib, thr, color="tab:blue", label="measured (smoothed)")
    coarse_kib = table.meta.get("coarse_kib")
    if coarse_kib:
        a.plot(coarse_kib, np.array(coarse_kib) * KIB / np.array(table.meta["coarse_s"]) / 1e6, "o",
               color="tab:gray", label="coarse pass")
    a.axhline(table.peak_bytes_per_s / 1e6, color="tab:green", ls=":", label=f"peak {table.peak_bytes_per_s / 1e6:.0f} MB/s")
    a.axvline(table.saturation_bytes / KIB, color="tab:red", ls="--",
              label=f"saturation {table.saturation_bytes // KIB} KiB")
    a.set(xscale="log", xlabel="chunk size (KiB)", ylabel="throughput (MB/s)", title="Throughput, many chunks in flight")
    a.legend(fontsize=8)
    b.plot(kib, table.latency_s * 1e6, color="tab:orange")
    b.set(xlabel="chunk size (KiB)", ylabel="T[s] (µs per chunk)", title="Latency table T[s]")
    fig.suptitle(title or table.meta.get("drive", "drive profile"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

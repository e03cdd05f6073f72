"""Which reader backend is faster on a drive: the thread pool or io_uring, measured side by side.

The drive profiler calls `compare_backends` on its scratch file before measuring T[s], records the
result in the profile (meta "reader_backend" and "backend_comparison") and measures T[s] through the
winner; `Reader(backend="auto", profile=table)` then reads with it. The comparison reads batches of
same-size chunks (SIZES_KIB) at random aligned offsets, cold (direct I/O), with one Reader of each
backend and the same number of reads in flight, alternating which goes first, and takes per size the
median throughput of each. io_uring wins only when the geometric mean over the sizes of its throughput
÷ the thread pool's exceeds 1 + MARGIN: on a tie the thread pool, which every kernel has, stays.
Where no ring can be set up, the thread pool wins without a measurement and the note says why.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nchunk_core.io.reader import Reader, io_uring_unavailable

KIB = 1024
MIB = 1024 * 1024
SIZES_KIB = (4, 64, 512)  # scattered rows, short runs, chunks near saturation
MARGIN = 0.03
BUFFER_BYTES = 16 * MIB


def _batch(rng: np.random.Generator, file_size: int, size: int, align: int, count: int) -> np.ndarray:
    """[count, 3] extents of `size` bytes at random aligned offsets, destinations wrapping a buffer."""
    slots = (file_size - size) // align + 1
    extents = np.empty((count, 3), dtype=np.int64)
    extents[:, 0] = rng.integers(0, slots, count) * align
    extents[:, 1] = size
    extents[:, 2] = (np.arange(count) % max(1, BUFFER_BYTES // size)) * size
    return extents


def compare_backends(path, threads: int = 6, repeats: int = 3, target_bytes: int = 16 * MIB,
                     min_chunks: int | None = None, seed: int = 0) -> dict:
    """Throughput of both backends on the file at `path` (see the module docstring).

    Returns {"reader_backend", "io_uring_vs_threads" (geometric mean of the ratios, None without a
    ring), "note", "sizes_kib", "threads_bytes_per_s", "io_uring_bytes_per_s", "ratios"}.
    """
    unavailable = io_uring_unavailable()
    out = {"reader_backend": "threads", "io_uring_vs_threads": None, "note": unavailable, "threads": threads,
           "sizes_kib": list(SIZES_KIB), "threads_bytes_per_s": [], "io_uring_bytes_per_s": [], "ratios": []}
    if unavailable:
        return out
    min_chunks = min_chunks or 8 * threads
    rng = np.random.default_rng(seed)
    with Reader(threads=threads, backend="threads") as pool, Reader(threads=threads, backend="io_uring") as ring:
        readers = {"threads": pool, "io_uring": ring}
        handle = pool.open(str(Path(path)))
        align = max(4096, handle.alignment.offset)
        buf = pool.empty(BUFFER_BYTES)
        for kib in SIZES_KIB:
            size = kib * KIB
            count = max(min_chunks, target_bytes // size)
            samples = {name: [] for name in readers}
            for r in range(repeats):
                order = ("threads", "io_uring") if r % 2 == 0 else ("io_uring", "threads")
                for name in order:
                    stats = readers[name].read(handle, _batch(rng, handle.size, size, align, count), buf)
                    samples[name].append(stats.bytes / stats.wall_s)
            for name in readers:
                out[f"{name}_bytes_per_s"].append(float(np.median(samples[name])))
            out["ratios"].append(out["io_uring_bytes_per_s"][-1] / out["threads_bytes_per_s"][-1])
    out["io_uring_vs_threads"] = float(np.exp(np.mean(np.log(out["ratios"]))))
    if out["io_uring_vs_threads"] > 1 + MARGIN:
        out["reader_backend"] = "io_uring"
    return out


def describe(comparison: dict | None) -> str:
    """One line for logs and `nchunk profile`: the backend chosen and why."""
    if not comparison:
        return "threads (profile made before backends were compared)"
    backend = comparison["reader_backend"]
    if comparison.get("io_uring_vs_threads") is None:
        return f"{backend} (io_uring unavailable: {comparison.get('note')})"
    per_size = ", ".join(f"{k} KiB {r:.2f}x" for k, r in zip(comparison["sizes_kib"], comparison["ratios"]))
    return f"{backend} (io_uring ÷ threads throughput {comparison['io_uring_vs_threads']:.2f}x: {per_size})"

"""`nchunk bench reader`: our direct-I/O reader beside fio on the same file with the same parallelism.

Two workloads, each run by both tools in the same invocation, interleaved, repeated, medians reported:
- sequential 1 MiB reads over the whole file (fio: psync engine, one job per thread, each job
  streaming its own slice of the file);
- random 4 KiB reads at 4 KiB-aligned offsets (fio: psync, randread, one job per thread).
Both read with O_DIRECT, so the page cache does not flatter either side. fio also runs its io_uring
engine (one job, as many reads in flight as threads), the reference for our io_uring backend.

Our reader runs both of its backends, the thread pool and io_uring (where the kernel gives a ring),
with the same number of reads in flight, alternating which goes first; `io_uring_vs_threads` ratios
are io_uring's throughput ÷ the thread pool's (above 1: io_uring faster). The CPU time of each read
(process CPU, every thread) is reported too: a backend may be slower here yet leave more CPU free.
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from nchunk_core.io.profile import MIB, ScratchFile
from nchunk_core.io.reader import Reader, io_uring_unavailable

FIO_HINT = "fio is not installed: install it with `sudo apt-get install fio` (Debian/Ubuntu package `fio`)."


def _cpu_s() -> float:
    """CPU seconds of this process so far, every thread (the reader's workers or ring) included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _ours_seq(reader: Reader, handle, buf, passes: int) -> tuple[float, float]:
    """(bytes/s, CPU µs per read) of 1 MiB reads over the whole file."""
    chunk = MIB
    n = handle.size // chunk
    cap = buf.nbytes // chunk
    extents = np.stack([np.arange(n) * chunk, np.full(n, chunk), (np.arange(n) % cap) * chunk], axis=1).astype(np.int64)
    total = wall = cpu = 0.0
    for _ in range(passes):
        c0 = _cpu_s()
        stats = reader.read(handle, extents, buf)
        cpu += _cpu_s() - c0
        total += stats.bytes
        wall += stats.wall_s
    return total / wall, cpu / (passes * n) * 1e6


def _ours_rand4k(reader: Reader, handle, buf, count: int, rng) -> tuple[float, float]:
    """(bytes/s, CPU µs per read) of 4 KiB reads at random aligned offsets."""
    size = 4096
    offsets = rng.integers(0, handle.size // size, count) * size
    dest = (np.arange(count) % (buf.nbytes // size)) * size
    extents = np.stack([offsets, np.full(count, size), dest], axis=1).astype(np.int64)
    c0 = _cpu_s()
    stats = reader.read(handle, extents, buf)
    return stats.bytes / stats.wall_s, (_cpu_s() - c0) / count * 1e6


def _fio(path: Path, rw: str, bs: str, threads: int, file_size: int, seconds: float, engine: str = "psync") -> float:
    """fio's throughput: psync with one job per thread, or io_uring with one job `threads` deep."""
    jobs = ["--ioengine=psync", f"--numjobs={threads}"] if engine == "psync" else \
        ["--ioengine=io_uring", f"--iodepth={threads}", "--numjobs=1"]
    cmd = [
        "fio", "--name=nchunk", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", "--direct=1", *jobs,
        "--thread", "--group_reporting", "--output-format=json",
        "--time_based", f"--runtime={seconds}s", "--invalidate=1",
    ]
    if rw == "read" and engine == "psync":  # each job streams its own slice, like our pool walking the file
        part = file_size // threads // MIB * MIB
        cmd += [f"--size={part}", f"--offset_increment={part}"]
    else:
        cmd += [f"--size={file_size}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out[out.index("{"):])["jobs"][0]["read"]["bw_bytes"])


def run(directory=None, file_mib: int = 512, threads: int = 6, repeats: int = 3, rand_count: int = 20000,
        progress: bool = True) -> dict:
    """Measure both workloads; returns medians (bytes/s), ratios ours/fio (None without fio) and
    io_uring/threads (None without a ring)."""
    directory = Path(directory or tempfile.gettempdir())
    have_fio = shutil.which("fio") is not None
    note = io_uring_unavailable()
    backends = ("threads",) if note else ("threads", "io_uring")
    rng = np.random.default_rng(0)
    samples = {f"{w}_{k}": [] for w in ("seq", "rand4k") for k in ("ours", "io_uring", "fio", "fio_io_uring")}
    cpu = {f"{w}_{k}": [] for w in ("seq", "rand4k") for k in ("ours", "io_uring")}  # CPU µs per read
    engines = ("psync",) if note else ("psync", "io_uring")
    from tqdm import tqdm

    steps = repeats * 2 * (len(backends) + have_fio * len(engines))
    with ScratchFile(directory, file_mib * MIB) as scratch, \
            Reader(threads=threads, backend="threads") as pool, \
            Reader(threads=threads, backend="io_uring" if not note else "threads") as ring, \
            tqdm(total=steps, desc="bench reader", disable=not progress, leave=False) as bar:
        readers = {"threads": pool, "io_uring": ring}
        key = {"threads": "ours", "io_uring": "io_uring"}
        fio_key = {"psync": "", "io_uring": "_io_uring"}
        handle = pool.open(str(scratch.path))
        buf = pool.empty(64 * MIB)
        for b in backends:
            _ours_seq(readers[b], handle, buf, 1)  # warm-up
        for r in range(repeats):
            order = backends if r % 2 == 0 else backends[::-1]
            for b in order:
                for d, v in zip((samples, cpu), _ours_seq(readers[b], handle, buf, passes=2)):
                    d[f"seq_{key[b]}"].append(v)
                bar.update()
            for engine in engines if have_fio else ():
                samples["seq_fio" + fio_key[engine]].append(_fio(scratch.path, "read", "1M", threads, handle.size,
                                                                 2, engine))
                bar.update()
            for b in order:
                for d, v in zip((samples, cpu), _ours_rand4k(readers[b], handle, buf, rand_count, rng)):
                    d[f"rand4k_{key[b]}"].append(v)
                bar.update()
            for engine in engines if have_fio else ():
                samples["rand4k_fio" + fio_key[engine]].append(_fio(scratch.path, "randread", "4k", threads,
                                                                    handle.size, 2, engine))
                bar.update()
        direct = bool(handle.direct)
    med = {k: (float(np.median(v)) if v else None) for k, v in samples.items()}
    ratio = lambda a, b: (med[a] / med[b]) if med[a] and med[b] else None  # noqa: E731
    return {
        "threads": threads,
        "file_mib": file_mib,
        "repeats": repeats,
        "direct_io": direct,
        "fio": have_fio,
        "io_uring": not note,
        "io_uring_note": note,
        "seq_bytes_per_s": med["seq_ours"],
        "seq_io_uring_bytes_per_s": med["seq_io_uring"],
        "seq_fio_bytes_per_s": med["seq_fio"],
        "rand4k_bytes_per_s": med["rand4k_ours"],
        "rand4k_io_uring_bytes_per_s": med["rand4k_io_uring"],
        "rand4k_fio_bytes_per_s": med["rand4k_fio"],
        "seq_ratio_vs_fio": ratio("seq_ours", "seq_fio"),
        "rand4k_ratio_vs_fio": ratio("rand4k_ours", "rand4k_fio"),
        "seq_fio_io_uring_bytes_per_s": med["seq_fio_io_uring"],
        "rand4k_fio_io_uring_bytes_per_s": med["rand4k_fio_io_uring"],
        "seq_io_uring_ratio_vs_fio_io_uring": ratio("seq_io_uring", "seq_fio_io_uring"),
        "rand4k_io_uring_ratio_vs_fio_io_uring": ratio("rand4k_io_uring", "rand4k_fio_io_uring"),
        "seq_io_uring_vs_threads": ratio("seq_io_uring", "seq_ours"),
        "rand4k_io_uring_vs_threads": ratio("rand4k_io_uring", "rand4k_ours"),
        **{f"{w}_{k}cpu_us_per_read": (float(np.median(cpu[f"{w}_{o}"])) if cpu[f"{w}_{o}"] else None)
           for w in ("seq", "rand4k") for k, o in (("", "ours"), ("io_uring_", "io_uring"))},
        "samples": samples,
        "cpu_samples": cpu,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def format_table(res: dict) -> str:
    def mb(v):
        return f"{v / 1e6:9.1f}" if v else "        -"

    def r(v):
        return f"{v:6.2f}" if v else "     -"

    lines = [
        f"reader vs fio: {res['threads']} reads in flight, direct I/O {'on' if res['direct_io'] else 'OFF'}, "
        f"{res['file_mib']} MiB file, median of {res['repeats']}, interleaved",
        f"{'MB/s':<18}{'threads':>9}{'io_uring':>9}{'fio psync':>10}{'fio uring':>10}   ratios: "
        f"{'threads/fio psync':>17}{'io_uring/fio uring':>19}{'io_uring_vs_threads':>20}",
    ]
    for w, name in (("seq", "sequential 1 MiB"), ("rand4k", "random 4 KiB")):
        lines.append(f"{name:<18}{mb(res[f'{w}_bytes_per_s'])}{mb(res[f'{w}_io_uring_bytes_per_s'])}"
                     f"{mb(res[f'{w}_fio_bytes_per_s']):>10}{mb(res[f'{w}_fio_io_uring_bytes_per_s']):>10}{'':11}"
                     f"{r(res[f'{w}_ratio_vs_fio']):>17}{r(res[f'{w}_io_uring_ratio_vs_fio_io_uring']):>19}"
                     f"{r(res[f'{w}_io_uring_vs_threads']):>20}")
    cpu = lambda v: f"{v:.1f}" if v else "-"  # noqa: E731
    lines.append("CPU µs per read (all threads), threads / io_uring: " + ", ".join(
        f"{name} {cpu(res[f'{w}_cpu_us_per_read'])} / {cpu(res[f'{w}_io_uring_cpu_us_per_read'])}"
        for w, name in (("seq", "sequential 1 MiB"), ("rand4k", "random 4 KiB"))))
    if not res["io_uring"]:
        lines.append(f"io_uring unavailable: {res['io_uring_note']}")
    if not res["fio"]:
        lines.append(FIO_HINT)
    return "\n".join(lines)


def plot(res: dict, path) -> None:
    """PNG: throughput of each workload for the thread pool, io_uring and fio (medians and samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (w, name) in zip(axes, (("seq", "sequential 1 MiB"), ("rand4k", "random 4 KiB"))):
        cols = [("threads", "ours"), ("io_uring", "io_uring"), ("fio psync", "fio"), ("fio io_uring", "fio_io_uring")]
        for i, (label, k) in enumerate(cols):
            vals = np.array(res["samples"][f"{w}_{k}"]) / 1e6
            if vals.size:
                ax.bar(i, np.median(vals), color=f"C{i}", alpha=0.7)
                ax.plot(np.full(vals.size, i), vals, "k.", ms=4)
        ax.set_xticks(range(len(cols)), [c[0] for c in cols])
        ratio = res[f"{w}_io_uring_vs_threads"]
        ax.set(ylabel="MB/s (direct I/O)", title=name + (f": io_uring ÷ threads {ratio:.2f}" if ratio else ""))
    fig.suptitle(f"reader backends and fio, {res['threads']} reads in flight", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

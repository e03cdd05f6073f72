"""`nchunk bench reader`: our direct-I/O reader beside fio on the same file with the same parallelism.

Two workloads, each run by both tools in the same invocation, interleaved, repeated, medians reported:
- sequential 1 MiB reads over the whole file (fio: psync engine, one job per thread, each job
  streaming its own slice of the file);
- random 4 KiB reads at 4 KiB-aligned offsets (fio: psync, randread, one job per thread).
Both read with O_DIRECT, so the page cache does not flatter either side.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from nchunk_core.io.profile import MIB, ScratchFile
from nchunk_core.io.reader import Reader

FIO_HINT = "fio is not installed: install it with `sudo apt-get install fio` (Debian/Ubuntu package `fio`)."


def _ours_seq(reader: Reader, handle, buf, passes: int) -> float:
    chunk = MIB
    n = handle.size // chunk
    cap = buf.nbytes // chunk
    extents = np.stack([np.arange(n) * chunk, np.full(n, chunk), (np.arange(n) % cap) * chunk], axis=1).astype(np.int64)
    total = wall = 0.0
    for _ in range(passes):
        stats = reader.read(handle, extents, buf)
        total += stats.bytes
        wall += stats.wall_s
    return total / wall


def _ours_rand4k(reader: Reader, handle, buf, count: int, rng) -> float:
    size = 4096
    offsets = rng.integers(0, handle.size // size, count) * size
    dest = (np.arange(count) % (buf.nbytes // size)) * size
    extents = np.stack([offsets, np.full(count, size), dest], axis=1).astype(np.int64)
    stats = reader.read(handle, extents, buf)
    return stats.bytes / stats.wall_s


def _fio(path: Path, rw: str, bs: str, threads: int, file_size: int, seconds: float) -> float:
    cmd = [
        "fio", "--name=nchunk", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", "--direct=1",
        "--ioengine=psync", f"--numjobs={threads}", "--thread", "--group_reporting", "--output-format=json",
        "--time_based", f"--runtime={seconds}s", "--invalidate=1",
    ]
    if rw == "read":  # each job streams its own slice, like our pool walking the file in 1 MiB chunks
        part = file_size // threads // MIB * MIB
        cmd += [f"--size={part}", f"--offset_increment={part}"]
    else:
        cmd += [f"--size={file_size}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out[out.index("{"):])["jobs"][0]["read"]["bw_bytes"])


def run(directory=None, file_mib: int = 512, threads: int = 6, repeats: int = 3, rand_count: int = 20000,
        progress: bool = True) -> dict:
    """Measure both workloads; returns medians (bytes/s) and ratios ours/fio (None without fio)."""
    directory = Path(directory or tempfile.gettempdir())
    have_fio = shutil.which("fio") is not None
    rng = np.random.default_rng(0)
    samples = {k: [] for k in ("seq_ours", "seq_fio", "rand4k_ours", "rand4k_fio")}
    from tqdm import tqdm

    steps = repeats * (4 if have_fio else 2)
    with ScratchFile(directory, file_mib * MIB) as scratch, Reader(threads=threads) as reader, \
            tqdm(total=steps, desc="bench reader", disable=not progress, leave=False) as bar:
        handle = reader.open(str(scratch.path))
        buf = reader.empty(64 * MIB)
        _ours_seq(reader, handle, buf, 1)  # warm-up
        for _ in range(repeats):
            samples["seq_ours"].append(_ours_seq(reader, handle, buf, passes=2))
            bar.update()
            if have_fio:
                samples["seq_fio"].append(_fio(scratch.path, "read", "1M", threads, handle.size, 2))
                bar.update()
            samples["rand4k_ours"].append(_ours_rand4k(reader, handle, buf, rand_count, rng))
            bar.update()
            if have_fio:
                samples["rand4k_fio"].append(_fio(scratch.path, "randread", "4k", threads, handle.size, 2))
                bar.update()
        direct = bool(handle.direct)
    med = {k: (float(np.median(v)) if v else None) for k, v in samples.items()}
    ratio = lambda a, b: (med[a] / med[b]) if med[b] else None  # noqa: E731
    return {
        "threads": threads,
        "file_mib": file_mib,
        "repeats": repeats,
        "direct_io": direct,
        "fio": have_fio,
        "seq_bytes_per_s": med["seq_ours"],
        "seq_fio_bytes_per_s": med["seq_fio"],
        "rand4k_bytes_per_s": med["rand4k_ours"],
        "rand4k_fio_bytes_per_s": med["rand4k_fio"],
        "seq_ratio_vs_fio": ratio("seq_ours", "seq_fio"),
        "rand4k_ratio_vs_fio": ratio("rand4k_ours", "rand4k_fio"),
        "samples": samples,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def format_table(res: dict) -> str:
    def mb(v):
        return f"{v / 1e6:9.1f}" if v else "        -"

    def r(v):
        return f"{v:6.2f}" if v else "     -"

    lines = [
        f"reader vs fio: {res['threads']} threads, direct I/O {'on' if res['direct_io'] else 'OFF'}, "
        f"{res['file_mib']} MiB file, median of {res['repeats']}",
        f"{'workload':<22}{'nchunk MB/s':>12}{'fio MB/s':>10}{'ratio':>8}",
        f"{'sequential 1 MiB':<22}{mb(res['seq_bytes_per_s']):>12}{mb(res['seq_fio_bytes_per_s']):>10}{r(res['seq_ratio_vs_fio']):>8}",
        f"{'random 4 KiB':<22}{mb(res['rand4k_bytes_per_s']):>12}{mb(res['rand4k_fio_bytes_per_s']):>10}{r(res['rand4k_ratio_vs_fio']):>8}",
    ]
    if not res["fio"]:
        lines.append(FIO_HINT)
    return "\n".join(lines)

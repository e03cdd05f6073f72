"""The io_uring backend of the reader against the thread pool, on real files with real direct I/O.

Both backends must read the same bytes, check rows the same way and raise the same errors; forcing
io_uring off (NCHUNK_IO_URING=off) gives the thread pool and says why. "auto" follows the drive profile.
"""
import errno
import os

import numpy as np
import pytest

from nchunk_core.io import checksum
from nchunk_core.io import reader as reader_module
from nchunk_core.io.errors import ChecksumError, EndOfFileError, IoError
from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.reader import Reader, RowChecksums, io_uring_unavailable, resolve_backend

ROW = 3000
ROWS = 1200
TASK = 64 * 1024
UNAVAILABLE = io_uring_unavailable()
needs_uring = pytest.mark.skipif(UNAVAILABLE != "", reason=f"no io_uring here: {UNAVAILABLE}")


@pytest.fixture
def rows_file(tmp_path):
    """A file of ROWS rows of random bytes, its row CRC table, and its path."""
    data = np.random.default_rng(5).integers(0, 256, ROW * ROWS, dtype=np.uint8)
    path = tmp_path / "rows.bin"
    data.tofile(path)
    return data, checksum.crc32c_rows(data, ROW), str(path)


def random_extents(rng, n, size, max_len):
    offsets = rng.integers(0, size, n)
    lengths = np.minimum(rng.integers(0, max_len, n), size - offsets)
    dests = np.concatenate([[0], np.cumsum(lengths + rng.integers(0, 700, n))[:-1]]) + rng.integers(0, 513)
    return np.stack([offsets, lengths, dests], axis=1).astype(np.int64)


@needs_uring
def test_io_uring_and_threads_read_the_same_bytes(rows_file):
    data, _, path = rows_file
    rng = np.random.default_rng(9)
    with Reader(threads=4, max_task_bytes=TASK, backend="threads") as pool, \
            Reader(threads=4, max_task_bytes=TASK, backend="io_uring") as ring:
        assert (pool.backend, ring.backend, ring.backend_note) == ("threads", "io_uring", "")
        f = ring.open(path)
        assert f.direct  # tmp_path is on a file system with O_DIRECT here
        for max_len in (600, 9000, 300_000):  # bounce-only, mixed, and long unaligned extents
            extents = random_extents(rng, 60, data.size, max_len)
            nbytes = int((extents[:, 2] + extents[:, 1]).max())
            a, b = np.zeros(nbytes, np.uint8), np.zeros(nbytes, np.uint8)  # gaps stay zero
            sa, sb = pool.read(f, extents, a), ring.read(f, extents, b)
            assert a.tobytes() == b.tobytes()
            for off, length, dest in extents:
                assert b[dest:dest + length].tobytes() == data[off:off + length].tobytes()
            assert (sa.bytes, sa.bytes_read, sa.reads, sa.tasks) == (sb.bytes, sb.bytes_read, sb.reads, sb.tasks)
        requests = [ring.submit(f, [(k * TASK, TASK, 0)], ring.empty(TASK)) for k in range(20)]  # many at once
        assert [r.wait().bytes for r in requests] == [TASK] * 20


@needs_uring
def test_io_uring_checks_rows_and_reports_a_flipped_byte(rows_file, tmp_path):
    data, table, path = rows_file
    damaged = data.copy()
    damaged[700 * ROW + 11] ^= 0x40
    bad = tmp_path / "damaged.bin"
    damaged.tofile(bad)
    runs = np.array([[0, 300], [650, 100], [1000, 200]])
    extents = np.stack([runs[:, 0] * ROW, runs[:, 1] * ROW,
                        np.concatenate([[0], np.cumsum(runs[:, 1])[:-1]]) * ROW], axis=1)
    checks = RowChecksums(table, runs[:, 0], ROW)
    with Reader(threads=3, max_task_bytes=TASK, backend="io_uring") as r:
        out = r.empty(600 * ROW)
        stats = r.read(r.open(path), extents, out, checksums=checks)
        assert stats.rows_checked == 600
        with pytest.raises(ChecksumError) as info:
            r.read(r.open(bad), extents, out, checksums=checks)
    e = info.value
    assert (e.path, e.row, e.offset, e.length, e.errno) == (str(bad), 700, 700 * ROW, ROW, errno.EBADMSG)
    assert e.expected == table[700] and e.actual != table[700]


@needs_uring
def test_io_uring_errors_name_file_offset_length_and_errno(rows_file, tmp_path):
    data, _, _ = rows_file
    victim = tmp_path / "victim.bin"
    data.tofile(victim)
    with Reader(threads=2, max_task_bytes=TASK, backend="io_uring") as r:
        f = r.open(victim)
        out = r.empty(data.size)
        with pytest.raises(EndOfFileError):  # past the end: refused before reading
            r.read(f, [(data.size - 10, 11, 0)], out)
        os.truncate(victim, 5000)  # the file shrinks while open: a short read
        with pytest.raises(EndOfFileError, match="ended early") as info:
            r.read(f, [(2 * TASK, TASK, 0)], out)
        assert (info.value.path, info.value.offset, info.value.length) == (str(victim), 2 * TASK, TASK)
        directory = os.open(tmp_path, os.O_RDONLY)
        os.dup2(directory, f.fileno())  # a descriptor that cannot be read: EISDIR from the ring
        os.close(directory)
        with pytest.raises(IoError) as info:
            r.read(f, [(4096, 1000, 0)], out)
        e = info.value
        assert isinstance(e, IsADirectoryError) and "read of 1000 bytes at offset 4096" in str(e)
        assert (e.path, e.offset, e.length, e.errno) == (str(victim), 4096, 1000, errno.EISDIR)
        r.read(r.open(tmp_path / "rows.bin"), [(0, 4096, 0)], out)  # the ring still reads after errors


def test_forced_fallback_reads_with_the_thread_pool_and_says_why(rows_file, monkeypatch):
    data, _, path = rows_file
    monkeypatch.setenv("NCHUNK_IO_URING", "off")
    monkeypatch.setattr(reader_module, "_backend_notes_warned", set())
    with pytest.warns(RuntimeWarning, match="NCHUNK_IO_URING=off"):
        r = Reader(threads=2, backend="io_uring")
    with r:
        assert r.backend == "threads" and "NCHUNK_IO_URING=off" in r.backend_note
        out = r.empty(5 * ROW)
        r.read(r.open(path), [(7 * ROW, 5 * ROW, 0)], out)
        assert out.tobytes() == data[7 * ROW:12 * ROW].tobytes()
    assert "NCHUNK_IO_URING=off" in io_uring_unavailable()


def test_auto_follows_the_drive_profile():
    table = LatencyTable.synthetic()
    assert resolve_backend("auto") == "threads"
    assert resolve_backend("auto", table) == "threads"  # a profile from before the comparison
    table.meta["reader_backend"] = "io_uring"
    assert resolve_backend("auto", table) == "io_uring"
    assert resolve_backend("threads", table) == "threads"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("aio")
    with Reader(threads=2, profile=table) as r:
        assert r.backend == ("io_uring" if UNAVAILABLE == "" else "threads")


def test_bench_reader_table_and_plot_show_both_backends(tmp_path):
    from nchunk_core.bench import reader_bench

    samples = {f"{w}_{k}": [] for w in ("seq", "rand4k") for k in ("ours", "io_uring", "fio", "fio_io_uring")}
    samples.update(seq_ours=[2e9, 2.2e9], seq_io_uring=[1e9, 1.2e9], rand4k_ours=[1e8], rand4k_io_uring=[1.5e8])
    res = {"threads": 6, "file_mib": 64, "repeats": 2, "direct_io": True, "fio": False, "io_uring": True,
           "io_uring_note": "", "samples": samples}
    for w in ("seq", "rand4k"):
        ours, uring = np.median(samples[f"{w}_ours"]), np.median(samples[f"{w}_io_uring"])
        res.update({f"{w}_bytes_per_s": ours, f"{w}_io_uring_bytes_per_s": uring, f"{w}_fio_bytes_per_s": None,
                    f"{w}_fio_io_uring_bytes_per_s": None, f"{w}_ratio_vs_fio": None,
                    f"{w}_io_uring_ratio_vs_fio_io_uring": None, f"{w}_io_uring_vs_threads": uring / ours,
                    f"{w}_cpu_us_per_read": 12.5, f"{w}_io_uring_cpu_us_per_read": 8.5})
    table = reader_bench.format_table(res)
    assert "io_uring_vs_threads" in table
    assert "  0.52" in table.splitlines()[2] and "  1.50" in table.splitlines()[3]
    assert "random 4 KiB 12.5 / 8.5" in table
    reader_bench.plot(res, tmp_path / "reader.png")
    assert (tmp_path / "reader.png").stat().st_size > 0

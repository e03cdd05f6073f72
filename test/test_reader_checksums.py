"""CRC-32C on every path, row checks in the direct-I/O reader, and the fields of its errors.

Real files with real direct I/O (tmp_path is on ext4 here); damage is real flipped bytes on disk, and
error sources are honest (a missing file, a descriptor pointed at a directory or at /proc/self/mem, a
file truncated while open).
"""
import errno
import os

import numpy as np
import pytest

from nchunk_core.io import checksum
from nchunk_core.io.reader import (ChecksumError, EndOfFileError, IoError, Reader, RowChecksums)

ROW = 3000  # bytes per row of the test file
ROWS = 1100
TASK = 64 * 1024

# (data, CRC-32C): the check value and RFC 3720 B.4
VECTORS = [(b"123456789", 0xE3069283), (bytes(32), 0x8A9136AA), (b"\xff" * 32, 0x62A8AB43),
           (bytes(range(32)), 0x46DD794E), (bytes(range(31, -1, -1)), 0x113FDB5C), (b"", 0)]


def paths():
    """Every CRC-32C path this CPU offers: the table always, the instruction where present."""
    return ["auto", "table"] + (["hardware"] if checksum.hardware() else [])


def test_crc32c_known_values_on_every_path():
    assert checksum.hardware() in ("sse4.2", "armv8-crc", "")
    for path in paths():
        for data, crc in VECTORS:
            assert checksum.crc32c(data, path=path) == crc, (path, data)
        assert checksum.crc32c(b"56789", checksum.crc32c(b"1234", path=path), path=path) == 0xE3069283
    if not checksum.hardware():
        with pytest.raises(ValueError, match="no CRC-32C instruction"):
            checksum.crc32c(b"1", path="hardware")
    with pytest.raises(ValueError, match="path must be"):
        checksum.crc32c(b"1", path="fast")


def test_crc32c_rows_agree_with_the_table_on_every_path():
    data = np.random.default_rng(1).integers(0, 256, 7 * 1001, dtype=np.uint8)
    one_by_one = [checksum.crc32c(data[r * 1001:(r + 1) * 1001], path="table") for r in range(7)]
    for path in paths():
        assert checksum.crc32c_rows(data, 1001, path=path).tolist() == one_by_one
        for n in (0, 1, 5, 8, 63, 4097):  # lengths around the 8-byte steps
            assert checksum.crc32c(data[3:3 + n], path=path) == checksum.crc32c(data[3:3 + n], path="table")
    with pytest.raises(ValueError, match="not whole rows"):
        checksum.crc32c_rows(data, 1000)


@pytest.fixture
def rows_file(tmp_path):
    """A file of ROWS rows, its row CRC table, and the path of a copy with two damaged rows."""
    data = np.random.default_rng(2).integers(0, 256, ROW * ROWS, dtype=np.uint8)
    path = tmp_path / "rows.bin"
    data.tofile(path)
    damaged = data.copy()
    damaged[500 * ROW + 17] ^= 0x01  # one bit in row 500
    damaged[900 * ROW:901 * ROW] = 0  # all of row 900
    bad = tmp_path / "damaged.bin"
    damaged.tofile(bad)
    return data, checksum.crc32c_rows(data, ROW), str(path), str(bad)


def extents_of(runs, row=ROW):
    """[k, 3] extents reading runs [(start row, rows)] packed into one buffer."""
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    dest = np.concatenate([[0], np.cumsum(runs[:, 1])[:-1]])
    return np.stack([runs[:, 0] * row, runs[:, 1] * row, dest * row], axis=1)


def test_checked_reads_count_their_rows(rows_file):
    data, table, path, _ = rows_file
    runs = np.array([[0, 40], [100, 1], [700, 300]])
    with Reader(threads=3, max_task_bytes=TASK) as r:
        f = r.open(path)
        out = r.empty(341 * ROW)
        stats = r.read(f, extents_of(runs), out, checksums=RowChecksums(table, runs[:, 0], ROW))
        assert stats.rows_checked == 341
        assert out.tobytes() == b"".join(data[s * ROW:(s + n) * ROW].tobytes() for s, n in runs)
        # tasks of whole rows: 21 rows of 3000 bytes fit in 64 KiB
        assert stats.tasks == 2 + 1 + 15
        assert r.read(f, extents_of(runs), out).rows_checked == 0  # no checksums given


def test_flipped_bytes_fail_the_first_read_that_touches_them(rows_file):
    data, table, _, bad = rows_file
    with Reader(threads=3, max_task_bytes=TASK) as r:
        f = r.open(bad)
        out = r.empty(ROWS * ROW)
        for runs in ([[0, 500]], [[501, 399]], [[901, ROWS - 901]], [[499, 1], [899, 1], [1000, 1]]):
            runs = np.array(runs)
            r.read(f, extents_of(runs), out, checksums=RowChecksums(table, runs[:, 0], ROW))  # untouched rows
        runs = np.array([[10, 5], [480, 100]])
        req = r.submit(f, extents_of(runs), out, checksums=RowChecksums(table, runs[:, 0], ROW))
        for _ in range(2):  # every wait raises the same error
            with pytest.raises(ChecksumError) as info:
                req.wait()
            e = info.value
            assert isinstance(e, IoError) and isinstance(e, OSError) and e.errno == errno.EBADMSG
            assert (e.path, e.row, e.offset, e.length) == (bad, 500, 500 * ROW, ROW)
            assert e.expected == table[500] and e.actual == checksum.crc32c(
                np.fromfile(bad, np.uint8)[500 * ROW:501 * ROW])
            assert e.group is None
            assert f"row 500 ({ROW} bytes at offset {500 * ROW})" in str(e) and bad in str(e)
        e.group = "layers.3.mlp"  # a store read adds the group it knows
        assert "group 'layers.3.mlp', row 500" in str(e)
        with pytest.raises(ChecksumError) as info:
            r.read(f, extents_of([[900, 1]]), out, checksums=RowChecksums(table, [900], ROW))
        assert (info.value.row, info.value.offset) == (900, 900 * ROW)


def test_verify_off_per_reader_and_per_call(rows_file):
    _, table, _, bad = rows_file
    runs = np.array([[450, 100]])
    checks = RowChecksums(table, runs[:, 0], ROW)
    with Reader(threads=2, max_task_bytes=TASK, verify=False) as r:
        f = r.open(bad)
        out = r.empty(100 * ROW)
        assert r.read(f, extents_of(runs), out, checksums=checks).rows_checked == 0
        with pytest.raises(ChecksumError):
            r.read(f, extents_of(runs), out, checksums=checks, verify=True)
    with Reader(threads=2, max_task_bytes=TASK) as r:
        assert r.verify
        f = r.open(bad)
        assert r.read(f, extents_of(runs), out, checksums=checks, verify=False).rows_checked == 0
        with pytest.raises(ChecksumError):
            r.read(f, extents_of(runs), out, checksums=checks)


def test_row_size_larger_than_a_task(tmp_path):
    data = np.random.default_rng(3).integers(0, 256, 5 * 100_000, dtype=np.uint8)
    path = tmp_path / "wide.bin"
    data.tofile(path)
    table = checksum.crc32c_rows(data, 100_000)
    with Reader(threads=2, max_task_bytes=4096) as r:
        out = r.empty(data.size)
        stats = r.read(r.open(path), [(0, data.size, 0)], out, checksums=RowChecksums(table, [0], 100_000))
    assert (stats.tasks, stats.rows_checked) == (5, 5) and out.tobytes() == data.tobytes()


@pytest.mark.parametrize("checks, message", [
    (RowChecksums(np.zeros(10, np.uint32), [0], 7), "not a whole number of 7-byte rows"),
    (RowChecksums(np.zeros(10, np.uint32), [8], ROW), "run past the 10-row checksum table"),
    (RowChecksums(np.zeros(10, np.uint32), [-1], ROW), "negative"),
    (RowChecksums(np.zeros((2, 5), np.uint32), [0], ROW), "1-D"),
], ids=["partial-row", "table-overflow", "negative-row", "table-2d"])
def test_malformed_row_checks_are_refused(rows_file, checks, message):
    with Reader(threads=1) as r:
        f = r.open(rows_file[2])
        with pytest.raises(ValueError, match=message):
            r.read(f, [(0, 3 * ROW, 0)], r.empty(3 * ROW), checksums=checks)


# ---- IoError fields ----

def test_open_errors_carry_path_and_errno(tmp_path):
    missing = str(tmp_path / "missing.bin")
    with Reader(threads=1) as r:
        with pytest.raises(IoError) as info:
            r.open(missing)
        e = info.value
        assert isinstance(e, FileNotFoundError)
        assert (e.path, e.filename, e.errno, e.offset, e.length) == (missing, missing, errno.ENOENT, None, None)
        with pytest.raises(IoError) as info:
            r.open(tmp_path)
        assert isinstance(info.value, IsADirectoryError) and info.value.errno == errno.EISDIR


def test_read_errors_carry_path_offset_length_and_errno(rows_file, tmp_path):
    _, _, path, _ = rows_file
    with Reader(threads=2, max_task_bytes=TASK) as r:
        f = r.open(path)
        out = r.empty(ROWS * ROW)
        directory = os.open(tmp_path, os.O_RDONLY)
        os.dup2(directory, f.fileno())  # a bad descriptor for pread: EISDIR
        os.close(directory)
        with pytest.raises(IoError) as info:
            r.read(f, [(3 * TASK, 1000, 0)], out)
        e = info.value
        assert isinstance(e, IsADirectoryError)
        assert (e.path, e.offset, e.length, e.errno) == (path, 3 * TASK, 1000, errno.EISDIR)
        memory = os.open("/proc/self/mem", os.O_RDONLY)  # address 0 is unmapped: EIO
        os.dup2(memory, f.fileno())
        os.close(memory)
        with pytest.raises(IoError) as info:
            r.read(f, [(0, 4096, 0)], out)
        assert (info.value.path, info.value.offset, info.value.length, info.value.errno) == (path, 0, 4096, errno.EIO)


def test_short_reads_are_end_of_file_io_errors(rows_file, tmp_path):
    data, _, _, _ = rows_file
    victim = tmp_path / "victim.bin"
    data.tofile(victim)
    with Reader(threads=2, max_task_bytes=TASK) as r:
        f = r.open(victim)
        out = r.empty(data.size)
        with pytest.raises(EndOfFileError) as info:  # past the end: refused before reading
            r.read(f, [(data.size - 10, 11, 0)], out)
        e = info.value
        assert isinstance(e, IoError) and isinstance(e, EOFError) and e.errno is None
        assert (e.path, e.offset, e.length) == (str(victim), data.size - 10, 11)
        os.truncate(victim, 5000)  # the file shrinks while open: a short read
        with pytest.raises(EndOfFileError, match="ended early") as info:
            r.read(f, [(2 * TASK, TASK, 0)], out)
        assert (info.value.path, info.value.offset, info.value.length) == (str(victim), 2 * TASK, TASK)

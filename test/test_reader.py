"""Tests of nchunk_core.io.reader against real files with real direct I/O (tmp_path is on ext4 here).

Every read is compared with the file's bytes as Python reads them. Error paths use honest sources: a
missing file, a directory, an unprivileged child process, a truncated file, and a descriptor pointed at a
directory or at /proc/self/mem (whose address 0 is unmapped, so pread fails with EIO).
"""
import errno
import gc
import os
import re
import shutil
import subprocess
import threading
import warnings
import weakref

import numpy as np
import pytest

from nchunk_core.io import reader as reader_module
from nchunk_core.io.reader import DioAlignment, Reader, ReadStats, dio_alignment

FILE_SIZE = 3 * (1 << 20) + 1234  # not a multiple of 512
TASK = 64 * 1024


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    data = np.random.default_rng(0).integers(0, 256, FILE_SIZE, dtype=np.uint8)
    path = tmp_path_factory.mktemp("reader") / "weights.bin"
    data.tofile(path)
    return str(path), path.read_bytes()


@pytest.fixture
def reader():
    with Reader(threads=4, max_task_bytes=TASK) as r:
        yield r


def expected(data, extents, nbytes):
    out = bytearray(nbytes)
    for off, length, dest in extents:
        out[dest:dest + length] = data[off:off + length]
    return bytes(out)


def random_extents(rng, n, max_len, size=FILE_SIZE):
    offsets = rng.integers(0, size, n)
    lengths = np.minimum(rng.integers(0, max_len, n), size - offsets)
    dests = np.concatenate([[0], np.cumsum(lengths + rng.integers(0, 9, n))[:-1]]) + rng.integers(0, 513)
    return np.stack([offsets, lengths, dests], axis=1)


# ---- alignment and open ----

def test_dio_alignment_of_file_and_directory(data_file):
    a = dio_alignment(data_file[0])
    assert isinstance(a, DioAlignment) and a.direct
    assert a.offset in (512, 1024, 2048, 4096) and 0 < a.memory <= 4096
    assert dio_alignment(os.path.dirname(data_file[0])) == a
    with pytest.raises(FileNotFoundError):
        dio_alignment(data_file[0] + ".missing")


def test_open_describes_the_file(reader, data_file):
    f = reader.open(data_file[0])
    assert (f.path, f.size, f.direct) == (data_file[0], FILE_SIZE, True)
    assert f.alignment == dio_alignment(data_file[0])
    assert reader.threads == 4 and reader.max_task_bytes == TASK


def test_empty_is_aligned(reader):
    buf = reader.empty(10000)
    assert buf.dtype == np.uint8 and buf.size == 10000
    assert buf.__array_interface__["data"][0] % 4096 == 0


# ---- correctness ----

@pytest.mark.parametrize("extent", [
    (0, 1, 0),                          # first byte
    (FILE_SIZE - 1, 1, 0),              # last byte
    (0, FILE_SIZE, 0),                  # whole file, tail not a multiple of 512
    (FILE_SIZE - 700, 700, 3),          # unaligned tail into an unaligned destination
    (4096, 2 << 20, 0),                 # aligned, many tasks
    (100, 2 << 20, 1),                  # unaligned head and tail, misaligned destination
    (100, 200_000, 100),                # unaligned, but the middle can go straight to the destination
    (FILE_SIZE - 300_000, 300_000, 0),  # ends at an unaligned end of file, many tasks
], ids=["first", "last", "whole", "tail", "aligned", "unaligned", "split-head-tail", "to-end"])
def test_file_boundaries(reader, data_file, extent):
    path, data = data_file
    f = reader.open(path)
    aligned = reader.empty(extent[1] + extent[2])
    aligned[:] = 0
    for out in (aligned, np.zeros(extent[1] + extent[2], np.uint8)):
        reader.read(f, [extent], out)
        assert out.tobytes() == expected(data, [extent], out.nbytes)


def test_random_extents_match_python(reader, data_file):
    path, data = data_file
    f = reader.open(path)
    rng = np.random.default_rng(1)
    for trial in range(30):
        extents = random_extents(rng, int(rng.integers(1, 40)), 200_000)
        nbytes = int((extents[:, 1] + extents[:, 2]).max())
        out = reader.empty(nbytes) if trial % 2 else np.ones(nbytes + 1, np.uint8)[1:]  # misaligned
        out[:] = 0
        reader.read(f, extents, out)
        assert out.tobytes() == expected(data, extents, nbytes), f"trial {trial}"


def test_many_small_extents(reader, data_file):
    path, data = data_file
    f = reader.open(path)
    rng = np.random.default_rng(2)
    extents = random_extents(rng, 5000, 600)
    out = np.zeros(int((extents[:, 1] + extents[:, 2]).max()), np.uint8)
    stats = reader.read(f, extents.tolist(), out)  # a plain list works too
    assert stats.reads == 5000
    assert out.tobytes() == expected(data, extents, out.nbytes)


def test_stats(reader, data_file):
    path, _ = data_file
    f = reader.open(path)
    block = f.alignment.offset
    stats = reader.read(f, [(0, 1 << 20, 0), (2 << 20, 100, 1 << 20)], reader.empty((1 << 20) + 100))
    assert isinstance(stats, ReadStats)
    assert (stats.bytes, stats.reads, stats.tasks) == ((1 << 20) + 100, 2, (1 << 20) // TASK + 1)
    assert stats.bytes_read == (1 << 20) + block  # the 100-byte read costs one aligned block
    assert stats.wall_s > 0
    stats = reader.read(f, [(5, 0, 0)], np.zeros(1, np.uint8))
    assert (stats.bytes, stats.bytes_read, stats.reads, stats.tasks) == (0, 0, 1, 0)


def test_torch_tensors(reader, data_file):
    torch = pytest.importorskip("torch")
    path, data = data_file
    f = reader.open(path)
    for dtype in (torch.float32, torch.bfloat16, torch.uint8):
        out = torch.zeros(1000, dtype=dtype)
        nbytes = out.numel() * out.element_size()
        reader.read(f, [(333, nbytes - 10, 10)], out)
        assert out.view(torch.uint8).numpy().tobytes() == expected(data, [(333, nbytes - 10, 10)], nbytes)
    with pytest.raises(ValueError, match="CPU memory only"):
        reader.read(f, [(0, 4, 0)], torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="contiguous"):
        reader.read(f, [(0, 4, 0)], torch.zeros(4, 4).t())


def test_other_destinations(reader, data_file):
    path, data = data_file
    f = reader.open(path)
    out = bytearray(100)
    reader.read(f, [(7, 100, 0)], out)
    assert bytes(out) == data[7:107]
    readonly = np.zeros(100, np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        reader.read(f, [(0, 4, 0)], readonly)
    with pytest.raises(ValueError, match="contiguous"):
        reader.read(f, [(0, 4, 0)], np.zeros((10, 10), np.uint8)[:, 1])


# ---- concurrency and async ----

def test_concurrent_callers(data_file):
    path, data = data_file
    failures = []
    with Reader(threads=6, max_task_bytes=TASK) as r:
        f = r.open(path)

        def caller(seed):
            rng = np.random.default_rng(seed)
            for _ in range(10):
                extents = random_extents(rng, 20, 100_000)
                out = np.zeros(int((extents[:, 1] + extents[:, 2]).max()), np.uint8)
                r.read(f, extents, out)
                if out.tobytes() != expected(data, extents, out.nbytes):
                    failures.append(seed)

        threads = [threading.Thread(target=caller, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []


def test_submit_and_wait(reader, data_file):
    path, data = data_file
    f = reader.open(path)
    outs = [reader.empty(FILE_SIZE), np.zeros(FILE_SIZE + 1, np.uint8)[1:]]
    requests = [reader.submit(f, [(0, FILE_SIZE, 0)], out) for out in outs]
    busy = sum(range(10000))  # compute while the reads run
    stats = [req.wait() for req in reversed(requests)]
    assert busy and all(req.done() for req in requests)
    assert requests[0].wait() == stats[1]  # waiting twice is fine
    assert all(out.tobytes() == data for out in outs)


def test_request_keeps_destination_alive(reader, data_file):
    path, data = data_file
    f = reader.open(path)

    class Buffer(np.ndarray):  # a weak-referenceable array
        pass

    out = np.zeros(FILE_SIZE, np.uint8).view(Buffer)
    alive = weakref.ref(out)
    req = reader.submit(f, [(0, FILE_SIZE, 0)], out)
    del out
    gc.collect()
    assert alive() is not None
    req.wait()
    assert alive().tobytes() == data
    del req
    gc.collect()
    assert alive() is None


def test_dropping_an_unwaited_request_waits(reader, data_file):
    path, data = data_file
    f = reader.open(path)
    out = reader.empty(FILE_SIZE)
    req = reader.submit(f, [(0, FILE_SIZE, 0)], out)
    del req
    assert out.tobytes() == data


# ---- errors ----

def test_missing_file_and_directory(reader, tmp_path):
    missing = str(tmp_path / "missing.bin")
    with pytest.raises(FileNotFoundError) as info:
        reader.open(missing)
    assert info.value.errno == errno.ENOENT and info.value.filename == missing
    with pytest.raises(IsADirectoryError):
        reader.open(tmp_path)


def test_permission_denied(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x" * 1000)
    secret.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(PermissionError) as info, Reader(threads=1) as r:
            r.open(secret)
        assert info.value.errno == errno.EACCES and info.value.filename == str(secret)
        return
    # Root is never denied, so open from a forked child that drops to the unprivileged user 65534.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                Reader(threads=1).open(secret)
                result = "opened"
            except PermissionError as e:
                result = f"PermissionError {e.errno} {e.filename}"
            except BaseException as e:  # report anything else to the parent
                result = repr(e)
            os.write(write_end, result.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        result = pipe.read()
    assert result.split() == ["PermissionError", str(errno.EACCES), str(secret)], result


def test_read_past_end(reader, data_file):
    path, _ = data_file
    f = reader.open(path)
    out = np.zeros(100, np.uint8)
    with pytest.raises(EOFError, match=rf"{re.escape(path)}.*offset {FILE_SIZE - 10}, length 11.*{FILE_SIZE} bytes"):
        reader.read(f, [(0, 5, 0), (FILE_SIZE - 10, 11, 0)], out)
    with pytest.raises(EOFError):
        reader.submit(f, [(FILE_SIZE + 1, 0, 0)], out)


@pytest.mark.parametrize("extents, message", [
    ([(-1, 10, 0)], "negative"),
    ([(0, -10, 0)], "negative"),
    ([(0, 10, -1)], "negative"),
    ([(0, 100, 50)], "offset 0, length 100, dest offset 50.*beyond the 100-byte buffer"),
    ([(0, 10, 2**63 - 1)], "beyond"),
    ([(0, 10)], "shape"),
    ([[(0, 10, 0)]], "shape"),
    ([(0.5, 10, 0)], "integers"),
], ids=["offset", "length", "dest", "dest-range", "dest-overflow", "columns", "ndim", "float"])
def test_bad_extents(reader, data_file, extents, message):
    f = reader.open(data_file[0])
    with pytest.raises(ValueError, match=message):
        reader.read(f, extents, np.zeros(100, np.uint8))


def test_bad_reader_options():
    with pytest.raises(ValueError, match="threads"):
        Reader(threads=0)
    with pytest.raises(ValueError, match="max_task_bytes"):
        Reader(max_task_bytes=1000)


def test_read_errors_from_workers(reader, data_file, tmp_path):
    """An errno raised by pread on a worker thread reaches the caller as the matching OSError."""
    path, _ = data_file
    f = reader.open(path)
    out = np.zeros(1 << 20, np.uint8)
    directory = os.open(tmp_path, os.O_RDONLY)
    os.dup2(directory, f.fileno())  # pread on a directory: EISDIR
    os.close(directory)
    req = reader.submit(f, [(0, 4096, 0), (8192, 100_000, 4096)], out)
    for _ in range(2):  # the error is raised by every wait
        with pytest.raises(IsADirectoryError, match=r"read of \d+ bytes at offset \d+") as info:
            req.wait()
        assert info.value.filename == path
    memory = os.open("/proc/self/mem", os.O_RDONLY)  # address 0 is unmapped: pread gives EIO
    os.dup2(memory, f.fileno())
    os.close(memory)
    with pytest.raises(OSError, match="read of 4096 bytes at offset 0") as info:
        reader.read(f, [(0, 4096, 0)], out)
    assert info.value.errno == errno.EIO and info.value.filename == path


def test_file_truncated_while_open(reader, data_file, tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(data_file[1])
    f = reader.open(victim)
    os.truncate(victim, 1000)
    with pytest.raises(EOFError, match="ended early"):
        reader.read(f, [(0, FILE_SIZE, 0)], np.zeros(FILE_SIZE, np.uint8))


def test_closed_reader(data_file):
    r = Reader(threads=2)
    f = r.open(data_file[0])
    r.close()
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.read(f, [(0, 10, 0)], np.zeros(10, np.uint8))


# ---- buffered fallback ----

def _refuses_direct_io(directory):
    probe = os.path.join(directory, ".nchunk_probe")
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        os.close(fd)
        return False
    except OSError as e:
        return e.errno == errno.EINVAL
    finally:
        if os.path.exists(probe):
            os.remove(probe)


@pytest.fixture
def no_direct_dir(tmp_path):
    """A directory on a file system that refuses O_DIRECT: /dev/shm on older kernels (tmpfs accepts
    O_DIRECT since Linux 6.6), otherwise a ramfs mounted for the test when running as root."""
    if os.path.isdir("/dev/shm") and _refuses_direct_io("/dev/shm"):
        yield "/dev/shm"
        return
    mount_point = tmp_path / "ramfs"
    mount_point.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("no file system without O_DIRECT available")
    done = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a ramfs: {done.stderr.decode().strip()}")
    try:
        yield str(mount_point)
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_tmpfs_reads(data_file):
    """tmpfs refuses O_DIRECT before Linux 6.6 and accepts it since, reporting no alignment through
    statx (so it is probed). Either way the reads are right and the handle says which I/O it uses."""
    _, data = data_file
    path = f"/dev/shm/nchunk_reader_test_{os.getpid()}.bin"
    with open(path, "wb") as fh:
        fh.write(data)
    try:
        with Reader(threads=2, max_task_bytes=TASK) as r, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            f = r.open(path)
            assert f.alignment == dio_alignment(path) and f.direct == f.alignment.direct
            extents = random_extents(np.random.default_rng(4), 30, 300_000)
            out = np.zeros(int((extents[:, 1] + extents[:, 2]).max()), np.uint8)
            r.read(f, extents, out)
        assert out.tobytes() == expected(data, extents, out.nbytes)
    finally:
        os.remove(path)


def test_buffered_fallback_reads_and_warns_once(no_direct_dir, data_file, monkeypatch):
    _, data = data_file
    path = os.path.join(no_direct_dir, f"nchunk_fallback_{os.getpid()}.bin")
    with open(path, "wb") as fh:
        fh.write(data)
    monkeypatch.setattr(reader_module, "_fallback_warned", False)
    try:
        with Reader(threads=3, max_task_bytes=TASK) as r, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            f = r.open(path)
            g = r.open(path)
            assert not f.direct and not g.direct
            assert f.alignment == DioAlignment(1, 1, False) == dio_alignment(path)
            extents = random_extents(np.random.default_rng(3), 50, 200_000)
            out = np.zeros(int((extents[:, 1] + extents[:, 2]).max()), np.uint8)
            stats = r.read(f, extents, out)
        assert out.tobytes() == expected(data, extents, out.nbytes)
        assert stats.bytes_read == stats.bytes  # no alignment padding
        fallback = [w for w in caught if "direct I/O is not available" in str(w.message)]
        assert len(fallback) == 1 and fallback[0].category is RuntimeWarning
    finally:
        os.remove(path)

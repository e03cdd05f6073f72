"""Drive profiler on a small scratch file: a monotone table, saturation, caching, validation, plot;
where the scratch file goes (never into the directory named, which may be a read-only store)."""
import json
import os
import shutil
import subprocess
import tempfile

from pathlib import Path

import numpy as np
import pytest

from nchunk_core.io import backends
from nchunk_core.io import profile as prof
from nchunk_core.io.drive import drive_info
from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.reader import Reader, io_uring_unavailable

MIB = 1 << 20


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NCHUNK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_isotonic_increasing():
    y = np.array([1.0, 3.0, 2.0, 2.0, 5.0, 4.0])
    fit = prof.isotonic_increasing(y)
    assert (np.diff(fit) >= 0).all()
    np.testing.assert_allclose(fit, [1, 7 / 3, 7 / 3, 7 / 3, 4.5, 4.5])
    assert fit.sum() == pytest.approx(y.sum())  # PAV preserves the mean


@pytest.fixture(scope="module")
def small_table(tmp_path_factory):
    d = tmp_path_factory.mktemp("drive")
    table = prof.profile_drive(d, threads=4, quick=True, scratch_bytes=24 * MIB, max_kib=128)
    assert not (d / prof.SCRATCH_NAME).exists()  # scratch file removed
    assert list(d.iterdir()) == []  # and it never was in the directory named
    return d, table


def test_profile_small_file(small_table):
    _, t = small_table
    assert t.step_bytes == 1024
    assert (np.diff(t.latency_s) >= 0).all()  # non-decreasing in size
    assert 1024 <= t.saturation_bytes <= 128 * 1024
    assert t.latency_s.size == t.saturation_bytes // 1024
    thr = np.arange(1, t.latency_s.size + 1) * 1024 / t.latency_s
    # throughput rises towards saturation (how close the monotone fit comes to the smoothed peak
    # depends on the drive's noise, which a loaded machine makes large: not asserted)
    assert thr[-1] > thr[0]
    assert t.meta["direct_io"] is True  # the test directory is on a real file system
    assert t.meta["threads"] == 4 and t.meta["quick"] is True
    # small chunks are far below peak throughput: the contiguity cliff the method exploits
    assert thr[0] < 0.5 * t.peak_bytes_per_s


def test_profile_records_the_faster_backend_and_the_runtime_uses_it(small_table, tmp_path):
    _, t = small_table
    comparison = t.meta["backend_comparison"]
    assert t.meta["reader_backend"] == comparison["reader_backend"] in ("threads", "io_uring")
    if io_uring_unavailable():  # no ring here: the thread pool, and why
        assert comparison["io_uring_vs_threads"] is None and comparison["note"]
    else:  # both measured at every size; the winner is the one the ratios favour
        assert len(comparison["threads_bytes_per_s"]) == len(comparison["io_uring_bytes_per_s"]) == 3
        assert all(v > 0 for v in comparison["threads_bytes_per_s"] + comparison["io_uring_bytes_per_s"])
        faster = comparison["io_uring_vs_threads"] > 1 + backends.MARGIN
        assert comparison["reader_backend"] == ("io_uring" if faster else "threads")
    saved = tmp_path / "profile.json"
    t.save(saved)
    loaded = LatencyTable.load(saved)
    with Reader(threads=2, profile=loaded) as r:
        assert r.backend == t.meta["reader_backend"]
    del loaded.meta["reader_backend"]  # a profile from before the comparison: the thread pool
    with Reader(threads=2, profile=loaded) as r:
        assert r.backend == "threads"
    assert "before backends were compared" in backends.describe(None)
    assert t.meta["reader_backend"] in backends.describe(comparison)


def test_cache_is_reused(tmp_path, cache, small_table):
    d, t = small_table
    path = prof.cache_path(d, 4)
    t.save(path)
    messages = []
    loaded = prof.load_or_profile(d, threads=4, log=messages.append)
    assert "from cache" in messages[0]
    np.testing.assert_array_equal(loaded.latency_s, t.latency_s)
    # a corrupt cache file is reported and replaced by a fresh measurement
    path.write_text("{not json")
    messages.clear()
    fresh = prof.load_or_profile(d, threads=4, log=messages.append, scratch_bytes=16 * MIB, max_kib=64)
    assert any("ignoring unreadable" in m for m in messages)
    assert json.loads(path.read_text())["step_bytes"] == 1024
    assert fresh.latency_s.size > 0


def test_random_pattern_runs_are_disjoint_and_in_file():
    rng = np.random.default_rng(0)
    for row_bytes in (1024, 7168):
        runs = prof.random_pattern(rng, 64 * MIB, row_bytes, 4 * MIB)
        starts, lengths = runs[:, 0], runs[:, 1]
        assert (starts % row_bytes == 0).all() and (lengths % row_bytes == 0).all()
        assert (starts[1:] > starts[:-1] + lengths[:-1]).all()  # sorted, separated by >= 1 row
        assert starts[-1] + lengths[-1] <= 64 * MIB
        assert lengths.sum() >= 4 * MIB - row_bytes


def test_validate_correlates(small_table):
    d, t = small_table
    res = prof.validate(d, t, threads=4, patterns=8, repeats=1)
    assert len(res["patterns"]) == 8
    assert all(p["measured_s"] > 0 and p["estimated_s"] > 0 for p in res["patterns"])
    assert -1.0 <= res["pearson_r"] <= 1.0
    # patterns span 1-32 MiB, so a sane cost model tracks the measured time
    assert res["pearson_r"] > 0.5


def test_plot(tmp_path, small_table):
    _, t = small_table
    out = tmp_path / "p.png"
    prof.plot_profile(t, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prof.profile_drive("/nonexistent/dir")


def test_synthetic_table_is_valid():
    t = LatencyTable.synthetic()
    assert t.saturation_bytes == 256 * 1024


def test_smooth_latency_removes_single_outliers():
    sizes = np.arange(64, 200, dtype=float)
    latency = 50e-6 + sizes * 1024 / 1e9
    noisy = latency.copy()
    noisy[70] *= 0.5  # one lucky measurement: throughput twice the truth
    noisy[120] *= 1.5
    smooth = prof.smooth_latency(sizes, noisy)
    assert smooth[70] == pytest.approx(latency[70], rel=0.02)
    np.testing.assert_allclose(smooth, latency, rtol=0.08)  # a wide median bends the curve only slightly


# ---- where the scratch file goes ------------------------------------------------------------------

def _snapshot(directory):
    return sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in directory.iterdir()) + \
        [("", directory.stat().st_mtime_ns, 0)]


def _mount(*args):
    """Run mount(8) as root; False when this machine does not allow it."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def read_only_store(tmp_path):
    """A store-like directory nobody can write to: a read-only bind mount when running as root (the
    same file system, and even root gets EROFS), else permission bits."""
    source = tmp_path / "store-src"
    source.mkdir()
    (source / "manifest.json").write_text("{}")
    (source / "weights-00000.bin").write_bytes(b"\0" * 4096)
    view = tmp_path / "store"
    view.mkdir()
    mounted = _mount("--bind", str(source), str(view))
    if mounted and not _mount("-o", "remount,ro,bind", str(view)):
        subprocess.run(["umount", str(view)], check=False)
        mounted = False
    if not mounted:
        view.rmdir()
        view = source
        view.chmod(0o555)
    try:
        yield view
    finally:
        if mounted:
            subprocess.run(["umount", str(view)], check=False)
        source.chmod(0o755)


def test_read_only_store_is_left_untouched(read_only_store, cache):
    before = _snapshot(read_only_store)
    if os.geteuid() == 0 and read_only_store.name == "store":  # the bind mount: even root cannot write
        with pytest.raises(OSError):
            (read_only_store / "probe").write_bytes(b"x")
    messages = []
    table = prof.load_or_profile(read_only_store, threads=2, log=messages.append, scratch_bytes=16 * MIB,
                                 max_kib=64)
    assert table.latency_s.size > 0 and (np.diff(table.latency_s) >= 0).all()
    assert _snapshot(read_only_store) == before
    # same file system (the temp folder or an ancestor): the store's own drive is the one measured
    assert table.meta["same_drive"] is True
    assert os.stat(table.meta["scratch_dir"]).st_dev == os.stat(read_only_store).st_dev
    assert drive_info(table.meta["scratch_dir"]).key(2) == table.meta["key"] == drive_info(read_only_store).key(2)
    assert "profiling the drive holding" in messages[0] and table.meta["profiled_for"] in messages[0]
    assert not list(Path(table.meta["scratch_dir"]).glob(".nchunk-profile-scratch-*"))
    assert prof.cache_path(read_only_store, 2).is_file()


def test_no_writable_folder_on_the_drive_falls_back_to_the_cache(tmp_path, cache):
    """A store on a read-only file system of its own: the cache folder's drive is measured, and the
    log says so."""
    mount_point = tmp_path / "ro-fs"
    mount_point.mkdir()
    if not _mount("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount_point)):
        pytest.skip("cannot mount a read-only file system here (needs root)")
    try:
        assert os.stat(mount_point).st_dev != os.stat(tempfile.gettempdir()).st_dev
        place, same_drive = prof.scratch_place(mount_point, prof.scratch_fallback())
        assert (place, same_drive) == (cache, False)
        messages = []
        table = prof.load_or_profile(mount_point, threads=2, log=messages.append, scratch_bytes=16 * MIB,
                                     max_kib=64)
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
    assert "instead" in messages[0] and str(cache) in messages[0]
    assert table.meta["same_drive"] is False and table.meta["scratch_dir"] == str(cache)
    assert table.meta["drive"] != table.meta["profiled_for"]
    assert not list(cache.glob(".nchunk-profile-scratch-*"))
    with pytest.raises(OSError, match="no writable folder"):
        with _mounted_read_only(mount_point):
            prof.ScratchFile(mount_point, MIB)  # no fallback: a measurement of another drive is refused


class _mounted_read_only:
    def __init__(self, mount_point):
        self.mount_point = mount_point

    def __enter__(self):
        assert _mount("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(self.mount_point))

    def __exit__(self, *exc):
        subprocess.run(["umount", str(self.mount_point)], check=False)


def test_scratch_files_are_unique_and_removed_when_writing_is_interrupted(tmp_path):
    with prof.ScratchFile(tmp_path, MIB) as a, prof.ScratchFile(tmp_path, MIB) as b:
        assert a.path != b.path and a.path.parent == b.path.parent
        assert a.path.stat().st_size == b.path.stat().st_size == MIB
        assert tmp_path not in a.path.parents and a.same_drive
    assert not a.path.exists() and not b.path.exists()

    created = []

    def interrupt(fraction, message):
        created.extend(Path(tempfile.gettempdir()).glob(".nchunk-profile-scratch-*"))
        raise KeyboardInterrupt  # a signal while the node profiles at start-up

    with pytest.raises(KeyboardInterrupt):
        prof.ScratchFile(tmp_path, 32 * MIB, progress=interrupt)
    assert created and not any(p.exists() for p in created)

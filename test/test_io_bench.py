"""`nchunk bench io`'s measurement of the row checks: the same reads with and without them, paired."""
import numpy as np
import pytest

from nchunk_core.bench import backend_compare, io_bench
from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.reader import ChecksumError, Reader, io_uring_unavailable
from nchunk_core.store import Store, StoreWriter

FRAMES = 3


def small_store(path):
    rng = np.random.default_rng(0)
    with StoreWriter(path) as w:
        for name, (out, inp) in {"attn_in": (96, 64), "mlp_out": (64, 192)}.items():
            w.add_group(name, name, [("w", rng.standard_normal((out, inp)).astype(np.float16))])
    return Store.open(path)


def setup(store, reader):
    names = store.inputs()
    mats = {n: io_bench.Matrix(store, reader, n, LatencyTable.synthetic()) for n in names}
    rng = np.random.default_rng(1)
    test_v = {n: rng.random((FRAMES, mats[n].rows)).astype(np.float32) for n in names}
    perms = {n: rng.permutation(mats[n].rows) for n in names}
    return names, mats, test_v, perms


def test_verify_cost_pairs_reads_with_and_without_the_checks(tmp_path):
    store = small_store(tmp_path / "s")
    with Reader(threads=2) as reader:
        names, mats, test_v, perms = setup(store, reader)
        buf = reader.empty(max(g.nbytes for g in store.groups.values()))
        res = io_bench.verify_cost(reader, mats, names, test_v, perms, FRAMES, buf, progress=False)
    assert [p["sparsity"] for p in res["points"]] == io_bench.VERIFY_SPARSITIES
    for p in res["points"]:
        assert len(p["ratio_pairs"]) == FRAMES * len(names)
        assert p["io_ms_verified"] > 0 and p["io_ms_unverified"] > 0
    assert res["ratio"] > 0 and res["crc32c_gb_per_s"] > 0
    assert "verify_overhead" in io_bench.format_table({**_table_stub(), "verification": res})


def test_verify_cost_really_checks_the_verified_half(tmp_path):
    store = small_store(tmp_path / "s")
    g = store.groups["mlp_out"]
    data = np.fromfile(g.file, np.uint8)
    data[g.offset:g.offset + g.nbytes] ^= 0xFF  # every row damaged: any checked read fails
    data.tofile(g.file)
    with Reader(threads=2) as reader:
        names, mats, test_v, perms = setup(store, reader)
        buf = reader.empty(max(g.nbytes for g in store.groups.values()))
        with pytest.raises(ChecksumError, match="group 'mlp_out'"):
            io_bench.verify_cost(reader, mats, names, test_v, perms, FRAMES, buf, progress=False)


def _table_stub() -> dict:
    """The fields format_table reads besides `verification`, for a run with no sweep points."""
    return {"layers": 1, "frames": FRAMES, "machine": "test", "saturation_kib": 256, "peak_mb_per_s": 1000.0,
            "importance_cv": {"median": 1.0, "min": 1.0, "max": 1.0}, "points": [], "speedups": {},
            "mean_speedup_30_70_by_method": {}, "mean_speedup_30_70_vs_envelope": {},
            "mean_speedup_30_70": None, "max_speedup": None, "select_ms_p50": 1.0, "estimate_pearson_r": 1.0}


@pytest.mark.skipif(io_uring_unavailable() != "", reason="no io_uring in this process")
def test_backend_comparison_pairs_the_same_reads_through_both_backends(tmp_path):
    store = small_store(tmp_path / "s")
    with Reader(threads=2) as reader:
        names, mats, test_v, perms = setup(store, reader)
        buf = reader.empty(max(g.nbytes for g in store.groups.values()))
        res = backend_compare.selection_reads(2, mats, names, test_v, perms, FRAMES, buf, progress=False)
    assert res["available"] and [p["sparsity"] for p in res["points"]] == backend_compare.SPARSITIES
    for p in res["points"]:
        assert len(p["ratio_pairs"]) == FRAMES * len(names)
        assert p["io_ms_threads"] > 0 and p["io_ms_io_uring"] > 0
    assert res["io_uring_vs_threads"] > 0
    assert "io_uring_vs_threads" in io_bench.format_table({**_table_stub(), "verification": _verification_stub(),
                                                           "backends": res})
    backend_compare.plot(res, tmp_path / "backends.png")
    assert (tmp_path / "backends.png").stat().st_size > 0


def test_backend_comparison_without_a_ring_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("NCHUNK_IO_URING", "off")
    res = backend_compare.selection_reads(2, {}, [], {}, {}, FRAMES, None, progress=False)
    assert not res["available"] and res["io_uring_vs_threads"] is None
    assert "NCHUNK_IO_URING=off" in backend_compare.format_lines(res)[0]


def _verification_stub() -> dict:
    return {"crc32c": "table", "crc32c_gb_per_s": 1.0, "label": "x", "points": [], "ratio": 1.0}

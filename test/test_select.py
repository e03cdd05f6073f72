"""Tests of row selection (nchunk_core.runtime.select): native kernels against the NumPy reference
(nchunk_core.testing.select_reference), the invariants every selection keeps, the latency estimator, exactness of the dynamic program, edge
cases and errors."""
import itertools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from nchunk_core import _native
from nchunk_core.io.latency import LatencyTable
from nchunk_core.runtime.select import (METHODS, ChunkParams, Selection, WindowRows, default_params,
                                optimal_runs, select)
from nchunk_core.testing.select_reference import select_reference

TABLE = LatencyTable.synthetic(setup_s=80e-6, peak_bytes_per_s=1e9, max_kib=64)


def bumpy_table():
    """A non-affine, non-decreasing table like a measured one."""
    rng = np.random.default_rng(3)
    lat = 60e-6 + np.arange(1, 129) * 1024 / 1.5e9 + np.cumsum(rng.uniform(0, 2e-6, 128))
    return LatencyTable(latency_s=lat, step_bytes=1024)


def random_case(rng):
    rows = int(rng.integers(1, 300))
    v = rng.lognormal(0.0, 1.5, rows).astype(np.float32)
    kind = rng.integers(4)
    if kind == 1:
        v[rng.random(rows) < 0.5] = 0.0  # many zeros
    elif kind == 2:
        v = np.round(v).astype(np.float32)  # many ties
    elif kind == 3:
        v = np.sort(v)[::-1].copy()  # hot rows first, as after hot-cold reordering
    row_bytes = int(rng.choice([1024, 3000, 7168, 20000, 75776]))
    params = ChunkParams(start_kib=float(rng.choice([1, 4, 8, 16])),
                         step_kib=float(rng.choice([1, 4, 8])),
                         jump_cap_kib=float(rng.choice([2, 8, 32])))
    return v, int(rng.integers(0, rows + 1)), row_bytes, params


def check_runs(sel: Selection, v: np.ndarray, budget: int, method: str):
    runs = sel.runs
    assert runs.dtype == np.int64 and runs.ndim == 2 and runs.shape[1] == 2
    expected = v.size if method == "dense" else budget
    assert sel.rows == expected == int(runs[:, 1].sum())
    if len(runs):
        starts, lengths = runs[:, 0], runs[:, 1]
        assert np.all(lengths >= 1) and starts[0] >= 0 and starts[-1] + lengths[-1] <= v.size
        # sorted, non-overlapping and maximal: a gap of at least one row between runs
        assert np.all(starts[1:] > starts[:-1] + lengths[:-1])
    rows = sel.row_indices()
    assert rows.dtype == np.int64 and rows.size == expected and np.all(np.diff(rows) > 0)
    total = float(v.sum(dtype=np.float64))
    kept = float(v[rows].sum(dtype=np.float64))
    assert sel.retained == pytest.approx(kept / total if total > 0 else 1.0, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_native_matches_numpy_reference(method):
    rng = np.random.default_rng(sum(map(ord, method)))
    for table in (TABLE, bumpy_table()):
        for _ in range(40 if method != "dp" else 25):
            v, budget, row_bytes, params = random_case(rng)
            native = select(v, budget, method, table, row_bytes, params)
            ref = select_reference(v, budget, method, table, row_bytes, params)
            np.testing.assert_array_equal(native.runs, ref.runs)
            assert native.est_latency_s == pytest.approx(ref.est_latency_s, rel=1e-12)
            assert native.retained == pytest.approx(ref.retained, rel=1e-12, abs=1e-15)
            check_runs(native, v, budget, method)


@pytest.mark.parametrize("method", METHODS)
def test_invariants_on_larger_inputs(method):
    rng = np.random.default_rng(1)
    for rows, row_bytes in ((3584, 9216), (18944, 7168), (3584, 75776)):
        v = rng.lognormal(0.0, 2.0, rows).astype(np.float32)
        for budget in (0, 1, rows // 7, rows // 2, rows - 1, rows):
            sel = select(v, budget, method, TABLE, row_bytes)
            check_runs(sel, v, budget, method)
            assert sel.est_latency_s == pytest.approx(
                TABLE.estimate_runs(sel.runs[:, 1], row_bytes), rel=1e-12)
            assert sel.select_s > 0


def test_estimator_matches_latency_table():
    rng = np.random.default_rng(2)
    for table in (TABLE, bumpy_table(), LatencyTable(latency_s=np.array([5e-5]), step_bytes=4096)):
        sizes = np.concatenate([
            [-5.0, 0.0, 1.0, 512.0, table.step_bytes, table.max_bytes, table.max_bytes + 1.0],
            np.arange(1, 4 * table.max_bytes // table.step_bytes) * float(table.step_bytes),
            rng.uniform(0, 3 * table.max_bytes, 500),
            rng.integers(1, 40, 200) * 7168.0,
        ])
        native = _native.estimate(table.latency_s, table.step_bytes, sizes)
        np.testing.assert_allclose(native, table.estimate(sizes), rtol=1e-14, atol=0)


def test_selection_latency_is_sum_over_maximal_runs():
    v = np.zeros(100, dtype=np.float32)
    v[[10, 11, 12, 50, 90, 91]] = [3, 3, 3, 2, 1, 1]
    sel = select(v, 6, "magnitude", TABLE, 7168)
    np.testing.assert_array_equal(sel.runs, [[10, 3], [50, 1], [90, 2]])
    expected = TABLE.estimate(np.array([3, 1, 2]) * 7168.0).sum()
    assert sel.est_latency_s == pytest.approx(expected, rel=1e-14)
    assert sel.n_runs == 3 and sel.mean_run_rows == 2.0
    np.testing.assert_array_equal(sel.row_indices(), [10, 11, 12, 50, 90, 91])


def test_chunking_takes_a_hot_block_whole():
    v = np.full(64, 0.01, dtype=np.float32)
    v[20:30] = 1.0
    params = ChunkParams(start_kib=1, step_kib=1, jump_cap_kib=1)  # every size at every row
    sel = select(v, 10, "chunking", TABLE, 1024, params)
    np.testing.assert_array_equal(sel.runs, [[20, 10]])
    mag = select(v, 10, "magnitude", TABLE, 1024)
    np.testing.assert_array_equal(mag.runs, [[20, 10]])


def test_chunking_fills_with_single_rows_when_no_window_fits():
    v = np.arange(40, dtype=np.float32)
    params = ChunkParams(start_kib=8, step_kib=8, jump_cap_kib=8)  # windows of >= 8 rows of 1 KiB
    sel = select(v, 11, "chunking", TABLE, 1024, params)  # one window of 8, then 3 single rows
    assert sel.rows == 11 and int(sel.runs[:, 1].sum()) == 11
    np.testing.assert_array_equal(sel.runs, [[29, 11]])  # best window 32..39, then rows 31, 30, 29


def test_chunking_reaches_the_tail():
    v = np.zeros(50, dtype=np.float32)
    v[-3:] = 1.0  # the last rows are not on the stride grid of 4-row windows
    params = ChunkParams(start_kib=4, step_kib=4, max_kib=4, jump_cap_kib=4)
    sel = select(v, 4, "chunking", TABLE, 1024, params)
    np.testing.assert_array_equal(sel.runs, [[46, 4]])


def test_dp_program_is_exact_against_brute_force():
    rng = np.random.default_rng(4)
    small_table = LatencyTable.synthetic(setup_s=80e-6, peak_bytes_per_s=1e9, max_kib=4)
    for trial in range(15):
        rows = int(rng.integers(1, 11))
        v = rng.lognormal(0.0, 1.0, rows).astype(np.float32)
        row_bytes = int(rng.choice([1024, 3072]))  # 4 or 2 rows fill the table: long runs occur
        lam = float(rng.uniform(0.2, 5.0)) * float(v.mean()) / 1e-4
        runs = optimal_runs(v, lam, small_table, row_bytes)

        def value(mask):
            edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
            lengths = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
            return float(v[mask].sum(dtype=np.float64)) - lam * small_table.estimate_runs(
                lengths, row_bytes)

        best = max(value(np.array(bits, dtype=bool))
                   for bits in itertools.product((0, 1), repeat=rows))
        mask = np.zeros(rows, dtype=bool)
        for s, n in runs:
            mask[s:s + n] = True
        assert value(mask) == pytest.approx(best, rel=1e-9, abs=1e-9), trial


def test_dp_is_not_dominated_by_chunking():
    rng = np.random.default_rng(6)
    v = np.sort(rng.lognormal(0.0, 1.5, 3584).astype(np.float32))[::-1].copy()
    v *= rng.lognormal(0.0, 0.5, v.size).astype(np.float32)
    for budget in (300, 1200, 2400):
        chunk = select(v, budget, "chunking", TABLE, 9216)
        dp = select(v, budget, "dp", TABLE, 9216)
        assert not (chunk.est_latency_s <= dp.est_latency_s and chunk.retained > dp.retained)


def test_threads_get_the_same_selections():
    rng = np.random.default_rng(8)
    jobs = [(rng.lognormal(0.0, 2.0, 4000).astype(np.float32), int(rng.integers(0, 4000)), method)
            for method in ("chunking", "dp", "magnitude") for _ in range(8)]
    serial = [select(v, r, m, TABLE, 7168).runs for v, r, m in jobs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda job: select(*job, TABLE, 7168).runs, jobs))
    for a, b in zip(serial, threaded):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("impl", (select, select_reference), ids=("native", "reference"))
def test_edge_cases(method, impl):
    v = np.array([0.5, 2.0, 2.0, 0.0, 1.0, 3.0], dtype=np.float32)
    sel = impl(v, 0, method, TABLE, 7168)
    assert (sel.runs.shape == (0, 2) and sel.est_latency_s == 0.0) or method == "dense"
    sel = impl(v, 6, method, TABLE, 7168)
    np.testing.assert_array_equal(sel.runs, [[0, 6]])
    # all-zero importance: still exactly R rows, nothing to lose
    zeros = np.zeros(20, dtype=np.float32)
    sel = impl(zeros, 7, method, TABLE, 7168)
    check_runs(sel, zeros, 7, method)
    assert sel.retained == 1.0
    # no rows at all
    sel = impl(np.zeros(0, dtype=np.float32), 0, method, TABLE, 7168)
    assert sel.runs.shape == (0, 2) and sel.rows == 0
    # deterministic
    a = impl(v, 3, method, TABLE, 7168)
    b = impl(v, 3, method, TABLE, 7168)
    np.testing.assert_array_equal(a.runs, b.runs)


def test_fewer_rows_than_the_smallest_window_selects_by_magnitude():
    v = np.array([1.0, 5.0, 2.0], dtype=np.float32)
    params = ChunkParams(start_kib=64, step_kib=8, jump_cap_kib=64)
    sel = select(v, 2, "chunking", TABLE, 1024, params)
    np.testing.assert_array_equal(sel.runs, [[1, 2]])


def test_ties_break_towards_lower_rows():
    v = np.ones(10, dtype=np.float32)
    np.testing.assert_array_equal(select(v, 3, "magnitude", TABLE, 7168).runs, [[0, 3]])


def test_window_conversion_to_rows():
    table = LatencyTable.synthetic(max_kib=256)
    w = ChunkParams(start_kib=8, step_kib=4, jump_cap_kib=32).for_matrix(7168, 18944, table)
    assert w == WindowRows(r_min=1, r_max=37, r_step=1, jump_cap=5)  # 256 KiB / 7 KiB = 36.6
    w = ChunkParams(start_kib=8, step_kib=8, jump_cap_kib=64).for_matrix(75776, 3584, table)
    assert w == WindowRows(r_min=1, r_max=3, r_step=1, jump_cap=1)
    w = ChunkParams(start_kib=16, step_kib=8, max_kib=64, jump_cap_kib=32).for_matrix(
        1024, 40, table)
    assert w == WindowRows(r_min=16, r_max=40, r_step=8, jump_cap=32)  # clipped to the rows
    for row_bytes, rows in ((7168, 18944), (9216, 3584), (75776, 3584), (512, 10)):
        assert isinstance(default_params(row_bytes, rows), ChunkParams)
    # rows below 6 KiB (models smaller than 7B): windows of exactly 2 rows, 3 on matrices of few rows
    assert default_params(1792, 4864).for_matrix(1792, 4864, table) == WindowRows(2, 2, 2, 2)
    assert default_params(512, 128).for_matrix(512, 128, table) == WindowRows(3, 3, 3, 3)
    assert default_params(3072, 128).for_matrix(3072, 128, table) == WindowRows(3, 3, 3, 3)
    assert default_params(7168, 18944) == ChunkParams(32.0, 32.0, None, 32.0)  # the 7B sweep's choice


@pytest.mark.parametrize("bad", [
    np.array([1.0, np.nan], dtype=np.float32),
    np.array([1.0, -0.5], dtype=np.float32),
    np.array([np.inf, 1.0], dtype=np.float32),
])
@pytest.mark.parametrize("impl", (select, select_reference), ids=("native", "reference"))
def test_bad_importance_is_rejected(bad, impl):
    with pytest.raises(ValueError, match="importance"):
        impl(bad, 1, "chunking", TABLE, 7168)


def test_bad_arguments_are_rejected():
    v = np.ones(8, dtype=np.float32)
    cases = [
        (dict(importance=np.ones((2, 4), dtype=np.float32)), "1-D"),
        (dict(budget_rows=9), "budget_rows"),
        (dict(budget_rows=-1), "budget_rows"),
        (dict(budget_rows=2.5), "budget_rows"),
        (dict(method="topk"), "method"),
        (dict(row_bytes=0), "row_bytes"),
        (dict(row_bytes=7168.0), "row_bytes"),
    ]
    for change, match in cases:
        args = dict(importance=v, budget_rows=2, method="chunking", table=TABLE, row_bytes=7168)
        args.update(change)
        with pytest.raises(ValueError, match=match):
            select(**args)
    for kwargs in (dict(start_kib=0), dict(step_kib=-1), dict(jump_cap_kib=math.nan),
                   dict(start_kib=64, max_kib=32), dict(start_kib="8")):
        with pytest.raises(ValueError, match="ChunkParams"):
            ChunkParams(**kwargs)


def test_selection_settings_are_one_validated_value():
    from nchunk_core.runtime.select import SelectionSettings

    assert SelectionSettings.from_kib(0.5, "chunking") == SelectionSettings(0.5, "chunking", None)
    got = SelectionSettings.from_kib(0.5, "chunking", start_kib=8.0, max_kib=256.0)
    assert got.windows == ChunkParams(start_kib=8.0, step_kib=ChunkParams.step_kib, max_kib=256.0,
                                      jump_cap_kib=ChunkParams.jump_cap_kib)
    with pytest.raises(ValueError, match=r"chunk_max_kib \(16\) is below the smallest window \(32 KiB\)"):
        SelectionSettings.from_kib(0.5, "chunking", max_kib=16.0)
    with pytest.raises(ValueError, match="chunk_step_kib must be a number >= 0"):
        SelectionSettings.from_kib(0.5, "chunking", step_kib=-1.0)
    with pytest.raises(ValueError, match="method must be one of dense, magnitude, chunking, dp"):
        SelectionSettings.from_kib(0.5, "topk")
    assert SelectionSettings(0.25).budget(8) == 6 and SelectionSettings(0.9, "dense").budget(8) == 8

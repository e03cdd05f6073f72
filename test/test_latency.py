"""The cost estimator: Σ T over runs, interpolation inside the table, linear scaling beyond it."""
import numpy as np
import pytest

from nchunk_core.io.latency import LatencyTable


def table():
    return LatencyTable(latency_s=np.array([10.0, 12.0, 16.0, 20.0]) * 1e-6, step_bytes=1024)


def test_grid_points_and_interpolation():
    t = table()
    assert t.estimate(1024) == pytest.approx(10e-6)
    assert t.estimate(4096) == pytest.approx(20e-6)
    assert t.estimate(1536) == pytest.approx(11e-6)  # halfway between 1 and 2 KiB
    assert t.estimate(3 * 1024 + 256) == pytest.approx(17e-6)


def test_below_one_step_and_zero():
    t = table()
    assert t.estimate(100) == pytest.approx(10e-6)
    assert t.estimate(0) == 0.0


def test_beyond_table_scales_with_size():
    t = table()
    assert t.estimate(8192) == pytest.approx(40e-6)
    assert t.peak_bytes_per_s == pytest.approx(4096 / 20e-6)
    assert t.saturation_bytes == 4096


def test_estimate_runs_sums_runs():
    t = table()
    # runs of 1, 2 and 8 rows of 512 B: 512 B, 1 KiB, 4 KiB
    assert t.estimate_runs([1, 2, 8], 512) == pytest.approx((10 + 10 + 20) * 1e-6)
    np.testing.assert_allclose(t.estimate([[1024, 2048], [0, 4096]]), [[10e-6, 12e-6], [0, 20e-6]])


def test_json_round_trip(tmp_path):
    t = table()
    t.meta["drive"] = "x"
    t.save(tmp_path / "t.json")
    u = LatencyTable.load(tmp_path / "t.json")
    np.testing.assert_array_equal(u.latency_s, t.latency_s)
    assert (u.step_bytes, u.peak_bytes_per_s, u.saturation_bytes, u.meta) == (1024, t.peak_bytes_per_s, 4096, {"drive": "x"})


@pytest.mark.parametrize("bad", [[], [1.0, -1.0], [np.nan], [[1.0]]])
def test_invalid_tables_rejected(bad):
    with pytest.raises(ValueError):
        LatencyTable(latency_s=np.array(bad, dtype=float))


def test_from_json_reports_missing_keys():
    with pytest.raises(ValueError, match="not a latency table"):
        LatencyTable.from_json({"latency_s": [1.0]})

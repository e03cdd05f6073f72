"""`nchunk bench calibration` (nchunk_core/bench/calibration_bench.py): the order metrics, and one
small pass on the built-in model's real store."""
import json

import numpy as np
import pytest

from nchunk_core.bench import calibration_bench as cb
from nchunk_core.io.latency import LatencyTable


def test_order_metrics():
    order = np.arange(100)
    assert cb.top_overlap(order, order, 0.3) == 1.0 and cb.spearman(order, order) == pytest.approx(1.0)
    reverse = order[::-1].copy()
    assert cb.top_overlap(reverse, order, 0.3) == 0.0 and cb.spearman(reverse, order) == pytest.approx(-1.0)
    swapped = order.copy()
    swapped[[29, 30]] = swapped[[30, 29]]  # one row leaves the top 30, another enters
    assert cb.top_overlap(swapped, order, 0.3) == pytest.approx(29 / 30)


def test_a_hot_first_order_keeps_more_than_a_scattered_one():
    rng = np.random.default_rng(0)
    hot = rng.permutation(512)[:64]  # scattered hot channels
    frames = rng.random((4, 512)).astype(np.float32) * 0.1
    frames[:, hot] += 1.0
    table = LatencyTable.synthetic()
    hot_first = np.concatenate([hot, np.setdiff1d(np.arange(512), hot)])
    kept_hot = cb.retained(hot_first, frames, 0.9, table, row_bytes=1024)  # 51 rows: fewer than the hot 64
    kept_plain = cb.retained(np.arange(512), frames, 0.9, table, row_bytes=1024)
    assert kept_hot > kept_plain + 0.2


def test_the_benchmark_on_the_built_in_model(tmp_path, capsys):
    from nchunk_core import cli

    assert cli.main(["bench", "calibration", "--snapshots", "2,4", "--held-out", "2", "--size", "160x120",
                     "--out", str(tmp_path), "--json"]) == 0
    (res,) = json.loads(capsys.readouterr().out)
    assert res["arch"] == "smolvlm" and res["snapshots"] == [2, 4] and res["inputs"] > 0
    summary = res["summary"]
    assert set(summary) == {"2", "4", cb.IDENTITY}
    reference = summary["4"]
    for key in ("top30", "top50", "spearman", "retained30_ratio", "retained50_ratio"):
        assert reference[key]["min"] == pytest.approx(1.0)  # the reference against itself
    # two frames already order the rows far more like four than the checkpoint's order does
    assert summary["2"]["spearman"]["mean"] > summary[cb.IDENTITY]["spearman"]["mean"] + 0.3
    assert 0.0 < reference["retained50"]["mean"] < reference["retained30"]["mean"] <= 1.0
    assert len(res["per_input"]) == res["inputs"] and res["calibration_s"]["4"] > res["calibration_s"]["2"] > 0
    assert (tmp_path / "bench_calibration.png").stat().st_size > 0
    assert json.loads((tmp_path / "bench_calibration.json").read_text())[0]["summary"] == summary

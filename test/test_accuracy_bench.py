"""`nchunk bench accuracy`: matched-accuracy speedups, and a short run on the built-in model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nchunk_core.bench import accuracy_bench
from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.profile import cache_path
from nchunk_core.demo.model import shipped_store

ROOT = Path(__file__).resolve().parents[1]


def point(method, sparsity, accuracy, io_ms):
    return {"method": method, "sparsity": sparsity, "accuracy": accuracy, "io_ms": io_ms}


def test_matched_speedup_interpolates_along_magnitudes_curve_or_front():
    points = [point("dense", 0.0, 0.90, 10.0),
              point("magnitude", 0.3, 0.88, 30.0),  # slower than dense and less accurate: off the front
              point("magnitude", 0.5, 0.80, 8.0),
              point("magnitude", 0.7, 0.60, 6.0),
              point("chunking", 0.1, 0.85, 5.0),
              point("chunking", 0.3, 0.90, 5.0),  # matches dense accuracy: 10 ms / 5 ms
              point("chunking", 0.5, 0.70, 2.0),  # halfway between 6 ms (0.60) and 8 ms (0.80): 7 / 2
              point("chunking", 0.7, 0.50, 1.0)]  # below magnitude's range: no matched point
    front = accuracy_bench.pareto([p for p in points if p["method"] in ("dense", "magnitude")])
    assert [p["sparsity"] for p in front] == [0.7, 0.5, 0.0]
    # Paper protocol: 0.85 lies between magnitude 0.5 (0.80, 8 ms) and 0.3 (0.88, 30 ms): 21.75 ms.
    assert accuracy_bench.matched_speedups(points) == pytest.approx({0.1: 4.35, 0.3: 2.0, 0.5: 3.5})
    # Against the front, 0.85 lies between 0.80 (8 ms) and dense (0.90, 10 ms): 9 ms.
    assert accuracy_bench.matched_speedups(points, front=True) == pytest.approx({0.1: 1.8, 0.3: 2.0, 0.5: 3.5})


def test_bench_accuracy_runs_on_the_built_in_model(tmp_path, monkeypatch):
    monkeypatch.setenv("NCHUNK_CACHE_DIR", str(tmp_path / "cache"))
    LatencyTable.synthetic().save(cache_path(shipped_store(), 2))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "nchunk_ros.cli", "bench", "accuracy", "--scenes", "4",
                           "--threads", "2", "--allocations", "layerwise", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    res = json.loads(done.stdout)
    assert res["test_scenes"] == 4 and res["test_questions"] >= 12
    assert 0.0 <= res["dense_accuracy"] <= 1.0
    assert "mean_speedup_matched_accuracy" in res and "mean_speedup_matched_accuracy_vs_front" in res
    methods = {(p["method"], p["sparsity"]) for p in res["points"]}
    assert methods == set(accuracy_bench.settings())
    by = {(p["method"], p["sparsity"]): p for p in res["points"]}
    # Sparsity reads fewer bytes per frame; dense reads every row of every group.
    assert by[("chunking", 0.7)]["kib"] < by[("chunking", 0.3)]["kib"] < by[("dense", 0.0)]["kib"]
    assert by[("dense", 0.0)]["retained"] == pytest.approx(1.0)
    assert (out / "bench_accuracy.png").stat().st_size > 10_000
    assert json.loads((out / "bench_accuracy.json").read_text())["dense_accuracy"] == res["dense_accuracy"]
    # the shipped store has an allocation: both allocations, the ratios, and the budget mode
    assert res["allocation"] == "layerwise"
    assert {p["allocation"] for p in res["points"] if p["method"] != "dense"} == {"layerwise"}
    for key in ("chunking_accuracy_ratio_at_30", "chunking_accuracy_ratio_at_50"):
        assert 0.0 <= res[key] <= 1.0 / max(res["dense_accuracy"], 1e-9)
    budgets = res["budget_points"]
    assert len(budgets) == 3 and 0.0 <= res["budget_hit_rate"] <= 1.0
    assert all(0.0 <= p["sparsity_chosen"] <= 0.9 and p["frames"] == 3 for p in budgets)
    assert 0.0 < res["chance_accuracy"] < 1.0
    # the row cache: every row selected (dense), the same answers; at 50 % fewer bytes from the drive
    cache = {p["method"]: p for p in res["cache_points"]}
    assert cache["dense"]["answers_agree"] == 1.0 and cache["dense"]["accuracy"] == res["dense_accuracy"]
    assert cache["dense"]["cached_kib"] > 0 and cache["dense"]["kib"] < cache["dense"]["kib_without_cache"]
    assert cache["chunking"]["sparsity"] == 0.5 and cache["chunking"]["kib"] < cache["chunking"]["kib_without_cache"]

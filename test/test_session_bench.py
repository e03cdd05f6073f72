"""`nchunk bench session`: every row's child code path on a tiny Qwen2.5-VL, and the report's ratios.

The benchmark's own model takes minutes to build and each of its rows runs in a fresh process; here
the same child code (session_bench.child_main, with the specs run() builds) runs in this process on
the tiny checkpoint and its store, two frames per row.
"""
import json

import pytest

from nchunk_core.bench import session_bench, session_report
from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.profile import cache_path
from nchunk_core.runtime.config import SessionConfig
from nchunk_core.runtime.select import CACHE_POLICIES

THREADS = 2
FRAMES = 2
SPARSITY = 0.5
FRAME_FIELDS = ("total_s", "vision_s", "select_s", "io_s", "compute_s", "bytes_read", "est_io_s", "retained",
                "tokens", "visual_tokens")
FLASH_FIELDS = ("io_wait_s", "cached_bytes", "prefetch_hit_bytes", "prefetch_wasted_bytes")


@pytest.fixture(scope="module")
def bench_inputs(tiny_checkpoints, tiny_stores, tmp_path_factory):
    """(checkpoint, store, work folder) with a synthetic drive profile cached for the store."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NCHUNK_CACHE_DIR", str(tmp_path_factory.mktemp("nchunk-cache")))
    store = tiny_stores["qwen2_5_vl"]
    LatencyTable.synthetic().save(cache_path(store, THREADS))
    yield tiny_checkpoints["qwen2_5_vl"], store, tmp_path_factory.mktemp("bench-session")
    mp.undo()


def variants():
    """Every row the benchmark runs with all its methods: (label, method, sparsity, extras)."""
    return session_bench._variants(session_bench.METHODS, SPARSITY, ())


@pytest.fixture(scope="module")
def results(bench_inputs):
    """label -> run entry as run() keeps it, with one round from child_main."""
    model, store, work = bench_inputs
    store_bytes = sum(f.stat().st_size for f in store.glob("weights-*.bin"))
    runs = {}
    for label, method, sparsity, extra in variants():
        entry = {"label": label, "method": method, "sparsity": sparsity, "rounds": [], **extra}
        spec = session_bench.child_spec(entry, store, model, FRAMES, THREADS, work, store_bytes)
        entry["rounds"].append(session_bench.child_main(spec))
        runs[label] = entry
    return runs


def test_every_method_has_a_row():
    labels = [v[0] for v in variants()]
    methods = {v[1] for v in variants()}
    assert methods == {"floor", "in_ram", "dense", "magnitude", "chunking", "dp", "accelerate"}
    for label in ("chunking 50%", "chunking 50% + overlap", "chunking 50% + cache", "chunking 50% in RAM",
                  "chunking 60% + cache", "chunking 50% + cache (frame)", "chunking 45% + cache (frame)"):
        assert label in labels
    assert CACHE_POLICIES[0] == SessionConfig().cache_policy  # the "+ cache" row is the runtime's default


@pytest.mark.parametrize("label", [v[0] for v in variants()])
def test_child_runs_every_row(results, label):
    result = results[label]["rounds"][0]
    assert "error" not in result
    assert result["peak_rss_mib"] > 0 and result["steady_rss_mib"] > 0
    if label == "floor":
        assert result["frames"] == []
        return
    frames = result["frames"]
    assert len(frames) == FRAMES
    flash = results[label]["method"] in session_report.FLASH_METHODS
    for f in frames:
        for key in FRAME_FIELDS + (FLASH_FIELDS if flash else ()):
            assert key in f, key
        assert f["total_s"] > 0 and f["visual_tokens"] > 0 and f["tokens"] >= f["visual_tokens"]
        assert 0.0 < f["retained"] <= 1.0 + 1e-6
    entry = results[label]
    if results[label]["method"] == "accelerate":
        assert frames[0]["bytes_read"] > 0  # every decoder layer streamed from the offload folder
    if flash and entry.get("cache"):
        assert all(f["cached_bytes"] > 0 for f in frames)
    if label.endswith("in RAM"):  # every selected row is cached: nothing is read
        assert all(f["bytes_read"] == 0 for f in frames)
    if label == "dense":
        assert all(f["retained"] == pytest.approx(1.0) and f["cached_bytes"] == 0 for f in frames)


def test_report_ratios_compute_from_the_results(results):
    rows = session_bench.collect(json.loads(json.dumps(results)))  # as the children's JSON comes back
    res = session_report.ratios(rows, SPARSITY)
    for key in ("best_frame_ratio_vs_in_ram", "best_peak_rss_ratio_vs_in_ram", "accelerate_ratio",
                "cache_bytes_reduction_same_sparsity"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert isinstance(res["exposed_io_fraction"], float) and res["exposed_io_fraction"] >= 0  # 0: all hidden
    assert res["best_flash_row"] in results and res["cache_policy"] == CACHE_POLICIES[0]
    # at the same sparsity the cached rows are free, so the cache row reads fewer bytes
    assert res["cache_bytes_reduction_same_sparsity"] > 1.0
    by = {r["label"]: r for r in rows}
    assert by["chunking 50% + cache"]["summary"]["cache_hit_rate"] > 0
    assert by["chunking 50%"]["summary"]["cache_hit_rate"] == 0
    table = session_report.format_table({**res, "machine": "test", "model": session_bench.model_settings(2),
                                         "backbone_bytes_on_drive": 1, "rounds": 1, "frames": FRAMES,
                                         "drive": {"peak_mb_per_s": 1.0, "saturation_kib": 1}, "runs": rows})
    assert "chunking 50% + cache (frame)" in table and "cache_bytes_reduction" in table


def _row(label, sparsity, retained, bytes_read, wasted=0.0, policy="static"):
    return {"label": label, "method": "chunking", "sparsity": sparsity, "cache_policy": policy, "peak_rss_mib": 1.0,
            "summary": {"retained": retained, "bytes_read": bytes_read, "prefetch_wasted_bytes": wasted,
                        "total_s": 1.0, "io_s": 0.5}}


def test_cache_bytes_reduction_is_taken_at_the_same_retained_importance():
    plain = {**_row("chunking 50%", 0.5, 0.65, 400.0), "cache_policy": None}
    curve = [_row("chunking 50% + cache", 0.5, 0.70, 200.0, 50.0), _row("chunking 60% + cache", 0.6, 0.60, 100.0),
             _row("chunking 70% + cache", 0.7, 0.50, 40.0)]
    rows = {r["label"]: r for r in [plain] + curve}
    m = session_report.matched_cache_bytes(session_report.cache_curve(rows, "static"), 0.65)
    # halfway between the 60 % (0.60, 100 B) and the 50 % row (0.70, 200 B)
    assert m["bytes_read"] == pytest.approx(150.0) and m["sparsity"] == pytest.approx(0.55)
    assert m["drive_bytes"] == pytest.approx(175.0)
    assert session_report.matched_cache_bytes(session_report.cache_curve(rows, "static"), 0.8) is None
    res = session_report.ratios([plain] + curve, 0.5)
    assert res["cache_bytes_reduction"] == pytest.approx(400.0 / 150.0)
    assert res["cache_matched"]["static"]["reduction_drive"] == pytest.approx(400.0 / 175.0)
    assert res["cache_bytes_reduction_same_sparsity"] == pytest.approx(2.0)

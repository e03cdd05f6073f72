"""`nchunk bench published` on the tiny published layouts: the result's structure, the visual tokens
per frame as the real processors make them, both ends of the allocation step (run, or stopped
after its first input and estimated), the report, and the scaling of a shallower replica."""
import copy
import json

import pytest

from nchunk_core.bench import published_bench, published_report
from nchunk_core.io.latency import LatencyTable
from nchunk_core.store.allocation import FILE as ALLOCATION_FILE
from test_published import VISUAL_TOKENS

SPARSITIES = [0.0, 0.1]
STEPS = ("write_s", "calibration_default_s", "reorder_s", "sensitivity_s")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """layout -> (result, work folder): idefics3 with its allocation run to the end and one frame per
    sparsity after the warm-up, llava_onevision with it stopped after the first input (limit 0 s)
    and the warm-up frame alone."""
    work = tmp_path_factory.mktemp("bench-published")
    out = {}
    for layout, limit, frames in (("idefics3", 1e9, 1), ("llava_onevision", 0.0, 0)):
        out[layout] = published_bench.run_layout(
            layout, work, dimensions="tiny", calib_frames=2, allocation_frames=1, frames=frames,
            sparsities=SPARSITIES, sensitivity_limit_s=limit, log=lambda m: None, table=LatencyTable.synthetic()), work
    return out


@pytest.mark.parametrize("layout", ["idefics3", "llava_onevision"])
def test_every_mode_and_sparsity_has_the_processors_tokens(results, layout):
    res, _ = results[layout]
    modes = published_bench.adapter_modes(layout)
    warmup_only = layout == "llava_onevision"
    sparsities = SPARSITIES[:1] if warmup_only else SPARSITIES
    assert [(r["mode"], r["sparsity"]) for r in res["frames"]] == [(m, s) for m in modes for s in sparsities]
    for row in res["frames"]:
        assert row["visual_tokens"] == VISUAL_TOKENS[layout, row["mode"]]
        assert row["frame_mode"] == row["mode"] and row["frames"] == 1 == len(row["total_s_all"])
        assert 0 < row["vision_s"] < row["total_s"] and row["warmup_s"] > 0
        assert row["warmup_only"] is warmup_only
        if warmup_only:
            assert row["total_s"] == row["warmup_s"]
    if not warmup_only:
        dense, sparse = res["frames"][0], res["frames"][1]
        assert sparse["bytes_read"] < dense["bytes_read"]  # the sparsity was in force for its frames


def test_conversion_is_timed_step_by_step(results):
    for layout, (res, work) in results.items():
        conv = res["conversion"]
        assert conv["calib_frames"] == 2 and conv["allocation_frames"] == 1
        assert all(conv[k] >= 0 for k in STEPS)
        assert conv["total_s"] == pytest.approx(sum(conv[k] for k in STEPS), abs=0.2)
        assert conv["visual_tokens"] == VISUAL_TOKENS[layout, conv["frame_mode"]]
        # 2 of the default 16 frames: one forward per frame
        assert conv["calibration_estimated"] and conv["default_calib_frames"] == 16
        assert conv["calibration_default_s"] == pytest.approx(conv["calibration_s"] * 16 / 2, abs=0.1)
        assert res["text_layers"] == res["published_layers"] and res["extrapolated"] is None
        m = res["machine"]
        assert m["cpus"] >= 1 and len(m["start"]["load_average"]) == len(m["end"]["load_average"]) == 3


def test_the_allocation_runs_or_is_estimated_and_says_which(results):
    done, done_work = results["idefics3"]
    cut, cut_work = results["llava_onevision"]
    assert done["conversion"]["sensitivity_estimated"] is False
    assert (done_work / "idefics3-tiny-all.store" / ALLOCATION_FILE).is_file()
    assert cut["conversion"]["sensitivity_estimated"] is True
    assert cut["conversion"]["sensitivity_s"] >= cut["conversion"]["sensitivity_measured_s"]
    assert not (cut_work / "llava_onevision-tiny-all.store" / ALLOCATION_FILE).exists()


def test_a_replica_is_reused_while_its_settings_match(results):
    _, work = results["idefics3"]
    log = []
    path, build_s = published_bench.replica("idefics3", work, "tiny", None, log.append)
    assert build_s is None and path == work / "idefics3-tiny-all" and "reusing" in log[0]


def test_report_merges_the_layouts_and_plots(results, tmp_path):
    for res, _ in results.values():
        published_report.save_layout(res, tmp_path)
    run = {"start": published_bench.machine(), "end": published_bench.machine()}
    report = published_report.merged(tmp_path, run)
    assert list(report["layouts"]) == ["idefics3", "llava_onevision"]
    assert json.loads(json.dumps(report)) == report
    table = published_report.format_table(report)
    assert "tiles" in table and "2929" in table and "sensitivity estimated" in table
    png = published_report.plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000 and png.endswith("p.png")


def test_a_shallower_replica_is_scaled_and_marked(results):
    res = copy.deepcopy(results["idefics3"][0])
    res["text_layers"], res["published_layers"] = 1, 3  # as if 1 of 3 layers were built
    ext = published_bench.scale_to_published(res)
    for measured, scaled in zip(res["frames"], ext["frames"]):
        rest = measured["total_s"] - measured["vision_s"]
        assert scaled["total_s"] == pytest.approx(measured["vision_s"] + 3 * rest, abs=2e-3)
    assert ext["conversion"]["sensitivity_estimated"] is True
    assert ext["conversion"]["sensitivity_s"] > res["conversion"]["sensitivity_s"]
    res["extrapolated"] = ext
    assert "EXTRAPOLATED to 3 layers from 1" in published_report.format_layout(res)


def test_the_command_reports_the_saved_layouts(results, tmp_path, capsys):
    """`nchunk bench published --layouts ''` merges what --out holds: the command's own report path."""
    from nchunk_core import cli

    for res, _ in results.values():
        published_report.save_layout(res, tmp_path)
    assert cli.main(["bench", "published", "--layouts", "", "--out", str(tmp_path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed["layouts"]) == ["idefics3", "llava_onevision"]
    assert (tmp_path / published_report.MERGED).is_file() and (tmp_path / published_report.PLOT).is_file()

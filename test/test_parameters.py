"""The VQA node's parameters without a Node: the table, the check of a change, the YAML file."""
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed")

from rclpy.parameter import Parameter, parameter_dict_from_yaml_file  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from nchunk_core.runtime.select import ChunkParams, SelectionSettings  # noqa: E402
from nchunk_ros import parameters  # noqa: E402
from nchunk_ros.parameters import (DEFAULTS, PARAMETERS, RECOMMENDED_PARAMETERS, check_parameters,  # noqa: E402
                                   recommended_values, selection_from, store_directory)
from nchunk_ros.vqa_node import topic_type  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "vqa.yaml"


def test_check_parameters_reasons():
    def reason(running=True, **changes):
        result = check_parameters(changes, DEFAULTS, running)
        return "" if result.successful else result.reason

    assert reason(sparsity=0.3, method="magnitude", image_topics=["/a", "/b/compressed"]) == ""
    assert reason(reader_threads=2, device="cpu", dtype="bfloat16", max_frames=3) == ""  # all apply at run time
    assert "store /elsewhere does not exist" in reason(store_path="/elsewhere")
    assert "not an nchunk store: no manifest.json" in reason(store_path=str(ROOT))
    assert reason(store_path="") == ""  # empty: the built-in store
    assert reason(running=False, store_path="/elsewhere") == ""  # at start-up, opening the store reports it
    assert "method must be one of" in reason(method="topk")
    assert "qos_reliability must be" in reason(qos_reliability="sometimes")
    assert "device must be" in reason(running=False, device="tpu")
    assert "dtype must be" in reason(running=False, dtype="int8")
    assert "image_topics is empty" in reason(image_topics=[])
    assert "not a valid topic name" in reason(image_topics=["/cam/1bad name"])
    assert "twice" in reason(image_topics=["/a", "/a"])
    assert "chunk_max_kib (16) is below the smallest window (32 KiB)" in reason(chunk_max_kib=16.0)
    assert "below the smallest window (64 KiB)" in reason(chunk_start_kib=64.0, chunk_max_kib=48.0)
    assert reason(chunk_start_kib=16.0, chunk_max_kib=16.0) == ""
    assert "below the smallest window" in check_parameters({"chunk_start_kib": 64.0}, {"chunk_max_kib": 48.0},
                                                            True).reason
    assert reason(use_sim_time=True) == ""  # not ours: rclpy's
    assert set(parameters.RELOAD_PARAMETERS) == {"store_path", "device", "dtype", "reader_threads"}
    for spec in PARAMETERS:
        d = spec.descriptor()
        assert "restart the node" not in d.description + d.additional_constraints, spec.name


def test_max_new_tokens_is_checked_against_the_running_model():
    def result(value, limit):
        return check_parameters({"max_new_tokens": value}, DEFAULTS, True, max_answer_tokens=limit)

    assert result(700, 700).successful and result(4096, None).successful  # None: no model open yet
    refused = result(4096, 700)
    assert not refused.successful and "max_new_tokens 4096" in refused.reason and "at most 700" in refused.reason


def test_selection_from_parameters():
    assert selection_from(DEFAULTS) == SelectionSettings(DEFAULTS["sparsity"], "chunking", None)  # per-matrix
    got = selection_from({**DEFAULTS, "chunk_start_kib": 8.0, "chunk_max_kib": 256.0}).windows
    assert got == ChunkParams(start_kib=8.0, step_kib=ChunkParams.step_kib, max_kib=256.0,
                              jump_cap_kib=ChunkParams.jump_cap_kib)
    assert selection_from({**DEFAULTS, "jump_cap_kib": 4.0}).windows.max_kib is None  # saturation size
    assert selection_from({**DEFAULTS, "method": "dp", "sparsity": 0.7}) == SelectionSettings(0.7, "dp")


def test_descriptors_carry_ranges_and_reload_notes():
    specs = {spec.name: spec.descriptor() for spec in PARAMETERS}
    assert specs["reader_threads"].integer_range[0].to_value == 256
    assert specs["sparsity"].floating_point_range[0].to_value == pytest.approx(0.99)
    assert "reloads the model" in specs["dtype"].additional_constraints
    assert not specs["image_topics"].integer_range and not specs["method"].floating_point_range


def test_topic_types_follow_image_transport_names():
    assert topic_type("/cam/image_raw") is Image
    assert topic_type("/cam/image_raw/compressed") is CompressedImage
    assert topic_type("compressed") is Image


def test_config_file_documents_every_parameter():
    text = CONFIG.read_text()
    values = parameter_dict_from_yaml_file(str(CONFIG), target_nodes=["vqa_node"])
    # the ones a store recommends are left unset (commented out), so that the store's values apply
    assert set(values) == set(DEFAULTS) - set(RECOMMENDED_PARAMETERS)
    lines = text.splitlines()
    for name in DEFAULTS:
        unset = name in RECOMMENDED_PARAMETERS
        prefix = f"# {name}:" if unset else f"{name}:"
        i = next(i for i, line in enumerate(lines) if line.strip().startswith(prefix))
        assert "#" in lines[i] or lines[i - 1].strip().startswith("#"), f"{name} has no comment in {CONFIG.name}"
        if unset:
            assert "store's recommended value" in lines[i - 1] + lines[i - 2], f"{name}: say why it is unset"
            value = type(DEFAULTS[name])(lines[i].split(":", 1)[1].strip())
        else:
            value = Parameter.from_parameter_msg(values[name]).value
        assert value == DEFAULTS[name], f"{CONFIG.name} and the node disagree on {name}"
    assert "sparsity: 0.5" not in text  # nonsense on the built-in model


def test_recommended_values_fill_what_the_user_did_not_set():
    from nchunk_core.store import Recommended

    store = Recommended(sparsity=0.1, method="magnitude", max_frames=1, max_new_tokens=4)
    assert recommended_values(store, set()) == {"sparsity": 0.1, "method": "magnitude", "max_frames": 1,
                                                "max_new_tokens": 4}
    assert recommended_values(store, {"sparsity", "max_frames"}) == {"method": "magnitude", "max_new_tokens": 4}
    assert recommended_values(None, {"method"}) == {k: DEFAULTS[k] for k in ("sparsity", "max_frames",
                                                                             "max_new_tokens")}
    assert DEFAULTS["sparsity"] == 0.0  # a store without recommendations runs the exact model
    assert recommended_values(store, set(RECOMMENDED_PARAMETERS)) == {}
    huge = Recommended(sparsity=0.0, method="dense", max_frames=5000, max_new_tokens=10**6)
    clamped = recommended_values(huge, set())  # into the parameters' ranges
    assert (clamped["max_frames"], clamped["max_new_tokens"]) == (1024, 4096)
    assert all(isinstance(v, type(DEFAULTS[k])) for k, v in recommended_values(store, set()).items())


def test_an_empty_store_path_is_the_built_in_store():
    from nchunk_core.demo.model import shipped_store

    assert store_directory("") == shipped_store() and (store_directory("") / "manifest.json").is_file()
    assert store_directory("~/s") == Path("~/s").expanduser()


def test_allocation_and_frame_budget_parameters():
    assert DEFAULTS["allocation"] == "layerwise" and DEFAULTS["frame_budget_ms"] == 0.0
    assert "allocation must be one of" in check_parameters({"allocation": "per-layer"}, DEFAULTS, True).reason
    assert check_parameters({"allocation": "uniform", "frame_budget_ms": 250.0}, DEFAULTS, True).successful
    assert selection_from({**DEFAULTS, "allocation": "uniform"}).allocation == "uniform"
    budget = {spec.name: spec for spec in PARAMETERS}["frame_budget_ms"].descriptor()
    assert budget.floating_point_range[0].from_value == 0.0  # negative budgets are refused by rclpy
    assert {"allocation", "frame_budget_ms"} <= set(parameters.SESSION_PARAMETERS)  # no reload


def test_frame_tokens_and_decoding_are_checked_for_form_and_by_the_running_model():
    def reason(model_check=None, **changes):
        result = check_parameters(changes, DEFAULTS, True, model_check=model_check)
        return "" if result.successful else result.reason

    assert reason(frame_tokens="tiles", decoding="greedy") == ""
    assert reason(frame_tokens=256) == reason(frame_tokens="256") == ""  # a number of tokens, as int or digits
    for bad in ("tile", 0, -3, 1.5, True, ""):
        assert "frame_tokens must be auto" in reason(frame_tokens=bad), bad
    assert "decoding must be one of checkpoint, greedy" in reason(decoding="sample")
    asked = []

    def model_check(changes):
        asked.append(dict(changes))
        return "frame_tokens='video' is not a frame mode of smolvlm" if changes.get("frame_tokens") == "video" else ""

    assert "not a frame mode of smolvlm" in reason(model_check, frame_tokens="video", sparsity=0.2)
    assert reason(model_check, decoding="greedy") == ""
    assert asked == [{"frame_tokens": "video"}, {"decoding": "greedy"}]  # only the model's parameters
    assert reason(model_check, frame_tokens="video", store_path="") == ""  # the new model checks it as it opens
    assert reason(model_check, sparsity=0.2) == "" and len(asked) == 2
    d = parameters.SPECS["frame_tokens"].descriptor()
    assert d.dynamic_typing and not parameters.SPECS["decoding"].descriptor().dynamic_typing
    assert {"frame_tokens", "decoding"} <= set(parameters.SESSION_PARAMETERS)
    assert not {"frame_tokens", "decoding"} & set(parameters.RELOAD_PARAMETERS)


def test_cache_policy_parameter():
    assert DEFAULTS["cache_policy"] == "static" and "cache_policy" in parameters.SESSION_PARAMETERS  # live
    assert "cache_policy must be one of" in check_parameters({"cache_policy": "lru"}, DEFAULTS, True).reason
    assert check_parameters({"cache_policy": "static"}, DEFAULTS, True).successful

"""Sensitivity measurement (convert/sensitivity.py): replaying the reference pass's outputs of the
layers before the perturbed input measures the same error as running every layer, in fewer layer
passes, on real tiny checkpoints of three architectures."""
import numpy as np
import pytest

from nchunk_core.convert.converter import load_frame
from nchunk_core.convert.sensitivity import measure
from nchunk_core.store import Store

LEVELS = (0.3, 0.7)


@pytest.mark.parametrize("arch", ["smolvlm", "qwen2_5_vl", "llava_onevision"])
def test_skipping_unchanged_layers_measures_the_same_error(arch, tiny_stores, calibration_frames):
    frames = [load_frame(p) for p in sorted(calibration_frames.glob("frame_*"))[:2]]
    plain = measure(tiny_stores[arch], frames, LEVELS, progress=False, skip_unchanged_layers=False)
    messages = []
    fast = measure(tiny_stores[arch], frames, LEVELS, progress=False, log=messages.append)
    assert fast["inputs"] == plain["inputs"]
    assert np.all(plain["error"] > 0)  # every input's sparsity moves the output
    np.testing.assert_allclose(fast["error"], plain["error"], rtol=1e-4, atol=0)
    # layers 0..L-1 once per frame, then per input and level the layers from its own on
    layers = {g.input: g.layer for g in Store.open(tiny_stores[arch]).groups.values()}
    n_layers = max(layers.values()) + 1
    per_frame = n_layers + len(LEVELS) * sum(n_layers - layers[name] for name in fast["inputs"])
    assert fast["layer_passes"] == len(frames) * per_frame < plain["layer_passes"]
    assert plain["layer_passes"] == len(frames) * n_layers * (1 + len(fast["inputs"]) * len(LEVELS))
    # the plan, then the estimate from the first measured appends, come before the result
    assert "decoder layer passes" in messages[0] and "for the rest" in messages[1]


def test_replayed_layers_are_restored_even_after_an_error(tiny_checkpoints):
    from nchunk_core.convert.sensitivity import _replayed
    from nchunk_core.runtime.adapters import adapter_class
    from nchunk_core.testing.tiny_models import load_tiny_vlm

    model, _ = load_tiny_vlm(tiny_checkpoints["smolvlm"])
    layers = adapter_class("smolvlm").decoder_layers(model)
    sentinel = object()
    with pytest.raises(RuntimeError):
        with _replayed(layers, [sentinel, sentinel], 2):
            assert layers[0]() is sentinel and layers[1]("any", cache=None) is sentinel
            raise RuntimeError("a pass failed")
    assert all("forward" not in layer.__dict__ for layer in layers)


@pytest.mark.parametrize("arch", ["smolvlm", "qwen2_5_vl", "llava_onevision"])
def test_layer_depth_measures_each_input_at_its_own_layer(arch, tiny_stores, calibration_frames):
    frames = [load_frame(p) for p in sorted(calibration_frames.glob("frame_*"))[:2]]
    model = measure(tiny_stores[arch], frames, LEVELS, progress=False, depth="model")
    layer = measure(tiny_stores[arch], frames, LEVELS, progress=False, depth="layer")
    full = measure(tiny_stores[arch], frames, LEVELS, progress=False, depth="layer", skip_unchanged_layers=False)
    assert (model["depth"], layer["depth"], full["depth"]) == ("model", "layer", "layer")
    assert layer["inputs"] == model["inputs"] == full["inputs"]
    assert np.all(layer["error"] > 0)
    # ending the pass at the input's layer measures what running the layers up to it does
    np.testing.assert_allclose(layer["error"], full["error"], rtol=1e-4, atol=0)
    layers = {g.input: g.layer for g in Store.open(tiny_stores[arch]).groups.values()}
    n_layers = max(layers.values()) + 1
    last = [i for i, name in enumerate(layer["inputs"]) if layers[name] == n_layers - 1]
    earlier = [i for i, name in enumerate(layer["inputs"]) if layers[name] < n_layers - 1]
    assert last and earlier
    # the last layer's inputs are measured at the same output either way; the others are not
    np.testing.assert_allclose(layer["error"][last], model["error"][last], rtol=1e-4, atol=0)
    assert not np.allclose(layer["error"][earlier], model["error"][earlier], rtol=1e-2)
    # one layer per perturbed pass
    assert layer["layer_passes"] == len(frames) * (n_layers + len(LEVELS) * len(layer["inputs"]))
    assert layer["layer_passes"] < model["layer_passes"]


def test_auto_depth_takes_the_input_layer_when_the_model_depth_would_take_too_long(tiny_stores, calibration_frames):
    frames = [load_frame(p) for p in sorted(calibration_frames.glob("frame_*"))[:1]]
    messages = []
    slow = measure(tiny_stores["smolvlm"], frames, LEVELS, progress=False, log=messages.append,
                   model_depth_minutes=0.0)
    assert slow["depth"] == "layer"
    assert any("instead" in m for m in messages)
    reference = measure(tiny_stores["smolvlm"], frames, LEVELS, progress=False, depth="layer")
    np.testing.assert_allclose(slow["error"], reference["error"], rtol=1e-4, atol=0)
    assert slow["layer_passes"] == reference["layer_passes"]
    # a tiny model fits the default limit: the last layer's output
    assert measure(tiny_stores["smolvlm"], frames, LEVELS, progress=False)["depth"] == "model"
    with pytest.raises(ValueError, match="depth"):
        measure(tiny_stores["smolvlm"], frames, LEVELS, progress=False, depth="deep")


def test_video_frames_measure_the_same_error_with_their_features_reused(tiny_stores, calibration_frames):
    """LLaVA-OneVision's video mode takes its features from get_video_features: reused within a frame
    like image features, they give the error of running the vision tower at every pass."""
    frames = [load_frame(p) for p in sorted(calibration_frames.glob("frame_*"))[:1]]
    store = tiny_stores["llava_onevision"]
    fast = measure(store, frames, LEVELS, progress=False, frame_tokens="video", depth="layer")
    plain = measure(store, frames, LEVELS, progress=False, frame_tokens="video", depth="layer",
                    skip_unchanged_layers=False)
    assert np.all(fast["error"] > 0)
    np.testing.assert_allclose(fast["error"], plain["error"], rtol=1e-4, atol=0)

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

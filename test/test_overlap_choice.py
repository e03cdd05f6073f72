"""Overlap chosen by measurement: probing, choosing the faster mode, re-probing, sizes kept apart,
and a layer under the choice computing exactly what it computes with overlap fixed."""
import pytest
import torch

from nchunk_core.runtime.config import SessionConfig
from nchunk_core.runtime.overlap_choice import OverlapChoice
from nchunk_core.runtime.select import SelectionSettings
from test_overlap_cache import OUTS, layer_for, make_store, reader, reference  # noqa: F401 (fixture)


def run_passes(choice, tokens, seconds_on, seconds_off, passes):
    modes = []
    for _ in range(passes):
        mode = choice.choose(tokens)
        modes.append(mode)
        choice.record(tokens, mode, seconds_on if mode else seconds_off)
    return modes


@pytest.mark.parametrize("on_faster", [True, False])
def test_probes_both_modes_then_keeps_the_faster_and_reprobes(on_faster):
    choice = OverlapChoice(probes=2, reprobe=8)
    modes = run_passes(choice, 90, 1.0 if on_faster else 2.0, 2.0 if on_faster else 1.0, 24)
    assert modes[:4] == [True, False, True, False]
    assert choice.faster(90) is on_faster
    later = modes[4:]
    assert later.count(not on_faster) == sum(1 for n in range(5, 25) if n % 8 == 0)  # one probe per 8 passes
    assert later.count(on_faster) == len(later) - later.count(not on_faster)


def test_a_change_of_load_turns_the_choice():
    choice = OverlapChoice(probes=2, reprobe=4)
    run_passes(choice, 90, 1.0, 2.0, 8)
    assert choice.faster(90) is True
    run_passes(choice, 90, 3.0, 2.0, 12)  # overlap became slower: the re-probes notice
    assert choice.faster(90) is False


def test_pass_sizes_are_measured_apart():
    choice = OverlapChoice(probes=1, reprobe=100)
    run_passes(choice, 90, 1.0, 2.0, 3)
    run_passes(choice, 1, 2.0, 1.0, 3)
    assert choice.faster(90) is True and choice.faster(1) is False and choice.faster(300) is None
    assert OverlapChoice.size(1) == 0 and OverlapChoice.size(2) == 1 and OverlapChoice.size(64) == OverlapChoice.size(33)


def test_auto_is_exact_in_either_mode(tmp_path, reader):  # noqa: F811
    store, weights = make_store(tmp_path / "s")
    layer = layer_for(store, reader, [SelectionSettings(0.5, "chunking")], overlap="auto")
    modes = []
    for seed in range(6):
        x = torch.randn(4, 256, generator=torch.Generator().manual_seed(seed))
        for y, want in zip(layer(x), reference(layer, weights, x)):
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
        modes.append(layer.workspace.stream.overlap)
    assert modes[:4] == [True, False, True, False]  # every call of the only input starts a pass


@pytest.mark.parametrize("value", ["on", 1, None])
def test_overlap_setting_is_validated(value):
    with pytest.raises(ValueError, match="overlap"):
        SessionConfig(overlap=value)
    assert SessionConfig(overlap="auto").overlap == "auto"

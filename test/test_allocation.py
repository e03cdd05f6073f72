"""Layer-wise sparsity: the greedy allocation, its file in the store, and the runtime following it.

The store fixture (conftest.allocated_store) is the tiny SmolVLM store with an allocation measured
on two frames; the reference for exactness is the Hugging Face model in RAM.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from nchunk_core.convert.sensitivity import allocate
from nchunk_core.io.latency import LatencyTable
from nchunk_core.runtime.adapters import adapter_for
from nchunk_core.runtime.select import SelectionSettings
from nchunk_core.runtime.session import Session, SessionConfig
from nchunk_core.store import Store, StoreFormatError
from nchunk_core.store.allocation import FILE, SparsityAllocation, input_bytes, load_allocation
from nchunk_core.testing.tiny_models import load_tiny_vlm, make_frame

TABLE = LatencyTable.synthetic()
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def toy_allocation() -> SparsityAllocation:
    """Three inputs: a sensitive one, a tolerant one, and a middle one twice as large."""
    levels = np.array(LEVELS)
    error = np.stack([4.0 * levels ** 2, 0.1 * levels ** 2, levels ** 2])  # [3, L]
    return allocate(["a", "b", "c"], [100, 100, 200], LEVELS, error)


def test_greedy_gives_sensitive_inputs_more_rows_at_the_requested_average():
    alloc = toy_allocation()
    for average in np.linspace(0.0, 0.89, 37):
        per_input = alloc.at(float(average))
        assert alloc.mean(per_input) == pytest.approx(average, abs=1e-9)  # same bytes as uniform
        assert per_input["a"] <= per_input["c"] <= per_input["b"]
    assert alloc.at(0.3)["a"] < 0.3 < alloc.at(0.3)["b"]
    assert alloc.at(0.0) == {"a": 0.0, "b": 0.0, "c": 0.0}
    assert alloc.at(0.95) == pytest.approx({"a": 0.95, "b": 0.95, "c": 0.95})  # beyond the grid: uniform
    # every input's sparsity only grows with the average
    grid = np.array([[alloc.at(float(a))[n] for n in "abc"] for a in np.linspace(0, 0.9, 50)])
    assert np.all(np.diff(grid, axis=0) >= -1e-12)


def test_noisy_curves_are_made_monotone_and_convex():
    error = np.array([[0.0, 0.3, 0.1, 0.2, 0.5], [0.1, 0.1, 0.1, 0.1, 0.1]])  # a dip, and a flat curve
    alloc = allocate(["x", "y"], [1, 3], (0.2, 0.4, 0.6, 0.8, 0.9), error)
    for average in (0.2, 0.5, 0.85):
        assert alloc.mean(alloc.at(average)) == pytest.approx(average, abs=1e-9)
    assert alloc.at(0.2)["x"] <= alloc.at(0.2)["y"]


def test_allocation_file_round_trip_and_validation():
    alloc = toy_allocation()
    again = SparsityAllocation.from_json(json.loads(json.dumps(alloc.to_json())))
    assert again.inputs == alloc.inputs and np.allclose(again.sparsity, alloc.sparsity)
    bad = alloc.to_json()
    bad["sparsity"][3] = [0.9] * 3  # its weighted mean is no longer its average
    with pytest.raises(StoreFormatError, match="weighted mean"):
        SparsityAllocation.from_json(bad)
    for key, value, match in (("format", "x", "format"), ("version", 9, "version"),
                              ("averages", [0.5, 0.6], "averages"), ("weights", [1, -1, 1], "weights")):
        with pytest.raises(StoreFormatError, match=match):
            SparsityAllocation.from_json({**alloc.to_json(), key: value})


def test_store_allocation_matches_its_groups(allocated_store, tmp_path):
    store = Store.open(allocated_store)
    alloc = load_allocation(store)
    assert alloc is not None and set(alloc.inputs) == set(store.inputs())
    assert dict(zip(alloc.inputs, alloc.weights)) == input_bytes(store)
    assert alloc.basis["frames"] == 2 and len(alloc.basis["sensitivity"]) == len(store.inputs())
    # averages from the grid and between its points: the bytes-weighted mean is the request
    for average in (0.1, 0.25, 0.333, 0.5, 0.7):
        assert alloc.mean(alloc.at(average)) == pytest.approx(average, abs=1e-9)
    # an allocation copied from another store is refused with a reason
    copy = tmp_path / "copy"
    shutil.copytree(allocated_store, copy)
    data = json.loads((copy / FILE).read_text())
    data["inputs"][0] = "layers.9.attn_in"
    (copy / FILE).write_text(json.dumps(data))
    with pytest.raises(StoreFormatError, match="do not match"):
        load_allocation(Store.open(copy))


def test_selection_settings_validate_the_allocation():
    assert SelectionSettings(0.5).allocation == "layerwise"
    assert SelectionSettings.from_kib(0.5, "chunking", allocation="uniform").allocation == "uniform"
    with pytest.raises(ValueError, match="allocation must be one of"):
        SelectionSettings(0.5, "chunking", allocation="per-layer")
    with pytest.raises(ValueError, match="allocation must be one of"):
        SelectionSettings.from_kib(0.5, "chunking", start_kib=8.0, allocation="")


def dense_logits(checkpoint, frame_seeds):
    """Logits of the last token of each chunk (prefix, frames) of the model in RAM."""
    model, processor = load_tiny_vlm(checkpoint)
    adapter = adapter_for(model, processor)
    chunks = [adapter.encode_text(adapter.prompt_prefix)] + [adapter.encode_frame(make_frame(seed=s))
                                                             for s in frame_seeds]
    cache, pos, out = DynamicCache(), 0, []
    for c in chunks:
        logits, pos = adapter.append(c, cache, pos)
        out.append(logits[0])
    return out


def test_layerwise_at_sparsity_zero_gives_the_dense_logits(allocated_store, tiny_checkpoints):
    cfg = SessionConfig(selection=SelectionSettings(0.0, "chunking", allocation="layerwise"))
    with Session.open(allocated_store, cfg, table=TABLE) as session:
        seen = []
        session.model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out[0, -1].float().clone()))
        stats = [session.append_frame(make_frame(seed=s)) for s in (1, 2)]
    ref = dense_logits(tiny_checkpoints["smolvlm"], (1, 2))
    assert len(seen) == len(ref) == 3
    assert max((a - b).abs().max().item() for a, b in zip(seen, ref)) <= 1e-4
    assert all(s.rows_read == s.rows_total for s in stats)


def test_layerwise_sparsity_follows_the_allocation(allocated_store):
    alloc = load_allocation(Store.open(allocated_store))
    cfg = SessionConfig(selection=SelectionSettings(0.5, "magnitude"))
    with Session.open(allocated_store, cfg, table=TABLE) as session:
        flash = session._flash
        session.append_frame(make_frame(seed=1))
        layer = session.append_frame(make_frame(seed=2))
        read = {c.name: c.rows / c.rows_total for c in flash.stats}
        session.update(SelectionSettings(0.5, "magnitude", allocation="uniform"))
        uniform = session.append_frame(make_frame(seed=3))
        read_uniform = {c.name: c.rows / c.rows_total for c in flash.stats}
    want = alloc.at(0.5)
    for name, fraction in read.items():
        assert fraction == pytest.approx(1.0 - want[name], abs=1.0 / 64)  # rows are whole
    assert max(read.values()) - min(read.values()) > 0.1  # not uniform
    assert all(f == pytest.approx(0.5, abs=1.0 / 64) for f in read_uniform.values())
    total = sum(g.nbytes for g in Store.open(allocated_store).groups.values())
    # the same bytes either way: the average is weighted by bytes
    assert layer.bytes_read == pytest.approx(0.5 * total, rel=0.05)
    assert uniform.bytes_read == pytest.approx(0.5 * total, rel=0.05)
    assert layer.selection.allocation == "layerwise" and uniform.selection.allocation == "uniform"


def test_store_without_allocation_runs_uniform_with_a_note(tiny_stores):
    notes = []
    cfg = SessionConfig(selection=SelectionSettings(0.5, "magnitude"))
    with Session.open(tiny_stores["smolvlm"], cfg, log=notes.append, table=TABLE) as session:
        session.append_frame(make_frame(seed=1))
        fractions = {c.rows / c.rows_total for c in session._flash.stats}
    assert any("no sparsity allocation" in n for n in notes)
    assert all(f == pytest.approx(0.5, abs=1.0 / 64) for f in fractions)


def test_convert_measures_an_allocation_and_calibrate_measures_it_again(tiny_checkpoints, calibration_frames,
                                                                         tmp_path, capsys):
    from nchunk_core import cli
    from nchunk_core.convert.converter import convert

    store = convert(tiny_checkpoints["smolvlm"], tmp_path / "store", calibration_frames, progress=False,
                    allocation_frames=1)
    alloc = load_allocation(Store.open(store))
    assert alloc is not None and alloc.basis["frames"] == 1 and alloc.basis["source"] == str(calibration_frames)
    assert cli.main(["calibrate", str(store), "--frames", str(calibration_frames), "--count", "2"]) == 0
    assert "average 50%: layers.0.attn_in" in capsys.readouterr().out
    assert load_allocation(Store.open(store)).basis["frames"] == 2
    assert cli.main(["calibrate", str(store), "--frames", str(tmp_path / "none")]) == 1  # a clear error

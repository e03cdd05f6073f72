"""Flash sparse layers: exact at sparsity 0 (any layout), sparse when asked, live settings."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nchunk_core.io.latency import LatencyTable
from nchunk_core.runtime.layers import FlashProjections, Workspace
from nchunk_core.runtime.select import SelectionSettings
from nchunk_core.io.reader import Reader
from nchunk_core.store import Store, StoreWriter

IN, OUTS = 96, [("q_proj", 96), ("k_proj", 32), ("v_proj", 32)]


def make_store(path, dtype, bundled, perm):
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(o, IN, generator=g).to(dtype) for n, o in OUTS}
    biases = {n: torch.randn(o, generator=g) for n, o in OUTS}
    with StoreWriter(path, model_info={"test": True}) as w:
        mats = [(n, weights[n]) for n, _ in OUTS]
        if bundled:
            w.add_group("l0.qkv", input="l0.attn_in", matrices=mats, permutation=perm)
        else:
            for n, m in mats:
                w.add_group(f"l0.{n}", input="l0.attn_in", matrices=[(n, m)], permutation=perm)
    return Store.open(path), weights, biases


@pytest.fixture
def reader():
    with Reader(threads=3) as r:
        yield r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bundled", [True, False])
@pytest.mark.parametrize("reordered", [False, True])
@pytest.mark.parametrize("method", ["chunking", "magnitude", "dense"])
def test_exact_at_sparsity_zero(tmp_path, reader, dtype, bundled, reordered, method):
    perm = np.random.default_rng(1).permutation(IN) if reordered else None
    store, weights, biases = make_store(tmp_path / "s", dtype, bundled, perm)
    settings = SelectionSettings(sparsity=0.0, method=method)
    layer = FlashProjections(store, "l0.attn_in", LatencyTable.synthetic(), lambda: settings, Workspace(reader, "cpu"),
                             dtype=torch.float32, biases=biases)
    x = torch.randn(2, 7, IN)
    outs = layer(x)
    assert layer.outputs == [n for n, _ in OUTS]
    for (name, _), y in zip(OUTS, outs):
        ref = torch.nn.functional.linear(x, weights[name].float(), biases[name])
        assert y.shape == ref.shape
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    s = layer.last_stats
    assert s.rows == IN and s.retained == pytest.approx(1.0) and s.tokens == 14
    assert s.bytes == IN * sum(o for _, o in OUTS) * weights["q_proj"].element_size()


def test_sparsity_changes_take_effect_on_next_call(tmp_path, reader):
    store, weights, biases = make_store(tmp_path / "s", torch.float32, True, None)
    owner = SimpleNamespace(selection=SelectionSettings(sparsity=0.0, method="chunking"))  # as the flash model
    layer = FlashProjections(store, "l0.attn_in", LatencyTable.synthetic(), lambda: owner.selection,
                             Workspace(reader, "cpu"))
    x = torch.randn(5, IN)
    dense = layer(x)
    full_bytes = layer.last_stats.bytes
    owner.selection = SelectionSettings(sparsity=0.5, method="chunking")
    sparse = layer(x)
    assert layer.last_stats.rows == IN // 2
    assert layer.last_stats.bytes == full_bytes // 2
    assert 0.5 < layer.last_stats.retained < 1.0
    assert not torch.allclose(dense[0], sparse[0])
    # the sparse result is exactly the product over the selected input channels
    owner.selection = SelectionSettings(sparsity=0.5, method="magnitude")
    sparse = layer(x)
    keep = torch.topk(x.abs().mean(0), IN // 2).indices
    ref = x[:, keep] @ weights["q_proj"][:, keep].T
    torch.testing.assert_close(sparse[0], ref, rtol=1e-5, atol=1e-4)


def test_config_validation():
    with pytest.raises(ValueError, match="sparsity"):
        SelectionSettings(sparsity=1.0)
    assert SelectionSettings(sparsity=0.3).budget(100) == 70
    assert SelectionSettings(sparsity=0.9, method="dense").budget(100) == 100


def test_unknown_input(tmp_path, reader):
    store, _, _ = make_store(tmp_path / "s", torch.float32, True, None)
    with pytest.raises(ValueError, match="no matrix group"):
        FlashProjections(store, "nope", LatencyTable.synthetic(), SelectionSettings, Workspace(reader, "cpu"))


def test_refused_setting_keeps_previous_value():
    import dataclasses

    settings = SelectionSettings(sparsity=0.2, method="chunking")
    with pytest.raises(ValueError, match="method must be one of"):
        dataclasses.replace(settings, method="random")
    with pytest.raises(ValueError):
        dataclasses.replace(settings, sparsity=-0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.sparsity = 0.5
    assert (settings.sparsity, settings.method) == (0.2, "chunking")


def test_combined_table_costs_every_group():
    from nchunk_core.runtime.layers import combined_table

    t = LatencyTable.synthetic()
    rbs = [7168, 1024, 1024]  # q, k, v rows of a 7B model, stored unbundled
    c = combined_table(t, rbs)
    for r in (1, 5, 40, 300):
        expected = sum(float(t.estimate(r * rb)) for rb in rbs)
        assert c.estimate_runs([r], sum(rbs)) == pytest.approx(expected, rel=1e-9)
    assert combined_table(t, [4096]) is t

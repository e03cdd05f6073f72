"""Overlap and row cache: exact outputs, reads only of what the cache lacks, prefetch hits, settings."""
import numpy as np
import pytest
import torch

from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.reader import Reader
from nchunk_core.runtime.config import SessionConfig
from nchunk_core.runtime.layers import FlashProjections, Workspace
from nchunk_core.runtime.overlap import row_runs, run_rows, split_pieces
from nchunk_core.runtime.row_cache import RowCache, plan_rows, select_cached
from nchunk_core.runtime.select import SelectionSettings
from nchunk_core.store import Store, StoreWriter
from nchunk_core.testing.tiny_models import make_frame

IN, OUTS = 256, [("gate_proj", 96), ("up_proj", 64)]


def make_store(path, bundled=True):
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(o, IN, generator=g).half() for n, o in OUTS}
    perm = np.random.default_rng(2).permutation(IN)
    with StoreWriter(path, model_info={"test": True}) as w:
        mats = [(n, weights[n]) for n, _ in OUTS]
        if bundled:
            w.add_group("l0.mlp", input="l0.mlp_in", matrices=mats, permutation=perm)
        else:
            for n, m in mats:
                w.add_group(f"l0.{n}", input="l0.mlp_in", matrices=[(n, m)], permutation=perm)
    return Store.open(path), weights


def layer_for(store, reader, settings, overlap=True, cache_rows=0, device="cpu", policy="static"):
    ws = Workspace(reader, device, overlap)
    layer = FlashProjections(store, "l0.mlp_in", LatencyTable.synthetic(), lambda: settings[0], ws)
    if cache_rows:
        ws.cache = RowCache.load(reader, {"l0.mlp_in": (layer.groups, layer.handles)}, {"l0.mlp_in": cache_rows},
                                 device, 1 << 30, policy)
    return layer


def reference(layer, weights, x):
    """x [N, IN] -> outputs over exactly the channels the layer's last selection used."""
    xs = x[:, layer.perm]
    rows = torch.as_tensor(layer.select(xs).row_indices())
    keep = layer.perm[rows]
    return [x[:, keep] @ weights[n].float()[:, keep].T for n, _ in OUTS]


@pytest.fixture
def reader():
    with Reader(threads=3) as r:
        yield r


def test_pieces_and_runs_round_trip():
    runs = np.array([[0, 5], [10, 40], [60, 3]], dtype=np.int64)
    pieces = split_pieces(runs, row_bytes=100, piece_bytes=1000, max_pieces=8)
    assert [int(p[:, 1].sum()) for p in pieces] == [10, 10, 10, 10, 8]
    assert np.array_equal(np.concatenate([run_rows(p) for p in pieces]), run_rows(runs))
    assert np.array_equal(row_runs(run_rows(runs)), runs)
    assert len(split_pieces(runs, row_bytes=1, piece_bytes=1, max_pieces=4)) == 4  # at most max_pieces


@pytest.mark.parametrize("bundled", [True, False])
@pytest.mark.parametrize("overlap", [False, True])
def test_dense_with_overlap_and_cache_is_exact(tmp_path, reader, bundled, overlap):
    store, weights = make_store(tmp_path / "s", bundled)
    settings = [SelectionSettings(0.0, "chunking")]
    layer = layer_for(store, reader, settings, overlap=overlap, cache_rows=IN // 4)
    for seed in range(3):  # later calls use rows prefetched by the earlier ones
        x = torch.randn(9, IN, generator=torch.Generator().manual_seed(seed))
        for y, (n, _) in zip(layer(x), OUTS):
            torch.testing.assert_close(y, torch.nn.functional.linear(x, weights[n].float()), rtol=1e-5, atol=1e-4)
        s = layer.last_stats
        assert s.rows == IN and s.retained == pytest.approx(1.0)
        assert s.cached_bytes == IN // 4 * layer.row_bytes and s.bytes == 3 * IN // 4 * layer.row_bytes
    if overlap:  # the same input called again: its rows were read ahead, every one used
        assert s.hit_bytes == s.bytes and s.wasted_bytes == 0


def test_block_parts_leave_out_unused_rows():
    from nchunk_core.runtime.overlap import Block

    w = torch.arange(10 * 2, dtype=torch.float16).view(10, 2)
    use = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0], dtype=bool)
    parts = Block(np.arange(10, 20), [w], use).parts(4)  # rows 10-13 all used, 14-17 none, 18-19 half
    assert [p.rows.tolist() for p in parts] == [[10, 11, 12, 13], [18, 19]]
    assert parts[0].use is None and parts[1].use.tolist() == [True, False]
    assert torch.equal(parts[1].weights[0], w[8:10])
    assert Block(np.arange(3), [w[:3]]).parts(4)[0].rows.tolist() == [0, 1, 2]


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_blocks_multiplied_in_parts_are_exact(tmp_path, reader, monkeypatch, sparsity):
    """Blocks converted and multiplied a few rows at a time (parts) give the same product."""
    import nchunk_core.runtime.layers as layers

    monkeypatch.setattr(layers, "PART_BYTES", 16 * 1024)  # 25 rows of 160 fp32 outputs per part
    monkeypatch.setattr(layers, "MAX_PARTS", 16)
    store, weights = make_store(tmp_path / "s")
    layer = layer_for(store, reader, [SelectionSettings(sparsity, "chunking")], overlap=True, cache_rows=IN // 4)
    assert layer.workspace.part_rows(layers.Block(np.arange(IN), [torch.zeros(IN, 160, dtype=torch.float16)]),
                                     torch.float32) == 25
    for seed in range(3):
        x = torch.randn(6, IN, generator=torch.Generator().manual_seed(seed))
        for y, want in zip(layer(x), reference(layer, weights, x)):
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)


def test_prefetch_reads_rows_chosen_twice_and_leaves_unused_ones_out(tmp_path, reader):
    """An input called again gets, read ahead, the rows both of its last two calls chose; the rows
    of it the new selection does not use are wasted reads, never part of the product."""
    store, weights = make_store(tmp_path / "s")
    layer = layer_for(store, reader, [SelectionSettings(0.5, "magnitude")], overlap=True)
    chosen, wasted = [], 0
    for seed in range(6):
        x = torch.randn(3, IN, generator=torch.Generator().manual_seed(seed))
        for y, want in zip(layer(x), reference(layer, weights, x)):
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
        chosen.append(set(layer.select(x[:, layer.perm]).row_indices().tolist()))
        s = layer.last_stats
        if seed >= 2:
            prefetched = chosen[-3] & chosen[-2]
            assert s.hit_bytes == len(prefetched & chosen[-1]) * layer.row_bytes
            assert s.wasted_bytes == len(prefetched - chosen[-1]) * layer.row_bytes
            wasted += s.wasted_bytes
        assert s.bytes == len(chosen[-1]) * layer.row_bytes
    assert wasted > 0  # random inputs: some prefetched rows went unused, and the products stayed exact


@pytest.mark.parametrize("method", ["chunking", "magnitude", "dp"])
def test_cache_serves_rows_without_changing_the_product(tmp_path, reader, method):
    """At any sparsity the layer computes x[S] · W[S] for its selection S; the cache only changes which
    of S's rows come from the drive (those past the cached front) and the selection always holds the
    free cached rows."""
    store, weights = make_store(tmp_path / "s")
    settings = [SelectionSettings(0.5, method)]
    plain = layer_for(store, reader, settings)
    cached = layer_for(store, reader, settings, cache_rows=IN // 4)
    for seed in range(3):
        x = torch.randn(5, IN, generator=torch.Generator().manual_seed(seed))
        for layer in (plain, cached):
            for y, want in zip(layer(x), reference(layer, weights, x)):
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
        s = cached.last_stats
        rows = cached.select(x[:, cached.perm]).row_indices()
        assert set(range(IN // 4)) <= set(rows.tolist()) and s.rows == IN // 2
        assert s.cached_bytes == IN // 4 * cached.row_bytes
        assert s.bytes == (IN // 2 - IN // 4) * cached.row_bytes < plain.last_stats.bytes


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_frame_policy_swaps_in_read_rows_without_changing_the_product(tmp_path, reader, sparsity):
    """The "frame" policy replaces cached rows by rows a call read; every later call still computes
    x[S] · W[S] for its selection S (dense at sparsity 0), and the cached rows hold the stored weights."""
    store, weights = make_store(tmp_path / "s")
    settings = [SelectionSettings(sparsity, "chunking")]
    layer = layer_for(store, reader, settings, cache_rows=IN // 4, policy="frame")
    cache = layer.workspace.cache
    for seed in range(4):
        x = torch.randn(5, IN, generator=torch.Generator().manual_seed(seed))
        x[:, layer.perm[-40:]] *= 50.0  # the back rows matter most: the cache should move there
        # the selection of the call (the policy changes the cache after it)
        wants = reference(layer, weights, x) if sparsity else [x @ weights[n].float().T for n, _ in OUTS]
        outs = layer(x)
        for y, want in zip(outs, wants):
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-3)
        held = cache.indices("l0.mlp_in")
        assert len(held) == IN // 4 == len(set(held.tolist()))
        assert layer.last_stats.rows == settings[0].budget(IN)
    assert cache.swapped_rows > 0 and set(range(IN - 40, IN)) <= set(held.tolist())
    stored = layer.perm[torch.as_tensor(held)]  # original channels of the cached rows
    for w, (n, o) in zip(cache.weights("l0.mlp_in")[0].split([o for _, o in OUTS], dim=1), OUTS):
        assert torch.equal(w, weights[n][:, stored].T)


def test_select_cached_on_any_set_of_rows():
    imp = np.random.default_rng(1).random(100).astype(np.float32)
    held = np.array([3, 50, 51, 97], dtype=np.int64)
    sel = select_cached(imp, 30, held, "chunking", LatencyTable.synthetic(), 1024, None)
    rows = sel.row_indices()
    assert len(rows) == 30 and set(held.tolist()) <= set(rows.tolist())
    assert sel.retained == pytest.approx(imp[rows].sum() / imp.sum(), rel=1e-5)
    assert sel.est_latency_s > 0.0
    few = select_cached(imp, 2, held, "magnitude", LatencyTable.synthetic(), 1024, None)
    assert sorted(few.row_indices().tolist()) == sorted(np.argsort(-imp)[:2].tolist())
    prefix = select_cached(imp, 30, np.arange(10), "chunking", LatencyTable.synthetic(), 1024, None)
    assert np.array_equal(prefix.runs, select_cached(imp, 30, 10, "chunking", LatencyTable.synthetic(), 1024,
                                                     None).runs)


def test_budget_within_the_cache_reads_nothing(tmp_path, reader):
    store, weights = make_store(tmp_path / "s")
    settings = [SelectionSettings(0.9, "chunking")]
    layer = layer_for(store, reader, settings, cache_rows=IN // 2)
    x = torch.randn(4, IN)
    x[:, layer.perm[:IN // 2]] *= 10.0  # the cached (front) rows matter most
    for y, want in zip(layer(x), reference(layer, weights, x)):
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    assert layer.last_stats.bytes == 0 and layer.last_stats.rows == settings[0].budget(IN)
    x[:, layer.perm[-1]] = 1e3  # one uncached row matters more than any cached one: it alone is read
    for y, want in zip(layer(x), reference(layer, weights, x)):
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-1)
    assert layer.last_stats.bytes == layer.row_bytes and layer.last_stats.cached_bytes > 0


def test_select_cached_keeps_the_budget_and_counts_retained():
    imp = np.random.default_rng(0).random(100).astype(np.float32)
    sel = select_cached(imp, 60, 20, "chunking", LatencyTable.synthetic(), 1024, None)
    rows = sel.row_indices()
    assert len(rows) == 60 and set(range(20)) <= set(rows.tolist())
    assert sel.retained == pytest.approx(imp[rows].sum() / imp.sum(), rel=1e-5)
    small = select_cached(imp, 5, 20, "chunking", LatencyTable.synthetic(), 1024, None)
    # a budget below the cache: its most important rows of all, the uncached ones among them read
    assert sorted(small.row_indices().tolist()) == sorted(np.argsort(-imp)[:5].tolist())
    assert (small.est_latency_s > 0.0) == bool((np.argsort(-imp)[:5] >= 20).any())
    inside = imp.copy()
    inside[:20] += 1.0  # the cached rows matter most: nothing is read
    assert select_cached(inside, 5, 20, "chunking", LatencyTable.synthetic(), 1024, None).est_latency_s == 0.0


def test_plan_splits_the_budget_by_benefit():
    hot = np.linspace(1.0, 0.0, 100)
    cold = np.full(100, 0.2)
    plan = plan_rows({"hot": (10, hot), "cold": (10, cold)}, budget_bytes=1000)
    assert plan["hot"] + plan["cold"] == 100 and plan["hot"] > plan["cold"]
    assert plan_rows({"a": (10, hot)}, 0) == {"a": 0}
    assert plan_rows({"a": (10, hot)}, 10**9) == {"a": 100}


@pytest.mark.parametrize("value", [-1.0, float("nan"), "64", True])
def test_ram_budget_is_validated(value):
    with pytest.raises(ValueError, match="ram_budget_mib"):
        SessionConfig(ram_budget_mib=value)
    with pytest.raises(ValueError, match="overlap"):
        SessionConfig(overlap="yes")
    with pytest.raises(ValueError, match="cache_policy"):
        SessionConfig(cache_policy="lru")
    assert SessionConfig(ram_budget_mib=64).ram_budget_mib == 64.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_keeps_pinned_buffers_and_is_exact(tmp_path, reader):
    store, weights = make_store(tmp_path / "s")
    settings = [SelectionSettings(0.0, "chunking")]
    layer = layer_for(store, reader, settings, cache_rows=IN // 4, device="cuda")
    x = torch.randn(5, IN)
    for _ in range(2):
        outs = layer(x.cuda())
    for y, (n, _) in zip(outs, OUTS):
        assert y.device.type == "cuda"
        torch.testing.assert_close(y.cpu(), torch.nn.functional.linear(x, weights[n].float()), rtol=1e-4, atol=1e-3)
    assert all(b.is_pinned() for b in layer.workspace.stream._pool)
    assert all(w.device.type == "cuda" for w in layer.workspace.cache.weights("l0.mlp_in"))


def test_session_with_either_cache_policy_at_sparsity_zero_gives_the_dense_logits(tiny_stores):
    """Three frames and a question through sessions without a cache and with each policy (a third of
    the backbone's bytes): the same logits at every forward, the same answer, fewer bytes read; a
    live policy change re-plans the cache."""
    from nchunk_core.runtime.session import Session

    store = tiny_stores["qwen2_5_vl"]
    budget = sum(f.stat().st_size for f in store.glob("weights-*.bin")) / 3 / 2**20
    runs = {}
    for name, cfg in (("none", {}), ("frame", {"ram_budget_mib": budget, "cache_policy": "frame"}),
                      ("static", {"ram_budget_mib": budget, "cache_policy": "static"})):
        with Session.open(store, SessionConfig(selection=SelectionSettings(0.0), max_new_tokens=4, **cfg),
                          table=LatencyTable.synthetic()) as session:
            seen = []
            session.model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out[0, -1].float().clone()))
            stats = [session.append_frame(make_frame(seed=s)) for s in range(3)]
            answer = session.ask("What is in the box?")
            runs[name] = (list(seen), answer.token_ids, stats)
            if name == "frame":
                assert session._flash.workspace.cache.swapped_rows > 0  # rows moved between frames
                session.update(cache_policy="static")
                session.append_frame(make_frame(seed=9))
                assert session._flash.workspace.cache.policy == "static"
    ref, ref_tokens, plain = runs["none"]
    for name in ("frame", "static"):
        seen, tokens, stats = runs[name]
        assert len(seen) == len(ref) and tokens == ref_tokens
        assert max((a - b).abs().max().item() for a, b in zip(seen, ref)) <= 1e-4
        assert all(s.cached_bytes > 0 and s.bytes_read < p.bytes_read for s, p in zip(stats, plain))

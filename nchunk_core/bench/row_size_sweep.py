"""Chunking windows for every row size: the sweep behind `default_params` (docs/selection.md).

    python -m nchunk_core.bench.row_size_sweep [--quick] [--table T.json]

select_sweep.py chose windows on a 7B model's rows (7-74 KiB), where a matrix is many times the
drive's saturation size. On small models a whole matrix is 64 KiB-2 MiB and a row 0.5-4 KiB: a
32 KiB window is a quarter of a matrix, and at a fixed row budget the greedy then trades most of
the importance for a few large reads. Here the runtime's knob is the row budget (the sparsity), so
windows are judged at equal rows, against magnitude on the same inputs:

- keep: retained importance / magnitude's, at sparsity 10-50 % (magnitude keeps the most any
  selection of that many rows can keep);
- cost: estimated read time / magnitude's, at the same sparsities;
- safe: at every sparsity of 10-70 %, chunking keeps at least what magnitude keeps at the same
  estimated time (magnitude's best over its row budgets within that time), less 0.002.

The chosen setting per shape is, among the safe ones whose selection stays under a quarter of the
2 ms budget at that shape, the one with the highest keep (within KEEP_TIE: the cheapest). Importance
is synthetic as in select_sweep.py (lognormal, persistent hot channels, hot-cold order, 6
distributions) and, for the built-in model's shapes with --real, recorded from its store on
training scenes (every layer's input of that kind, in stored order).
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np

from nchunk_core.bench.select_sweep import (BUDGET_FRACTIONS, DISTRIBUTIONS, SHAPES, envelope, median_ms,
                                            synthetic_importance)
from nchunk_core.io.latency import LatencyTable
from nchunk_core.runtime.select import ChunkParams, default_params, select

# (rows, bytes per row): the built-in model (fp32), then fp16 shapes between it and the 7B model.
ROW_SHAPES = {
    "demo q+k+v": (128, 1024), "demo o": (128, 512), "demo gate+up": (128, 3072), "demo down": (384, 512),
    "256M q+k+v": (576, 1920), "256M o": (576, 1152), "256M gate+up": (576, 6144), "256M down": (1536, 1152),
    "0.5B q+k+v": (896, 2304), "0.5B o": (896, 1792), "0.5B gate+up": (896, 19456), "0.5B down": (4864, 1792),
    "1.5B q+k+v": (1536, 4096), "1.5B gate+up": (1536, 35840), "1.5B down": (8960, 3072),
    **{f"7B {name}": shape for name, shape in SHAPES.items()},
}
KEEP_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5)  # where keep and cost are averaged
SAFE_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # where chunking must not fall below magnitude
KEEP_TIE = 0.005  # keep differences below this are noise between settings
SAFE_TOLERANCE = 0.002
TIME_LIMIT_MS = 0.5  # a quarter of the 2 ms budget per matrix


def settings_grid(quick: bool = False) -> list[ChunkParams]:
    """Window unit u (start = step), largest window (multiples of u, or the saturation size) and
    jump cap (u, or a quarter of u: overlapping placements)."""
    units = (0.5, 2.0, 8.0, 32.0) if quick else (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    multiples = (1, 4, None) if quick else (1, 2, 4, 8, 16, None)
    out = []
    for u, m, quarter in itertools.product(units, multiples, (False, True)):
        out.append(ChunkParams(start_kib=u, step_kib=u, max_kib=None if m is None else u * m,
                               jump_cap_kib=max(0.5, u / 4) if quarter else u))
    return out


def _at_budgets(v, method, table, row_bytes, sparsities, params=None):
    """(cost, retained) arrays at the row budgets of `sparsities`."""
    cost, kept = [], []
    for s in sparsities:
        sel = select(v, max(1, v.size - int(round(s * v.size))), method, table, row_bytes, params)
        cost.append(sel.est_latency_s)
        kept.append(sel.retained)
    return np.array(cost), np.array(kept)


def store_importance(store_path, frames) -> dict[str, tuple[int, list[np.ndarray]]]:
    """Real importance of a store's model: input -> (row bytes, [float32 [rows] per frame]), mean
    |x| over each frame's tokens in stored-row order, recorded while appending `frames` densely."""
    from nchunk_core.io.latency import LatencyTable
    from nchunk_core.runtime.select import SelectionSettings
    from nchunk_core.runtime.session import Session, SessionConfig

    seen: dict[str, list[np.ndarray]] = {}

    def observe(phase, name, x):
        if phase == "frame":
            seen.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).abs().float().mean(0).numpy())

    cfg = SessionConfig(selection=SelectionSettings(0.0, "dense"), max_frames=1)
    with Session.open(store_path, cfg, table=LatencyTable.synthetic()) as session:
        session.set_observer(observe)
        for frame in frames:
            session.append_frame(frame)
        store = session.store
        out = {}
        for name, vectors in seen.items():
            perm = store.permutation(name)
            row_bytes = sum(g.row_bytes for g in store.groups_for_input(name))
            out[name] = (row_bytes, [v if perm is None else v[perm] for v in vectors])
    return out


def score_shape(rows, row_bytes, table, grid, n_inputs=1, seed=11, inputs=None):
    """Per setting of `grid`: keep, cost, safe and selection ms on this shape; plus magnitude's
    retained importance at KEEP_SPARSITIES (mean over inputs). `inputs`: importance vectors
    [rows] (default: synthetic ones)."""
    if inputs is None:
        rng = np.random.default_rng(seed)
        inputs = [synthetic_importance(rows, cv, hc, rng) for cv, hc in DISTRIBUTIONS for _ in range(n_inputs)]
    reference = []
    for v in inputs:
        lat, ret = [], []
        for f in BUDGET_FRACTIONS:
            sel = select(v, max(1, int(round(f * rows))), "magnitude", table, row_bytes)
            lat.append(sel.est_latency_s)
            ret.append(sel.retained)
        reference.append((envelope(lat, ret), _at_budgets(v, "magnitude", table, row_bytes, SAFE_SPARSITIES)))
    keep_idx = [SAFE_SPARSITIES.index(s) for s in KEEP_SPARSITIES]
    results, seen = [], {}
    for params in grid:
        windows = params.for_matrix(row_bytes, rows, table)
        if windows in seen:  # same rows on this shape as an earlier setting
            continue
        seen[windows] = params
        keep, cost, safe = [], [], True
        for v, ((env_lat, env_ret), (m_cost, m_kept)) in zip(inputs, reference):
            c_cost, c_kept = _at_budgets(v, "chunking", table, row_bytes, SAFE_SPARSITIES, params)
            floor = np.interp(c_cost, env_lat, env_ret, left=0.0, right=env_ret[-1])
            safe &= bool(np.all(c_kept >= floor - SAFE_TOLERANCE))
            keep.append(np.mean(c_kept[keep_idx] / m_kept[keep_idx]))
            cost.append(np.mean(c_cost[keep_idx] / m_cost[keep_idx]))
        v = inputs[-1]
        ms = max(median_ms(lambda: select(v, int(f * rows), "chunking", table, row_bytes, params), 5)
                 for f in (0.1, 0.5))
        results.append({"params": params, "windows": windows, "keep": float(np.mean(keep)),
                        "cost": float(np.mean(cost)), "safe": safe, "ms": ms})
    magnitude = float(np.mean([m_kept[keep_idx].mean() for _, (_, m_kept) in reference]))
    return results, magnitude


def choose(results):
    """Among the safe settings selecting in time, the one keeping the most importance at equal rows;
    settings within KEEP_TIE of the best count as equal and the cheapest of them wins. None if none."""
    ok = [r for r in results if r["safe"] and r["ms"] <= TIME_LIMIT_MS]
    if not ok:
        return None
    best = max(r["keep"] for r in ok)
    return min((r for r in ok if r["keep"] >= best - KEEP_TIE), key=lambda r: (r["cost"], -r["keep"]))


def built_in_importance(frames: int) -> dict[str, list[np.ndarray]]:
    """Shape name ("demo q+k+v", ...) -> importance vectors of the built-in model, all layers pooled."""
    from nchunk_core.demo import scenes
    from nchunk_core.demo.model import shipped_store
    from nchunk_core.demo.train_settings import FRAME_H, FRAME_W

    images = [scenes.render_scene(scenes.split_scene("train", 20_000_000 + i, 0, FRAME_W, FRAME_H))
              for i in range(frames)]
    kinds = {"attn_in": "demo q+k+v", "attn_out": "demo o", "mlp_in": "demo gate+up", "mlp_out": "demo down"}
    out: dict[str, list[np.ndarray]] = {}
    for name, (_, vectors) in store_importance(shipped_store(), images).items():
        out.setdefault(kinds[name.rsplit(".", 1)[1]], []).extend(vectors)
    return out


def _kib(x) -> str:
    return "sat" if x is None else f"{x:g}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller grid, fewer shapes")
    parser.add_argument("--table", help="latency table JSON (default: synthetic 80 us + 1 GB/s, 256 KiB)")
    parser.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    parser.add_argument("--real", type=int, default=0, metavar="FRAMES",
                        help="also score the built-in model's shapes on its own importance, recorded on "
                        "this many training scenes")
    args = parser.parse_args(argv)
    table = LatencyTable.load(args.table) if args.table else LatencyTable.synthetic(
        setup_s=80e-6, peak_bytes_per_s=1e9, max_kib=256)
    names = [n.strip() for n in args.shapes.split(",") if n.strip()] or list(ROW_SHAPES)
    grid = settings_grid(args.quick)
    print(f"Latency table: {table.meta or args.table}, saturation {table.saturation_bytes // 1024} KiB; "
          f"{len(grid)} settings (unit = start = step KiB, largest window, jump cap KiB).\n")
    print("| shape | rows x row B | magnitude keeps | chosen: unit / max / jump KiB | keep | cost | ms |"
          " default_params: keep | cost | safe | old 32/32/32: keep | cost | safe |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    jobs = [(name, *ROW_SHAPES[name], None) for name in names]
    if args.real:
        jobs += [(f"{name} (real)", *ROW_SHAPES[name], inputs) for name, inputs in built_in_importance(args.real).items()]
    for name, rows, row_bytes, inputs in jobs:
        current = default_params(row_bytes, rows)
        old = ChunkParams(32.0, 32.0, None, 32.0) if row_bytes <= 32 * 1024 else ChunkParams(4.0, 4.0, None, 8.0)
        results, magnitude = score_shape(rows, row_bytes, table, [*grid, current, old], inputs=inputs)
        by_windows = {r["windows"]: r for r in results}
        best = choose(results)
        cur = by_windows[current.for_matrix(row_bytes, rows, table)]
        prev = by_windows[old.for_matrix(row_bytes, rows, table)]
        chosen = ("none" if best is None else f"{best['params'].start_kib:g} / {_kib(best['params'].max_kib)} / "
                  f"{best['params'].jump_cap_kib:g} | {best['keep']:.3f} | {best['cost']:.3f} | {best['ms']:.2f}")
        print(f"| {name} | {rows} x {row_bytes} | {magnitude:.3f} | {chosen} | {cur['keep']:.3f} | "
              f"{cur['cost']:.3f} | {'yes' if cur['safe'] else 'NO'} | {prev['keep']:.3f} | {prev['cost']:.3f} | "
              f"{'yes' if prev['safe'] else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()

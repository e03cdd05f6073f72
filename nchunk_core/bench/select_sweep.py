"""Selection study: chunking window sweep, greedy versus dynamic program, and selection time.

Prints markdown tables (docs/selection.md records a run):

    python -m nchunk_core.bench.select_sweep            # everything, a few minutes
    python -m nchunk_core.bench.select_sweep --quick    # smaller grid, fewer inputs
    python -m nchunk_core.bench.select_sweep --only timing

Quality is measured on the paper's axis: retained importance (Σ selected / Σ all) against estimated
read time (Σ T over runs). Each method gives one curve over the row budget R; a curve is turned into
its upper envelope (with a time budget one may pick any R that fits) and read off at fixed fractions
of the dense read time. Importance vectors are synthetic: lognormal with persistent hot channels,
with and without the offline hot-cold reordering of rows.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np

from nchunk_core.io.latency import LatencyTable
from nchunk_core.runtime.select import ChunkParams, default_params, optimal_runs, select

# LLaVA-OneVision-Qwen2-7B fp16: hidden 3584, intermediate 18944, 4 KV heads of 128.
SHAPES = {  # name: (rows = input channels, bytes per stored row)
    "q+k+v": (3584, (3584 + 512 + 512) * 2),  # bundled: one row holds a channel of q, k and v
    "q": (3584, 3584 * 2),
    "down": (18944, 3584 * 2),
    "gate+up": (3584, 2 * 18944 * 2),
}
TIMING_ROWS = 18944  # selection time is measured on matrices of this many rows
TIME_LIMIT_MS = 2.0  # per matrix, median, one thread
# The sweep keeps combinations under TIME_LIMIT_MS * TIME_MARGIN: room for slower cores (Jetson)
# and for the noise of a shared machine.
TIME_MARGIN = 0.5
LATENCY_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)  # of the dense read time, where curves are compared
BUDGET_FRACTIONS = np.concatenate([np.linspace(0.01, 0.1, 6), np.linspace(0.12, 0.8, 22)])
DISTRIBUTIONS = [(cv, hot_cold) for cv in (1.0, 2.5, 4.5) for hot_cold in (False, True)]


def synthetic_importance(rows: int, cv: float, hot_cold: bool, rng: np.random.Generator,
                         n_calibration: int = 32) -> np.ndarray:
    """One input's importance: float32 [rows], lognormal with coefficient of variation `cv`.

    70 % of the log-variance is a per-channel hotness shared by all inputs, 30 % is per input. With
    `hot_cold`, rows are ordered as the offline reordering would store them: by how often a channel
    is in the top half on `n_calibration` calibration inputs.
    """
    sigma = np.sqrt(np.log1p(cv * cv))
    hot = rng.lognormal(0.0, sigma * np.sqrt(0.7), rows)  # [rows]
    noise = sigma * np.sqrt(0.3)
    v = (hot * rng.lognormal(0.0, noise, rows)).astype(np.float32)
    if hot_cold:
        calibration = hot * rng.lognormal(0.0, noise, (n_calibration, rows))  # [n_cal, rows]
        top = calibration >= np.median(calibration, axis=1, keepdims=True)
        v = v[np.argsort(-top.sum(axis=0), kind="stable")]
    return v


def envelope(latency, retained):
    """Best retained importance reachable within each time: sorted latency, running max."""
    order = np.argsort(latency)
    return np.asarray(latency)[order], np.maximum.accumulate(np.asarray(retained)[order])


def method_curve(v, method, table, row_bytes, params=None):
    lat, ret = [], []
    for fraction in BUDGET_FRACTIONS:
        sel = select(v, int(round(fraction * v.size)), method, table, row_bytes, params)
        lat.append(sel.est_latency_s)
        ret.append(sel.retained)
    return envelope(lat, ret)


def frontier_at(v, table, row_bytes, latencies, steps=30):
    """Best retained importance any selection reaches within each time (upper concave hull).

    For each time, bisects the price of time lam of optimal_runs until the two solutions around it
    are adjacent hull vertices, then interpolates between them.
    """
    total = float(v.sum(dtype=np.float64))
    t_row = float(table.estimate(table.max_bytes)) / table.max_bytes * row_bytes
    lam0 = total / v.size / t_row

    def point(lam):
        runs = optimal_runs(v, lam, table, row_bytes)
        kept = sum(float(v[s:s + n].sum(dtype=np.float64)) for s, n in runs)
        return table.estimate_runs(runs[:, 1], row_bytes), kept / total

    out = []
    for target in latencies:
        lo, hi = np.log(lam0) - 12.0, np.log(lam0) + 12.0  # time falls as lam rises
        slow, fast = point(np.exp(lo)), point(np.exp(hi))
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            p = point(np.exp(mid))
            if p[0] > target:
                lo, slow = mid, p
            else:
                hi, fast = mid, p
        if slow[0] <= target or slow[0] == fast[0]:
            out.append(slow[1] if slow[0] <= target else fast[1])
        else:
            w = (target - fast[0]) / (slow[0] - fast[0])
            out.append(fast[1] + w * (slow[1] - fast[1]))
    return np.array(out)


def retained_at(curve, latencies):
    """Retained importance of an envelope at the given times (0 below its first point)."""
    lat, ret = curve
    return np.interp(latencies, lat, ret, left=0.0, right=ret[-1])


def time_needed(curve, retained):
    """Estimated time an envelope needs to reach the given retained importance (nan if never)."""
    lat, ret = curve
    out = np.full(np.shape(retained), np.nan)
    for i, r in enumerate(np.atleast_1d(retained)):
        k = int(np.searchsorted(ret, r))  # first point reaching r
        if k < len(ret):
            out[i] = lat[0] if k == 0 else np.interp(r, ret[k - 1:k + 1], lat[k - 1:k + 1])
    return out


def n_candidates(w, rows):
    """Candidate windows of the chunking method for WindowRows `w` on `rows` rows."""
    count = 0
    for r in range(w.r_min, min(w.r_max, rows) + 1, w.r_step):
        stride = min(r, w.jump_cap)
        on_grid = (rows - r) // stride + 1
        count += on_grid + ((on_grid - 1) * stride + r < rows)
    return count


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def inputs_for(rows, n_per_distribution, seed):
    rng = np.random.default_rng(seed)
    return [synthetic_importance(rows, cv, hc, rng)
            for cv, hc in DISTRIBUTIONS for _ in range(n_per_distribution)]


def selection_ms(method, row_bytes, table, params=None, repeats=15, rows=TIMING_ROWS,
                 fractions=(0.1, 0.3, 0.5)):
    """Worst over budgets of the median wall time of `select` on `rows` rows (ms)."""
    v = synthetic_importance(rows, 2.5, True, np.random.default_rng(7))
    out = []
    for fraction in fractions:
        budget = int(fraction * rows)
        select(v, budget, method, table, row_bytes, params)  # warm up scratch buffers
        out.append(median_ms(lambda: select(v, budget, method, table, row_bytes, params), repeats))
    return max(out)


# ---- sections ------------------------------------------------------------------------------

def sweep(table, quick=False):
    """Score every window combination per shape; pick defaults per row-size regime."""
    starts = (4, 8, 16, 32, 64)
    steps = (4, 8, 16, 32, 64)
    caps = (8, 16, 32, 64, 128, 256) if not quick else (16, 64)
    n_inputs = 1
    limit = TIME_LIMIT_MS * TIME_MARGIN
    regimes = {"small rows (q+k+v, q, down)": ["q+k+v", "q", "down"],
               "large rows (gate+up)": ["gate+up"]}
    chosen = {}
    for regime, names in regimes.items():
        print(f"\n### Window sweep, {regime}\n")
        fractions = ", ".join(f"{f:.0%}" for f in LATENCY_FRACTIONS)
        print(f"Score = mean retained importance at {fractions} of the dense read time, over "
              f"{len(DISTRIBUTIONS) * n_inputs} inputs per shape; "
              f"time = worst median select() ms at {TIMING_ROWS} rows over R = 10, 30, 50 % "
              "(best of 3 rounds); "
              f"candidates = number of candidate windows at {TIMING_ROWS} rows.\n")
        data = {name: inputs_for(SHAPES[name][0], n_inputs, seed=11) for name in names}
        header = ("| start KiB | step KiB | jump cap KiB | " + " | ".join(names)
                  + " | mean | ms | candidates |")
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        results = []
        seen = set()
        for start, step, cap in itertools.product(starts, steps, caps):
            params = ChunkParams(start_kib=start, step_kib=step, jump_cap_kib=cap)
            key = tuple(params.for_matrix(SHAPES[n][1], SHAPES[n][0], table) for n in names)
            if key in seen:
                continue
            seen.add(key)
            scores = []
            for name in names:
                rows, row_bytes = SHAPES[name]
                dense = table.estimate_runs([rows], row_bytes)
                at = np.array(LATENCY_FRACTIONS) * dense
                curves = [method_curve(v, "chunking", table, row_bytes, params) for v in data[name]]
                scores.append(np.mean([retained_at(c, at) for c in curves]))
            row_sizes = sorted({SHAPES[n][1] for n in names})
            # Best of 3 rounds: the load of a shared machine only ever adds time.
            ms = max(min(selection_ms("chunking", rb, table, params, repeats=9) for _ in range(3))
                     for rb in row_sizes)
            count = max(n_candidates(params.for_matrix(rb, TIMING_ROWS, table), TIMING_ROWS)
                        for rb in row_sizes)
            results.append((float(np.mean(scores)), ms, params, scores))
            print(f"| {start} | {step} | {cap} | " + " | ".join(f"{s:.4f}" for s in scores)
                  + f" | {np.mean(scores):.4f} | {ms:.2f} | {count} |", flush=True)
        for method in ("magnitude", "dp"):  # references on the same inputs
            scores = []
            for name in names:
                rows, row_bytes = SHAPES[name]
                at = np.array(LATENCY_FRACTIONS) * table.estimate_runs([rows], row_bytes)
                scores.append(np.mean([retained_at(method_curve(v, method, table, row_bytes), at)
                                       for v in data[name]]))
            print(f"| {method} | | | " + " | ".join(f"{x:.4f}" for x in scores)
                  + f" | {np.mean(scores):.4f} | | |")
        fast = [r for r in results if r[1] <= limit]
        best = max(fast or results, key=lambda r: r[0])
        overall = max(results, key=lambda r: r[0])
        chosen[regime] = best[2]
        print(f"\nBest within {limit:.2f} ms: {best[2]} score {best[0]:.4f} at {best[1]:.2f} ms; "
              f"best overall: {overall[2]} score {overall[0]:.4f} at {overall[1]:.2f} ms.")
    return chosen


def greedy_vs_dp(table, quick=False):
    """Retained importance at equal estimated time: magnitude, chunking, dp, and the frontier."""
    n_inputs = 1 if quick else 2
    print("\n### Greedy chunking versus the dynamic program (defaults of default_params)\n")
    print("Retained importance at a fraction of the dense read time, mean over inputs; "
          "`time ratio` = time chunking needs for the retained importance dp reaches, / dp's time "
          "(median over the compared points).\n")
    print("| shape | rows order | CV | t/dense | magnitude | chunking | dp | frontier |"
          " dp - chunking | time ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    for name, (rows, row_bytes) in SHAPES.items():
        params = default_params(row_bytes, rows)
        dense = table.estimate_runs([rows], row_bytes)
        at = np.array(LATENCY_FRACTIONS) * dense
        rng = np.random.default_rng(5)
        for cv, hot_cold in DISTRIBUTIONS:
            acc = {k: [] for k in ("magnitude", "chunking", "dp", "frontier")}
            ratios = []
            for _ in range(n_inputs):
                v = synthetic_importance(rows, cv, hot_cold, rng)
                curves = {m: method_curve(v, m, table, row_bytes, params)
                          for m in ("magnitude", "chunking", "dp")}
                for k, c in curves.items():
                    acc[k].append(retained_at(c, at))
                acc["frontier"].append(frontier_at(v, table, row_bytes, at))
                dp_ret = retained_at(curves["dp"], at)
                ratios.extend(time_needed(curves["chunking"], dp_ret) / at)
            mean = {k: np.mean(a, axis=0) for k, a in acc.items()}  # [len(at)]
            ratio = float(np.nanmedian(ratios))
            summary.append((mean["dp"] - mean["chunking"], ratio))
            for j, frac in enumerate(LATENCY_FRACTIONS):
                if frac not in (0.1, 0.3, 0.5):
                    continue
                print(f"| {name} | {'hot-cold' if hot_cold else 'as is'} | {cv} | {frac:.0%} | "
                      + " | ".join(f"{mean[k][j]:.4f}" for k in acc)
                      + f" | {mean['dp'][j] - mean['chunking'][j]:+.4f} | {ratio:.3f} |")
    gains = np.concatenate([g for g, _ in summary])
    print(f"\nOver all shapes, inputs and times: dp - chunking mean {gains.mean():+.4f}, "
          f"min {gains.min():+.4f}, max {gains.max():+.4f}; median time ratio "
          f"{np.median([r for _, r in summary]):.3f}.")


def timing(table, repeats=60):
    """Median select time at TIMING_ROWS rows per row size and method; native call vs wrapper."""
    from nchunk_core import _native
    print(f"\n### Selection time, {TIMING_ROWS} rows, one thread (median of {repeats} calls)\n")
    print("| row bytes | method | R = 10 % | R = 30 % | R = 50 % | R = 90 % |"
          " native call only, R = 50 % |")
    print("|---|---|---|---|---|---|---|")
    v = synthetic_importance(TIMING_ROWS, 2.5, True, np.random.default_rng(7))
    for row_bytes in sorted({rb for _, rb in SHAPES.values()}):
        for method in ("magnitude", "chunking", "dp"):
            cells = [selection_ms(method, row_bytes, table, repeats=repeats, fractions=(f,))
                     for f in (0.1, 0.3, 0.5, 0.9)]
            params = default_params(row_bytes, TIMING_ROWS)
            windows = params.for_matrix(row_bytes, TIMING_ROWS, table)
            budget = TIMING_ROWS // 2
            native = median_ms(lambda: _native.select_rows(
                v, budget, method, table.latency_s, table.step_bytes, row_bytes, *windows), repeats)
            print(f"| {row_bytes} | {method} | " + " | ".join(f"{c:.3f}" for c in cells)
                  + f" | {native:.3f} |", flush=True)
    print("\nSpread over inputs: 6 distributions x 12 budgets (2-95 %), best of 3 calls each, "
          "ms.\n")
    print("| rows x row bytes | method | median | 90th percentile | worst |")
    print("|---|---|---|---|---|")
    shapes = sorted({(TIMING_ROWS, rb) for _, rb in SHAPES.values()} | set(SHAPES.values()))
    for rows, row_bytes in shapes:
        inputs = inputs_for(rows, 1, seed=13)
        for method in ("chunking", "dp"):
            times = []
            for x in inputs:
                for fraction in np.linspace(0.02, 0.95, 12):
                    budget = int(fraction * rows)
                    times.append(min(select(x, budget, method, table, row_bytes).select_s
                                     for _ in range(3)))
            ms = 1e3 * np.array(times)
            print(f"| {rows} x {row_bytes} | {method} | {np.median(ms):.3f} | "
                  f"{np.percentile(ms, 90):.3f} | {ms.max():.3f} |", flush=True)
    small = v[:64].copy()
    wrapper = median_ms(lambda: select(small, 32, "magnitude", table, 7168), 20 * repeats)
    native = median_ms(lambda: _native.select_rows(
        small, 32, "magnitude", table.latency_s, table.step_bytes, 7168), 20 * repeats)
    print(f"\nPython wrapper overhead (select() minus the native call, 64 rows): "
          f"{1e3 * (wrapper - native):.1f} us per call.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller grid and fewer inputs")
    parser.add_argument("--only", choices=("sweep", "compare", "timing"), help="run one section")
    parser.add_argument("--table", help="latency table JSON (default: synthetic 80 us + 1 GB/s)")
    args = parser.parse_args(argv)
    table = LatencyTable.load(args.table) if args.table else LatencyTable.synthetic(
        setup_s=80e-6, peak_bytes_per_s=1e9, max_kib=256)
    print(f"Latency table: {table.meta or args.table}, {table.max_bytes // 1024} KiB grid, "
          f"saturation {table.saturation_bytes // 1024} KiB.")
    if args.only in (None, "sweep"):
        sweep(table, args.quick)
    if args.only in (None, "compare"):
        greedy_vs_dp(table, args.quick)
    if args.only in (None, "timing"):
        timing(table, repeats=20 if args.quick else 60)


if __name__ == "__main__":
    main()

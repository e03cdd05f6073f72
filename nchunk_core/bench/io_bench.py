"""`nchunk bench io`: I/O efficiency of selection methods on the decoder shapes of a 7B VLM.

A store with the decoder projections of LLaVA-OneVision-Qwen2-7B (hidden 3584, 28 query / 4 key-value
heads of 128, intermediate 18 944, fp16; random weights, since only I/O is measured) is written once
on the drive under test, bundled (q|k|v and gate|up share rows) and unbundled, and reused later.

For every method, storage layout and sparsity, each test frame's importance vectors are turned into a
selection per matrix, the selected rows are read cold (direct I/O) through the reader, and we record
measured and estimated I/O time, retained importance, reads and run lengths. Reordering is applied
the way the runtime sees it: the importance vector is put in hot–cold order (permutation from
calibration frames) before selection, and the selected stored positions are read; the I/O pattern is
exactly that of a store written in hot–cold order.

The paper's comparison: the speedup of a method over magnitude at matched retained importance, with
magnitude's time interpolated linearly along its retained-importance curve.

Reads check every row's CRC-32C, as the runtime does. What that costs is measured on its own: for
chunking + reorder on the bundled store at a few sparsities, every frame's selections are read twice,
with and without the checks, in alternating order, and the ratio of the summed I/O times is reported.

The sweep reads through the backend the drive profile chose; the two backends (thread pool, io_uring)
are compared apart on the same selections, paired and interleaved (backend_compare.py).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from nchunk_core.io import checksum
from nchunk_core.io.latency import LatencyTable
from nchunk_core.runtime.layers import combined_table, read_runs
from nchunk_core.io.reader import Reader
from nchunk_core.convert.reorder import hot_cold_permutation
from nchunk_core.runtime.select import select
from nchunk_core.store import Store, StoreError, StoreWriter
from nchunk_core.bench import backend_compare
from nchunk_core.bench.importance import ImportanceModel, cv

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 3584, 28, 4, 128, 18944
SPARSITIES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
EXTRA_MAGNITUDE = [0.8, 0.9]  # extends magnitude's curve so matched-importance interpolation has support
VERIFY_SPARSITIES = [0.0, 0.3, 0.5, 0.7]  # where the cost of the row checks is measured
STORE_VERSION = 1
RUN_BINS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1 << 30]  # run-length histogram bins, in rows

# input name -> [(projection, out_features)], in_features
INPUTS = {
    "attn_in": ([("q_proj", HEADS * HEAD_DIM), ("k_proj", KV_HEADS * HEAD_DIM), ("v_proj", KV_HEADS * HEAD_DIM)], HIDDEN),
    "attn_out": ([("o_proj", HIDDEN)], HEADS * HEAD_DIM),
    "mlp_in": ([("gate_proj", INTER), ("up_proj", INTER)], HIDDEN),
    "mlp_out": ([("down_proj", HIDDEN)], INTER),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    method: str  # selection method
    reorder: bool
    bundled: bool

    @property
    def label(self) -> str:
        return f"{self.method}{' + reorder' if self.reorder else ''} ({'bundled' if self.bundled else 'unbundled'})"


def _random_fp16(rng, out_features: int, in_features: int) -> np.ndarray:
    """[out, in] finite fp16 values (bit patterns below the exponent of inf), cheap to generate."""
    bits = rng.integers(0, 0x7BFF, (out_features, in_features), dtype=np.uint16)
    return bits.view(np.float16)


def build_store(path: Path, layers: int, bundled: bool, progress: bool = True) -> Store:
    """Write (or reuse) the benchmark store."""
    info = {"bench": "io", "version": STORE_VERSION, "layers": layers, "bundled": bundled,
            "shape": "llava-onevision-qwen2-7b"}
    if (path / "manifest.json").exists():
        try:
            store = Store.open(path)
            if store.model_info == info:
                return store
        except StoreError:
            pass
    from tqdm import tqdm

    rng = np.random.default_rng(1234)
    todo = [(layer, name) for layer in range(layers) for name in INPUTS]
    with StoreWriter(path, model_info=info, overwrite=True) as w:
        for layer, inp in tqdm(todo, desc=f"writing {'bundled' if bundled else 'unbundled'} store", disable=not progress):
            outs, in_features = INPUTS[inp]
            mats = [(p, _random_fp16(rng, o, in_features)) for p, o in outs]
            if bundled or len(mats) == 1:
                w.add_group(f"layers.{layer}.{inp}", input=f"layers.{layer}.{inp}", matrices=mats, layer=layer)
            else:
                for p, m in mats:
                    w.add_group(f"layers.{layer}.{p}", input=f"layers.{layer}.{inp}", matrices=[(p, m)], layer=layer)
    return Store.open(path)


class Matrix:
    """The groups of one input in a store, opened for reading, with the cost table selection uses."""

    def __init__(self, store: Store, reader: Reader, input_name: str, table: LatencyTable):
        self.groups = store.groups_for_input(input_name)
        self.rows = self.groups[0].rows
        self.row_bytes = sum(g.row_bytes for g in self.groups)
        self.table = combined_table(table, [g.row_bytes for g in self.groups])
        self.handles = [reader.open(str(g.file)) for g in self.groups]


def crc32c_throughput(row_bytes: int = 2 * (HIDDEN + 2 * KV_HEADS * HEAD_DIM + HEADS * HEAD_DIM),
                      nbytes: int = 64 << 20) -> float:
    """Bytes per second of the row CRC-32C on one core, in memory (best of 5), on q|k|v-sized rows."""
    data = np.random.default_rng(0).integers(0, 256, nbytes // row_bytes * row_bytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        checksum.crc32c_rows(data, row_bytes)
        best = min(best, time.perf_counter() - t0)
    return data.size / best


def verify_cost(reader: Reader, mats: dict, names: list, test_v: dict, perms: dict, frames: int, buf,
                method: str = "chunking", progress: bool = True) -> dict:
    """I/O time of the same reads with and without the row checks, interleaved.

    Each matrix's selection is read twice, one right after the other, in alternating order over
    frames and matrices (so a drive or host cache that favours the second read favours neither). The
    two times form a pair; ratios are medians of the paired ratios, which a stall of the shared
    machine during one read does not sway. Times per frame are sums over the matrices. For scale,
    `crc_cpu_ms` is the CPU time the checks of a frame take on one idle core (bytes / throughput).
    """
    from tqdm import tqdm

    throughput = crc32c_throughput()
    points, ratios = [], []
    for s in tqdm(VERIFY_SPARSITIES, desc="bench io: row checks on/off", disable=not progress):
        on, off, paired, nbytes = [], [], [], []
        for f in range(frames):
            t = {True: 0.0, False: 0.0}
            nbytes.append(0)
            for k, key in enumerate(names):
                m = mats[key]
                imp = test_v[key][f][perms[key]]  # stored order of a hot–cold store
                sel = select(imp, m.rows - int(round(s * m.rows)), method, m.table, m.row_bytes)
                nbytes[-1] += sel.rows * m.row_bytes
                pair = {}
                for verify in ((True, False) if (f + k) % 2 == 0 else (False, True)):
                    pair[verify] = read_runs(reader, m.handles, m.groups, sel.runs, buf, verify=verify)
                    t[verify] += pair[verify]
                paired.append(pair[True] / pair[False])
            on.append(t[True])
            off.append(t[False])
        ratios.extend(paired)
        points.append({"sparsity": s, "io_ms_verified": float(np.median(on)) * 1e3,
                       "io_ms_unverified": float(np.median(off)) * 1e3, "ratio": float(np.median(paired)),
                       "crc_cpu_ms": float(np.median(nbytes)) / throughput * 1e3, "ratio_pairs": paired})
    return {"label": f"{method} + reorder (bundled)", "points": points, "ratio": float(np.median(ratios)),
            "crc32c": checksum.hardware() or "table", "crc32c_gb_per_s": throughput / 1e9}


def run(directory, layers: int = 2, frames: int = 10, calib_frames: int = 64, methods=("magnitude", "chunking", "dp"),
        threads: int = 6, table: LatencyTable | None = None, model: ImportanceModel | None = None,
        progress: bool = True, log=print, sparsities=None) -> dict:
    """Run the sweep; returns the JSON-able result (points, summary)."""
    from tqdm import tqdm

    from nchunk_core.io.profile import load_or_profile

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = model or ImportanceModel()
    table = table or load_or_profile(directory, threads=threads, quick=True, progress=progress, log=log)
    stores = {b: build_store(directory / f"bench-io-{'bundled' if b else 'unbundled'}", layers, b, progress)
              for b in (True, False)}

    # Importance: per (layer, input) a persistent base, calibration frames, and test frames.
    names = [(layer, inp) for layer in range(layers) for inp in INPUTS]
    test_v, perms, cvs = {}, {}, []
    for k, (layer, inp) in enumerate(names):
        base = model.base(INPUTS[inp][1], seed=100 + k)
        perms[(layer, inp)] = hot_cold_permutation(model.frames(base, calib_frames, seed=200 + k))
        test_v[(layer, inp)] = model.frames(base, frames, seed=300 + k)
        cvs.extend(cv(test_v[(layer, inp)]).tolist())

    variants = [Variant(m, r, b) for b in (True, False) for m in methods for r in (False, True)]
    sweep = SPARSITIES if sparsities is None else [float(s) for s in sparsities]
    points = []
    with Reader(threads=threads, profile=table) as reader:
        mats = {b: {(layer, inp): Matrix(stores[b], reader, f"layers.{layer}.{inp}", table) for layer, inp in names}
                for b in stores}
        largest = max(sum(g.nbytes for g in m.groups) for m in mats[True].values())
        buf = reader.empty(largest)
        verification = verify_cost(reader, mats[True], names, test_v, perms, frames, buf,
                                   "chunking" if "chunking" in methods else methods[0], progress)
        backends = backend_compare.selection_reads(threads, mats[True], names, test_v, perms, frames, buf,
                                                   "chunking" if "chunking" in methods else methods[0], progress)
        backends["sweep_backend"] = reader.backend
        jobs = [(v, s) for v in variants for s in sweep + (EXTRA_MAGNITUDE if v.method == "magnitude" else [])]
        for v, s in tqdm(jobs, desc="bench io", disable=not progress):
            per_frame = []
            for f in range(frames):
                acc = dict(io_s=0.0, est_s=0.0, bytes=0, reads=0, rows=0, select_s=0.0,
                           kept=0.0, total=0.0, runlens=[], select_largest_s=0.0)
                for key in names:
                    m = mats[v.bundled][key]
                    imp = test_v[key][f]
                    if v.reorder:
                        imp = imp[perms[key]]  # stored order of a hot–cold store
                    budget = m.rows - int(round(s * m.rows))
                    sel = select(imp, budget, v.method, m.table, m.row_bytes)
                    io = read_runs(reader, m.handles, m.groups, sel.runs, buf)
                    acc["io_s"] += io
                    acc["est_s"] += sel.est_latency_s
                    acc["bytes"] += int(sel.rows) * m.row_bytes
                    acc["reads"] += len(sel.runs) * len(m.groups)
                    acc["rows"] += int(sel.rows)
                    acc["select_s"] += sel.select_s
                    if key[1] == "mlp_out":
                        acc["select_largest_s"] = max(acc["select_largest_s"], sel.select_s)
                    acc["kept"] += float(imp[sel.row_indices()].sum())
                    acc["total"] += float(imp.sum())
                    acc["runlens"].extend(sel.runs[:, 1].tolist())
                per_frame.append(acc)
            med = lambda k: float(np.median([a[k] for a in per_frame]))  # noqa: E731
            runlens = np.concatenate([np.asarray(a["runlens"]) for a in per_frame])
            points.append({
                "method": v.method, "reorder": v.reorder, "bundled": v.bundled, "label": v.label, "sparsity": s,
                "io_ms": med("io_s") * 1e3, "est_ms": med("est_s") * 1e3,
                "io_ms_frames": [a["io_s"] * 1e3 for a in per_frame], "est_ms_frames": [a["est_s"] * 1e3 for a in per_frame],
                "retained": float(np.median([a["kept"] / a["total"] for a in per_frame])),
                "reads": med("reads"), "mean_run_rows": float(runlens.mean()) if runlens.size else 0.0,
                "mib": med("bytes") / 2**20, "physical_limit_ms": med("bytes") / table.peak_bytes_per_s * 1e3,
                "select_ms": med("select_s") * 1e3, "select_largest_ms": med("select_largest_s") * 1e3,
                "runlen_hist": np.histogram(runlens, bins=RUN_BINS, weights=runlens)[0].tolist()
                if abs(s - 0.5) < 1e-9 else None,  # selected rows per run-length bin
            })
    return summarize(points, table, cvs, layers=layers, frames=frames, calib_frames=calib_frames, model=model,
                     verification=verification, backends=backends,
                     io_uring_vs_threads=backends["io_uring_vs_threads"])


def matched_speedup(points: list[dict], label: str, baseline: str, envelope: bool = False) -> dict[float, float]:
    """Speedup of `label` over `baseline` at the retained importance `label` reaches, per sparsity.

    The paper's protocol: the baseline's time is interpolated linearly along its curve of
    (retained importance, I/O time). With `envelope`, the baseline is first replaced by its lower
    envelope — at each importance level the fastest baseline point retaining at least that much —
    so a baseline point slower than reading more rows (for magnitude: slower than dense) never counts.
    """
    base = sorted((p for p in points if p["label"] == baseline), key=lambda p: p["retained"])
    if not base:
        return {}  # the baseline method was not run
    r = np.array([p["retained"] for p in base])
    t = np.array([p["io_ms"] for p in base])
    if envelope:
        t = np.minimum.accumulate(t[::-1])[::-1]  # fastest among points retaining at least r
    out = {}
    for p in points:
        if p["label"] != label or p["sparsity"] not in SPARSITIES:
            continue
        if r[0] <= p["retained"] <= r[-1]:
            out[p["sparsity"]] = float(np.interp(p["retained"], r, t) / p["io_ms"])
    return out


def summarize(points, table, cvs, **meta) -> dict:
    speedups, envelope = {}, {}
    for label in sorted({p["label"] for p in points}):
        baseline = f"magnitude ({'bundled' if '(bundled)' in label else 'unbundled'})"
        if label != baseline:
            speedups[label] = matched_speedup(points, label, baseline)
            envelope[label] = matched_speedup(points, label, baseline, envelope=True)

    def mean_30_70(d):
        mid = [v for s, v in d.items() if 0.3 - 1e-9 <= s <= 0.7 + 1e-9]
        return float(np.mean(mid)) if mid else None

    headline = "chunking + reorder (bundled)"
    all_best = [v for d in speedups.values() for v in d.values()]
    meas = np.concatenate([p["io_ms_frames"] for p in points])
    est = np.concatenate([p["est_ms_frames"] for p in points])
    sel_largest = [p["select_largest_ms"] for p in points if p["method"] == "chunking"]
    model = meta.pop("model")
    return {
        "machine": table.meta.get("drive"),
        "saturation_kib": table.saturation_bytes // 1024,
        "peak_mb_per_s": table.peak_bytes_per_s / 1e6,
        "importance_model": dataclasses.asdict(model),
        "importance_cv": {"min": float(np.min(cvs)), "median": float(np.median(cvs)), "max": float(np.max(cvs))},
        "mean_speedup_30_70": mean_30_70(speedups.get(headline, {})),
        "max_speedup": float(np.max(all_best)) if all_best else None,
        "mean_speedup_30_70_by_method": {k: mean_30_70(d) for k, d in speedups.items()},
        "mean_speedup_30_70_vs_envelope": {k: mean_30_70(d) for k, d in envelope.items()},
        "select_ms_p50": float(np.median(sel_largest)) if sel_largest else None,
        "estimate_pearson_r": float(np.corrcoef(meas, est)[0, 1]),
        "speedups": {k: {str(s): v for s, v in d.items()} for k, d in speedups.items()},
        "speedups_vs_envelope": {k: {str(s): v for s, v in d.items()} for k, d in envelope.items()},
        "points": points,
        **meta,
    }


def format_table(res: dict) -> str:
    lines = [
        f"bench io: {res['layers']} decoder layers of LLaVA-OneVision-Qwen2-7B shape, fp16, {res['frames']} frames; "
        f"drive {res['machine']}, saturation {res['saturation_kib']} KiB, peak {res['peak_mb_per_s']:.0f} MB/s",
        f"importance CV over channels: median {res['importance_cv']['median']:.2f} "
        f"(range {res['importance_cv']['min']:.2f}-{res['importance_cv']['max']:.2f})",
        "",
        f"{'method':<34}{'sparsity':>8}{'io ms':>9}{'est ms':>9}{'limit ms':>9}{'retained':>9}{'reads':>9}"
        f"{'mean run':>9}{'MiB':>8}{'sel ms':>8}{'speedup':>8}",
    ]
    for p in res["points"]:
        if p["sparsity"] not in SPARSITIES:
            continue
        sp = res["speedups"].get(p["label"], {}).get(str(p["sparsity"]))
        lines.append(
            f"{p['label']:<34}{p['sparsity']:>8.1f}{p['io_ms']:>9.1f}{p['est_ms']:>9.1f}{p['physical_limit_ms']:>9.1f}"
            f"{p['retained']:>9.3f}{p['reads']:>9.0f}{p['mean_run_rows']:>9.1f}{p['mib']:>8.1f}{p['select_ms']:>8.1f}"
            f"{(f'{sp:.2f}x' if sp else '-'):>8}")
    fmt = lambda v: f"{v:.2f}x" if v is not None else "n/a"  # noqa: E731
    ver = res["verification"]
    lines += ["", f"row CRC-32C checks ({ver['crc32c']}, {ver['crc32c_gb_per_s']:.1f} GB/s on one core), {ver['label']}, "
              f"interleaved: I/O time with / without",
              f"{'sparsity':>10}{'with ms':>10}{'without ms':>12}{'ratio':>8}{'crc cpu ms':>12}"]
    for p in ver["points"]:
        lines.append(f"{p['sparsity']:>10.1f}{p['io_ms_verified']:>10.1f}{p['io_ms_unverified']:>12.1f}{p['ratio']:>8.3f}"
                     f"{p['crc_cpu_ms']:>12.1f}")
    lines.append(f"verify_overhead: {100 * (ver['ratio'] - 1):+.1f} % of I/O time (median of paired ratios "
                 f"{ver['ratio']:.3f}; goal at most +5 %)")
    if "backends" in res:
        lines += ["", *backend_compare.format_lines(res["backends"])]
    lines += ["", f"{'mean speedup over magnitude, sparsity 30-70 %':<48}{'paper protocol':>16}{'vs best of magnitude/dense':>28}"]
    for label, v in res["mean_speedup_30_70_by_method"].items():
        lines.append(f"{label:<48}{fmt(v):>16}{fmt(res['mean_speedup_30_70_vs_envelope'][label]):>28}")
    lines += [
        "",
        f"mean_speedup_30_70 (chunking + reorder, bundled): {fmt(res['mean_speedup_30_70'])}   "
        f"max_speedup: {fmt(res['max_speedup'])}   select_ms_p50 (18 944 rows, chunking): "
        f"{res['select_ms_p50']:.2f} ms   estimate_pearson_r: {res['estimate_pearson_r']:.3f}",
    ]
    return "\n".join(lines)


def plot(res: dict, out_dir) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, bundled in zip(axes, (True, False)):
        for label in sorted({p["label"] for p in res["points"] if p["bundled"] == bundled}):
            pts = sorted((p for p in res["points"] if p["label"] == label), key=lambda p: p["sparsity"])
            ax.plot([p["io_ms"] for p in pts], [p["retained"] for p in pts], "o-", ms=3, label=label.split(" (")[0])
        lim = sorted((p for p in res["points"] if p["bundled"] == bundled and p["method"] == "magnitude" and not p["reorder"]),
                     key=lambda p: p["sparsity"])
        ax.plot([p["physical_limit_ms"] for p in lim], [p["retained"] for p in lim], "k:", lw=1,
                label="physical limit (magnitude's bytes at peak)")
        ax.set(xlabel="I/O time per frame (ms, median, direct I/O)", title="bundled q|k|v, gate|up" if bundled else "unbundled",
               xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("retained importance")
    fig.suptitle(f"Retained importance vs I/O time — {res['machine']}", fontsize=10)
    fig.tight_layout()
    paths.append(str(out_dir / "bench_io_curves.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    hists = [p for p in res["points"] if p["runlen_hist"] and p["bundled"]]
    width = 0.8 / max(1, len(hists))
    for i, p in enumerate(hists):
        h = np.array(p["runlen_hist"], dtype=float)
        ax.bar(np.arange(h.size) + i * width, h / h.sum(), width, label=p["label"].split(" (")[0])
    names = [f"{a}" if b == a + 1 else (f"{a}-{b - 1}" if b < 1 << 30 else f"≥{a}") for a, b in zip(RUN_BINS, RUN_BINS[1:])]
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    ax.set(xlabel="run length (rows)", ylabel="fraction of selected rows",
           title="Run lengths at 50 % sparsity (bundled store)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(str(out_dir / "bench_io_runlengths.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if res.get("backends", {}).get("points"):
        paths.append(str(out_dir / "bench_io_backends.png"))
        backend_compare.plot(res["backends"], paths[-1])
    return paths


def to_json(res: dict) -> str:
    slim = {k: v for k, v in res.items() if k != "points"}
    slim["points"] = [{k: v for k, v in p.items() if not k.endswith("_frames") and k != "runlen_hist"} for p in res["points"]]
    return json.dumps(slim, indent=1)

"""`nchunk bench session`'s report: the headline ratios, the table and the plot of a run's results."""
from __future__ import annotations

from pathlib import Path

import numpy as np

FLASH_METHODS = ("dense", "magnitude", "chunking", "dp")  # rows that stream from the drive


def _drive_bytes(s: dict) -> float:
    return (s["bytes_read"] or 0.0) + (s.get("prefetch_wasted_bytes") or 0.0)


def cache_curve(rows: dict, policy: str) -> list[dict]:
    """The "+ cache" rows of one cache policy (every sparsity), by increasing retained importance."""
    return sorted((r for label, r in rows.items() if " + cache" in label and r.get("cache_policy") == policy),
                  key=lambda r: r["summary"]["retained"])


def matched_cache_bytes(curve: list[dict], retained: float) -> dict | None:
    """Bytes per frame of a "+ cache" row at `retained` importance, interpolated linearly between
    the two rows around it (the paper's matched-accuracy protocol, with retained importance for
    accuracy): selected rows read from the drive (`bytes_read`), the same with the prefetch's waste
    (`drive_bytes`), and the sparsity. None when no two rows enclose `retained`."""
    points = [(r["summary"]["retained"], r) for r in curve if r["summary"].get("retained") is not None]
    for (lo, a), (hi, b) in zip(points, points[1:]):
        if lo <= retained <= hi:
            t = 0.0 if hi == lo else (retained - lo) / (hi - lo)
            mix = {k: a_v + t * (b_v - a_v) for k, a_v, b_v in
                   (("bytes_read", a["summary"]["bytes_read"], b["summary"]["bytes_read"]),
                    ("drive_bytes", _drive_bytes(a["summary"]), _drive_bytes(b["summary"])),
                    ("sparsity", a["sparsity"], b["sparsity"]))}
            return {**mix, "retained": retained, "between": [a["label"], b["label"]]}
    if points and points[-1][0] == retained:
        r = points[-1][1]
        return {"bytes_read": r["summary"]["bytes_read"], "drive_bytes": _drive_bytes(r["summary"]),
                "sparsity": r["sparsity"], "retained": retained, "between": [r["label"]]}
    return None


def ratios(out: list[dict], sparsity: float) -> dict:
    """Per row exposed I/O, cache and prefetch hit rates; the headline ratios of the run (None where a row
    they need is missing or failed)."""
    rows = {r["label"]: r for r in out if r.get("summary")}
    label = f"chunking {sparsity:.0%}"
    ref = rows.get(f"{label} in RAM")
    for r in rows.values():
        s = r["summary"]
        drive = _drive_bytes(s)
        if r["method"] in FLASH_METHODS:
            served = drive + (s.get("cached_bytes") or 0.0)
            s["cache_hit_rate"] = (s.get("cached_bytes") or 0.0) / served if served else 0.0
            hits = s.get("prefetch_hit_bytes") or 0.0
            s["prefetch_hit_rate"] = hits / s["bytes_read"] if s["bytes_read"] else 0.0
            s["drive_bytes"] = drive
        if ref is not None and r["label"].startswith(label):
            s["exposed_io_s"] = max(0.0, s["total_s"] - ref["summary"]["total_s"])
    in_ram = rows.get("in_ram")
    flash = [r for r in rows.values() if r["method"] in FLASH_METHODS and r is not ref]
    best = min(flash, key=lambda r: r["summary"]["total_s"]) if flash else None
    plain, overlap, cached = rows.get(label), rows.get(f"{label} + overlap"), rows.get(f"{label} + cache")
    acc = rows.get("accelerate")

    def ratio(a, b):
        return a / b if a is not None and b else None

    # Bytes per frame without the cache / with it at the same retained importance: the plain chunking
    # row (no cache, no prefetch) against the "+ cache" rows interpolated at its retained importance.
    matched = {}
    for policy in sorted({r.get("cache_policy") for label, r in rows.items() if " + cache" in label}):
        m = plain and matched_cache_bytes(cache_curve(rows, policy), plain["summary"]["retained"])
        matched[policy] = m and {**m, "reduction": ratio(plain["summary"]["bytes_read"], m["bytes_read"]),
                                 "reduction_drive": ratio(plain["summary"]["bytes_read"], m["drive_bytes"])}
    default = cached and matched.get(cached.get("cache_policy"))

    return {
        "best_flash_row": best["label"] if best else None,
        "best_frame_ratio_vs_in_ram": ratio(best and best["summary"]["total_s"], in_ram and in_ram["summary"]["total_s"]),
        "best_peak_rss_ratio_vs_in_ram": ratio(best and best["peak_rss_mib"], in_ram and in_ram["peak_rss_mib"]),
        "exposed_io_fraction": ratio(overlap and overlap["summary"].get("exposed_io_s"), plain and plain["summary"]["io_s"]),
        "cache_bytes_reduction": default and default["reduction"],
        "cache_bytes_reduction_basis": (f"bytes read per frame by '{label}' (no cache, no prefetch) / by the "
                                        "'+ cache' rows interpolated at its retained importance; bytes = selected "
                                        "rows read from the drive, prefetch waste excluded (with it: "
                                        "cache_matched[policy].reduction_drive)"),
        "cache_policy": cached and cached.get("cache_policy"),
        "cache_matched": matched,
        "cache_bytes_reduction_same_sparsity": ratio(plain and plain["summary"]["bytes_read"],
                                                     cached and cached["summary"]["bytes_read"]),
        "cache_retained": [r and r["summary"]["retained"] for r in (plain, cached)],
        "accelerate_ratio": ratio(acc and acc["summary"]["total_s"], best and best["summary"]["total_s"]),
    }


def format_table(res: dict) -> str:
    head = (f"{'method':<28} {'frame ms':>9} {'vision':>7} {'select':>7} {'I/O':>7} {'compute':>8} "
            f"{'MB read':>8} {'retained':>8} {'RSS MiB':>8} {'peak RSS MiB':>13} {'vs in RAM':>9} {'exposed':>8} "
            f"{'cache hit':>9} {'prefetch hit':>12}")
    lines = [f"Frame append on {res['machine']}: Qwen2.5-VL, Qwen2-0.5B-shaped backbone "
             f"({res['model']['backbone']['num_hidden_layers']} layers, {res['backbone_bytes_on_drive'] / 2**20:.0f} MiB "
             f"fp16 on the drive), {res['rounds']} x {res['frames']} frames (first of each = warm-up), medians; drive peak "
             f"{res['drive']['peak_mb_per_s']:.0f} MB/s; RSS after the last frame, peak RSS = high-water mark",
             head, "-" * len(head)]

    def ms(v):
        return f"{v * 1e3:.0f}" if v is not None else "-"

    def pct(v):
        return f"{v:.0%}" if v is not None else "-"

    for r in res["runs"]:
        if "error" in r:
            lines.append(f"{r['label']:<28} failed: {r['error'][0][:100]}")
            continue
        s = r.get("summary") or {}
        ratio = f"{r['rss_vs_in_ram']:.2f}x" if "rss_vs_in_ram" in r else "-"
        if not s:
            lines.append(f"{r['label']:<28} {'':>9} {'':>7} {'':>7} {'':>7} {'':>8} {'':>8} {'':>8} "
                         f"{r['steady_rss_mib'] or 0:>8.0f} {r['peak_rss_mib']:>13.0f} {ratio:>9}")
            continue
        io = ms(s["io_s"]) if s["io_s"] is not None else "in comp"
        retained = f"{s['retained']:.3f}" if s["retained"] is not None else "-"
        lines.append(f"{r['label']:<28} {ms(s['total_s']):>9} {ms(s['vision_s']):>7} {ms(s['select_s']):>7} {io:>7} "
                     f"{ms(s['compute_s']):>8} {s.get('drive_bytes', s['bytes_read']) / 1e6:>8.0f} {retained:>8} "
                     f"{r['steady_rss_mib'] or 0:>8.0f} {r['peak_rss_mib']:>13.0f} {ratio:>9} "
                     f"{ms(s.get('exposed_io_s')):>8} {pct(s.get('cache_hit_rate')):>9} "
                     f"{pct(s.get('prefetch_hit_rate')):>12}")
    keys = ("best_flash_row", "best_frame_ratio_vs_in_ram", "best_peak_rss_ratio_vs_in_ram", "exposed_io_fraction",
            "cache_bytes_reduction", "accelerate_ratio")
    lines.append("; ".join(f"{k} {res[k]:.3f}" if isinstance(res.get(k), float) else f"{k} {res.get(k)}"
                           for k in keys))
    for policy, m in (res.get("cache_matched") or {}).items():
        lines.append(f"cache ({policy}) at the retained importance of the row without cache: " + (
            f"sparsity {m['sparsity']:.3f}, {m['bytes_read'] / 1e6:.1f} MB read per frame "
            f"({m['drive_bytes'] / 1e6:.1f} with prefetch waste): {m['reduction']:.2f}x fewer "
            f"({m['reduction_drive']:.2f}x)" if m else "outside the sparsities run"))
    return "\n".join(lines)


def plot(res: dict, out_dir) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [r for r in res["runs"] if r.get("summary")]
    labels = [r["label"] for r in runs]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5))
    bottom = np.zeros(len(runs))
    for key, name in (("vision_s", "vision"), ("select_s", "selection"), ("io_s", "I/O"), ("compute_s", "compute")):
        values = np.array([(r["summary"][key] or 0.0) * 1e3 for r in runs])
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom += values
    ax.set(ylabel="frame append (ms, median)", title="Latency per frame")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
    every = [r for r in res["runs"] if "peak_rss_mib" in r]
    bx.bar([r["label"] for r in every], [r["peak_rss_mib"] for r in every], color="tab:gray", label="peak")
    bx.scatter([r["label"] for r in every], [r.get("steady_rss_mib") or 0 for r in every], marker="_", s=400,
               color="black", label="after the last frame", zorder=3)
    ref = next((r for r in every if r["method"] == "in_ram"), None)
    if ref is not None:
        bx.axhline(ref["peak_rss_mib"], color="tab:red", ls="--", lw=1, label="model in RAM (peak)")
    bx.legend(fontsize=8)
    bx.set(ylabel="peak RSS (MiB)", title="Peak resident memory (own process per method)")
    bx.tick_params(axis="x", rotation=30)
    fig.suptitle(f"nchunk session vs transformers — {res['machine']}", fontsize=10)
    fig.tight_layout()
    path = out_dir / "bench_session.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


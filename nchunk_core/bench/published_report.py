"""What `nchunk bench published` writes: per-layout JSON kept as each layout finishes, the merged
JSON of every layout result in the folder, a table and a bar chart of append time per frame mode.

Each layout's result goes to `published_<layout>.json` as soon as it is measured, so a long run
stopped half way keeps what it finished and layouts run separately merge into one report; each
result carries its own machine state (load averages at its start and end).
"""
from __future__ import annotations

import json
from pathlib import Path

PREFIX = "published_"
MERGED = "published.json"
PLOT = "published.png"


def save_layout(res: dict, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{PREFIX}{res['layout']}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    return path


def merged(out_dir, run: dict) -> dict:
    """Every layout result in `out_dir` (published_<layout>.json) with the run's own record."""
    from nchunk_core.testing.published import LAYOUTS

    layouts = {}
    for layout in LAYOUTS:
        path = Path(out_dir) / f"{PREFIX}{layout}.json"
        if path.is_file():
            layouts[layout] = json.loads(path.read_text())
    return {"run": run, "layouts": layouts}


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} s" if value < 120 else f"{value:.0f} s ({value / 60:.1f} min)"


def _conversion_line(conv: dict, label: str) -> str:
    flag = " (sensitivity estimated from its first input)" if conv["sensitivity_estimated"] else ""
    calib = f"{conv['calibration_default_s']:.1f} ({conv['default_calib_frames']} frames, {conv['frame_mode']}"
    if conv["calibration_estimated"]:
        calib += f"; ESTIMATED from {conv['calib_frames']} frames measured in {conv['calibration_s']:.1f} s"
    return (f"  conversion{label}: {_seconds(conv['total_s'])} = write {conv['write_s']:.1f} + calibration "
            f"{calib}) + reorder "
            f"{conv['reorder_s']:.1f} + sensitivity {conv['sensitivity_s']:.1f} "
            f"({conv.get('allocation_frames', '?')} frames, at {conv.get('sensitivity_depth', 'model')} depth){flag}")


def format_layout(res: dict) -> str:
    m = res["machine"]
    lines = [f"{res['layout']} ({res['checkpoint']}, {res['dimensions']} dimensions, {res['text_layers']} of "
             f"{res['published_layers']} decoder layers; load {m['start']['load_average']} -> "
             f"{m['end']['load_average']} on {m['cpus']} CPUs)",
             f"  {'mode':<7} {'sparsity':>8} {'tokens':>7} {'append s':>9} {'vision':>7} {'select':>7} {'io':>7} "
             f"{'compute':>8} {'frames':>6}"]
    for r in res["frames"]:
        lines.append(f"  {r['mode']:<7} {r['sparsity']:>8g} {r['visual_tokens']:>7} {r['total_s']:>9.2f} "
                     f"{r['vision_s']:>7.2f} {r['select_s']:>7.2f} {r['io_s']:>7.2f} {r['compute_s']:>8.2f} "
                     f"{'warm-up' if r.get('warmup_only') else r['frames']:>6}")
    lines.append(_conversion_line(res["conversion"], ""))
    ext = res.get("extrapolated")
    if ext:
        lines.append(f"  EXTRAPOLATED to {ext['to_layers']} layers from {ext['from_layers']} (not measured): "
                     + ", ".join(f"{r['mode']} at {r['sparsity']:g}: {r['total_s']:.1f} s" for r in ext["frames"]))
        lines.append(_conversion_line(ext["conversion"], f" EXTRAPOLATED to {ext['to_layers']} layers"))
    return "\n".join(lines)


def format_table(report: dict) -> str:
    run = report["run"]
    head = (f"nchunk bench published: 640x480 frames; medians after one warm-up frame; load average "
            f"{run['start']['load_average']} at start, {run['end']['load_average']} at end "
            f"({run['start']['cpus']} CPUs)")
    return "\n\n".join([head] + [format_layout(res) for res in report["layouts"].values()])


def plot(report: dict, path) -> str:
    """Bar chart: append time per frame (median) per frame mode and sparsity, one group per layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(report["layouts"].values())
    fig, axes = plt.subplots(1, max(1, len(layouts)), figsize=(4.2 * max(1, len(layouts)), 4.2), squeeze=False)
    for ax, res in zip(axes[0], layouts):
        rows = res["frames"]
        sparsities = sorted({r["sparsity"] for r in rows})
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        width = 0.8 / len(sparsities)
        for j, s in enumerate(sparsities):
            by_mode = {r["mode"]: r for r in rows if r["sparsity"] == s}
            xs = [i + j * width for i in range(len(modes))]
            bars = ax.bar(xs, [by_mode[m]["total_s"] for m in modes], width, label=f"sparsity {s:g}")
            ax.bar_label(bars, labels=[str(by_mode[m]["visual_tokens"]) for m in modes], fontsize=7)
        ax.set_xticks([i + width * (len(sparsities) - 1) / 2 for i in range(len(modes))], modes)
        layers = f"{res['text_layers']}/{res['published_layers']} layers"
        conv = res["conversion"]
        estimated = " est." if conv["sensitivity_estimated"] or conv["calibration_estimated"] else ""
        ax.set_title(f"{res['layout']}\n({layers}; conversion {conv['total_s'] / 3600:.1f} h{estimated})", fontsize=9)
        ax.set_ylabel("append s per 640x480 frame (median)")
        ax.legend(fontsize=7)
    fig.suptitle("nchunk bench published (bar labels: visual tokens per frame)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)

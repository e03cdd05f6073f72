"""`nchunk bench calibration`: how many calibration frames the hot–cold order needs.

Each calibration frame of `nchunk convert` is a full dense forward (seconds to a minute on a CPU), so
the default frame count is a trade-off between conversion time and the quality of the row order. This
benchmark measures it on one store:

1. one calibration pass, as the converter makes it (the flash runtime, dense, in the `frame_tokens`
   mode), over `max(snapshots)` calibration frames and then `held_out` other frames, keeping every
   frame's importance vector per input (mean |x| over the frame's tokens, original channel order);
2. per input (one per streamed matrix group), the hot–cold order (reorder.hot_cold_permutation) of
   the first n calibration frames for every n in `snapshots`: one pass gives all of them;
3. each order against the order of the most frames (the reference):
   - top-30 % / top-50 % overlap: the share of the reference's hottest rows that are also hottest here;
   - Spearman rank correlation of the rows' positions;
   - retained importance on the held-out frames by a chunking selection at 30 % and 50 % sparsity
     on rows laid out in that order (the drive's latency table), divided by the reference order's:
     what a store converted with n frames keeps of what the longest calibration keeps;
   and the checkpoint's own order (no reordering) for scale.

Frames: the built-in model's training scenes (calibration) and validation scenes (held out), or a
folder of the user's camera frames (`frames_dir`: the first frames calibrate, the last are held out).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

SNAPSHOTS = (8, 16, 32)
HELD_OUT = 8
SPARSITIES = (0.3, 0.5)
TOPS = (0.3, 0.5)
IDENTITY = "checkpoint order"


@dataclasses.dataclass
class Recorded:
    """Importance vectors of a calibration pass: input -> float32 [frames, in], and seconds per frame."""

    vectors: dict[str, np.ndarray]
    frame_s: list[float]
    frame_mode: str
    visual_tokens: int


def scene_frames(count: int, split: str, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """`count` rendered shape scenes of `split` (train: calibration, as the built-in model's own; val:
    held out), uint8 [height, width, 3]."""
    from nchunk_core.demo import scenes

    offset = 10_000_000 if split == "train" else 0  # the training scenes the demo calibrates on
    return [scenes.render_scene(scenes.split_scene(split, offset + i, seed, width, height)) for i in range(count)]


def record(store, frames: list, frame_tokens="auto", device: str = "cpu", dtype: str = "float32",
           threads: int = 6, log: Callable[[str], None] = print) -> Recorded:
    """Append `frames` densely through the store's flash runtime; every frame's importance per input."""
    from nchunk_core.io.latency import LatencyTable
    from nchunk_core.runtime.select import SelectionSettings
    from nchunk_core.runtime.session import Session, SessionConfig

    per_input: dict[str, list[np.ndarray]] = {}

    def observe(phase: str, name: str, x) -> None:
        if phase == "frame":  # the prefix and replays are not calibration samples
            v = x.detach().reshape(-1, x.shape[-1]).abs().float().mean(dim=0).cpu().numpy()  # [in]
            per_input.setdefault(name, []).append(v)

    cfg = SessionConfig(device=device, dtype=dtype, selection=SelectionSettings(0.0, "dense"), reader_threads=threads,
                        frame_tokens=frame_tokens, max_frames=1)  # one frame in context: every frame alike
    times = []
    with Session.open(store, cfg, table=LatencyTable.synthetic()) as session:
        session.set_observer(observe)
        for i, frame in enumerate(frames):
            t0 = time.perf_counter()
            stats = session.append_frame(frame)
            times.append(time.perf_counter() - t0)
            if i == 0 or (i + 1) % 8 == 0:
                log(f"frame {i + 1}/{len(frames)}: {times[-1]:.2f} s ({stats.visual_tokens} visual tokens)")
        mode, tokens = session.adapter.frame_mode, stats.visual_tokens
    return Recorded({k: np.stack(v).astype(np.float32) for k, v in per_input.items()}, times, mode, tokens)


def top_overlap(order: np.ndarray, reference: np.ndarray, fraction: float) -> float:
    """Share of the reference's first `fraction` of rows that are also in `order`'s first."""
    k = max(1, int(round(fraction * order.size)))
    return len(np.intersect1d(order[:k], reference[:k], assume_unique=True)) / k


def spearman(order: np.ndarray, reference: np.ndarray) -> float:
    """Spearman correlation of each channel's position in the two orders (permutations)."""
    from nchunk_core.convert.reorder import inverse

    a, b = inverse(order).astype(np.float64), inverse(reference).astype(np.float64)
    return float(np.corrcoef(a, b)[0, 1])


def retained(order: np.ndarray, held_out: np.ndarray, sparsity: float, table, row_bytes: int) -> float:
    """Mean retained importance over held-out frames [F, in] of chunking at `sparsity` on rows in `order`."""
    from nchunk_core.runtime.select import select

    budget = int(round((1.0 - sparsity) * order.size))
    return float(np.mean([select(v[order], budget, "chunking", table, row_bytes).retained for v in held_out]))


def compare(rec: Recorded, snapshots, held_out: int, row_bytes: dict[str, int], table) -> dict:
    """Per order (n frames, and the checkpoint's), per input: the metrics of the module docstring."""
    from nchunk_core.convert.reorder import hot_cold_permutation

    reference_n = max(snapshots)
    out = {}
    for name, vectors in sorted(rec.vectors.items()):
        calib, test = vectors[:reference_n], vectors[reference_n:reference_n + held_out]
        orders = {str(n): hot_cold_permutation(calib[:n]) for n in snapshots}
        orders[IDENTITY] = np.arange(vectors.shape[1], dtype=np.int64)
        ref = orders[str(reference_n)]
        ref_kept = {s: retained(ref, test, s, table, row_bytes[name]) for s in SPARSITIES}
        rows = {}
        for label, order in orders.items():
            row = {f"top{int(f * 100)}": top_overlap(order, ref, f) for f in TOPS}
            row["spearman"] = spearman(order, ref)
            for s in SPARSITIES:
                kept = retained(order, test, s, table, row_bytes[name])
                row[f"retained{int(s * 100)}"] = kept
                row[f"retained{int(s * 100)}_ratio"] = kept / ref_kept[s] if ref_kept[s] > 0 else 1.0
            rows[label] = row
        out[name] = rows
    return out


def summarise(per_input: dict) -> dict:
    """Per order: mean and min over the inputs of every metric."""
    labels = next(iter(per_input.values())).keys()
    summary = {}
    for label in labels:
        metrics = {}
        for key in next(iter(per_input.values()))[label]:
            values = np.array([rows[label][key] for rows in per_input.values()])
            metrics[key] = {"mean": float(values.mean()), "min": float(values.min())}
        summary[label] = metrics
    return summary


def run(store, frames_dir=None, snapshots=SNAPSHOTS, held_out: int = HELD_OUT, frame_tokens="auto",
        width: int = 320, height: int = 240, threads: int = 6, log: Callable[[str], None] = print) -> dict:
    """The benchmark on `store` (module docstring); a JSON-ready dict."""
    from nchunk_core.io.profile import load_or_profile
    from nchunk_core.store import Store

    snapshots = tuple(sorted(set(int(n) for n in snapshots)))
    if not snapshots or snapshots[0] < 1 or held_out < 1:
        raise ValueError("snapshots and held_out must be positive")
    n_calib = snapshots[-1]
    if frames_dir is not None:
        from nchunk_core.convert.converter import calibration_frames, load_frame

        source, paths = calibration_frames(frames_dir, n_calib + held_out, log)
        if len(paths) < n_calib + held_out:
            raise ValueError(f"{frames_dir} holds {len(paths)} frames; {n_calib} + {held_out} are needed")
        frames = [load_frame(p) for p in paths]
        frames = frames[::2] + frames[1::2]  # calibration and held-out frames spread over the folder
        frames = frames[:n_calib] + frames[n_calib:][:held_out]
    else:
        source = f"shape scenes {width}x{height}: {n_calib} training, {held_out} validation"
        frames = scene_frames(n_calib, "train", width, height) + scene_frames(held_out, "val", width, height)
    store_obj = Store.open(store)
    row_bytes = {}
    for g in store_obj.groups.values():
        row_bytes[g.input] = max(row_bytes.get(g.input, 0), g.row_bytes)
    table = load_or_profile(store_obj.path, threads=threads, quick=True, log=log)
    t0 = time.perf_counter()
    rec = record(store, frames, frame_tokens, threads=threads, log=log)
    pass_s = time.perf_counter() - t0
    per_input = compare(rec, snapshots, held_out, row_bytes, table)
    frame_s = float(np.median(rec.frame_s[1:] or rec.frame_s))
    return {
        "store": str(store_obj.path), "arch": store_obj.model_info.get("arch"), "frames": source,
        "frame_mode": rec.frame_mode, "visual_tokens": rec.visual_tokens, "snapshots": list(snapshots),
        "held_out": held_out, "inputs": len(per_input), "median_frame_s": frame_s, "pass_s": pass_s,
        "calibration_s": {str(n): n * frame_s for n in snapshots},
        "summary": summarise(per_input), "per_input": per_input,
    }


def format_table(res: dict) -> str:
    lines = [f"{res['store']} ({res['arch']}, frame mode {res['frame_mode']}, {res['visual_tokens']} visual tokens; "
             f"{res['frames']}; {res['inputs']} inputs)",
             f"median dense frame {res['median_frame_s']:.2f} s; reference: the {max(res['snapshots'])}-frame order",
             "",
             f"{'order':>16} {'calib s':>8} {'top30':>12} {'top50':>12} {'spearman':>12} "
             f"{'kept@30% / ref':>16} {'kept@50% / ref':>16}",
             f"{'':>16} {'':>8} {'mean  min':>12} {'mean  min':>12} {'mean  min':>12} {'mean   min':>16} "
             f"{'mean   min':>16}"]
    for label, m in res["summary"].items():
        calib = res["calibration_s"].get(label)
        calib_text = f"{calib:8.0f}" if calib is not None else f"{'-':>8}"

        def pair(key, width=12, digits=3):
            return f"{m[key]['mean']:.{digits}f} {m[key]['min']:.{digits}f}".rjust(width)

        lines.append(f"{label:>16} {calib_text} {pair('top30')} {pair('top50')} {pair('spearman')} "
                     f"{pair('retained30_ratio', 16, 4)} {pair('retained50_ratio', 16, 4)}")
    ref = res["summary"][str(max(res["snapshots"]))]
    lines.append(f"\nretained importance of the reference order on held-out frames: "
                 f"{ref['retained30']['mean']:.4f} at 30 %, {ref['retained50']['mean']:.4f} at 50 % sparsity")
    return "\n".join(lines)


def plot(results: list[dict], path) -> str:
    """One panel per metric, a line per store: mean over inputs against calibration frames (min dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("top30", "top-30 % overlap"), ("spearman", "Spearman rank correlation"),
            ("retained30_ratio", "retained at 30 % / reference"), ("retained50_ratio", "retained at 50 % / reference")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    for ax, (key, title) in zip(axes, keys):
        for res in results:
            n = res["snapshots"]
            mean = [res["summary"][str(k)][key]["mean"] for k in n]
            low = [res["summary"][str(k)][key]["min"] for k in n]
            line, = ax.plot(n, mean, marker="o", label=f"{res['arch']} ({res['frame_mode']})")
            ax.plot(n, low, linestyle="--", color=line.get_color(), alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(results[0]["snapshots"], [str(k) for k in results[0]["snapshots"]])
        ax.set_xlabel("calibration frames")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("hot-cold order against the order of the most frames (solid: mean over inputs, dashed: min)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def save(results: list[dict], out_dir) -> tuple[str, str]:
    """bench_calibration.json and .png in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "bench_calibration.json"
    json_path.write_text(json.dumps(results, indent=1))
    return str(json_path), plot(results, out / "bench_calibration.png")

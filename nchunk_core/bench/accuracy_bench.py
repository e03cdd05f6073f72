"""`nchunk bench accuracy`: what sparsity costs in accuracy, and what it saves in I/O, on a trained VLM.

The built-in model (demo/model.py, trained by demo/train.py) answers the held-out test questions of
scenes.py through the real store, reader and Session, one frame in context (max_frames 1, as it was
trained). For every test scene the settings take turns on the same frame, interleaved so that drift
of the shared drive hits them alike: dense (sparsity 0) and each sparsity of SPARSITIES for
magnitude and chunking, both on the store's hot–cold order. Per setting: exact-match accuracy per
question kind, and per frame (median) the I/O time, bytes, reads and retained importance of
the frame append (direct I/O, so every read is cold).

Matched accuracy (the paper's protocol): for each chunking point, magnitude's I/O time at the same
accuracy, interpolated linearly along magnitude's curve (dense is its sparsity 0); the speedup is
that time over chunking's. A second figure interpolates along magnitude's Pareto front instead (a
point slower than a more accurate one never counts): when reading every row is the fastest way to
any accuracy, as on this model's small rows, that front is the dense point alone and no chunking
point is in its range. Chunking points outside the curve's accuracy range have no value.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from nchunk_core.demo import scenes
from nchunk_core.demo.model import shipped_store
from nchunk_core.runtime.select import SelectionSettings
from nchunk_core.runtime.session import Session, SessionConfig
from nchunk_core.demo.train_settings import FRAME_H, FRAME_W, TEST_SCENES

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
METHODS = ("magnitude", "chunking")


def settings(methods=METHODS, sparsities=SPARSITIES) -> list[tuple[str, float]]:
    return [("dense", 0.0)] + [(m, s) for s in sparsities for m in methods]


def run(store=None, scene_count: int = TEST_SCENES, seed: int = 0, methods=METHODS, sparsities=SPARSITIES,
        threads: int = 6, log=print) -> dict:
    store = Path(store) if store else shipped_store()
    test = scenes.split_scenes("test", scene_count, seed, FRAME_W, FRAME_H)
    question_set = scenes.question_set(test, seed, "test")
    plan = settings(methods, sparsities)
    rec = {key: {"right": {k: 0 for k in scenes.KINDS}, "total": {k: 0 for k in scenes.KINDS},
                 "io_s": [], "bytes": [], "reads": [], "retained": [], "select_s": []} for key in plan}
    cfg = SessionConfig(max_frames=1, max_new_tokens=4, reader_threads=threads)
    t0 = time.perf_counter()
    with Session.open(store, cfg, log=lambda m: None) as session:  # quiet: it logs every rebuild
        sizes = row_bytes(session.store)
        for n, (scene, questions) in enumerate(question_set):
            frame = scenes.render_scene(scene)
            for key in plan:
                method, sparsity = key
                session.update(SelectionSettings(sparsity, "chunking" if method == "dense" else method))
                st = session.append_frame(frame)
                r = rec[key]
                if n > 0:  # the first append also starts the conversation (prefix): not a frame cost
                    r["io_s"].append(st.io_s)
                    r["bytes"].append(st.bytes_read)
                    r["reads"].append(st.reads)
                    r["retained"].append(st.retained)
                    r["select_s"].append(st.select_s)
                for q in questions:
                    r["total"][q.kind] += 1
                    r["right"][q.kind] += session.ask(q.text).text == q.answer
            if (n + 1) % 50 == 0 or n + 1 == len(test):
                log(f"{n + 1}/{len(test)} scenes, {time.perf_counter() - t0:.0f} s")
    points = []
    for (method, sparsity), r in rec.items():
        acc = {k: r["right"][k] / r["total"][k] for k in scenes.KINDS if r["total"][k]}
        points.append({
            "method": method, "sparsity": sparsity,
            "accuracy": sum(r["right"].values()) / sum(r["total"].values()), "accuracy_by_kind": acc,
            "io_ms": statistics.median(r["io_s"]) * 1e3, "kib": statistics.median(r["bytes"]) / 1024,
            "reads": statistics.median(r["reads"]), "retained": float(np.mean(r["retained"])),
            "select_ms": statistics.median(r["select_s"]) * 1e3,
        })
    return summarize(points, store, sizes, len(test), sum(len(q) for _, q in question_set), seed,
                     time.perf_counter() - t0)


def pareto(points: list[dict]) -> list[dict]:
    """Points that no faster point matches in accuracy, by increasing I/O time (and accuracy)."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p["io_ms"], -p["accuracy"])):
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def matched_speedups(points: list[dict], label: str = "chunking", baseline: str = "magnitude",
                     front: bool = False) -> dict[float, float]:
    """Per sparsity of `label`: the baseline's I/O time at the same accuracy / label's I/O time.

    The baseline's curve is its points plus dense (its sparsity 0), ordered by accuracy (the paper's
    protocol). With `front`, only its Pareto front counts: a point slower than a more accurate one
    (dense included) is dropped, so the speedup is over the best way the baseline reaches that
    accuracy. Points outside the curve's accuracy range get no value.
    """
    curve = [p for p in points if p["method"] in (baseline, "dense")]
    curve = pareto(curve) if front else sorted(curve, key=lambda p: (p["accuracy"], -p["io_ms"]))
    acc = np.array([p["accuracy"] for p in curve])
    ms = np.array([p["io_ms"] for p in curve])
    out = {}
    for p in points:
        if p["method"] == label and acc[0] <= p["accuracy"] <= acc[-1]:
            out[p["sparsity"]] = float(np.interp(p["accuracy"], acc, ms) / p["io_ms"])
    return out


def _mean(d: dict) -> float | None:
    return float(np.mean(list(d.values()))) if d else None


def summarize(points, store: Path, sizes: dict[str, int], scene_count: int, question_count: int, seed: int,
              seconds: float) -> dict:
    speedups, front = matched_speedups(points), matched_speedups(points, front=True)
    dense = next(p for p in points if p["method"] == "dense")
    return {
        "store": str(store), "test_scenes": scene_count, "test_questions": question_count, "seed": seed,
        "seconds": round(seconds, 1),
        "dense_accuracy": dense["accuracy"], "dense_accuracy_by_kind": dense["accuracy_by_kind"],
        "dense_io_ms": dense["io_ms"],
        "mean_speedup_matched_accuracy": _mean(speedups),
        "speedups_matched_accuracy": {str(s): v for s, v in speedups.items()},
        "mean_speedup_matched_accuracy_vs_front": _mean(front),
        "speedups_matched_accuracy_vs_front": {str(s): v for s, v in front.items()},
        "row_bytes": sizes,
        "points": points,
    }


def row_bytes(store) -> dict[str, int]:
    """Bytes of one row per group kind (the first layer's), to set these figures beside a 7B's."""
    return {g.name.split(".", 2)[2]: g.row_bytes for name in store.inputs() if name.startswith("layers.0.")
            for g in store.groups_for_input(name)}


def format_table(res: dict) -> str:
    kinds = scenes.KINDS
    lines = [f"bench accuracy: {res['test_questions']} test questions on {res['test_scenes']} held-out scenes "
             f"(seed {res['seed']}), store {res['store']}",
             "row sizes: " + ", ".join(f"{k} {v} B" for k, v in res["row_bytes"].items()),
             f"{'method':<10}{'sparsity':>9}{'accuracy':>9}" + "".join(f"{k:>10}" for k in kinds)
             + f"{'I/O ms':>8}{'KiB':>8}{'reads':>7}{'retained':>9}"]
    for p in sorted(res["points"], key=lambda p: (p["sparsity"], p["method"])):
        lines.append(f"{p['method']:<10}{p['sparsity']:>9.1f}{p['accuracy']:>9.3f}"
                     + "".join(f"{p['accuracy_by_kind'].get(k, float('nan')):>10.3f}" for k in kinds)
                     + f"{p['io_ms']:>8.2f}{p['kib']:>8.0f}{p['reads']:>7.0f}{p['retained']:>9.3f}")
    for key, what in (("", "along magnitude's curve (paper protocol)"),
                      ("_vs_front", "against magnitude's Pareto front, dense included")):
        sp, mean = res["speedups_matched_accuracy" + key], res["mean_speedup_matched_accuracy" + key]
        lines.append(f"chunking over magnitude at matched accuracy, {what}: "
                     + (", ".join(f"{float(s):.0%} {v:.2f}x" for s, v in sp.items()) or "no point in range")
                     + (f"; mean {mean:.2f}x" if mean is not None else ""))
    lines.append(f"dense accuracy {res['dense_accuracy']:.3f}, dense I/O {res['dense_io_ms']:.2f} ms per frame")
    return "\n".join(lines)


def plot(res: dict, out_dir) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    dense = next(p for p in res["points"] if p["method"] == "dense")
    for method, style in (("magnitude", "s-"), ("chunking", "o-")):
        pts = [dense] + sorted((p for p in res["points"] if p["method"] == method), key=lambda p: p["sparsity"])
        ax.plot([p["io_ms"] for p in pts], [p["accuracy"] for p in pts], style, ms=4, label=method)
        for p in pts[1:]:
            ax.annotate(f"{p['sparsity']:.0%}", (p["io_ms"], p["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        bx.plot([p["sparsity"] for p in pts], [p["io_ms"] for p in pts], style, ms=4, label=method)
    ax.set(xlabel="I/O time per frame (ms, median, direct I/O)", ylabel="test accuracy (exact match)",
           title="Accuracy vs I/O time (labels: sparsity)")
    bx.set(xlabel="sparsity", ylabel="I/O time per frame (ms, median)", title="I/O time vs sparsity")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(f"Built-in model, {res['test_questions']} held-out test questions", fontsize=10)
    fig.tight_layout()
    path = out_dir / "bench_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def to_json(res: dict) -> str:
    return json.dumps(res, indent=1)

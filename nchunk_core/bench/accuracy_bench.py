"""`nchunk bench accuracy`: what sparsity costs in accuracy, and what it saves in I/O, on a trained VLM.

The built-in model (demo/model.py, trained by demo/train.py) answers the held-out test questions of
scenes.py through the real store, reader and Session, one frame in context (max_frames 1, as it was
trained). For every test scene the settings take turns on the same frame, interleaved so that drift
of the shared drive hits them alike: dense (sparsity 0) and each sparsity of SPARSITIES for
magnitude and chunking, both on the store's hot–cold order, each with the sparsity spread uniformly
and, when the store has an allocation, layer-wise (store/allocation.py); then chunking layer-wise in
the latency-budget mode at three frame budgets (budget.py; by default 0.9, 1.2 and 1.6 times the
median dense frame time of a warm-up), its questions at the sparsity the budget chose. Per setting:
exact-match accuracy per question kind, and per frame (median) the I/O time, bytes, reads and
retained importance of the frame append (direct I/O, so every read is cold); per budget also the
sparsity chosen and the budget hit rate (frames whose measured time was at most 1.1 x the budget).

Matched accuracy (the paper's protocol): for each chunking point, magnitude's I/O time at the same
accuracy, interpolated linearly along magnitude's curve (dense is its sparsity 0); the speedup is
that time over chunking's. A second figure interpolates along magnitude's Pareto front instead (a
point slower than a more accurate one never counts): when reading every row is the fastest way to
any accuracy, as on this model's small rows, that front is the dense point alone and no chunking
point is in its range. Chunking points outside the curve's accuracy range have no value.

The row cache (row_cache.py) at CACHE_FRACTION of the backbone's bytes runs in a second session on
the same frames, at the settings of CACHE_SETTINGS: cached rows are rows read from RAM instead of
the drive, so where the selection is the same (sparsity 0: every row) every answer must be the
no-cache one; at a sparsity the cache's free rows change the selection (more rows than the drive
reads), and its accuracy, bytes and retained importance are reported beside the no-cache point's,
with the fraction of answers that agree.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np

from nchunk_core.demo import scenes
from nchunk_core.demo.model import shipped_store
from nchunk_core.runtime.select import SelectionSettings
from nchunk_core.runtime.session import Session, SessionConfig
from nchunk_core.store.allocation import load_allocation
from nchunk_core.demo.train_settings import FRAME_H, FRAME_W, TEST_SCENES

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
METHODS = ("magnitude", "chunking")
BUDGET_FACTORS = (0.9, 1.2, 1.6)  # default frame budgets, times the warm-up's median dense frame time
BUDGET_SLACK = 1.1  # a frame within 10 % of its budget counts as a hit
WARMUP_FRAMES = 6
CACHE_FRACTION = 0.25  # of the backbone's bytes on the drive, the row cache of the cache points
CACHE_SETTINGS = (("dense", 0.0), ("chunking", 0.5))  # (method, sparsity) run with the cache too


def settings(methods=METHODS, sparsities=SPARSITIES) -> list[tuple[str, float]]:
    return [("dense", 0.0)] + [(m, s) for s in sparsities for m in methods]


def _record() -> dict:
    return {"right": {k: 0 for k in scenes.KINDS}, "total": {k: 0 for k in scenes.KINDS}, "io_s": [], "bytes": [],
            "reads": [], "retained": [], "select_s": [], "total_s": [], "sparsity": [], "met": [], "answers": [],
            "cached_bytes": []}


def _warmup_ms(session, question_set) -> float:
    """Median dense frame time (ms) over WARMUP_FRAMES appends of the first test frames."""
    session.update(SelectionSettings(0.0, "dense"))
    frames = [scenes.render_scene(scene) for scene, _ in question_set[:3]]
    times = [session.append_frame(frames[i % len(frames)]).total_s for i in range(WARMUP_FRAMES + 1)]
    return statistics.median(times[1:]) * 1e3


def run(store=None, scene_count: int = TEST_SCENES, seed: int = 0, methods=METHODS, sparsities=SPARSITIES,
        threads: int = 6, budgets_ms=None, allocations=("uniform", "layerwise"), log=print) -> dict:
    store = Path(store) if store else shipped_store()
    test = scenes.split_scenes("test", scene_count, seed, FRAME_W, FRAME_H)
    question_set = scenes.question_set(test, seed, "test")
    cfg = SessionConfig(max_frames=1, max_new_tokens=4, reader_threads=threads)
    cache_mib = CACHE_FRACTION * sum(f.stat().st_size for f in store.glob("weights-*.bin")) / 2**20
    t0 = time.perf_counter()
    with Session.open(store, cfg, log=lambda m: None) as session, \
            Session.open(store, dataclasses.replace(cfg, ram_budget_mib=cache_mib), log=lambda m: None) as cached:
        sizes = row_bytes(session.store)
        if load_allocation(session.store) is None:  # a store without one runs uniform either way
            allocations = ("uniform",)
        plan = [(m, s, "uniform") for m, s in settings(methods, sparsities)[:1]]
        plan += [(m, s, a) for m, s in settings(methods, sparsities)[1:] for a in allocations]
        warmup_ms = _warmup_ms(session, question_set)
        budgets = tuple(float(b) for b in budgets_ms) if budgets_ms else tuple(
            round(f * warmup_ms, 1) for f in BUDGET_FACTORS)
        plan += [("budget", b, "layerwise" if "layerwise" in allocations else "uniform") for b in budgets]
        rec = {key: _record() for key in plan}
        shipped = "layerwise" if "layerwise" in allocations else "uniform"
        cache_plan = [key for key in ((m, s, "uniform" if m == "dense" else shipped) for m, s in CACHE_SETTINGS)
                      if key in rec]
        cache_rec = {key: _record() for key in cache_plan}
        for n, (scene, questions) in enumerate(question_set):
            frame = scenes.render_scene(scene)
            for key in plan:
                _run_setting(session, key, frame, questions, rec[key], n)
            for key in cache_plan:
                _run_setting(cached, key, frame, questions, cache_rec[key], n)
            if (n + 1) % 50 == 0 or n + 1 == len(test):
                log(f"{n + 1}/{len(test)} scenes, {time.perf_counter() - t0:.0f} s")
    points, budget_points = [], []
    for (method, value, allocation), r in rec.items():
        acc = {k: r["right"][k] / r["total"][k] for k in scenes.KINDS if r["total"][k]}
        p = {"method": method, "sparsity": value, "allocation": allocation,
             "accuracy": sum(r["right"].values()) / sum(r["total"].values()), "accuracy_by_kind": acc,
             "io_ms": statistics.median(r["io_s"]) * 1e3, "kib": statistics.median(r["bytes"]) / 1024,
             "reads": statistics.median(r["reads"]), "retained": float(np.mean(r["retained"])),
             "select_ms": statistics.median(r["select_s"]) * 1e3, "frame_ms": statistics.median(r["total_s"]) * 1e3}
        if method == "budget":
            del p["sparsity"]
            p.update(budget_ms=value, sparsity_chosen=float(np.mean(r["sparsity"])),
                     planned_met=float(np.mean(r["met"])), frames=len(r["total_s"]),
                     hits=int(sum(t * 1e3 <= BUDGET_SLACK * value for t in r["total_s"])))
            budget_points.append(p)
        else:
            points.append(p)
    res = summarize(points, store, sizes, len(test), sum(len(q) for _, q in question_set), seed,
                    time.perf_counter() - t0, chance_accuracy(question_set))
    frames = sum(p["frames"] for p in budget_points)
    res["cache_points"] = [cache_point(key, r, rec[key], cache_mib) for key, r in cache_rec.items()]
    res.update(warmup_dense_frame_ms=warmup_ms, budget_points=budget_points,
               budget_hit_rate=sum(p["hits"] for p in budget_points) / frames if frames else None)
    return res


def _run_setting(session, key, frame, questions, r: dict, n: int) -> None:
    """Append `frame` with the setting `key` (method, sparsity or budget ms, allocation), ask its
    questions, and add what happened to the record `r` (frame costs from the second scene on)."""
    method, value, allocation = key
    budgeted = method == "budget"
    selection = SelectionSettings(0.0 if budgeted else value, "chunking" if method in ("dense", "budget")
                                  else method, allocation=allocation)
    session.update(selection, frame_budget_ms=value if budgeted else 0.0)
    st = session.append_frame(frame)
    if budgeted:  # the questions at the sparsity the budget chose for the frame
        session.update(st.selection)
    if n > 0:  # the first append also starts the conversation (prefix): not a frame cost
        for name, v in (("io_s", st.io_s), ("bytes", st.bytes_read), ("reads", st.reads),
                        ("retained", st.retained), ("select_s", st.select_s), ("total_s", st.total_s),
                        ("sparsity", st.selection.sparsity), ("met", st.budget_met),
                        ("cached_bytes", st.cached_bytes)):
            r[name].append(v)
    for q in questions:
        answer = session.ask(q.text).text
        r["answers"].append(answer)
        r["total"][q.kind] += 1
        r["right"][q.kind] += answer == q.answer


def cache_point(key, r: dict, plain: dict, cache_mib: float) -> dict:
    """A setting run with the row cache, beside the same setting without it (`plain`)."""
    def accuracy(x):
        return sum(x["right"].values()) / sum(x["total"].values())

    agree = sum(a == b for a, b in zip(r["answers"], plain["answers"])) / max(1, len(r["answers"]))
    return {"method": key[0], "sparsity": key[1], "allocation": key[2], "cache_mib": cache_mib,
            "accuracy": accuracy(r), "accuracy_without_cache": accuracy(plain), "answers_agree": agree,
            "kib": statistics.median(r["bytes"]) / 1024, "kib_without_cache": statistics.median(plain["bytes"]) / 1024,
            "cached_kib": statistics.median(r["cached_bytes"]) / 1024,
            "retained": float(np.mean(r["retained"])), "retained_without_cache": float(np.mean(plain["retained"])),
            "io_ms": statistics.median(r["io_s"]) * 1e3, "io_ms_without_cache": statistics.median(plain["io_s"]) * 1e3}


def pareto(points: list[dict]) -> list[dict]:
    """Points that no faster point matches in accuracy, by increasing I/O time (and accuracy)."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p["io_ms"], -p["accuracy"])):
        if p["accuracy"] > best:
            front.append(p)
            best = p["accuracy"]
    return front


def matched_speedups(points: list[dict], label: str = "chunking", baseline: str = "magnitude",
                     front: bool = False, allocation: str | None = None) -> dict[float, float]:
    """Per sparsity of `label`: the baseline's I/O time at the same accuracy / label's I/O time.

    The baseline's curve is its points plus dense (its sparsity 0), ordered by accuracy (the paper's
    protocol). With `front`, only its Pareto front counts: a point slower than a more accurate one
    (dense included) is dropped, so the speedup is over the best way the baseline reaches that
    accuracy. Points outside the curve's accuracy range get no value. `allocation`: only points
    with that allocation (dense always counts).
    """
    if allocation is not None:
        points = [p for p in points if p["method"] == "dense" or p.get("allocation") == allocation]
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
              seconds: float, chance: float = 0.0) -> dict:
    """The result: figures of the shipped configuration (layer-wise when the store has an
    allocation), the same per allocation, and every point."""
    allocations = sorted({p.get("allocation", "uniform") for p in points if p["method"] != "dense"})
    shipped = "layerwise" if "layerwise" in allocations else "uniform"
    speedups, front = (matched_speedups(points, allocation=shipped),
                       matched_speedups(points, front=True, allocation=shipped))
    dense = next(p for p in points if p["method"] == "dense")

    def ratio_at(sparsity):
        p = [p for p in points if p["method"] == "chunking" and p.get("allocation", "uniform") == shipped
             and p["sparsity"] == sparsity]
        return p[0]["accuracy"] / dense["accuracy"] if p and dense["accuracy"] else None

    accuracy = {(p["method"], p["sparsity"]): p["accuracy"] for p in points
                if p.get("allocation", "uniform") == shipped or p["method"] == "dense"}
    above = {s: v for s, v in speedups.items()
             if min(accuracy.get(("chunking", s), 0.0), accuracy.get(("magnitude", s), 0.0)) > chance}
    return {
        "allocation": shipped, "chance_accuracy": chance,
        "speedups_matched_accuracy_above_chance": {str(s): v for s, v in above.items()},
        "chunking_beats_magnitude_above_chance": bool(above) and all(v > 1.0 for v in above.values()),
        "chunking_accuracy_ratio_at_30": ratio_at(0.3), "chunking_accuracy_ratio_at_50": ratio_at(0.5),
        "speedups_by_allocation": {a: {str(s): v for s, v in matched_speedups(points, allocation=a).items()}
                                   for a in allocations},
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


def chance_accuracy(question_set) -> float:
    """Accuracy of always giving each question kind's most frequent answer (the majority baseline)."""
    answers: dict[str, list[str]] = {}
    for _, questions in question_set:
        for q in questions:
            answers.setdefault(q.kind, []).append(q.answer)
    right = sum(max(a.count(x) for x in set(a)) for a in answers.values())
    return right / sum(len(a) for a in answers.values())


def row_bytes(store) -> dict[str, int]:
    """Bytes of one row per group kind (the first layer's), to set these figures beside a 7B's."""
    return {g.name.split(".", 2)[2]: g.row_bytes for name in store.inputs() if name.startswith("layers.0.")
            for g in store.groups_for_input(name)}


def format_table(res: dict) -> str:
    kinds = scenes.KINDS
    lines = [f"bench accuracy: {res['test_questions']} test questions on {res['test_scenes']} held-out scenes "
             f"(seed {res['seed']}), store {res['store']}",
             "row sizes: " + ", ".join(f"{k} {v} B" for k, v in res["row_bytes"].items()),
             f"{'method':<10}{'allocation':>11}{'sparsity':>9}{'accuracy':>9}" + "".join(f"{k:>10}" for k in kinds)
             + f"{'I/O ms':>8}{'KiB':>8}{'reads':>7}{'retained':>9}{'frame ms':>9}"]
    for p in sorted(res["points"], key=lambda p: (p["sparsity"], p["method"], p.get("allocation", ""))):
        lines.append(f"{p['method']:<10}{p.get('allocation', 'uniform'):>11}{p['sparsity']:>9.1f}{p['accuracy']:>9.3f}"
                     + "".join(f"{p['accuracy_by_kind'].get(k, float('nan')):>10.3f}" for k in kinds)
                     + f"{p['io_ms']:>8.2f}{p['kib']:>8.0f}{p['reads']:>7.0f}{p['retained']:>9.3f}"
                     + f"{p.get('frame_ms', float('nan')):>9.1f}")
    for key, what in (("", "along magnitude's curve (paper protocol)"),
                      ("_vs_front", "against magnitude's Pareto front, dense included")):
        sp, mean = res["speedups_matched_accuracy" + key], res["mean_speedup_matched_accuracy" + key]
        lines.append(f"chunking over magnitude at matched accuracy, {what}: "
                     + (", ".join(f"{float(s):.0%} {v:.2f}x" for s, v in sp.items()) or "no point in range")
                     + (f"; mean {mean:.2f}x" if mean is not None else ""))
    for a, sp in res.get("speedups_by_allocation", {}).items():
        lines.append(f"  {a}: " + (", ".join(f"{float(s):.0%} {v:.2f}x" for s, v in sp.items()) or "no point in range"))
    lines.append(f"chance (majority answer per kind) {res.get('chance_accuracy', 0.0):.3f}; chunking beats magnitude "
                 f"at every sparsity where both are above chance ({res['allocation']}): "
                 f"{res.get('chunking_beats_magnitude_above_chance')}")
    for key in ("chunking_accuracy_ratio_at_30", "chunking_accuracy_ratio_at_50"):
        if res.get(key) is not None:
            lines.append(f"{key} ({res['allocation']}): {res[key]:.3f}")
    if res.get("budget_points"):
        lines.append(f"latency-budget mode (chunking, {res['allocation']}; warm-up dense frame "
                     f"{res['warmup_dense_frame_ms']:.1f} ms): budget_hit_rate {res['budget_hit_rate']:.3f}")
        lines.append(f"{'budget ms':>10}{'frame ms':>9}{'hit rate':>9}{'planned met':>12}{'sparsity':>9}{'accuracy':>9}")
        for p in res["budget_points"]:
            lines.append(f"{p['budget_ms']:>10.1f}{p['frame_ms']:>9.1f}{p['hits'] / max(1, p['frames']):>9.3f}"
                         f"{p['planned_met']:>12.3f}{p['sparsity_chosen']:>9.3f}{p['accuracy']:>9.3f}")
    for p in res.get("cache_points", []):
        lines.append(f"{p['method']} {p['sparsity']:.0%} ({p['allocation']}), {p['cache_mib']:.2f} MiB row cache: "
                     f"accuracy {p['accuracy']:.3f} (without {p['accuracy_without_cache']:.3f}; answers agree "
                     f"{p['answers_agree']:.1%}), KiB read {p['kib']:.0f} (without {p['kib_without_cache']:.0f}; "
                     f"{p['cached_kib']:.0f} from RAM), retained {p['retained']:.3f} "
                     f"(without {p['retained_without_cache']:.3f})")
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
    for (method, allocation), style in ((("magnitude", "uniform"), "s:"), (("chunking", "uniform"), "o:"),
                                        (("magnitude", "layerwise"), "s-"), (("chunking", "layerwise"), "o-")):
        pts = [dense] + sorted((p for p in res["points"] if p["method"] == method
                                and p.get("allocation", "uniform") == allocation), key=lambda p: p["sparsity"])
        if len(pts) == 1:
            continue
        label = f"{method}, {allocation}"
        ax.plot([p["io_ms"] for p in pts], [p["accuracy"] for p in pts], style, ms=4, label=label)
        for p in pts[1:]:
            ax.annotate(f"{p['sparsity']:.0%}", (p["io_ms"], p["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        bx.plot([p["sparsity"] for p in pts], [p["io_ms"] for p in pts], style, ms=4, label=label)
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

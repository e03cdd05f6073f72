"""`nchunk bench published`: what the published checkpoints cost on this machine.

For each layout (published.py: idefics3 = SmolVLM-256M-Instruct, smolvlm = SmolVLM2-256M-Video-Instruct,
llava_onevision = llava-onevision-qwen2-0.5b-ov-hf, qwen2_5_vl = Qwen2.5-VL-3B-Instruct):

1. a replica at the published dimensions (random weights at the real shapes, bf16 shards, the
   published tensor names, tokenizer, templates and processor configs), built once under `work`
   and reused while its settings match;
2. the conversion a user waits for, with `nchunk convert`'s defaults and real calibration frames
   (rendered 640×480 shape scenes written as PNGs, `calib_frames` of them, as `--calib` takes them):
   `converter.convert(..., allocation=False)` times writing, calibration and the hot–cold rewrite,
   then `sensitivity.calibrate_allocation` on the allocation frames convert would pick (its step 5,
   the same call) times the layer-wise allocation, after step 3. When its estimate after the first
   input (sensitivity_estimate: the rate of that input's appends over the plan's decoder layer
   passes) exceeds `sensitivity_limit_s`, it stops there and the estimate is reported, flagged;
3. per frame mode of the adapter (`frame_tokens`) a Session on the store appends 640×480 scenes:
   one warm-up, then `frames` frames at each sparsity, interleaved; medians of FrameStats' times.
   They run before the allocation step (a sparsity is then spread uniformly over the inputs, the
   same bytes as layer-wise).

A replica with fewer decoder layers than published (`text_layers`, for Qwen2.5-VL-3B where 36 do not
fit the time or memory) is measured as built, and every figure is also given scaled to the published
depth (`extrapolated`, see `scale_to_published`), never in place of the measured one.
Report, plot and merging of per-layout results: published_report.py.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from nchunk_core.testing.published import LAYOUTS, PUBLISHED

FRAME_SIZE = (640, 480)  # (width, height) of every frame appended and calibrated on
FRAME_FIELDS = ("total_s", "vision_s", "select_s", "io_s", "io_wait_s", "compute_s")
REPLICA_VERSION = 1  # bump when the replica builder changes what it writes

Log = Callable[[str], None]


def machine() -> dict:
    """The machine as measured now: CPU count and load averages (1, 5, 15 min)."""
    return {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def shipped_sparsity() -> float:
    """The sparsity the shipped store (the built-in model) recommends: the project's default."""
    from nchunk_core.demo.model import shipped_store
    from nchunk_core.store.format import MANIFEST
    from nchunk_core.store.recommended import Recommended

    manifest = json.loads((shipped_store() / MANIFEST).read_text())
    return Recommended.from_manifest(manifest).sparsity


def adapter_modes(layout: str) -> list[str]:
    """The frame modes of the layout's adapter."""
    from nchunk_core.runtime.adapters import adapter_class

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return list(adapter_class(layout).frame_modes)


def published_layers(layout: str, dimensions: str) -> int:
    """Decoder layers of the layout's checkpoint at `dimensions` (tiny or published)."""
    if dimensions == "tiny":
        config = PUBLISHED[layout].config
        return int(config.get("text_config", config)["num_hidden_layers"])
    from nchunk_core.testing.published_dimensions import DIMENSIONS

    return int(DIMENSIONS[layout][0]["num_hidden_layers"])


def replica(layout: str, work: Path, dimensions: str, text_layers: int | None, log: Log) -> tuple[Path, float | None]:
    """(checkpoint directory, seconds it took to build or None when reused) of the layout's replica."""
    from nchunk_core.testing.published import build_published

    name = f"{layout}-{dimensions}-{text_layers or 'all'}"
    path, marker = work / name, work / f"{name}.settings.json"
    settings = {"layout": layout, "dimensions": dimensions, "text_layers": text_layers, "seed": 0,
                "version": REPLICA_VERSION}
    if path.is_dir() and marker.is_file() and json.loads(marker.read_text()) == settings:
        log(f"{layout}: reusing the replica in {path}")
        return path, None
    shutil.rmtree(path, ignore_errors=True)
    marker.unlink(missing_ok=True)
    log(f"{layout}: building a replica ({dimensions} dimensions, {text_layers or 'all'} decoder layers) in {path}")
    t0 = time.perf_counter()
    build_published(layout, path, seed=0, dimensions=dimensions, text_layers=text_layers)
    marker.write_text(json.dumps(settings))  # written last: a half-built replica is rebuilt
    return path, round(time.perf_counter() - t0, 1)


def scenes(count: int, split: str) -> list[np.ndarray]:
    """`count` rendered 640×480 shape scenes of `split`, uint8 [480, 640, 3] (calibration_bench's frames:
    training scenes calibrate, validation scenes are appended)."""
    from nchunk_core.bench.calibration_bench import scene_frames

    return scene_frames(count, split, *FRAME_SIZE)


def calibration_folder(work: Path, count: int) -> Path:
    """A folder of `count` calibration frames (training scenes as PNGs), written once."""
    from PIL import Image

    folder = work / f"calib-{FRAME_SIZE[0]}x{FRAME_SIZE[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"frame_{i:04d}.png" for i in range(count)]
    if not all(p.is_file() for p in paths):
        for path, image in zip(paths, scenes(count, "train")):
            Image.fromarray(image).save(path)
    return folder


# ---- conversion -------------------------------------------------------------------------------------

class _SensitivityCut(Exception):
    """Raised from the sensitivity log once its estimate is above the limit: stops it there."""


def sensitivity_estimate(elapsed_s: float, first_s: float, first_passes: int, done_passes: int,
                         total_passes: int) -> float:
    """Seconds of the whole allocation step: `elapsed_s` so far, and the passes left at the rate of the
    first input's appends (`first_s` for `first_passes` decoder layer passes), as the converter's own
    estimate; like it, this leaves out the vision tower of the frames after the first (once each)."""
    return elapsed_s + first_s / first_passes * (total_passes - done_passes)


def timed_sensitivity(store: Path, frames: list, limit_s: float, threads: int, log: Log,
                      estimate_frames: int | None = None) -> dict:
    """Run the converter's allocation step on `store` (its default depth); stop after the first input
    when its estimate (sensitivity_estimate, for `estimate_frames` frames: default as many as given;
    more are always estimated) is above `limit_s`, and report the estimate, flagged."""
    from nchunk_core.convert.converter import load_frame
    from nchunk_core.convert.sensitivity import calibrate_allocation

    estimate_frames = max(estimate_frames or len(frames), len(frames))
    if estimate_frames > len(frames):
        limit_s = 0.0
    marks: dict = {}
    t0 = time.perf_counter()

    def first_input(first: dict) -> None:
        marks.update(first_input_s=round(first["seconds"], 1), depth=first["depth"],
                     total=first["total"] * estimate_frames // len(frames))
        marks["estimate"] = sensitivity_estimate(time.perf_counter() - t0, first["seconds"], first["passes"],
                                                 first["done"], marks["total"])
        if marks["estimate"] > limit_s:
            raise _SensitivityCut

    try:
        allocation = calibrate_allocation(store, [load_frame(f) for f in frames], threads=threads, progress=False,
                                          log=log, frame_tokens="auto", first_input=first_input)
    except _SensitivityCut:
        log(f"sensitivity stopped after its first input: estimated {marks['estimate']:.0f} s "
            f"(limit {limit_s:g} s); the store keeps no allocation (uniform sparsity)")
        return {"sensitivity_s": round(marks["estimate"], 1), "sensitivity_estimated": True,
                "sensitivity_measured_s": round(time.perf_counter() - t0, 1), "first_input_s": marks["first_input_s"],
                "layer_passes": marks["total"], "allocation_frames": estimate_frames, "sensitivity_depth": marks["depth"]}
    return {"sensitivity_s": round(time.perf_counter() - t0, 1), "sensitivity_estimated": False,
            "layer_passes": marks.get("total"), "allocation_frames": len(frames),
            "sensitivity_depth": allocation.basis["depth"]}


def timed_conversion(checkpoint: Path, store: Path, calib: Path, calib_frames: int, threads: int, log: Log) -> dict:
    """Convert as `nchunk convert CHECKPOINT STORE --calib CALIB --no-allocation` does, timing each step;
    the allocation step is timed_allocation's (module docstring)."""
    from nchunk_core.convert.converter import convert
    from nchunk_core.store import Store

    timings: dict = {}
    convert(checkpoint, store, calib, calib_frames=calib_frames, threads=threads, overwrite=True, progress=False,
            log=log, allocation=False, timings=timings)
    calibration = Store.open(store).model_info["calibration"]
    return {"calib_frames": calibration["frames"], **timings, "frame_mode": calibration["frame_mode"],
            "visual_tokens": calibration["visual_tokens"]}


def timed_allocation(store: Path, calib: Path, conversion: dict, allocation_frames: int, limit_s: float,
                     threads: int, log: Log) -> dict:
    """`conversion` completed by the allocation step on the frames convert picks for it, and its total."""
    from nchunk_core.convert.converter import calibration_frames, spread

    _, frames = calibration_frames(calib, conversion["calib_frames"], log)
    out = dict(conversion, **timed_sensitivity(store, spread(frames, allocation_frames), limit_s, threads, log,
                                               estimate_frames=allocation_frames))
    return with_total(out)


def with_total(conv: dict, default_frames: int | None = None) -> dict:
    """`conv` with the calibration of the converter's default frame count (`calibration_default_s`:
    measured, or scaled by the frame count from fewer frames and flagged) and the total a user
    waits with the defaults."""
    from nchunk_core.convert.converter import CALIB_FRAMES

    default_frames = default_frames or CALIB_FRAMES
    measured = conv["calib_frames"]
    scale = default_frames / measured  # one dense forward per frame (converter.calibrate)
    conv = dict(conv, default_calib_frames=default_frames, calibration_estimated=measured != default_frames,
                calibration_default_s=round(conv["calibration_s"] * scale, 1))
    conv["total_s"] = round(sum(conv[k] for k in ("write_s", "calibration_default_s", "reorder_s", "sensitivity_s")),
                            1)
    return conv


# ---- frames -----------------------------------------------------------------------------------------

def timed_frames(store: Path, mode: str, sparsities: list[float], frames: int, threads: int, log: Log,
                 table=None) -> list[dict]:
    """One Session in frame mode `mode`: a warm-up frame, then `frames` rounds of one frame per sparsity
    (interleaved); per sparsity the visual tokens and median FrameStats times. `frames` 0: the
    warm-up frame alone is the measurement, at the first sparsity (`warmup_only`)."""
    from nchunk_core.runtime.select import SelectionSettings
    from nchunk_core.runtime.session import Session, SessionConfig

    appended = 1 + frames * len(sparsities)
    cfg = SessionConfig(frame_tokens=mode, max_frames=appended + 1, reader_threads=threads,
                        selection=SelectionSettings(sparsities[0]))
    stats: dict[float, list] = {s: [] for s in sparsities}
    images = iter(scenes(appended, "val"))
    with Session.open(store, cfg, log=log, table=table) as session:
        warm = session.append_frame(next(images))
        log(f"  {mode}: warm-up frame {warm.total_s:.1f} s ({warm.visual_tokens} visual tokens)")
        for _ in range(frames):
            for s in sparsities:
                session.update(selection=SelectionSettings(s))
                st = session.append_frame(next(images))
                if st.rebuilt:
                    raise RuntimeError("the context was rebuilt during the benchmark; max_frames too low")
                stats[s].append(st)
                log(f"  {mode} sparsity {s:g}: {st.total_s:.1f} s (vision {st.vision_s:.1f} s)")
    if frames == 0:
        stats = {sparsities[0]: [warm]}
    rows = []
    for s, runs in stats.items():
        row = {"mode": mode, "sparsity": s, "visual_tokens": runs[0].visual_tokens, "frame_mode": runs[0].frame_mode,
               "frames": len(runs), "warmup_s": round(warm.total_s, 3), "warmup_only": frames == 0,
               "total_s_all": [round(r.total_s, 3) for r in runs],
               "bytes_read": int(statistics.median(r.bytes_read for r in runs))}
        row.update({k: round(statistics.median(getattr(r, k) for r in runs), 3) for k in FRAME_FIELDS})
        rows.append(row)
    return rows


# ---- extrapolation to the published depth -----------------------------------------------------------

def scale_to_published(res: dict) -> dict:
    """A layout result measured with fewer decoder layers, scaled to the published depth L from N:
    a frame keeps its vision time and scales the rest by L/N; writing and the hot–cold rewrite scale
    with the bytes written (resident part fixed, backbone by L/N); calibration frames as the dense
    frame of the calibrated mode (and to the default frame count, with_total); sensitivity by its
    decoder layer passes at the depth the converter's "auto" would take at L layers (sensitivity.py):
    L + 10 × 4 × L(L+1)/2 at the last layer's output, L + 10 × 4 × L at each input's own layer."""
    from nchunk_core.convert.sensitivity import LEVELS, MODEL_DEPTH_MINUTES, passes_per_frame

    n, big = res["text_layers"], res["published_layers"]
    ratio = big / n
    frames = []
    for row in res["frames"]:
        vision = row["vision_s"]
        frames.append({"mode": row["mode"], "sparsity": row["sparsity"], "visual_tokens": row["visual_tokens"],
                       "total_s": round(vision + (row["total_s"] - vision) * ratio, 3)})
    conv = dict(res["conversion"])
    resident, backbone = res["resident_bytes"], res["backbone_bytes"]
    bytes_ratio = (resident + backbone * ratio) / (resident + backbone)
    dense = [r for r in res["frames"] if r["mode"] == conv["frame_mode"] and r["sparsity"] == 0.0]
    vision_share = dense[0]["vision_s"] / dense[0]["total_s"] if dense and dense[0]["total_s"] else 0.0

    def passes(layers, depth):  # four bundled inputs per layer: q|k|v, o, gate|up, down
        return passes_per_frame(layers, [k for k in range(layers) for _ in range(4)], len(LEVELS), depth)

    per_pass = conv["sensitivity_s"] / passes(n, conv.get("sensitivity_depth", "model"))
    depth = "model" if per_pass * passes(big, "model") <= 60 * MODEL_DEPTH_MINUTES else "layer"
    conv.update(write_s=round(conv["write_s"] * bytes_ratio, 1), reorder_s=round(conv["reorder_s"] * bytes_ratio, 1),
                calibration_s=round(conv["calibration_s"] * (vision_share + (1 - vision_share) * ratio), 1),
                sensitivity_s=round(per_pass * passes(big, depth), 1), sensitivity_estimated=True,
                sensitivity_depth=depth)
    conv = with_total(conv, conv["default_calib_frames"])
    for key in ("sensitivity_measured_s", "layer_passes"):
        conv.pop(key, None)
    return {"from_layers": n, "to_layers": big, "frames": frames, "conversion": conv,
            "how": scale_to_published.__doc__.split(":", 1)[1].strip()}


def _store_bytes(store: Path) -> tuple[int, int]:
    """(resident bytes, streamed backbone bytes) of a store on the drive."""
    from nchunk_core.store.format import RESIDENT

    resident = (store / RESIDENT).stat().st_size
    total = sum(f.stat().st_size for f in store.iterdir() if f.is_file())
    return resident, total - resident


# ---- one layout, the whole run ----------------------------------------------------------------------

def run_layout(layout: str, work: Path, *, dimensions: str = "published", text_layers: int | None = None,
               calib_frames: int | None = None, allocation_frames: int | None = None, frames: int = 2,
               sparsities: list[float] | None = None, modes: list[str] | None = None,
               sensitivity_limit_s: float = 300.0, threads: int = 6, log: Log = print, table=None) -> dict:
    """Build (or reuse), convert and time one layout (module docstring); a JSON-ready dict."""
    from nchunk_core.convert.converter import CALIB_FRAMES
    from nchunk_core.convert.sensitivity import DEFAULT_FRAMES

    if frames < 0:
        raise ValueError(f"frames must be at least 0, got {frames}")
    calib_frames = calib_frames or CALIB_FRAMES
    allocation_frames = allocation_frames or DEFAULT_FRAMES
    sparsities = sparsities if sparsities is not None else [0.0, shipped_sparsity()]
    arch_modes = adapter_modes(layout)
    modes = modes or arch_modes
    unknown = [m for m in modes if m not in arch_modes]
    if unknown:
        raise ValueError(f"{layout} has no frame mode {unknown[0]!r}; it has {', '.join(arch_modes)}")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    full = published_layers(layout, dimensions)
    layers = text_layers if dimensions == "published" and text_layers and text_layers < full else None
    start = machine()
    checkpoint, build_s = replica(layout, work, dimensions, layers, log)
    store = work / f"{checkpoint.name}.store"
    log(f"{layout}: converting (nchunk convert defaults, {calib_frames} calibration frames)")
    calib = calibration_folder(work, calib_frames)
    conversion = timed_conversion(checkpoint, store, calib, calib_frames, threads, log)
    rows = []
    for mode in modes:
        rows += timed_frames(store, mode, sparsities, frames, threads, log, table)
    conversion = timed_allocation(store, calib, conversion, allocation_frames, sensitivity_limit_s, threads, log)
    log(f"{layout}: conversion {conversion['total_s']:.0f} s" + (" (sensitivity estimated)"
                                                                  if conversion["sensitivity_estimated"] else ""))
    resident, backbone = _store_bytes(store)
    res = {"layout": layout, "checkpoint": PUBLISHED[layout].checkpoint, "dimensions": dimensions,
           "text_layers": layers or full, "published_layers": full, "build_s": build_s,
           "frame_size": list(FRAME_SIZE), "sparsities": sparsities, "conversion": conversion, "frames": rows,
           "resident_bytes": resident, "backbone_bytes": backbone,
           "machine": {"cpus": start["cpus"], "start": start, "end": machine()}}
    res["extrapolated"] = scale_to_published(res) if layers else None
    return res

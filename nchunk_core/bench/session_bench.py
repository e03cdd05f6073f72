"""`nchunk bench session`: frame-append latency and peak RAM of the whole runtime, method by method.

One model of realistic shape that runs on a small CPU: Qwen2.5-VL with the language backbone of
Qwen2-0.5B (24 layers, hidden 896, 14 query / 2 key-value heads of 64, intermediate 4864, vocabulary
151 936, tied embeddings) and a small vision tower (4 blocks of 320), random weights, fp16 on disk,
a byte-level tokenizer (tiny_models.py). It is saved as a Hugging Face checkpoint and converted to a
store with calibration (once; both are reused while their settings match).

The same camera frames (480×640, about 88 visual tokens each) are appended by every method, each
method in its own process so that its peak resident memory (getrusage ru_maxrss, which counts
mapped file pages too) is its own:

- ``floor``: Python with torch and transformers imported, nothing loaded;
- ``in_ram``: the checkpoint loaded whole with transformers (fp32 compute), the reference;
- ``dense``, ``magnitude``, ``chunking``: the nchunk session (fp32 compute, the drive's profiled
  latency table), dense reading every row, the others at --sparsity;
- with ``chunking``, more rows at --sparsity: ``+ overlap`` (reads in pieces multiplied as they
  land, the next input's rows read ahead, overlap.py), ``+ overlap auto`` (overlap on or off per pass,
  as measured faster, overlap_choice.py), ``+ cache`` (and hot rows in RAM, 25 % of the backbone's
  bytes, row_cache.py, its default policy "static"), ``+ cache (frame)`` (the other policy), and
  ``in RAM`` (every row cached: the same selection size with no read, the reference for exposed I/O
  = frame time minus this row's); the cache rows of both policies also run at CACHE_SWEEP sparsities
  around --sparsity, so that `cache_bytes_reduction` compares bytes at the same retained importance
  (session_report.matched_cache_bytes);
- ``accelerate``: what one would reach for today, transformers' `device_map` with every decoder
  layer on "disk" (accelerate hooks load each layer's weights from the memory-mapped safetensors
  before it runs); the page cache of the checkpoint is dropped before every frame
  (posix_fadvise DONTNEED) so that it reads from the drive, as direct I/O does for nchunk.

Reported per method: median over frames (the first of each process is a warm-up) of the frame-append
time split into vision (preprocessing, vision tower, projector), selection, I/O and compute (the
rest), the bytes of backbone weights read per frame, the RSS after the last frame (model alive) and
the peak RSS of the process (its high-water mark, loading included). Timing comes from the session's own FrameStats;
for the transformers-only methods I/O cannot be separated from compute and is reported within it.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nchunk_core.bench.session_report import FLASH_METHODS, ratios
from nchunk_core.runtime.select import CACHE_POLICIES

BACKBONE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                tie_word_embeddings=True, initializer_range=0.02)
VISION = dict(depth=4, hidden_size=320, intermediate_size=1280, num_heads=5, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, window_size=112, fullatt_block_indexes=[3], initializer_range=0.02)
PIXELS = dict(shortest_edge=56 * 56, longest_edge=96 * 28 * 28)  # about 88 visual tokens for a 4:3 frame
FRAME_HW = (480, 640)
CALIB_FRAMES = 8
MODEL_VERSION = 1
METHODS = ("floor", "in_ram", *FLASH_METHODS, "accelerate")
DEFAULT_METHODS = ("in_ram", "dense", "magnitude", "chunking", "accelerate")
CACHE_FRACTION = 0.25  # of the backbone's bytes, the "+ cache" rows
# The "+ cache" rows also run at these sparsities around --sparsity, so that the bytes they read can be
# interpolated at the retained importance of the row without cache (session_report.matched_cache_bytes).
CACHE_SWEEP = (-0.05, 0.05, 0.1)


# ---- the model ----------------------------------------------------------------------------------

def model_settings(layers: int) -> dict:
    return {"version": MODEL_VERSION, "backbone": {**BACKBONE, "num_hidden_layers": layers}, "vision": VISION,
            "pixels": PIXELS}


def build_model(out_dir: Path, layers: int, seed: int = 0) -> Path:
    """Save the random Qwen2.5-VL of the module docstring as a fp16 safetensors checkpoint."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from nchunk_core.testing.tiny_models import ImageOnlyQwen2_5_VLProcessor, build_tokenizer

    settings = model_settings(layers)
    tok = build_tokenizer("qwen2_5_vl")
    ids = tok.convert_tokens_to_ids
    head_dim = BACKBONE["hidden_size"] // BACKBONE["num_attention_heads"]  # 64: mrope splits 32 frequencies
    config = Qwen2_5_VLConfig(
        text_config=dict(**settings["backbone"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16])),
        vision_config=dict(**VISION, out_hidden_size=BACKBONE["hidden_size"]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float16).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, size=PIXELS)
    ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out_dir)
    (out_dir / "bench_settings.json").write_text(json.dumps(settings))
    return out_dir


def bench_frames(count: int, seed0: int = 0) -> list[np.ndarray]:
    from nchunk_core.testing.tiny_models import make_frame

    return [make_frame(*FRAME_HW, seed=seed0 + i) for i in range(count)]


def prepare(directory: Path, layers: int, threads: int, log) -> tuple[Path, Path]:
    """(checkpoint, store) in `directory`, built and converted unless present with these settings."""
    from PIL import Image

    from nchunk_core.convert.converter import convert

    model_dir, store_dir, calib = directory / "model", directory / "store", directory / "calib"
    settings = model_settings(layers)
    marker = model_dir / "bench_settings.json"
    fresh = not marker.is_file() or json.loads(marker.read_text()) != settings
    if fresh:
        log(f"building the benchmark model ({layers} layers) in {model_dir}")
        build_model(model_dir, layers)
    store_marker = store_dir / "bench_settings.json"
    if fresh or not store_marker.is_file() or json.loads(store_marker.read_text()) != settings:
        calib.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(bench_frames(CALIB_FRAMES, seed0=1000)):  # not the measured frames
            Image.fromarray(frame).save(calib / f"{i:03d}.png")
        log(f"converting it to a store in {store_dir}")
        convert(model_dir, store_dir, calib, threads=threads, overwrite=True, log=log)
        store_marker.write_text(json.dumps(settings))
    else:  # a store kept from an older nchunk: bring its format up to date instead of converting again
        from nchunk_core.store.upgrade import upgrade

        result = upgrade(store_dir, progress=False)
        if result.rows:
            log(str(result))
    return model_dir, store_dir


# ---- one method, in a child process -------------------------------------------------------------

def _status_mib(*keys: str) -> dict:
    """Fields of /proc/self/status in MiB (Linux), e.g. VmHWM, VmRSS, RssAnon, RssFile."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def _memory() -> dict:
    """Peak RSS of this process in MiB.

    peak_rss_mib is VmHWM, the high-water mark of this process's own address space. getrusage's
    ru_maxrss is reported too, but on Linux it also carries the RSS of the parent at the moment it
    forked this process (exec keeps the larger of the two), so it is only as clean as the parent is
    small; run() keeps its own process small for that reason (model building runs in a child).
    """
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ru_maxrss_mib": ru, "peak_rss_mib": _status_mib("VmHWM").get("VmHWM", ru)}


def _steady_memory() -> dict:
    """RSS now (taken after the last frame, with the model alive): total, anonymous, file-backed."""
    now = _status_mib("VmRSS", "RssAnon", "RssFile")
    return {"steady_rss_mib": now.get("VmRSS"), "steady_anon_mib": now.get("RssAnon"),
            "steady_file_mib": now.get("RssFile")}


def _drop_page_cache(paths) -> None:
    """Ask the kernel to forget cached pages of these files (no root needed; unmapped pages only)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _run_flash(spec: dict) -> list[dict]:
    from nchunk_core.runtime.select import SelectionSettings
    from nchunk_core.runtime.session import Session, SessionConfig

    cfg = SessionConfig(selection=SelectionSettings(spec["sparsity"], spec["method"]), reader_threads=spec["threads"],
                        max_frames=spec["frames"] + 1, overlap=spec.get("overlap", False),
                        ram_budget_mib=spec.get("ram_budget_mib", 0.0),
                        cache_policy=spec.get("cache_policy", CACHE_POLICIES[0]))
    out = []
    with Session.open(spec["store"], cfg) as session:
        for frame in bench_frames(spec["frames"]):
            s = session.append_frame(frame)
            out.append({"total_s": s.total_s, "vision_s": s.vision_s, "select_s": s.select_s, "io_s": s.io_s,
                        "compute_s": s.compute_s, "bytes_read": s.bytes_read, "est_io_s": s.est_io_s,
                        "retained": s.retained, "tokens": s.tokens, "visual_tokens": s.visual_tokens,
                        "io_wait_s": s.io_wait_s, "cached_bytes": s.cached_bytes,
                        "prefetch_hit_bytes": s.prefetch_hit_bytes, "prefetch_wasted_bytes": s.prefetch_wasted_bytes})
        steady = _steady_memory()
    return out, steady


def _run_transformers(spec: dict) -> list[dict]:
    """Frames through the Hugging Face model: whole in RAM, or decoder layers offloaded to disk."""
    import torch
    from transformers import AutoModelForImageTextToText, DynamicCache

    from nchunk_core.runtime.adapters import adapter_for
    from nchunk_core.runtime.processors import load_processor

    model_dir = Path(spec["model"])
    kwargs = {}
    shards = sorted(str(p) for p in model_dir.glob("*.safetensors"))
    if spec["method"] == "accelerate":
        layers = json.loads((model_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
        device_map = {"model.visual": "cpu", "model.language_model.embed_tokens": "cpu",
                      "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
        device_map.update({f"model.language_model.layers.{i}": "disk" for i in range(layers)})
        kwargs = {"device_map": device_map, "offload_folder": spec["offload_folder"]}
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True,
                                                        **kwargs).eval()
    adapter = adapter_for(model, load_processor(model_dir, "qwen2_5_vl"))
    timer = {"vision_s": 0.0}
    visual = model.get_submodule("model.visual")
    visual.register_forward_pre_hook(lambda m, a: timer.__setitem__("t0", time.perf_counter()))
    visual.register_forward_hook(lambda m, a, o: timer.__setitem__(
        "vision_s", timer["vision_s"] + time.perf_counter() - timer["t0"]))
    streamed = sum(p.numel() * 2 for n, p in model.named_parameters() if ".layers." in n and "proj" in n
                   and "visual" not in n) if spec["method"] == "accelerate" else 0
    cache, position, out = DynamicCache(), 0, []
    with torch.no_grad():
        _, position = adapter.append(adapter.encode_text(adapter.prompt_prefix), cache, position)
        for frame in bench_frames(spec["frames"]):
            if spec["method"] == "accelerate":
                _drop_page_cache(shards)
            timer["vision_s"] = 0.0
            t0 = time.perf_counter()
            chunk = adapter.encode_frame(frame)
            prep = time.perf_counter() - t0
            _, position = adapter.append(chunk, cache, position)
            total = time.perf_counter() - t0
            vision = prep + timer["vision_s"]
            out.append({"total_s": total, "vision_s": vision, "select_s": 0.0, "io_s": None,
                        "compute_s": total - vision, "bytes_read": streamed, "est_io_s": None, "retained": 1.0,
                        "tokens": chunk.num_tokens, "visual_tokens": chunk.num_visual_tokens})
    return out, _steady_memory()


def child_main(spec: dict) -> dict:
    t0 = time.perf_counter()
    if spec["method"] == "prepare":
        model_dir, store_dir = prepare(Path(spec["dir"]), spec["layers"], spec["threads"],
                                       lambda m: print(m, file=sys.stderr))
        return {"model": str(model_dir), "store": str(store_dir)}
    if spec["method"] == "floor":
        import torch  # noqa: F401
        import transformers  # noqa: F401

        frames, steady = [], _steady_memory()
    elif spec["method"] in FLASH_METHODS:
        frames, steady = _run_flash(spec)
    else:
        frames, steady = _run_transformers(spec)
    return {"frames": frames, "wall_s": time.perf_counter() - t0, **steady, **_memory()}


def _spawn(spec: dict, timeout: float, show_stderr: bool = False) -> dict:
    """Run child_main(spec) in a fresh interpreter; its result, or {"error": [...], "stderr_tail"}."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "nchunk_core.bench.session_bench", json.dumps(spec)],
                          stdout=subprocess.PIPE, stderr=None if show_stderr else subprocess.PIPE, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = proc.stderr or ""
        return {"error": tail.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"],
                "stderr_tail": tail[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the whole benchmark --------------------------------------------------------------------------

def _summary(rounds: list[list[dict]]) -> dict:
    """Medians over every frame of every round but each round's first (it warms caches and threads)."""
    measured = [f for frames in rounds for f in (frames[1:] if len(frames) > 1 else frames)]
    out = {}
    for key in ("total_s", "vision_s", "select_s", "io_s", "compute_s", "est_io_s", "bytes_read", "retained",
                "io_wait_s", "cached_bytes", "prefetch_hit_bytes", "prefetch_wasted_bytes"):
        values = [f[key] for f in measured if f.get(key) is not None]
        out[key] = float(np.median(values)) if values else None
    out["visual_tokens"] = measured[0]["visual_tokens"] if measured else None
    out["frames_measured"] = len(measured)
    return out


def _variants(methods, sparsity: float, sweep) -> list[tuple[str, str, float, dict]]:
    """(label, method, sparsity, extra spec) of every process to run; one with nothing loaded first."""
    out = [("floor", "floor", 0.0)]
    for method in methods:
        if method == "floor":
            continue
        if method in ("magnitude", "chunking", "dp"):
            points = [sparsity] + ([s for s in sweep if s != sparsity] if method == "chunking" else [])
            out += [(f"{method} {s:.0%}", method, s) for s in points]
        else:
            out.append((method, method, 0.0))
    out = [(*v, {}) for v in out]
    if "chunking" in methods:
        label = f"chunking {sparsity:.0%}"
        out.append((f"{label} + overlap", "chunking", sparsity, {"overlap": True}))
        out.append((f"{label} + overlap auto", "chunking", sparsity, {"overlap": "auto"}))  # on or off as measured
        for policy in CACHE_POLICIES:
            for s in [sparsity] + [round(sparsity + d, 4) for d in CACHE_SWEEP if 0.0 <= sparsity + d < 0.95]:
                name = f"chunking {s:.0%} + cache" + ("" if policy == CACHE_POLICIES[0] else f" ({policy})")
                out.append((name, "chunking", s, {"overlap": True, "cache": CACHE_FRACTION, "cache_policy": policy}))
        out.append((f"{label} in RAM", "chunking", sparsity, {"overlap": True, "cache": 1.0}))
    return out


def child_spec(entry: dict, store_dir: Path, model_dir: Path, frames: int, threads: int, directory: Path,
               store_bytes: int) -> dict:
    """What child_main needs to run one row of `_variants` (entry: its label, method, sparsity, extras)."""
    return {"method": entry["method"], "sparsity": entry["sparsity"], "store": str(store_dir),
            "model": str(model_dir), "frames": frames, "threads": threads,
            "offload_folder": str(directory / "offload"), "overlap": entry.get("overlap", False),
            "ram_budget_mib": entry.get("cache", 0.0) * store_bytes / 2**20,
            "cache_policy": entry.get("cache_policy", CACHE_POLICIES[0])}


def collect(runs: dict) -> list[dict]:
    """Rows of the result from every round's child results: medians, and the largest memory figures."""
    out = []
    for entry in runs.values():
        good = [x for x in entry["rounds"] if "error" not in x]
        if not good:
            out.append({**entry, "error": entry["rounds"][0]["error"]})
            continue
        entry["summary"] = _summary([x["frames"] for x in good]) if good[0]["frames"] else None
        for key in ("peak_rss_mib", "ru_maxrss_mib", "steady_rss_mib", "steady_anon_mib", "steady_file_mib"):
            entry[key] = max(x.get(key, 0.0) for x in good)
        out.append(entry)
    ref = next((r for r in out if r["method"] == "in_ram" and "peak_rss_mib" in r), None)
    for r in out:
        if ref is not None and "peak_rss_mib" in r:
            r["rss_vs_in_ram"] = r["peak_rss_mib"] / ref["peak_rss_mib"]
    return out


def run(directory, frames: int = 4, sparsity: float = 0.5, sweep=(), methods=DEFAULT_METHODS,
        layers: int | None = None, threads: int = 6, rounds: int = 2, timeout: float = 900, log=None) -> dict:
    """Build/convert if needed, profile the drive (cached), then run every method in its own process,
    `rounds` times interleaved (method A, B, C, A, B, C, ...) so that slow phases of a shared machine
    fall on every method alike."""
    from nchunk_core.io.profile import load_or_profile

    log = log or (lambda m: None)
    layers = layers or BACKBONE["num_hidden_layers"]
    if frames < 2 or rounds < 1:
        raise ValueError("frames must be at least 2 (the first is a warm-up) and rounds at least 1")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prepared = _spawn({"method": "prepare", "dir": str(directory), "layers": layers, "threads": threads},
                      timeout, show_stderr=True)
    if "error" in prepared:
        raise RuntimeError(f"building or converting the benchmark model failed: {prepared['error'][0]}")
    model_dir, store_dir = Path(prepared["model"]), Path(prepared["store"])
    table = load_or_profile(store_dir, threads=threads, quick=True, log=log)  # cached for the children

    store_bytes = sum(f.stat().st_size for f in store_dir.glob("weights-*.bin"))
    runs = {label: {"label": label, "method": method, "sparsity": s, "rounds": [], **extra}
            for label, method, s, extra in _variants(methods, sparsity, sweep)}
    for r in range(rounds):
        for label, entry in runs.items():
            log(f"round {r + 1}/{rounds}: {label} in a fresh process")
            result = _spawn(child_spec(entry, store_dir, model_dir, frames, threads, directory, store_bytes), timeout)
            entry["rounds"].append(result)
            if "error" in result:
                log(f"  {label} failed: {result['error'][0]}")
    out = collect(runs)
    return {**ratios(out, sparsity), "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "model": model_settings(layers),
            "store_dir": str(store_dir), "backbone_bytes_on_drive": store_bytes, "frames": frames, "rounds": rounds,
            "sparsity": sparsity, "threads": threads,
            "drive": {"peak_mb_per_s": table.peak_bytes_per_s / 1e6, "saturation_kib": table.saturation_bytes // 1024},
            "runs": out}


if __name__ == "__main__":  # a child process: one method, result as one JSON line on stdout
    print(json.dumps(child_main(json.loads(sys.argv[1]))))

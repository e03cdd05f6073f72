"""Layer-wise sparsity from calibration: how much each streamed input's sparsity hurts the model,
and the allocation of an average sparsity that hurts least (the store's sparsity_allocation.json).

    allocation = calibrate_allocation(store_dir, frames)      # or: nchunk calibrate STORE --frames DIR

1. **Sensitivity** (`measure`): for every calibration frame, the frame is appended once with every
   row read (the reference), then once per input and level with that input alone sparsified
   (magnitude selection, the best rows for that count) and every other input dense. The error is
   the squared relative error of a decoder layer's output over the frame's tokens (each token's
   error over its own norm, averaged), averaged over frames: `error[i, l]`. The layer (`depth`):
   "model", the last one, what the sparsity does to the whole model; "layer", the perturbed
   input's own, which ends the pass there (one layer per pass instead of the layers from it to the
   last: TEAL's block-wise errors, 10-20x fewer layer passes on a 24-36 layer model); "auto" (the
   default) takes "model" while its estimate, from the reference pass of the first frame, fits
   MODEL_DEPTH_MINUTES, and "layer" beyond (a published 0.25-3B checkpoint on a small CPU would
   otherwise take hours to days). An input of
   decoder layer k leaves layers 0..k-1 as they were in the reference, so the reference pass
   records every layer's output and a perturbed pass replays them (those layers' forward returns
   the recorded output) and runs only layers k..L-1; inputs are taken layer by layer. The error is
   the same as running every layer (test_sensitivity.py); the KV cache is a throwaway copy per
   pass, and positions and the mask are made before the first layer. The frame's image features
   are computed at the reference pass and reused by the others (the vision tower otherwise ran
   at every append and dominated the built-in model's time). Cost per frame: L + levels x
   sum over inputs of (L - k) decoder layer passes, about half of (1 + inputs x levels) x L; the
   plan and, after the first input's appends, the estimated time are logged, and the progress bar
   counts layer passes.
   Defaults, measured on the built-in model (8 training scenes, allocations at averages 0.3 / 0.5
   against the one from 8 frames x 10 levels; MAD: mean |difference| of per-input sparsity, then
   the additive error the allocation predicts on the 8-frame curves, default 0.054 / 0.247):
   4 frames x 10 levels 0.020 / 0.032, error 0.055 / 0.255 (another 4 frames: 0.033 / 0.034,
   0.059 / 0.254, so this is the frames' own spread); 8 frames x 5 levels (.2 .4 .6 .8 .95) 0.022
   / 0.058, 0.059 / 0.258; 8 x 6 levels 0.052 / 0.035; 2 frames 0.024 / 0.053, 0.056 / 0.266;
   1 frame 0.044 / 0.114, 0.062 / 0.334; 3 levels 0.106 / 0.111. Fewer levels move the allocation
   more than fewer frames at the same cost, so LEVELS stay 10 and the converter takes
   DEFAULT_FRAMES = 4 (half of the 8 before); uniform sparsity would predict 0.161 / 0.500.
2. **Allocation** (`allocate`), greedy as TEAL's calibration: start with every input dense and keep
   giving the next step of sparsity to the input whose output error grows least per byte saved,
   until every input is at the top level. Errors of separate inputs are taken to add (squared
   relative errors of independent perturbations); each input's curve is made non-decreasing and
   replaced by its lower convex hull, so the greedy order is the optimal one for that model and
   the path is piecewise linear. The path is read at every GRID_STEP of byte-weighted average
   sparsity; sensitive inputs keep more rows, tolerant ones fewer, at the same bytes in all.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm
from transformers import DynamicCache

from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.reader import Reader
from nchunk_core.runtime.adapters import adapter_class
from nchunk_core.runtime.flash_model import build_flash_model
from nchunk_core.runtime.kv_cache import copy_cache
from nchunk_core.runtime.layers import Workspace
from nchunk_core.runtime.processors import load_processor
from nchunk_core.runtime.select import SelectionSettings
from nchunk_core.store import Store
from nchunk_core.store.allocation import SparsityAllocation, input_bytes, write_allocation
from nchunk_core.store.naming import torch_dtype

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # per-input sparsities measured
GRID_STEP = 0.025  # of average sparsity, between the allocation's grid points
DEPTHS = ("auto", "model", "layer")  # where the error is measured (module docstring)
MODEL_DEPTH_MINUTES = 15.0  # "auto": the last layer's output while its estimate fits this
MEASURED_AT = {"model": "the last decoder layer's output", "layer": "each input's own decoder layer's output"}
DEFAULT_FRAMES = 4  # calibration frames the converter measures sensitivity on (see the docstring's figures)

Log = Callable[[str], None]


def _relative_error2(h: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over tokens of ||h_t - ref_t||² / ||ref_t||²; h, ref: [T, D]."""
    num = (h - ref).pow(2).sum(-1)
    den = ref.pow(2).sum(-1).clamp_min(1e-30)
    return float((num / den).mean())


def _layer_of(store: Store, inputs: list[str]) -> dict[str, int]:
    """Decoder layer of each input (0 for one outside the decoder: nothing before it is skipped)."""
    layer = {g.input: g.layer for g in store.groups.values()}
    return {name: layer.get(name) or 0 for name in inputs}


class _Stop(Exception):
    """Ends a perturbed pass after the layer whose output is measured (depth "layer")."""


@contextmanager
def _stop_after(layer):
    """The pass ends once `layer` has run (its output recorded by the hooks registered before)."""
    def stop(module, args, out):
        raise _Stop

    handle = layer.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _replayed(layers, recorded: list, k: int):
    """Decoder layers 0..k-1 return their outputs recorded in the reference pass instead of
    computing them again (their inputs and weights are the reference's); restored on exit."""
    saved = [layer.__dict__.get("forward") for layer in layers[:k]]
    try:
        for layer, out in zip(layers[:k], recorded):
            layer.forward = lambda *args, _out=out, **kwargs: _out
        yield
    finally:
        for layer, forward in zip(layers[:k], saved):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


@contextmanager
def _vision_once(model):
    """The frame's image or video features computed at its first pass and reused by the others (the
    same pixels through the same vision tower): `get_image_features` and `get_video_features` of
    the inner model memoised (LLaVA-OneVision's video mode takes the second). Yields a dict whose
    "seconds" is the time the features took."""
    inner = getattr(model, "model", None)
    memoised = [name for name in ("get_image_features", "get_video_features") if hasattr(inner, name)]
    timing = {"seconds": 0.0}

    def once(compute):
        memo: list = []

        def call(*args, **kwargs):
            if not memo:
                t0 = time.perf_counter()
                memo.append(compute(*args, **kwargs))
                timing["seconds"] += time.perf_counter() - t0
            return memo[0]
        return call

    for name in memoised:
        setattr(inner, name, once(getattr(inner, name)))
    try:
        yield timing
    finally:
        for name in memoised:
            delattr(inner, name)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h"


def passes_per_frame(n_layers: int, input_layers: list[int], levels: int, depth: str, skip: bool = True) -> int:
    """Decoder layer passes per frame: the reference pass, then per input (its decoder layer in
    `input_layers`) and level the layers from its own (`skip`, else the first) to the measured one."""
    return n_layers + levels * sum((k + 1 if depth == "layer" else n_layers) - (k if skip else 0)
                                   for k in input_layers)


def measure(store_path, frames: list, levels=LEVELS, device: str = "cpu", dtype: str = "float32",
            threads: int = 6, progress: bool = True, log: Log | None = None, method: str = "magnitude",
            table: LatencyTable | None = None, frame_tokens="auto", skip_unchanged_layers: bool = True,
            depth: str = "auto", model_depth_minutes: float = MODEL_DEPTH_MINUTES,
            first_input: Callable[[dict], None] | None = None) -> dict:
    """Output error per input and level (see the module docstring).

    frames: PIL images or uint8 [H, W, 3] arrays, encoded in the `frame_tokens` mode.
    skip_unchanged_layers: replay the reference pass's outputs of the layers before the perturbed
    input's and compute the frame's image features once (the same error, less work); False runs
    the vision tower and every layer at every pass.
    depth: "model", "layer" or "auto" (module docstring; "auto" decides by `model_depth_minutes`).
    first_input, if given, is called after the first input's appends with {"seconds", "passes"}
    (their time and decoder layer passes: what the logged estimate is made from), "done" (passes so
    far), "total" (passes of the whole plan) and "depth" (the one measured); it may raise to stop.
    Returns {"inputs": [N names], "error": float64 [N, L], "levels": [L], "frames": n, "seconds": s,
    "layer_passes": decoder layers run, "depth": "model" or "layer"}.
    """
    log = log or (lambda message: None)
    levels = tuple(float(x) for x in levels)
    if not frames:
        raise ValueError("sensitivity needs at least one calibration frame")
    if not levels or any(not 0.0 < x < 1.0 for x in levels) or list(levels) != sorted(set(levels)):
        raise ValueError(f"levels must be increasing sparsities in (0, 1), got {levels}")
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {', '.join(DEPTHS)}, got {depth!r}")
    t0 = time.perf_counter()
    store = Store.open(store_path)
    reader = Reader(threads=threads)
    try:
        # dense and magnitude selections never consult the drive's latency table; no reads ahead (a
        # "layer" pass ends early, and every pass reads what it uses anyway)
        flash = build_flash_model(store, table or LatencyTable.synthetic(), SelectionSettings(0.0, "dense"),
                                  Workspace(reader, device, overlap=False), device=device, dtype=torch_dtype(dtype))
        adapter = adapter_class(flash.arch)(flash.model, load_processor(store.path, flash.arch),
                                            frame_tokens=frame_tokens)
        decoder = adapter.decoder_layers(flash.model)
        inputs = list(flash.layers)
        own_layer = _layer_of(store, inputs)
        # inputs of one layer run one after another: they share the replayed prefix
        order = sorted(range(len(inputs)), key=lambda i: (own_layer[inputs[i]], i))
        n_layers = len(decoder)
        input_layers = [own_layer[name] for name in inputs]

        def layer_passes(d: str) -> int:
            return len(frames) * passes_per_frame(n_layers, input_layers, len(levels), d, skip_unchanged_layers)

        measured = "model" if depth == "auto" else depth  # "auto" decides after the first reference pass
        total = layer_passes(measured)
        log(f"sensitivity of {len(inputs)} inputs at {len(levels)} levels on {len(frames)} frame(s): "
            f"{len(frames) * (1 + len(inputs) * len(levels))} appends, {total} decoder layer passes at "
            f"{MEASURED_AT[measured]}" + (f" ({layer_passes('layer')} at {MEASURED_AT['layer']})"
                                          if depth == "auto" else ""))
        recorded: list = []  # the reference pass's output of every decoder layer

        def record(module, args, out):
            recorded.append(out.detach() if torch.is_tensor(out) else out)

        hooks = [layer.register_forward_hook(record) for layer in decoder]
        try:
            base = DynamicCache()
            _, position = adapter.append(adapter.encode_text(adapter.prompt_prefix), base, 0)
            error = np.zeros((len(inputs), len(levels)))
            done = 0
            with tqdm(total=total, desc="sensitivity", unit="layer", disable=not progress) as bar:
                for f, frame in enumerate(frames):
                    chunk = adapter.encode_frame(frame)

                    def run(overrides, k=0, stop=None):
                        """Output [T, D] (float32) of decoder layer `stop` (None: the last), layers
                        before k replayed."""
                        nonlocal done
                        flash.overrides = overrides
                        recorded.clear()
                        with _replayed(decoder, reference, k), \
                                (_stop_after(decoder[stop]) if stop is not None else nullcontext()):
                            try:
                                adapter.append(chunk, copy_cache(base), position)
                            except _Stop:
                                pass
                        passes = (n_layers if stop is None else stop + 1) - k
                        bar.update(passes)
                        done += passes
                        return _flat(recorded[-1])

                    reference: list = []
                    frame_scope = _vision_once(flash.model) if skip_unchanged_layers else nullcontext({"seconds": 0.0})
                    with frame_scope as vision:
                        t_ref = time.perf_counter()
                        ref = run(None)
                        reference = list(recorded)
                        if f == 0 and depth == "auto":
                            # per layer pass: the reference pass without its vision tower (the others reuse it)
                            rate = (time.perf_counter() - t_ref - vision["seconds"]) / n_layers
                            estimate = rate * (layer_passes("model") - done)
                            if estimate > 60 * model_depth_minutes:
                                measured = "layer"
                                bar.total = total = layer_passes("layer")
                                bar.refresh()
                                log(f"sensitivity at {MEASURED_AT['model']} would take about {_duration(estimate)} "
                                    f"(more than {model_depth_minutes:g} min): measuring at {MEASURED_AT['layer']} "
                                    f"instead, about {_duration(rate * (total - done))}")
                        for n, i in enumerate(order):
                            k = own_layer[inputs[i]]
                            stop = k if measured == "layer" else None
                            target = ref if stop is None else _flat(reference[k])
                            start = k if skip_unchanged_layers else 0
                            t_input = time.perf_counter()
                            for j, level in enumerate(levels):
                                h = run({inputs[i]: SelectionSettings(level, method, allocation="uniform")}, start,
                                        stop)
                                error[i, j] += _relative_error2(h, target)
                            if f == 0 and n == 0:  # the first measured appends: the estimate of the rest
                                per_append = (n_layers if stop is None else stop + 1) - start
                                rate = (time.perf_counter() - t_input) / (len(levels) * per_append)
                                log(f"sensitivity: {len(levels)} appends took {time.perf_counter() - t_input:.1f} s, "
                                    f"so about {_duration(rate * (total - done))} for the rest")
                                if first_input is not None:
                                    first_input({"seconds": time.perf_counter() - t_input, "depth": measured,
                                                 "passes": len(levels) * per_append, "done": done, "total": total})
        finally:
            for hook in hooks:
                hook.remove()
            flash.overrides = None
    finally:
        reader.close()
    seconds = time.perf_counter() - t0
    log(f"sensitivity of {len(inputs)} inputs at {len(levels)} levels on {len(frames)} frame(s) at "
        f"{MEASURED_AT[measured]}: {seconds:.0f} s")
    return {"inputs": inputs, "error": error / len(frames), "levels": list(levels), "frames": len(frames),
            "seconds": round(seconds, 1), "layer_passes": total, "depth": measured}


def _flat(out) -> torch.Tensor:
    """A decoder layer's recorded output (a tensor or a tuple led by one) as float32 [T, D]."""
    out = out[0] if isinstance(out, tuple) else out
    return out.detach().float().reshape(-1, out.shape[-1])


def _hull(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points sorted by x (first and last included)."""
    hull: list[int] = []
    for k in range(len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (y[b] - y[a]) * (x[k] - x[a]) >= (y[k] - y[a]) * (x[b] - x[a]):
                hull.pop()  # b lies on or above the chord a-k
            else:
                break
        hull.append(k)
    return hull


def allocate(inputs: list[str], weights, levels, error, grid_step: float = GRID_STEP,
             basis: dict | None = None) -> SparsityAllocation:
    """The greedy allocation for measured `error` [N, L] at `levels` (see the module docstring).

    weights: bytes per input [N]. The grid runs from 0 in steps of `grid_step` up to the top level
    (every input there, so uniform).
    """
    w = np.asarray(weights, dtype=np.float64)
    x = np.concatenate([[0.0], np.asarray(levels, dtype=np.float64)])  # [L + 1]
    err = np.asarray(error, dtype=np.float64)
    segments = []  # (slope per byte, input, sparsity from, sparsity to)
    for i in range(len(inputs)):
        y = np.maximum.accumulate(np.concatenate([[0.0], np.maximum(err[i], 0.0)]))
        hull = _hull(x, y)
        for a, b in zip(hull, hull[1:]):
            segments.append(((y[b] - y[a]) / ((x[b] - x[a]) * w[i]), i, x[a], x[b]))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))  # per input, hull slopes increase: order kept
    top = float(x[-1])
    grid = np.append(np.arange(0.0, top - 1e-9, grid_step), top)
    rows = np.zeros((grid.size, len(inputs)))
    current = np.zeros(len(inputs))
    done = 0.0  # byte-weighted average reached
    k = 1
    for _, i, lo, hi in segments:
        gain = (hi - lo) * w[i] / w.sum()
        while k < grid.size and grid[k] <= done + gain + 1e-12:
            t = (grid[k] - done) / gain if gain > 0 else 1.0
            rows[k] = current
            rows[k, i] = lo + t * (hi - lo)
            k += 1
        current[i] = hi
        done += gain
    rows[-1] = top  # every input at the top level
    return SparsityAllocation(tuple(inputs), w, grid, rows, basis or {})


def calibrate_allocation(store_path, frames: list, levels=LEVELS, device: str = "cpu", dtype: str = "float32",
                         threads: int = 6, source: str = "", progress: bool = True, log: Log | None = None,
                         write: bool = True, frame_tokens=None, depth: str = "auto",
                         first_input: Callable[[dict], None] | None = None) -> SparsityAllocation:
    """Measure the store's sensitivity on `frames` (at `depth`, see `measure`), allocate, and (with
    `write`) store the result; `first_input` as `measure`'s.

    frame_tokens None: the mode the store was calibrated in (its manifest), else "auto"."""
    store = Store.open(store_path, check_alignment=False)
    if frame_tokens is None:
        frame_tokens = (store.model_info.get("calibration") or {}).get("frame_tokens", "auto")
    sens = measure(store_path, frames, levels, device, dtype, threads, progress, log, frame_tokens=frame_tokens,
                   depth=depth, first_input=first_input)
    sizes = input_bytes(store)
    basis = {"frames": sens["frames"], "source": source, "levels": sens["levels"], "frame_tokens": frame_tokens,
             "selection": "magnitude", "seconds": sens["seconds"],
             "depth": sens["depth"],
             "error": f"squared relative error of {MEASURED_AT[sens['depth']]} over a frame's tokens",
             "sensitivity": {name: [round(float(e), 8) for e in row]
                             for name, row in zip(sens["inputs"], sens["error"])}}
    allocation = allocate(sens["inputs"], [sizes[n] for n in sens["inputs"]], sens["levels"], sens["error"],
                          basis=basis)
    if write:
        path = write_allocation(Path(store_path), allocation)
        if log:
            log(f"sparsity allocation written to {path}")
    return allocation

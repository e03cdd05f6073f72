"""`nchunk convert`: a Hugging Face VLM checkpoint → an nchunk store that alone is the model.

    convert(model_dir, store_dir, calib="frames/")     # or: nchunk convert MODEL STORE --calib frames/

What goes where (store format: store/__init__.py; names: flash_model.py):

- every decoder projection → rows on the drive: per layer the groups q|k|v, o, gate|up, down
  (bundled: one group per input, so one channel is one read; `bundle=False`: one group per
  projection, sharing the input's selection), in the checkpoint's dtype unless `dtype` is given;
- everything else → resident.safetensors under the model's own keys: vision tower, projector,
  embeddings, norms, LM head and the projection biases;
- calibration statistics → resident.safetensors too, per input name (original channel order):
  ``calibration/<input>/mean_importance`` float32 [in], the mean over calibration frames of the
  frame's mean |x| per channel, and ``calibration/<input>/active_fraction`` float32 [in], how often
  the channel was in the top half (what the hot–cold order sorts by); the manifest's
  ``model.calibration`` says how many frames, from where, and in which frame mode (`frame_mode`,
  `token_budget`, `visual_tokens` per frame: runtime/calibrated_mode.py);
- the hot–cold permutation per input → permutations.safetensors;
- the layer-wise sparsity allocation → sparsity_allocation.json (store/allocation.py), measured on
  `allocation_frames` (4: sensitivity.DEFAULT_FRAMES) of the calibration frames, spread over them
  (convert/sensitivity.py);
- config.json, generation_config.json, tokenizer and processor files → copied next to the manifest;
- the manifest's `recommended` settings (store/recommended.py): `recommended` when given (what the
  caller validated), else CONVERTED: sparsity 0, which reads every row and reproduces the checkpoint.

Steps (nothing holds the model twice; the checkpoint is read one tensor at a time, and only the
resident part, which the runtime keeps in RAM anyway, is held until each store is closed):

1. check the checkpoint against its architecture (checkpoint.py) before writing anything;
2. write an unpermuted store, group by group, into a work directory next to the destination;
3. calibrate: open that store with the flash runtime, dense (every row read from the drive), append
   the calibration frames (in the `frame_tokens` mode the robot will use) and record each input's
   per-frame importance (mean |x| over the frame's tokens) in an ActivationCounter; each frame is a
   full dense forward, so the time of the first one is logged as an estimate of the rest, and a
   progress bar follows them;
4. rewrite the store permuted hot–cold, group by group from the first store, then delete the first;
5. measure each input's sensitivity on the new store and write the sparsity allocation; the plan
   (appends and decoder layer passes) and, after the first input's appends, the estimated time of
   the rest are logged before the bulk of it runs, and a progress bar counts the layer passes. The
   error is taken at the last decoder layer's output while that is estimated to fit 15 minutes,
   else at each input's own layer (`sensitivity_depth`, sensitivity.py).

The work directory needs about twice the backbone's size on the drive while step 4 runs. With
`reorder=False` steps 3-5 are skipped (identity order, no calibration, uniform sparsity); with
`allocation=False` step 5 is (per frame it costs 1 + inputs x levels appends, each running the
decoder from the perturbed input's layer on, or only that layer: about half of that many full
appends, or one layer each).
"""
from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from nchunk_core.convert.checkpoint import INDEX, Checkpoint
from nchunk_core.runtime.adapters import adapter_class
from nchunk_core.runtime.config import frame_tokens_value
from nchunk_core.io.latency import LatencyTable
from nchunk_core.convert.reorder import ActivationCounter
from nchunk_core.store import Recommended, Store, StoreError, StoreWriter, set_recommended
from nchunk_core.store.format import MANIFEST, PERMUTATIONS, RESIDENT
from nchunk_core.store.naming import CALIBRATION_PREFIX, DTYPES, group_names, input_name, torch_dtype

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
STORE_FILE_NAMES = (MANIFEST, RESIDENT, PERMUTATIONS)
SYNTHETIC_FRAMES = 8
# What a converted store recommends when the caller measured nothing better: the exact model, and the
# node's defaults for context and answer length.
CONVERTED = Recommended(sparsity=0.0, method="chunking", max_frames=8, max_new_tokens=32,
                        basis="nchunk convert: sparsity 0 reads every row and reproduces the checkpoint; "
                              "accuracy at higher sparsity was not measured")

Log = Callable[[str], None]


# ---- checkpoint → unpermuted store ----------------------------------------------------------------

def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


def write_store(ck: Checkpoint, path: Path, bundle: bool, dtype: torch.dtype | None, model_info: dict,
                progress: bool = True) -> None:
    """Stream the checkpoint into a store at `path` (identity row order)."""
    resident = ck.resident_keys()
    groups = sum(len(layer) for layer in ck.plan)
    with StoreWriter(path, model_info=model_info) as writer, \
            tqdm(total=groups + len(resident), desc="writing store", unit="tensor", disable=not progress) as bar:
        for i, layer in enumerate(ck.plan):
            for kind, paths in layer.items():
                matrices = [(p, _cast(ck.tensor(p + ".weight"), dtype)) for p in paths]  # [out, in] each
                names = group_names(i, kind, paths, bundle)
                parts = [matrices] if bundle else [[m] for m in matrices]
                for name, part in zip(names, parts):
                    writer.add_group(name, input_name(i, kind), part, layer=i)
                del matrices, parts
                bar.update()
        for key in resident:
            writer.add_resident(key, _cast(ck.tensor(key), dtype))
            bar.update()


def copy_model_files(model_dir: Path, store: Path) -> list[str]:
    """Copy config, tokenizer, processor (every top-level file but weights) into the store."""
    copied = []
    for f in sorted(Path(model_dir).iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name == INDEX or f.suffix in WEIGHT_SUFFIXES:
            continue
        if f.name in STORE_FILE_NAMES or f.name.startswith("weights-"):
            raise ValueError(f"{f}: its name clashes with a store file; remove it from the model directory")
        shutil.copy2(f, store / f.name)
        copied.append(f.name)
    return copied


# ---- calibration -----------------------------------------------------------------------------------

def spread(items: list, count: int) -> list:
    """Up to `count` of `items`, evenly spaced from the first to the last (all of them when fewer)."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def calibration_frames(directory, limit: int, log: Log):
    """(source description, list of frame paths or images): up to `limit` frames spread over the folder.

    None gives a few synthetic frames (colour gradients with a random box) and a warning: the
    hot–cold order is then only as good as those frames are like the camera's.
    """
    if directory is None:
        from nchunk_core.testing.tiny_models import make_frame

        message = ("no calibration frames given (--calib): calibrating on synthetic frames; pass a folder "
                   "of camera frames for a hot–cold order that fits real inputs")
        warnings.warn(message, stacklevel=2)
        log(f"warning: {message}")
        return "synthetic", [make_frame(480, 640, seed=i) for i in range(min(limit, SYNTHETIC_FRAMES))]
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"calibration folder {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"calibration folder {directory} holds no {'/'.join(FRAME_SUFFIXES)} images")
    return str(directory), spread(files, limit)  # frames of a video: picks over the whole clip


def load_frame(frame):
    if not isinstance(frame, Path):
        return frame
    try:
        with Image.open(frame) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"calibration frame {frame}: cannot read it as an image: {exc}") from exc


class ImportanceRecorder:
    """Per input: ActivationCounter of frame importance vectors and their running sum."""

    def __init__(self):
        self.counters: dict[str, ActivationCounter] = {}
        self.sums: dict[str, np.ndarray] = {}

    def __call__(self, phase: str, name: str, x: torch.Tensor) -> None:
        if phase != "frame":  # prompt text, replays of kept frames, questions: not calibration samples
            return
        v = x.detach().reshape(-1, x.shape[-1]).abs().float().mean(dim=0).cpu().numpy()  # [in]
        if name not in self.counters:
            self.counters[name] = ActivationCounter(v.size)
            self.sums[name] = np.zeros(v.size, dtype=np.float64)
        self.counters[name].add(v)
        self.sums[name] += v

    def results(self) -> dict[str, dict[str, np.ndarray]]:
        """input -> {"permutation": int64 [in], "mean_importance", "active_fraction": float32 [in]}."""
        out = {}
        for name, counter in self.counters.items():
            out[name] = {
                "permutation": counter.permutation(),
                "mean_importance": (self.sums[name] / counter.samples).astype(np.float32),
                "active_fraction": (counter.counts / counter.samples).astype(np.float32),
            }
        return out


# Calibration frames by default: more stop paying at 16 (`nchunk bench calibration`, docs/design.md#converter)
CALIB_FRAMES = 16


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def calibrate(store_path: Path, frames: list, device: str = "cpu", dtype: str = "float32", threads: int = 6,
              progress: bool = True, log: Log | None = None,
              frame_tokens="auto", mode: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Append `frames` through the store's flash runtime, dense, and record importance per input.

    `mode`, if given, receives the frame mode the frames were encoded in: frame_mode, token_budget
    (or None) and visual_tokens of the first frame (the manifest's calibration record).

    Every frame is a full dense forward (every row read), in contexts of up to max_frames frames (a
    full context starts again empty, so no frame is encoded twice): the time of the first one,
    logged before the others run, gives the estimate of the whole calibration; a progress bar
    follows the rest.
    """
    from nchunk_core.runtime.select import SelectionSettings
    from nchunk_core.runtime.session import Session, SessionConfig

    log = log or (lambda message: None)
    cfg = SessionConfig(device=device, dtype=dtype, selection=SelectionSettings(0.0, "dense"), reader_threads=threads,
                        frame_tokens=frame_tokens)
    recorder = ImportanceRecorder()
    # dense selection reads every row and never consults the drive's latency table
    with Session.open(store_path, cfg, log=log, table=LatencyTable.synthetic()) as session:
        session.set_observer(recorder)
        t0 = time.perf_counter()
        first = session.append_frame(load_frame(frames[0]))
        first_s = time.perf_counter() - t0
        if mode is not None:
            mode.update(frame_mode=session.adapter.frame_mode, token_budget=session.adapter.token_budget,
                        visual_tokens=first.visual_tokens)
        log(f"calibrating on {len(frames)} frame(s): the first ({first.visual_tokens} visual tokens) took "
            f"{first_s:.1f} s, so about {_duration(first_s * (len(frames) - 1))} for the other "
            f"{len(frames) - 1}")
        for frame in tqdm(frames[1:], desc="calibrating", unit="frame", initial=1, total=len(frames),
                          disable=not progress):
            if session.frames_in_context >= cfg.max_frames:
                session.reset()  # a new context: a rebuild would re-encode kept frames, which add no samples
            session.append_frame(load_frame(frame))
    return recorder.results()


# ---- unpermuted store → permuted store --------------------------------------------------------------

def permute_store(src: Path, dst: Path, calibration: dict, model_info: dict, progress: bool = True) -> None:
    """Rewrite the store at `src` into `dst` with each input's rows in hot–cold order."""
    store = Store.open(src)
    missing = sorted(set(store.inputs()) - set(calibration))
    if missing:
        raise RuntimeError(f"calibration saw no activation for input(s) {missing[:3]}")
    with StoreWriter(dst, model_info=model_info) as writer:
        for g in tqdm(list(store.groups.values()), desc="reordering rows", unit="group", disable=not progress):
            rows = torch.from_numpy(store.read_group_dense(g.name))  # [in, Σout] storage dtype
            if g.dtype == "bfloat16":
                rows = rows.view(torch.bfloat16)
            matrices = [(o["name"], rows[:, o["offset"]:o["offset"] + o["out_features"]].T)  # [out, in]
                        for o in g.outputs]
            writer.add_group(g.name, g.input, matrices, layer=g.layer,
                             permutation=calibration[g.input]["permutation"])
            del rows, matrices
        for name, tensor in store.resident("cpu").items():
            writer.add_resident(name, tensor)
        for name, stats in calibration.items():
            for field in ("mean_importance", "active_fraction"):
                writer.add_resident(f"{CALIBRATION_PREFIX}{name}/{field}", stats[field])


# ---- the whole conversion ---------------------------------------------------------------------------

def _prepare_destination(dst: Path, overwrite: bool) -> None:
    if not dst.exists():
        return
    if not dst.is_dir():
        raise StoreError(f"{dst} exists and is not a directory")
    if any(dst.iterdir()):
        if not overwrite:
            raise StoreError(f"{dst} is not empty; pass --overwrite to replace the store in it")
        if not (dst / MANIFEST).is_file():
            raise StoreError(f"refusing to overwrite {dst}: it is not an nchunk store (no {MANIFEST})")


def convert(model_dir, store_dir, calib=None, *, bundle: bool = True, dtype: str = "auto",
            reorder: bool = True, calib_frames: int = CALIB_FRAMES, calib_device: str = "cpu",
            calib_dtype: str = "float32", threads: int = 6, overwrite: bool = False,
            recommended: Recommended | None = None, progress: bool = True, log: Log | None = None,
            frame_tokens="auto", allocation: bool = True, allocation_frames: int = 4,
            sensitivity_depth: str = "auto", timings: dict | None = None) -> Path:
    """Convert the checkpoint in `model_dir` into a store at `store_dir` (see the module docstring).

    `timings`, if given, receives the seconds of each step that ran: write_s (checkpoint → first
    store), calibration_s, reorder_s (the permuted rewrite) and allocation_s (sensitivity)."""
    log = log or (lambda message: None)
    timings = {} if timings is None else timings
    step = time.perf_counter()

    def done(name: str) -> None:
        nonlocal step
        now = time.perf_counter()
        timings[name] = round(now - step, 3)
        step = now

    if recommended is not None and not isinstance(recommended, Recommended):
        raise ValueError(f"recommended must be a Recommended or None, got {type(recommended).__name__}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value in (("calib_frames", calib_frames), ("allocation_frames", allocation_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    dst = Path(store_dir).absolute()
    _prepare_destination(dst, overwrite)
    frame_tokens = frame_tokens_value(frame_tokens)
    with Checkpoint(model_dir) as ck:
        adapter_class(ck.arch).frame_mode_for(frame_tokens)  # a mode the architecture has
        log(f"{ck.path}: {ck.arch}, {ck.text_layers} decoder layers, {len(ck.refs)} tensors, "
            f"{ck.nbytes / 2**30:.2f} GiB ({ck.dtype()} projections)")
        frames_source, frames = calibration_frames(calib, calib_frames, log) if reorder else (None, [])
        source = ck.path
        info = {"arch": ck.arch, "source": str(ck.path), "text_layers": ck.text_layers, "bundled": bundle,
                "dtype": ck.dtype() if dtype == "auto" else dtype, "converter": "nchunk convert",
                "calibration": None}
        work = dst.parent / f".{dst.name}.converting"
        if work.exists():
            shutil.rmtree(work)  # left by an interrupted conversion
        work.mkdir(parents=True)
        first = work / ("unpermuted" if reorder else "store")
        try:
            write_store(ck, first, bundle, None if dtype == "auto" else torch_dtype(dtype), info, progress)
            copy_model_files(source, first)
            done("write_s")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    # the checkpoint is closed (its memory maps released) before the store is run
    try:
        final = first
        if reorder:
            mode = {}
            calibration = calibrate(first, frames, calib_device, calib_dtype, threads, progress, log, frame_tokens,
                                    mode)
            done("calibration_s")
            info["calibration"] = {"frames": len(frames), "source": frames_source, "frame_tokens": frame_tokens,
                                   **mode,
                                   "synthetic": calib is None, "active_fraction": 0.5,
                                   "importance": "mean |x| over a frame's tokens, per input channel"}
            final = work / "store"
            permute_store(first, final, calibration, info, progress)
            copy_model_files(source, final)
            shutil.rmtree(first)
            done("reorder_s")
            if allocation:
                from nchunk_core.convert.sensitivity import calibrate_allocation

                calibrate_allocation(final, [load_frame(f) for f in spread(frames, allocation_frames)], device=calib_device,
                                     dtype=calib_dtype, threads=threads, source=frames_source, progress=progress,
                                     log=log, frame_tokens=frame_tokens, depth=sensitivity_depth)
                done("allocation_s")
        set_recommended(final, recommended or CONVERTED)
        Store.open(final)  # the result opens and validates before it replaces anything
        if dst.exists():
            dst.rename(work / "previous")
        final.rename(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"store written to {dst}")
    return dst

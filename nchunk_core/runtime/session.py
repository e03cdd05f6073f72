"""Frame-appending question answering over a store: the API the ROS node calls.

    cfg = SessionConfig(device="cpu", dtype="float32", sparsity=0.5, method="chunking")
    s = Session.open(store_path, cfg)
    s.append_frame(frame)            # np.ndarray [H, W, 3] uint8 RGB or PIL image -> FrameStats
    s.ask("What is on the table?")   # -> Answer
    s.ask("And now?", deadline=time.monotonic() + 2.0)   # partial answer if decoding runs past it
    s.update(sparsity=0.3)           # validated now, applied at the start of the next call
    s.close()

What stays in RAM: the resident tensors of the store (vision tower, projector, embeddings, norms, LM
head, biases), the KV cache and a few recent frames. Every decoder projection is streamed from the
store through one Reader and one Workspace per session (flash_model.py, layers.py).

Context policy:

- The conversation is the architecture's prompt prefix, then one chunk per frame, in order. A frame
  is appended the moment it arrives, so its cost is paid before anyone asks.
- `ask` appends the question chunk after the frames, decodes greedily through the same sparse
  layers (stops at an end-of-sequence token or `max_new_tokens`), and then truncates the KV cache
  back to the frames-only state. Questions and answers never pile up in the context: every question
  sees exactly the frames in context, and asking twice gives the same answer.
- A `deadline` (time.monotonic()) or a `should_stop` callable stops decoding before the next token:
  the Answer holds the tokens so far and `interrupted` is True. The question's prefill itself is not
  interrupted (an answer stopped right after it is empty). The context is cropped back as usual.
- Bounded context: a frame that arrives when `max_frames` frames are in context (or when the model's
  position limit would be reached) rebuilds the cache: a new cache gets a copy of the prefix's keys
  and values (same text at the same positions, so it is not recomputed or read again), the last
  `max_frames // 2` earlier frames (kept in RAM as images, downscaled to at most KEEP_MAX_SIDE px)
  re-encoded, then the new frame (`FrameStats.rebuilt` is True). RAM stays flat however long the
  camera runs: at most `max_frames` frames of KV cache and `max_frames // 2` images. A smaller
  `max_frames` given to `update` while more frames are in context makes the next append rebuild.
- A failed call leaves the context as it was before the call (the cache is truncated back).

Timing in FrameStats: `vision_s` is image preprocessing plus the vision tower and projector;
`select_s` and `io_s` are summed over every flash layer call; `compute_s` is everything else
(decoder arithmetic, attention, norms, LM head). `append_frame` and `ask` are serialised by a lock;
`update` never waits for them.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

from nchunk_core.runtime.flash_model import DTYPES, build_flash_model
from nchunk_core.runtime.adapters import Chunk, adapter_class, frame_tokens_value
from nchunk_core.runtime.decoding import DecodingSettings, decoding_value, greedy_decode
from nchunk_core.io.latency import LatencyTable
from nchunk_core.runtime.layers import SparsityConfig, Workspace
from nchunk_core.io.reader import Reader
from nchunk_core.runtime.select import METHODS, ChunkParams
from nchunk_core.store import Store

KEEP_MAX_SIDE = 1024  # frames kept for a rebuild are downscaled to this longest side
MIN_SIDE = 16  # smallest frame side accepted (processors cannot resize smaller images sensibly)
MAX_SIDE = 16384
MAX_ASPECT = 50.0
MAX_NEW_TOKENS_LIMIT = 4096


def _chunk_params(value) -> ChunkParams | None:
    """None, a ChunkParams, or a dict of its fields (as a ROS parameter might give)."""
    if value is None or isinstance(value, ChunkParams):
        return value
    if isinstance(value, dict):
        try:
            return ChunkParams(**value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"chunk_params: {exc}") from exc
    raise ValueError(f"chunk_params must be None, a ChunkParams or a dict, got {type(value).__name__}")


def _positive_int(name: str, value, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be at most {upper}, got {value}")
    return int(value)


def _sparsity(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(value)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {value!r}")
    return float(value)


def _method(value) -> str:
    if value not in METHODS:
        raise ValueError(f"unknown selection method {value!r}; choose one of {', '.join(METHODS)}")
    return value


@dataclasses.dataclass
class SessionConfig:
    """Settings of a session; checked on construction (ValueError naming the bad field)."""

    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str = "float32"  # compute dtype: float32 | float16 | bfloat16
    sparsity: float = 0.0  # fraction of input rows of every projection NOT read, in [0, 1)
    method: str = "chunking"  # dense | magnitude | chunking | dp (select.py)
    chunk_params: ChunkParams | None = None  # None: defaults per matrix shape
    threads: int = 6  # reader threads (also the key of the cached drive profile)
    max_frames: int = 8  # frames in context before the cache is rebuilt (see module docstring)
    max_new_tokens: int = 32  # default answer length limit
    profile_quick: bool = True  # quick drive profile if none is cached
    max_question_tokens: int = 256  # longer questions are refused
    frame_tokens: str | int = "auto"  # what a frame costs: FRAME_TOKENS_HELP (adapters.py)
    decoding: str = "checkpoint"  # "checkpoint": generation_config.json's greedy settings; "greedy" (decoding.py)

    def __post_init__(self):
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda', got {self.device!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device {self.device!r} is not a device name: {exc}") from exc
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but this PyTorch sees no CUDA device")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.sparsity = _sparsity(self.sparsity)
        _method(self.method)
        self.chunk_params = _chunk_params(self.chunk_params)
        self.threads = _positive_int("threads", self.threads, 256)
        self.max_frames = _positive_int("max_frames", self.max_frames)
        self.max_new_tokens = _positive_int("max_new_tokens", self.max_new_tokens, MAX_NEW_TOKENS_LIMIT)
        self.max_question_tokens = _positive_int("max_question_tokens", self.max_question_tokens)
        if not isinstance(self.profile_quick, bool):
            raise ValueError(f"profile_quick must be True or False, got {self.profile_quick!r}")
        self.frame_tokens = frame_tokens_value(self.frame_tokens)
        decoding_value(self.decoding)


@dataclasses.dataclass
class FrameStats:
    """What appending one frame cost (a rebuild's re-encoded frames included)."""

    visual_tokens: int  # of the new frame
    tokens: int  # all tokens appended by this call
    rows_read: int
    rows_total: int
    bytes_read: int
    est_io_s: float  # Σ latency-table estimate of the selections
    io_s: float
    select_s: float
    compute_s: float
    vision_s: float
    total_s: float
    retained: float  # mean fraction of importance covered by the rows read
    frames_in_context: int
    rebuilt: bool  # the max_frames policy fired
    reads: int = 0  # contiguous runs of rows read (one request per run and group of the input)


@dataclasses.dataclass
class Answer:
    text: str
    token_ids: list[int]
    tokens_generated: int
    frames_in_context: int
    newest_stamp: float | None
    prefill_s: float  # the question chunk
    decode_s: float  # the generated tokens
    total_s: float
    bytes_read: int
    io_s: float
    select_s: float
    retained: float
    reads: int = 0  # contiguous runs of rows read (one request per run and group of the input)
    interrupted: bool = False  # decoding stopped at the deadline or by should_stop: text is partial


def as_frame_image(image) -> Image.Image:
    """A camera frame as a PIL RGB image; ValueError / TypeError naming what is wrong.

    Arrays must be uint8 [H, W, 3] RGB; PIL images of any mode are converted to RGB.
    """
    if isinstance(image, Image.Image):
        w, h = image.size
        pil = image
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"a frame array must be uint8 RGB, got dtype {image.dtype} "
                             f"(convert floats with (x * 255).clip(0, 255).astype(np.uint8))")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a frame array must have shape [H, W, 3] (RGB), got {list(image.shape)}")
        h, w = image.shape[:2]
        pil = None
    else:
        raise TypeError(f"a frame must be a NumPy array [H, W, 3] uint8 or a PIL image, "
                        f"not {type(image).__name__}")
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise ValueError(f"frame of {w}x{h} px: each side must be in [{MIN_SIDE}, {MAX_SIDE}] px")
    if max(h, w) / min(h, w) > MAX_ASPECT:
        raise ValueError(f"frame of {w}x{h} px: aspect ratio above {MAX_ASPECT:g}")
    if pil is None:
        return Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    try:
        return pil.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot convert a {pil.mode} frame to RGB: {exc}") from exc


def _kept_copy(image: Image.Image) -> Image.Image:
    """The frame as kept for a rebuild: the same image, or a downscaled copy of a large one."""
    if max(image.size) <= KEEP_MAX_SIDE:
        return image
    copy = image.copy()
    copy.thumbnail((KEEP_MAX_SIDE, KEEP_MAX_SIDE), Image.Resampling.BILINEAR)
    return copy


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Drop every cached token after the first `length`, in every layer."""
    for layer in cache.layers:
        n = layer.get_seq_length()
        if n > length:
            layer.crop(length - n)


def load_processor(path, arch: str):
    """The image-only processor of `arch` saved in `path` (no video processor, no torchvision)."""
    from transformers import Idefics3Processor

    from nchunk_core.testing import tiny_models

    classes = {
        "idefics3": Idefics3Processor,  # has no video processor: the real class
        "llava_onevision": tiny_models.ImageOnlyLlavaOnevisionProcessor,
        "qwen2_5_vl": tiny_models.ImageOnlyQwen2_5_VLProcessor,
        "smolvlm": tiny_models.ImageOnlySmolVLMProcessor,
    }
    try:
        return classes[arch].from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: cannot load the {arch} processor and tokenizer: {exc}") from exc


def stop_token_ids(path, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's eos_token_id(s) and the tokenizer's eos."""
    from transformers import GenerationConfig

    ids = set()
    if (Path(path) / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(str(path), local_files_only=True).eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


class Session:
    """A store opened for frame appending and questions (see the module docstring)."""

    def __init__(self, store: Store, cfg: SessionConfig, reader: Reader, flash, processor,
                 log: Callable[[str], None]):
        self.store = store
        self._cfg = dataclasses.replace(cfg)
        self._reader = reader
        self._flash = flash
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._log = log
        self.adapter = adapter_class(flash.arch)(flash.model, processor, frame_tokens=cfg.frame_tokens)
        # The conversation's first chunk, the same text every time; a text chunk at 0 takes
        # positions 0 … n-1 in every adapter, so it ends at position num_tokens.
        self._prefix = self.adapter.encode_text(self.adapter.prompt_prefix)
        self.decoding = DecodingSettings.load(store.path, stop_token_ids(store.path, self.tokenizer), cfg.decoding)
        self.stop_ids = self.decoding.stop_ids
        text = flash.model.config.get_text_config()
        self.max_positions = int(getattr(text, "max_position_embeddings", 1 << 30))
        self._lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: dict = {}
        self._closed = False
        self._kept: collections.deque = collections.deque(maxlen=cfg.max_frames // 2)
        self._new_context()

    @classmethod
    def open(cls, store_path, cfg: SessionConfig | None = None, log: Callable[[str], None] | None = None,
             *, table: LatencyTable | None = None) -> "Session":
        """Open the store at `store_path` and build its model (no backbone weight in RAM).

        `table` replaces the drive's latency table (tests, tools); by default it comes from
        `profile.load_or_profile(store_path, cfg.threads, quick=cfg.profile_quick)` (cached per drive).
        """
        cfg = SessionConfig() if cfg is None else cfg
        if not isinstance(cfg, SessionConfig):
            raise ValueError(f"cfg must be a SessionConfig, got {type(cfg).__name__}")
        log = log or (lambda message: None)
        path = Path(store_path)
        if not path.exists():
            raise FileNotFoundError(f"store {path} does not exist")
        store = Store.open(path)
        if table is None:
            from nchunk_core.io.profile import load_or_profile

            table = load_or_profile(store.path, threads=cfg.threads, quick=cfg.profile_quick, log=log)
        reader = Reader(threads=cfg.threads)
        try:
            sparsity = SparsityConfig(cfg.sparsity, cfg.method, cfg.chunk_params)
            flash = build_flash_model(store, table, sparsity, Workspace(reader, cfg.device),
                                      device=cfg.device, dtype=DTYPES[cfg.dtype])
            processor = load_processor(store.path, flash.arch)
            session = cls(store, cfg, reader, flash, processor, log)
        except BaseException:
            reader.close()
            raise
        groups = len(store.groups)
        log(f"opened {store.path}: {flash.arch}, {groups} streamed groups, "
            f"{sum(g.nbytes for g in store.groups.values()) / 2**20:.1f} MiB on the drive")
        log(session.adapter.describe())
        log(f"decoding: {session.decoding.describe()}")
        return session

    # -- state --------------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._flash.model

    @property
    def config(self) -> SessionConfig:
        """A copy of the settings in force (pending updates included)."""
        with self._pending_lock:
            return dataclasses.replace(self._cfg, **self._pending)

    @property
    def frames_in_context(self) -> int:
        return self._frames

    @property
    def newest_stamp(self) -> float | None:
        return self._newest_stamp

    def _new_context(self) -> None:
        self._cache = DynamicCache()
        self._next_position = 0
        self._frames = 0
        self._newest_stamp = None
        self._prefixed = False
        self._context_ids: list[torch.Tensor] = []  # [1, T] ids of each chunk in the cache, in order

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("session is closed")

    # -- settings -----------------------------------------------------------------------------------
    def update(self, sparsity=None, method=None, chunk_params=None, max_frames=None) -> None:
        """Change selection settings or max_frames; checked now, applied at the start of the next call.

        None leaves a setting unchanged; `chunk_params="default"` returns to the per-matrix defaults.
        A refused value raises ValueError and changes nothing. A max_frames below the frames in context
        makes the next append rebuild the context (module docstring).
        """
        change = {}
        if max_frames is not None:
            change["max_frames"] = _positive_int("max_frames", max_frames)
        if sparsity is not None:
            change["sparsity"] = _sparsity(sparsity)
        if method is not None:
            change["method"] = _method(method)
        if isinstance(chunk_params, str) and chunk_params == "default":
            change["chunk_params"] = None
        elif chunk_params is not None:
            change["chunk_params"] = _chunk_params(chunk_params)
        with self._pending_lock:
            self._pending.update(change)

    def set_observer(self, observer) -> None:
        """observer(phase, input_name, x [..., in]) is called with the input of every streamed
        projection group, in original channel order (calibration, studies); phase is one of prefix,
        frame, replay (a kept frame re-encoded by a rebuild), question, answer. None removes it."""
        self._flash.observer = observer

    def _apply_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        old, self._cfg = self._cfg, dataclasses.replace(self._cfg, **pending)
        cfg, sp = self._cfg, self._flash.sparsity
        sp.sparsity, sp.method, sp.params = cfg.sparsity, cfg.method, cfg.chunk_params
        if (old.sparsity, old.method, old.chunk_params) != (cfg.sparsity, cfg.method, cfg.chunk_params):
            self._log(f"selection now {cfg.method} at sparsity {cfg.sparsity:g}")
        if old.max_frames != cfg.max_frames:
            self._kept = collections.deque(self._kept, maxlen=cfg.max_frames // 2)
            self._log(f"max_frames now {cfg.max_frames}")

    # -- appending ----------------------------------------------------------------------------------
    def _append(self, chunk: Chunk, cache: DynamicCache, position: int, phase: str):
        self._flash.phase = phase
        return self.adapter.append(chunk, cache, position)

    def _encode(self, image: Image.Image) -> Chunk:
        try:
            return self.adapter.encode_frame(image)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"cannot encode frame of {image.size[0]}x{image.size[1]} px: {exc}") from exc

    def _fill(self, cache: DynamicCache, position: int, chunks: list[tuple[Chunk, str]]) -> int:
        for chunk, phase in chunks:
            if position + chunk.num_tokens > self.max_positions:
                raise ValueError(f"context would reach {position + chunk.num_tokens} positions, above "
                                 f"the model's {self.max_positions}; lower max_frames")
            _, position = self._append(chunk, cache, position, phase)
        return position

    def _reserve(self) -> int:
        """Positions kept free for a question and its answer."""
        return self._cfg.max_question_tokens + self._cfg.max_new_tokens + 16

    def append_frame(self, image, stamp: float | None = None) -> FrameStats:
        """Add a camera frame to the context (see the module docstring for the policy)."""
        if stamp is not None and (isinstance(stamp, bool) or not isinstance(stamp, (int, float))
                                  or not math.isfinite(stamp)):
            raise ValueError(f"stamp must be a finite number of seconds or None, got {stamp!r}")
        image = as_frame_image(image)
        with self._lock:
            self._check_open()
            self._apply_pending()
            t0 = time.perf_counter()
            self._flash.stats.clear()
            self._flash.vision_s = 0.0
            chunk = self._encode(image)
            prep_s = time.perf_counter() - t0
            before = self._cache.get_seq_length()
            rebuilt = self._frames >= self._cfg.max_frames or (
                self._next_position + chunk.num_tokens + self._reserve() > self.max_positions)
            if rebuilt:
                prep_s += self._rebuild(chunk)
            else:
                chunks = [] if self._prefixed else [(self._prefix, "prefix")]
                chunks.append((chunk, "frame"))
                length, position = self._cache.get_seq_length(), self._next_position
                try:
                    self._next_position = self._fill(self._cache, position, chunks)
                except BaseException:
                    truncate_cache(self._cache, length)
                    self._next_position = position
                    raise
                self._prefixed = True
                self._frames += 1
                self._context_ids += [c.input_ids for c, _ in chunks]
            self._kept.append((_kept_copy(image), stamp))
            self._newest_stamp = None if stamp is None else float(stamp)
            total_s = time.perf_counter() - t0
            calls = self._flash.stats
            tokens = self._cache.get_seq_length() - (0 if rebuilt else before)
            vision_s = prep_s + self._flash.vision_s
            io_s = sum(c.io_s for c in calls)
            select_s = sum(c.select_s for c in calls)
            return FrameStats(
                visual_tokens=chunk.num_visual_tokens, tokens=tokens,
                rows_read=sum(c.rows for c in calls), rows_total=sum(c.rows_total for c in calls),
                bytes_read=sum(c.bytes for c in calls), est_io_s=sum(c.est_io_s for c in calls),
                io_s=io_s, select_s=select_s, compute_s=max(0.0, total_s - vision_s - io_s - select_s),
                vision_s=vision_s, total_s=total_s,
                retained=float(np.mean([c.retained for c in calls])) if calls else 1.0,
                frames_in_context=self._frames, rebuilt=rebuilt, reads=sum(c.runs for c in calls))

    def _prefix_copy(self) -> DynamicCache:
        """A new cache holding a copy of the current cache's prefix."""
        n, cache = self._prefix.num_tokens, DynamicCache()
        for i, layer in enumerate(self._cache.layers):
            cache.update(layer.keys[..., :n, :].clone(), layer.values[..., :n, :].clone(), i)
        return cache

    def _rebuild(self, chunk: Chunk) -> float:
        """New cache: the prefix (copied), the kept frames re-encoded, then `chunk`. Returns encoding s."""
        t0 = time.perf_counter()
        replay = [(self._encode(image), "replay") for image, _ in self._kept]
        prep_s = time.perf_counter() - t0
        if self._prefixed:  # the prefix's keys and values are kept: it is the same text at the same place
            cache, position = self._prefix_copy(), self._prefix.num_tokens
            chunks = [*replay, (chunk, "frame")]
        else:
            cache, position = DynamicCache(), 0
            chunks = [(self._prefix, "prefix"), *replay, (chunk, "frame")]
        position = self._fill(cache, position, chunks)  # the old context stays intact if this fails
        self._cache, self._next_position = cache, position
        self._context_ids = [self._prefix.input_ids] + [c.input_ids for c, _ in chunks if c is not self._prefix]
        self._prefixed = True
        self._frames = len(replay) + 1
        self._log(f"context rebuilt with the last {len(replay)} frame(s) and the new one")
        return prep_s

    # -- questions ----------------------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int | None = None, deadline: float | None = None,
            should_stop: Callable[[], bool] | None = None) -> Answer:
        """Answer a question about the frames in context; the context is left as it was.

        Decoding stops before the next token once time.monotonic() reaches `deadline` or
        `should_stop()` is true: the Answer then holds the tokens so far, with `interrupted` True.
        """
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                     or not math.isfinite(deadline)):
            raise ValueError(f"deadline must be a finite time.monotonic() value or None, got {deadline!r}")

        def stop() -> bool:
            return (should_stop is not None and should_stop()) or (deadline is not None
                                                                   and time.monotonic() >= deadline)

        if not isinstance(question, str):
            raise ValueError(f"question must be a string, got {type(question).__name__}")
        text = question.strip()
        if not text:
            raise ValueError("question is empty")
        n_new = self._cfg.max_new_tokens if max_new_tokens is None else _positive_int(
            "max_new_tokens", max_new_tokens, MAX_NEW_TOKENS_LIMIT)
        with self._lock:
            self._check_open()
            self._apply_pending()
            if self._frames == 0:
                raise ValueError("no frame in context yet: append a camera frame before asking")
            n_question = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if n_question > self._cfg.max_question_tokens:
                raise ValueError(f"question is {n_question} tokens long; the limit is "
                                 f"{self._cfg.max_question_tokens} (max_question_tokens)")
            chunk = self.adapter.encode_question(text)
            need = self._next_position + chunk.num_tokens + n_new
            if need > self.max_positions:
                raise ValueError(f"question and answer would reach position {need}, above the "
                                 f"model's {self.max_positions}; ask shorter or lower max_new_tokens")
            self._flash.stats.clear()
            length, position = self._cache.get_seq_length(), self._next_position
            t0 = time.perf_counter()
            try:
                logits, pos = self._append(chunk, self._cache, position, "question")
                t1 = time.perf_counter()
                self._flash.phase = "answer"
                tokens, _ = greedy_decode(self.adapter, logits, self._cache, pos, n_new, self.stop_ids, stop,
                                          repetition_penalty=self.decoding.repetition_penalty,
                                          context_ids=torch.cat([*self._context_ids, chunk.input_ids], dim=1))
            finally:
                truncate_cache(self._cache, length)
                self._next_position = position
            t2 = time.perf_counter()
            calls = self._flash.stats
            answer_ids = [t for t in tokens if t not in self.stop_ids]
            return Answer(
                text=self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip(),
                token_ids=tokens, tokens_generated=len(tokens), frames_in_context=self._frames,
                newest_stamp=self._newest_stamp, prefill_s=t1 - t0, decode_s=t2 - t1, total_s=t2 - t0,
                bytes_read=sum(c.bytes for c in calls), io_s=sum(c.io_s for c in calls),
                select_s=sum(c.select_s for c in calls),
                retained=float(np.mean([c.retained for c in calls])) if calls else 1.0,
                reads=sum(c.runs for c in calls),
                interrupted=len(tokens) < n_new and not (tokens and tokens[-1] in self.stop_ids))

    # -- lifecycle ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every frame (the next frame starts a new conversation)."""
        with self._lock:
            self._check_open()
            self._new_context()
            self._kept.clear()

    def close(self) -> None:
        """Release the reader threads, the model and the cache; the session cannot be used after."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cache = None
            self._kept.clear()
            self._reader.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

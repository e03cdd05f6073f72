"""Frame-appending question answering over a store: the API the ROS node calls.

    cfg = SessionConfig(device="cpu", selection=SelectionSettings(0.5, "chunking"))
    s = Session.open(store_path, cfg)
    s.append_frame(frame, stamp=t)   # np.ndarray [H, W, 3] uint8 RGB or PIL image -> FrameStats
    s.ask("What is on the table?")   # -> Answer
    s.ask("And now?", deadline=time.monotonic() + 2.0)   # partial answer if decoding runs past it
    s.update(selection=SelectionSettings(0.3, "chunking"))   # applied at the start of the next call
    s.update(frame_budget_ms=300.0)  # each frame's sparsity chosen to fit 300 ms (budget.py)
    s.update(frame_tokens="tiles", decoding="greedy")   # from the next frame / the next question
    s.reset(keep_newest=True)        # the context restarts from the newest frame
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
  camera runs: at most `max_frames` frames of KV cache and `max_frames // 2` images, plus the newest
  frame as it came (for `reset(keep_newest=True)`). A smaller `max_frames` given to `update` while
  more frames are in context makes the next append rebuild.
- A failed call leaves the context as it was before the call (the cache is truncated back).
- A new `frame_tokens` applies from the next frame: frames in context keep their tokens, unless the
  new mode changes the conversation's prompt pieces (LLaVA-OneVision's video mode against its image
  modes): then the next frame rebuilds the context, its kept frames re-encoded in the new mode. A
  new `decoding` applies from the next question.
- `cancel` (append_frame, ask, reset) is asked at every layer boundary: once true, the call raises
  `Cancelled` there (cancel.py), the context as it was (reset: empty). `on_token` streams answers.

The session keeps its own books and reports them: `context_tokens` (tokens in the cache),
`frames_in_context`, `newest_stamp` (the stamp given with the newest frame, kept as given), and per
call the settings the call actually used (FrameStats.selection and .max_frames). An Answer's
`tokens_generated` counts the answer's tokens without the stop token; `truncated` says that no stop
token ended it (max_new_tokens reached, or decoding interrupted).

`append_frame`, `ask` and `reset` are serialised by a lock; `update` never waits for them.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from typing import Callable

import torch
from PIL import Image
from transformers import DynamicCache

from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.reader import Reader
from nchunk_core.runtime.adapters import Chunk, adapter_class
from nchunk_core.runtime.budget import FrameBudget, io_estimator
from nchunk_core.runtime.cancel import CancelCheck, cancellable
from nchunk_core.runtime.decoding import DecodingSettings, greedy_decode
from nchunk_core.runtime.config import MAX_NEW_TOKENS_LIMIT, SessionConfig, positive_int
from nchunk_core.runtime.frames import as_frame_image, check_stamp, kept_copy
from nchunk_core.runtime.kv_cache import copy_cache, truncate_cache
from nchunk_core.runtime.model_loading import load_model
from nchunk_core.runtime.processors import stop_token_ids
from nchunk_core.runtime.results import Answer, FrameStats, call_totals, overlap_totals
from nchunk_core.runtime.calibrated_mode import frame_mode_note
from nchunk_core.runtime.session_settings import QUESTION_TEMPLATE_TOKENS, SessionSettings
from nchunk_core.store import Store


class Session(SessionSettings):
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
        self._frame_tokens = 0  # the most tokens a frame took so far (max_answer_tokens)
        self._lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: dict = {}
        self._closed = False
        self._kept: collections.deque = collections.deque(maxlen=cfg.max_frames // 2)  # kept_copy images
        self._budget = FrameBudget(io_estimator(flash, store))  # frame_budget_ms > 0 (budget.py)
        self._new_context()

    @classmethod
    def open(cls, store_path, cfg: SessionConfig | None = None, log: Callable[[str], None] | None = None,
             *, table: LatencyTable | None = None) -> "Session":
        """Open the store at `store_path` and build its model (no backbone weight in RAM).

        `table` replaces the drive's latency table (tests, tools); by default it comes from
        `profile.load_or_profile(store_path, cfg.reader_threads, quick=cfg.profile_quick)` (cached
        per drive).
        """
        cfg = SessionConfig() if cfg is None else cfg
        if not isinstance(cfg, SessionConfig):
            raise ValueError(f"cfg must be a SessionConfig, got {type(cfg).__name__}")
        log = log or (lambda message: None)
        store, reader, flash, processor = load_model(store_path, cfg, log, table)
        try:
            session = cls(store, cfg, reader, flash, processor, log)
        except BaseException:
            reader.close()
            raise
        log(session.adapter.describe())
        note = frame_mode_note(store.model_info, session.adapter)
        if note:
            log(note)
        log(f"decoding: {session.decoding.describe()}")
        return session

    # -- state --------------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._flash.model

    @property
    def frames_in_context(self) -> int:
        return self._frames

    @property
    def context_tokens(self) -> int:
        """Tokens in the KV cache: the prompt prefix and the frames in context."""
        return self._context_tokens

    @property
    def newest_stamp(self):
        """The stamp given with the newest frame in context (as given), None without one."""
        return None if self._newest is None else self._newest[1]

    @property
    def newest_frame(self) -> tuple[Image.Image, object] | None:
        """The newest frame in context as it was appended (PIL RGB) and its stamp; None without one."""
        return self._newest

    def _new_context(self) -> None:
        self._cache = DynamicCache()
        self._next_position = 0
        self._frames = 0
        self._context_tokens = 0
        self._newest = None
        self._prefixed = False
        self._relayout = False  # a new frame mode changed the prompt pieces: the next frame rebuilds
        self._context_ids: list[torch.Tensor] = []  # [1, T] ids of each chunk in the cache, in order

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("session is closed")

    # -- settings (update, config, max_answer_tokens: session_settings.py) -------------------------
    def set_observer(self, observer) -> None:
        """observer(phase, input_name, x [..., in]) is called with the input of every streamed
        projection group, in original channel order (calibration, studies); phase is one of prefix,
        frame, replay (a kept frame re-encoded by a rebuild), question, answer. None removes it."""
        self._flash.observer = observer

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
        return self._cfg.max_question_tokens + self._cfg.max_new_tokens + QUESTION_TEMPLATE_TOKENS

    def append_frame(self, image, stamp=None, *, cancel: CancelCheck | None = None) -> FrameStats:
        """Add a camera frame to the context (see the module docstring for the policy).

        `stamp`: None or a finite number of seconds, kept as given (newest_stamp, FrameStats.stamp).
        `cancel`: asked at every layer boundary; true stops the append there (Cancelled).
        """
        check_stamp(stamp)
        image = as_frame_image(image)
        with self._lock, cancellable(self._flash, cancel):
            self._check_open()
            return self._append_frame(image, stamp)

    def _append_frame(self, image: Image.Image, stamp) -> FrameStats:
        """append_frame under the lock, for a checked RGB image."""
        self._apply_pending()
        t0 = time.perf_counter()
        self._flash.stats.clear()
        self._flash.vision_s = 0.0
        chunk = self._encode(image)
        self._frame_tokens = max(self._frame_tokens, chunk.num_tokens)
        prep_s = time.perf_counter() - t0
        before = self._cache.get_seq_length()
        rebuilt = self._relayout or self._frames >= self._cfg.max_frames or (
            self._next_position + chunk.num_tokens + self._reserve() > self.max_positions)
        plan = None
        if self._cfg.frame_budget_ms:  # this frame's sparsity from the budget (budget.py)
            chunks = (len(self._kept) + 1 if rebuilt else 1) + (0 if self._prefixed else 1)
            plan = self._budget.plan_frame(self._cfg, chunks, self._log)
            self._flash.selection = plan.selection
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
        self._kept.append(kept_copy(image))
        self._newest = (image, stamp)
        self._context_tokens = self._cache.get_seq_length()
        total_s = time.perf_counter() - t0
        calls = self._flash.stats
        totals, overlap = call_totals(calls), overlap_totals(calls)
        vision_s = prep_s + self._flash.vision_s
        if plan is not None:
            self._budget.observe(plan, total_s)
        return FrameStats(
            visual_tokens=chunk.num_visual_tokens, tokens=self._context_tokens - (0 if rebuilt else before),
            context_tokens=self._context_tokens, rows_read=sum(c.rows for c in calls),
            rows_total=sum(c.rows_total for c in calls), est_io_s=sum(c.est_io_s for c in calls),
            compute_s=max(0.0, total_s - vision_s - overlap["io_wait_s"] - totals["select_s"]),
            vision_s=vision_s, total_s=total_s, frames_in_context=self._frames, rebuilt=rebuilt, stamp=stamp,
            selection=self._flash.selection, max_frames=self._cfg.max_frames, frame_budget_ms=self._cfg.frame_budget_ms,
            budget_met=None if plan is None else plan.met, predicted_s=0.0 if plan is None else plan.predicted_s,
            frame_mode=self.adapter.frame_mode,
            **totals, **overlap)

    def _rebuild(self, chunk: Chunk) -> float:
        """New cache: the prefix (copied), the kept frames re-encoded, then `chunk`. Returns encoding s."""
        t0 = time.perf_counter()
        replay = [(self._encode(image), "replay") for image in self._kept]
        prep_s = time.perf_counter() - t0
        if self._prefixed:  # the prefix's keys and values are kept: it is the same text at the same place
            cache, position = copy_cache(self._cache, self._prefix.num_tokens), self._prefix.num_tokens
            chunks = [*replay, (chunk, "frame")]
        else:
            cache, position = DynamicCache(), 0
            chunks = [(self._prefix, "prefix"), *replay, (chunk, "frame")]
        position = self._fill(cache, position, chunks)  # the old context stays intact if this fails
        self._cache, self._next_position = cache, position
        self._context_ids = [self._prefix.input_ids] + [c.input_ids for c, _ in chunks if c is not self._prefix]
        self._prefixed, self._relayout = True, False
        self._frames = len(replay) + 1
        if replay:  # with max_frames 1 every frame starts a new context: nothing worth a log line
            self._log(f"context rebuilt with the last {len(replay)} frame(s) and the new one")
        return prep_s

    # -- questions ----------------------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int | None = None, deadline: float | None = None,
            should_stop: Callable[[], bool] | None = None, *,
            on_token: Callable[[str, int], None] | None = None, cancel: CancelCheck | None = None) -> Answer:
        """Answer a question about the frames in context; the context is left as it was.

        Decoding stops before the next token once time.monotonic() reaches `deadline` or
        `should_stop()` is true: the Answer then holds the tokens so far, with `interrupted` True.
        `on_token(answer so far, tokens generated)` follows every answer token but the stop token;
        `cancel`: asked at every layer boundary, true stops the call there (Cancelled).
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
        n_new = self._cfg.max_new_tokens if max_new_tokens is None else positive_int(
            "max_new_tokens", max_new_tokens, MAX_NEW_TOKENS_LIMIT)

        def token_added(tokens: list[int]) -> None:
            if on_token is not None and tokens[-1] not in self.stop_ids:
                ids = [t for t in tokens if t not in self.stop_ids]
                on_token(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids))

        with self._lock, cancellable(self._flash, cancel):
            self._check_open()
            self._apply_pending(frame=False)
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
                                          context_ids=torch.cat([*self._context_ids, chunk.input_ids], dim=1),
                                          on_token=token_added)
            finally:
                truncate_cache(self._cache, length)
                self._next_position = position
            t2 = time.perf_counter()
            answer_ids = [t for t in tokens if t not in self.stop_ids]
            stopped = bool(tokens) and tokens[-1] in self.stop_ids  # the model ended the answer
            return Answer(
                text=self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip(),
                token_ids=tokens, tokens_generated=len(answer_ids), truncated=not stopped,
                interrupted=len(tokens) < n_new and not stopped, question_tokens=chunk.num_tokens,
                context_tokens=length + chunk.num_tokens, frames_in_context=self._frames,
                newest_stamp=self.newest_stamp, prefill_s=t1 - t0, decode_s=t2 - t1, total_s=t2 - t0,
                **call_totals(self._flash.stats))

    # -- lifecycle ----------------------------------------------------------------------------------
    def reset(self, keep_newest: bool = False, *, cancel: CancelCheck | None = None) -> FrameStats | None:
        """Forget the frames in context: all of them, or with `keep_newest` all but the newest one.

        keep_newest: the context restarts from the newest frame, re-encoded (as it was appended);
        returns that append's FrameStats, or None when there was nothing to do (no frame, or the
        newest one alone in context). Later frames are appended after it. If re-encoding fails (or
        is cancelled), the context is empty and the error is raised.
        """
        with self._lock, cancellable(self._flash, cancel):
            self._check_open()
            newest = self._newest
            if keep_newest and (newest is None or self._frames <= 1):
                return None
            self._new_context()
            self._kept.clear()
            return self._append_frame(*newest) if keep_newest else None

    def close(self) -> None:
        """Release the reader threads, the model and the cache; the session cannot be used after."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cache = None
            self._newest = None
            self._kept.clear()
            self._reader.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

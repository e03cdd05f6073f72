"""What the session's calls report: FrameStats for a frame appended, Answer for a question.

Both are plain dataclasses, typed to the end: the ROS node turns them into messages in one place
(nchunk_ros/diagnostics.py and the /ask response), and nothing parses them back from text.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from nchunk_core.runtime.select import SelectionSettings


@dataclasses.dataclass
class FrameStats:
    """What appending one frame cost (a rebuild's re-encoded frames included), and with what settings.

    `vision_s` is image preprocessing plus the vision tower and projector; `select_s` and `io_s` are
    summed over every flash layer call (`io_s`: from the call's start to its last read done; rows
    read ahead during the previous call count only from there); `io_wait_s` is the part of it that compute waited for (the rest was hidden behind
    compute); `compute_s` is everything else (decoder arithmetic, attention, norms, LM head).
    """

    visual_tokens: int  # of the new frame
    tokens: int  # all tokens appended by this call
    context_tokens: int  # tokens in the cache after the call
    rows_read: int
    rows_total: int
    bytes_read: int
    reads: int  # contiguous runs of rows read (one request per run and group of the input)
    est_io_s: float  # Σ latency-table estimate of the selections
    io_s: float
    select_s: float
    compute_s: float
    vision_s: float
    total_s: float
    retained: float  # mean fraction of importance covered by the rows read
    frames_in_context: int
    rebuilt: bool  # the max_frames policy fired
    stamp: object  # the stamp given with the frame (None if none)
    selection: SelectionSettings  # the selection settings this frame was appended with (its sparsity
    # is the one actually used: with a frame budget, the one the budget chose)
    max_frames: int  # the max_frames in force for this frame
    io_wait_s: float = 0.0  # blocked waiting for reads
    cached_bytes: int = 0  # selected rows served from the row cache (not read)
    prefetch_hit_bytes: int = 0  # selected rows read ahead, before their selection was known
    prefetch_wasted_bytes: int = 0  # rows read ahead that the selection did not use (on top of bytes_read)
    frame_budget_ms: float = 0.0  # the frame budget in force (0: off)
    budget_met: bool | None = None  # with a budget: whether the estimate fit it (False: even at
    # budget_max_sparsity it did not); None without one
    predicted_s: float = 0.0  # with a budget: the estimated frame time planned with
    frame_mode: str = ""  # the adapter's frame mode this frame was encoded in (frame_tokens); visual_tokens its cost


@dataclasses.dataclass
class Answer:
    text: str
    token_ids: list[int]  # every generated id, the stop token included
    tokens_generated: int  # answer tokens, the stop token not counted
    truncated: bool  # no stop token ended the answer: max_new_tokens reached, or interrupted
    interrupted: bool  # decoding stopped at the deadline or by should_stop: text is partial
    question_tokens: int  # the question chunk, prompt template included
    context_tokens: int  # tokens in the cache when decoding started (frames, prompt and question)
    frames_in_context: int
    newest_stamp: object  # the stamp of the newest frame in context, as given
    prefill_s: float  # the question chunk
    decode_s: float  # the generated tokens
    total_s: float
    bytes_read: int
    reads: int  # contiguous runs of rows read (one request per run and group of the input)
    io_s: float
    select_s: float
    retained: float


def overlap_totals(calls: list) -> dict:
    """Waits, cache and prefetch totals of the flash layer calls (FrameStats' fields)."""
    return {"io_wait_s": sum(c.wait_s for c in calls), "cached_bytes": sum(c.cached_bytes for c in calls),
            "prefetch_hit_bytes": sum(c.hit_bytes for c in calls),
            "prefetch_wasted_bytes": sum(c.wasted_bytes for c in calls)}


def call_totals(calls: list) -> dict:
    """I/O and selection totals of the flash layer calls (layers.CallStats) of one session call."""
    return {"bytes_read": sum(c.bytes for c in calls), "reads": sum(c.reads for c in calls),
            "io_s": sum(c.io_s for c in calls), "select_s": sum(c.select_s for c in calls),
            "retained": float(np.mean([c.retained for c in calls])) if calls else 1.0}

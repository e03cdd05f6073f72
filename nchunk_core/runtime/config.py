"""Settings of a Session (session.py), checked once on construction.

    cfg = SessionConfig(device="cpu", selection=SelectionSettings(0.5, "chunking"), reader_threads=6)

The selection settings are one `SelectionSettings` value (select.py), validated where it is built and
passed through unchanged; everything else is checked here (ValueError naming the bad field).
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import torch

from nchunk_core.store.naming import DTYPES
from nchunk_core.runtime.select import SelectionSettings, check_cache_policy
from nchunk_core.runtime.setting_values import decoding_value, frame_tokens_value

MAX_NEW_TOKENS_LIMIT = 4096


def positive_int(name: str, value, upper: int | None = None) -> int:
    """`value` as an int if it is a positive integer (at most `upper`); ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be at most {upper}, got {value}")
    return int(value)


def check_budget_ms(value) -> float:
    """`value` as a float if it is a finite number >= 0 (a frame budget in ms; 0 = off)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or value < 0):
        raise ValueError(f"frame_budget_ms must be a number >= 0 (0 = off), got {value!r}")
    return float(value)


def ram_budget_value(value) -> float:
    """`value` as a float if it is a finite number of MiB >= 0 (0: no row cache); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"ram_budget_mib must be a number of MiB >= 0 (0: no row cache), got {value!r}")
    return float(value)


def check_selection(value) -> SelectionSettings:
    """`value` if it is a SelectionSettings (validated when it was built); ValueError otherwise."""
    if not isinstance(value, SelectionSettings):
        raise ValueError(f"selection must be a SelectionSettings, got {type(value).__name__}")
    return value


@dataclasses.dataclass
class SessionConfig:
    """Settings of a session; checked on construction (ValueError naming the bad field)."""

    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str = "float32"  # compute dtype: float32 | float16 | bfloat16
    selection: SelectionSettings = dataclasses.field(default_factory=SelectionSettings)  # sparsity, method, windows
    reader_threads: int = 6  # threads of the direct-I/O reader (also the key of the cached drive profile)
    max_frames: int = 8  # frames in context before the cache is rebuilt (session.py's docstring)
    max_new_tokens: int = 32  # default answer length limit
    profile_quick: bool = True  # quick drive profile if none is cached
    max_question_tokens: int = 256  # longer questions are refused
    frame_tokens: str | int = "auto"  # what a frame costs (setting_values.py); the model's adapter checks the mode
    decoding: str = "checkpoint"  # "checkpoint": generation_config.json's greedy settings; "greedy" (decoding.py)
    ram_budget_mib: float = 0.0  # RAM for hot backbone rows kept between calls (row_cache.py); 0: none
    cache_policy: str = "static"  # which rows the row cache keeps: select.CACHE_POLICIES
    # True: read in pieces and prefetch the next input's rows while computing (overlap.py); "auto"
    # (default): on or off per pass through the layers, as measured faster on this machine
    # (overlap_choice.py); False: read, then compute
    overlap: bool | str = "auto"
    # > 0: each frame's sparsity is chosen so that its estimated time fits this many ms (budget.py),
    # from 0 up to budget_max_sparsity; selection.sparsity is then ignored for frames. 0: off.
    frame_budget_ms: float = 0.0
    budget_max_sparsity: float = 0.9

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
        check_selection(self.selection)
        self.reader_threads = positive_int("reader_threads", self.reader_threads, 256)
        self.max_frames = positive_int("max_frames", self.max_frames)
        self.max_new_tokens = positive_int("max_new_tokens", self.max_new_tokens, MAX_NEW_TOKENS_LIMIT)
        self.max_question_tokens = positive_int("max_question_tokens", self.max_question_tokens)
        if not isinstance(self.profile_quick, bool):
            raise ValueError(f"profile_quick must be True or False, got {self.profile_quick!r}")
        self.frame_tokens = frame_tokens_value(self.frame_tokens)
        decoding_value(self.decoding)
        self.ram_budget_mib = ram_budget_value(self.ram_budget_mib)
        check_cache_policy(self.cache_policy)
        if not (isinstance(self.overlap, bool) or self.overlap == "auto"):
            raise ValueError(f"overlap must be True, False or 'auto', got {self.overlap!r}")
        self.frame_budget_ms = check_budget_ms(self.frame_budget_ms)
        value = self.budget_max_sparsity
        if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                or not 0.0 <= value < 1.0):
            raise ValueError(f"budget_max_sparsity must be a number in [0, 1), got {value!r}")
        self.budget_max_sparsity = float(value)

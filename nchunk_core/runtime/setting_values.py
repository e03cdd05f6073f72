"""The forms of the frame_tokens and decoding settings, checked without torch.

The Session (config.py) and the ROS node's parameter check (nchunk_ros/parameters.py) share these
checks; the node runs them before torch is loaded. Whether a model has a frame mode is its adapter's
business (adapters.py); these only say whether a value could name one.
"""
from __future__ import annotations

import numbers

FRAME_MODES = ("video", "image", "tiles")
FRAME_TOKENS_HELP = ("auto (the cheapest mode the model was trained with), video, image, tiles, or a number "
                     "of visual tokens per frame (models with a pixel budget: qwen2_5_vl)")
DECODING = ("checkpoint", "greedy")


def frame_tokens_value(value) -> str | int:
    """A frame_tokens setting checked for form: "auto", a mode name, or a positive number of tokens
    (a string of digits, as a ROS parameter may give, is a number). Whether the model has that mode
    is checked by its adapter."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    if isinstance(value, str) and (value == "auto" or value in FRAME_MODES):
        return value
    raise ValueError(f"frame_tokens must be {FRAME_TOKENS_HELP}; got {value!r}")


def decoding_value(value) -> str:
    """A decoding setting: "checkpoint" (generation_config.json's greedy settings) or "greedy"."""
    if value not in DECODING:
        raise ValueError(f"decoding must be one of {', '.join(DECODING)}, got {value!r}")
    return value

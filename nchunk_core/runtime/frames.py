"""Camera frames as the session takes them: checked and converted to PIL RGB, and the copies it keeps.

`as_frame_image` accepts a NumPy array [H, W, 3] uint8 RGB or a PIL image of any mode and refuses
anything else with a ValueError / TypeError that says what is wrong. `kept_copy` is the frame as
kept in RAM for a context rebuild (downscaled when large); `check_stamp` checks a frame's stamp.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
from PIL import Image

KEEP_MAX_SIDE = 1024  # frames kept for a rebuild are downscaled to this longest side
MIN_SIDE = 16  # smallest frame side accepted (processors cannot resize smaller images sensibly)
MAX_SIDE = 16384
MAX_ASPECT = 50.0


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


def kept_copy(image: Image.Image) -> Image.Image:
    """The frame as kept for a rebuild: the same image, or a downscaled copy of a large one."""
    if max(image.size) <= KEEP_MAX_SIDE:
        return image
    copy = image.copy()
    copy.thumbnail((KEEP_MAX_SIDE, KEEP_MAX_SIDE), Image.Resampling.BILINEAR)
    return copy


def check_stamp(stamp):
    """`stamp` if it is None or a finite number of seconds (any real type: it is kept as given)."""
    if stamp is not None and (isinstance(stamp, bool) or not isinstance(stamp, numbers.Real)
                              or not math.isfinite(stamp)):
        raise ValueError(f"stamp must be a finite number of seconds or None, got {stamp!r}")
    return stamp

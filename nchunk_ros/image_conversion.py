"""sensor_msgs/Image and CompressedImage ⇄ NumPy, without cv_bridge.

    rgb = message_to_rgb(msg)                      # any supported message -> uint8 [H, W, 3] RGB
    arr = image_to_array(msg)                      # Image -> its own layout: [H, W, C] or [H, W]
    msg = array_to_image(arr, "bgr8", stamp=...)   # NumPy -> Image (optional row padding)
    msg = array_to_compressed(rgb, "jpeg")         # NumPy RGB -> CompressedImage (JPEG or PNG)

Raw encodings: rgb8, bgr8, rgba8, bgra8, mono8, mono16. `step` (bytes per row) may be larger than
the pixel data of a row (padded rows); `is_bigendian` is honoured for mono16. Conversion to RGB
drops alpha, repeats mono channels, and scales mono16 to 8 bits by value / 257 (0 -> 0,
65535 -> 255), a fixed scale so that brightness does not change from frame to frame.

Compressed images are decoded with Pillow whatever `format` says (JPEG, PNG, 8 or 16 bit; 16-bit
images are scaled like mono16). The image size is checked against the pixel limit from the header,
before anything is decoded.

Every malformed message raises ValueError with a message that says what is wrong: unknown encoding,
zero or oversized dimensions, a step too small for the width, a data length that is not
height × step, undecodable compressed data. The pixel limit (`max_pixels`, default
DEFAULT_MAX_PIXELS) keeps a bogus header from allocating gigabytes.
"""
from __future__ import annotations

import array
import io
import warnings

import numpy as np
from PIL import Image as PILImage
from sensor_msgs.msg import CompressedImage, Image

# 8K UHD; a camera frame bigger than this is almost certainly a corrupt header.
DEFAULT_MAX_PIXELS = 7680 * 4320

# encoding -> (dtype of one channel, channels)
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "mono8": (np.dtype(np.uint8), 1),
    "mono16": (np.dtype(np.uint16), 1),
}
COMPRESSED_FORMATS = ("jpeg", "png")


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image has zero size ({width}x{height} px)")
    if width * height > max_pixels:
        raise ValueError(f"image of {width}x{height} = {width * height} px is above the limit of "
                         f"{max_pixels} px")


def image_to_array(msg: Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The pixels of a raw Image in its own encoding: [H, W, C] for colour, [H, W] for mono.

    The result is a native-byte-order copy, independent of the message buffer.
    """
    encoding = msg.encoding.strip().lower()
    if encoding not in ENCODINGS:
        raise ValueError(f"unsupported image encoding {msg.encoding!r}; supported: "
                         f"{', '.join(ENCODINGS)}")
    dtype, channels = ENCODINGS[encoding]
    width, height, step = int(msg.width), int(msg.height), int(msg.step)
    _check_size(width, height, max_pixels)
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ValueError(f"step of {step} bytes is below one row of {width} px {encoding} "
                         f"({row_bytes} bytes)")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != height * step:
        raise ValueError(f"data has {data.size} bytes, expected height x step = {height} x {step} = "
                         f"{height * step} bytes")
    rows = data.reshape(height, step)[:, :row_bytes]  # drop row padding
    wire = dtype.newbyteorder(">" if msg.is_bigendian else "<") if dtype.itemsize > 1 else dtype
    pixels = np.ascontiguousarray(rows).view(wire).astype(dtype, copy=True)  # [H, W * C]
    return pixels.reshape(height, width, channels) if channels > 1 else pixels.reshape(height, width)


def mono16_to_8(values: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 by value / 257, rounded (0 -> 0, 65535 -> 255)."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _to_rgb(pixels: np.ndarray, encoding: str) -> np.ndarray:
    """[H, W, C] or [H, W] in `encoding` -> uint8 [H, W, 3] RGB (contiguous)."""
    if encoding == "mono16":
        pixels = mono16_to_8(pixels)
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    if encoding.startswith("bgr"):
        return np.ascontiguousarray(pixels[:, :, 2::-1])
    return np.ascontiguousarray(pixels[:, :, :3])


def raw_to_rgb(msg: Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A raw Image -> uint8 [H, W, 3] RGB."""
    return _to_rgb(image_to_array(msg, max_pixels), msg.encoding.strip().lower())


def compressed_to_rgb(msg: CompressedImage, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A CompressedImage (JPEG or PNG, whatever `format` says) -> uint8 [H, W, 3] RGB."""
    data = bytes(msg.data)
    if not data:
        raise ValueError(f"compressed image ({msg.format!r}) has no data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data)) as im:
                _check_size(im.width, im.height, max_pixels)  # from the header, before decoding
                if im.format not in ("JPEG", "PNG"):
                    raise ValueError(f"compressed image is {im.format}, expected JPEG or PNG")
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    values = np.asarray(im).astype(np.uint16)
                    return _to_rgb(values, "mono16")
                return np.asarray(im.convert("RGB")).copy()
    except ValueError:
        raise
    except (OSError, SyntaxError, PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
        raise ValueError(f"cannot decode compressed image ({msg.format!r}, {len(data)} bytes): "
                         f"{exc}") from exc


def message_to_rgb(msg, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An Image or CompressedImage -> uint8 [H, W, 3] RGB; ValueError on anything malformed."""
    if isinstance(msg, CompressedImage):
        return compressed_to_rgb(msg, max_pixels)
    if isinstance(msg, Image):
        return raw_to_rgb(msg, max_pixels)
    raise TypeError(f"expected sensor_msgs/Image or CompressedImage, got {type(msg).__name__}")


def array_to_image(pixels: np.ndarray, encoding: str = "rgb8", *, stamp=None, frame_id: str = "",
                   row_padding: int = 0, is_bigendian: bool = False) -> Image:
    """NumPy -> Image. `pixels` is [H, W, C] ([H, W] for mono) in `encoding`'s channel order.

    `row_padding` extra bytes are appended to every row (step = row bytes + padding); mono16 is
    written big-endian when `is_bigendian`.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unsupported image encoding {encoding!r}; supported: {', '.join(ENCODINGS)}")
    dtype, channels = ENCODINGS[encoding]
    pixels = np.asarray(pixels)
    if channels == 1 and pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    expected = 2 if channels == 1 else 3
    if pixels.ndim != expected or (channels > 1 and pixels.shape[2] != channels):
        raise ValueError(f"{encoding} needs an array of shape "
                         f"{'[H, W]' if channels == 1 else f'[H, W, {channels}]'}, got {list(pixels.shape)}")
    if pixels.dtype != dtype:
        raise ValueError(f"{encoding} needs dtype {dtype}, got {pixels.dtype}")
    if row_padding < 0:
        raise ValueError(f"row_padding must be >= 0, got {row_padding}")
    height, width = pixels.shape[:2]
    wire = dtype.newbyteorder(">" if is_bigendian else "<") if dtype.itemsize > 1 else dtype
    rows = np.ascontiguousarray(pixels.astype(wire, copy=False)).view(np.uint8).reshape(height, -1)
    if row_padding:
        rows = np.concatenate([rows, np.zeros((height, row_padding), np.uint8)], axis=1)
    msg = Image()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width, msg.encoding = int(height), int(width), encoding
    msg.is_bigendian = int(bool(is_bigendian) and dtype.itemsize > 1)
    msg.step = int(rows.shape[1])
    msg.data = array.array("B", rows.tobytes())
    return msg


def array_to_compressed(rgb: np.ndarray, fmt: str = "jpeg", *, quality: int = 90, stamp=None,
                        frame_id: str = "") -> CompressedImage:
    """uint8 RGB [H, W, 3] (or mono [H, W]) -> CompressedImage in `fmt` (jpeg or png)."""
    fmt = fmt.lower()
    if fmt not in COMPRESSED_FORMATS:
        raise ValueError(f"compressed format must be one of {', '.join(COMPRESSED_FORMATS)}, got {fmt!r}")
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        raise ValueError(f"compressed images are encoded from uint8 arrays, got {rgb.dtype}")
    buffer = io.BytesIO()
    options = {"quality": int(quality)} if fmt == "jpeg" else {}
    PILImage.fromarray(rgb).save(buffer, format=fmt.upper(), **options)
    msg = CompressedImage()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.format = fmt
    msg.data = array.array("B", buffer.getvalue())
    return msg

"""Image message conversion (nchunk_ros/image_conversion.py): every encoding round trip, row padding,
byte order, compressed JPEG/PNG, and a clear ValueError for every malformed message.

Uses the real sensor_msgs message classes; no DDS, no node.
"""
import array
import io

import numpy as np
import pytest

pytest.importorskip("sensor_msgs", reason="ROS 2 message packages are not installed")

from PIL import Image as PILImage  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from nchunk_ros.image_conversion import (  # noqa: E402
    ENCODINGS,
    array_to_compressed,
    array_to_image,
    image_to_array,
    message_to_rgb,
    mono16_to_8,
)

H, W = 5, 7


def rgb_frame(seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def native_pixels(encoding, rgb):
    """The array an `encoding` message of the RGB frame holds, and the RGB that should come back."""
    if encoding == "rgb8":
        return rgb, rgb
    if encoding == "bgr8":
        return rgb[:, :, ::-1].copy(), rgb
    alpha = np.full((H, W, 1), 77, np.uint8)
    if encoding == "rgba8":
        return np.concatenate([rgb, alpha], axis=2), rgb
    if encoding == "bgra8":
        return np.concatenate([rgb[:, :, ::-1], alpha], axis=2), rgb
    if encoding == "mono8":
        return rgb[:, :, 0].copy(), np.repeat(rgb[:, :, :1], 3, axis=2)
    if encoding == "mono16":
        values = rgb[:, :, 0].astype(np.uint16) * 257 + 3  # not a multiple of 257: rounding matters
        return values, np.repeat(mono16_to_8(values)[:, :, None], 3, axis=2)
    raise AssertionError(encoding)


@pytest.mark.parametrize("padding", [0, 5])
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_raw_round_trip(encoding, padding):
    pixels, rgb = native_pixels(encoding, rgb_frame())
    msg = array_to_image(pixels, encoding, row_padding=padding, frame_id="cam")
    dtype, channels = ENCODINGS[encoding]
    assert msg.step == W * channels * dtype.itemsize + padding
    assert len(msg.data) == H * msg.step
    np.testing.assert_array_equal(image_to_array(msg), pixels)
    out = message_to_rgb(msg)
    assert out.dtype == np.uint8 and out.shape == (H, W, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


def test_padding_bytes_are_ignored():
    rgb = rgb_frame()
    msg = array_to_image(rgb, "rgb8", row_padding=3)
    data = np.frombuffer(msg.data, np.uint8).reshape(H, msg.step).copy()
    data[:, -3:] = 255  # garbage in the padding must not leak into the image
    msg.data = array.array("B", data.tobytes())
    np.testing.assert_array_equal(message_to_rgb(msg), rgb)


@pytest.mark.parametrize("bigendian", [False, True])
def test_mono16_byte_order(bigendian):
    values = np.array([[0, 1, 256, 0x1234, 0xFFFF]], dtype=np.uint16)
    msg = array_to_image(values, "mono16", is_bigendian=bigendian)
    raw = bytes(msg.data)
    assert raw[6:8] == (b"\x12\x34" if bigendian else b"\x34\x12")
    np.testing.assert_array_equal(image_to_array(msg), values)
    np.testing.assert_array_equal(message_to_rgb(msg)[0, :, 0], [0, 0, 1, 18, 255])


def test_mono16_scale_endpoints():
    np.testing.assert_array_equal(mono16_to_8(np.array([0, 128, 129, 257, 65535], np.uint16)),
                                  [0, 0, 1, 1, 255])


def test_bigendian_flag_is_irrelevant_for_8_bit():
    rgb = rgb_frame()
    msg = array_to_image(rgb, "rgb8")
    msg.is_bigendian = 1
    np.testing.assert_array_equal(message_to_rgb(msg), rgb)


def test_png_round_trip_is_exact():
    rgb = rgb_frame(1)
    msg = array_to_compressed(rgb, "png")
    assert msg.format == "png"
    np.testing.assert_array_equal(message_to_rgb(msg), rgb)


def test_png_16_bit_is_scaled_like_mono16():
    values = np.array([[0, 257 * 10, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    PILImage.fromarray(values).save(buffer, format="PNG")
    msg = CompressedImage(format="png", data=array.array("B", buffer.getvalue()))
    np.testing.assert_array_equal(message_to_rgb(msg)[0, :, 1], [0, 10, 255])


def test_jpeg_round_trip_is_close():
    y, x = np.mgrid[0:64, 0:80]
    smooth = np.stack([x * 3, y * 3, (x + y) * 2], axis=-1).astype(np.uint8)  # JPEG-friendly
    msg = array_to_compressed(smooth, "jpeg", quality=95)
    out = message_to_rgb(msg)
    assert out.shape == smooth.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - smooth).mean() < 3


def test_format_string_is_not_trusted():
    # image_transport writes e.g. "rgb8; jpeg compressed bgr8"; the data decides
    msg = array_to_compressed(rgb_frame(), "png")
    msg.format = "rgb8; jpeg compressed bgr8"
    np.testing.assert_array_equal(message_to_rgb(msg), rgb_frame())


# ---- malformed messages --------------------------------------------------------------------------

def raw(encoding="rgb8", width=W, height=H, step=None, data=None):
    step = W * 3 if step is None else step
    data = bytes(height * step) if data is None else data
    return Image(encoding=encoding, width=width, height=height, step=step, data=array.array("B", data))


@pytest.mark.parametrize("msg, match", [
    (raw(encoding="yuv422"), "unsupported image encoding 'yuv422'"),
    (raw(encoding=""), "unsupported image encoding ''"),
    (raw(step=W * 3 - 1), "step of 20 bytes is below one row"),
    (raw(data=bytes(H * W * 3 - 1)), "data has 104 bytes, expected height x step"),
    (raw(data=bytes(H * W * 3 + 1)), "data has 106 bytes"),
    (raw(width=0, data=b""), "zero size"),
    (raw(height=0, data=b""), "zero size"),
    (raw(width=100_000, height=100_000, step=300_000, data=b"\0" * 16), "above the limit"),
    (raw(encoding="mono16", step=W), "below one row"),
], ids=["unknown-encoding", "empty-encoding", "short-step", "short-data", "long-data", "zero-width",
        "zero-height", "huge", "mono16-step"])
def test_malformed_raw_images_raise_value_error(msg, match):
    with pytest.raises(ValueError, match=match):
        message_to_rgb(msg)


def test_max_pixels_is_configurable():
    msg = array_to_image(rgb_frame(), "rgb8")
    with pytest.raises(ValueError, match="above the limit of 34 px"):
        message_to_rgb(msg, max_pixels=34)
    assert message_to_rgb(msg, max_pixels=35).shape == (H, W, 3)


def test_corrupt_jpeg_raises_value_error():
    good = bytes(array_to_compressed(rgb_frame(), "jpeg").data)
    for data in (good[: len(good) // 2], b"\xff\xd8\xff" + b"\x00" * 40, b"not an image at all"):
        with pytest.raises(ValueError, match="cannot decode compressed image"):
            message_to_rgb(CompressedImage(format="jpeg", data=array.array("B", data)))


def test_empty_compressed_raises_value_error():
    with pytest.raises(ValueError, match="no data"):
        message_to_rgb(CompressedImage(format="jpeg"))


def test_compressed_huge_header_is_refused_before_decoding():
    buffer = io.BytesIO()
    PILImage.new("L", (9000, 9000)).save(buffer, format="PNG")  # 81 MP of zeros: a tiny file
    msg = CompressedImage(format="png", data=array.array("B", buffer.getvalue()))
    with pytest.raises(ValueError, match="above the limit"):
        message_to_rgb(msg)


def test_other_compressed_formats_are_refused():
    buffer = io.BytesIO()
    PILImage.fromarray(rgb_frame()).save(buffer, format="BMP")
    with pytest.raises(ValueError, match="BMP, expected JPEG or PNG"):
        message_to_rgb(CompressedImage(format="bmp", data=array.array("B", buffer.getvalue())))


def test_array_to_image_checks_its_input():
    with pytest.raises(ValueError, match="shape"):
        array_to_image(np.zeros((H, W), np.uint8), "rgb8")
    with pytest.raises(ValueError, match="dtype"):
        array_to_image(np.zeros((H, W), np.uint8), "mono16")
    with pytest.raises(ValueError, match="unsupported"):
        array_to_image(np.zeros((H, W, 3), np.uint8), "yuv422")


def test_not_an_image_message():
    with pytest.raises(TypeError, match="sensor_msgs/Image or CompressedImage"):
        message_to_rgb("frame")

#!/usr/bin/env python3
"""Writes the hand corpus of nasty camera frames that tests/fuzz_decoding.rs replays.

    .venv/bin/python tests/corpus/make_corpus.py      # rewrites tests/corpus/ (deterministic)

raw_frames.json: sensor_msgs/Image field sets (encoding, width, height, step, is_bigendian,
data as hex) with the outcome the node must give: "ok" or the fault name it reports
(anomaly_inspector::FrameFault::as_str).
compressed/: CompressedImage payloads; compressed.json maps each file (and a list of `format`
strings) to the expected outcome. The files are kept in git: fix a bug, add its input here.
"""
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
U32_MAX = 2**32 - 1


def raw(name, encoding, width, height, step, data, expect, is_bigendian=0):
    return {"name": name, "encoding": encoding, "width": width, "height": height, "step": step,
            "is_bigendian": is_bigendian, "data_hex": bytes(data).hex(), "expect": expect}


def f32(values, big_endian=False):
    return np.asarray(values, dtype=">f4" if big_endian else "<f4").tobytes()


def raw_frames():
    rgb = bytes(range(24))  # 4x2 rgb8
    ramp = [i / 63 for i in range(64)]
    # little-endian floats flagged big endian: read back as garbage; make sure it is refused
    lying = np.frombuffer(f32(ramp), dtype=">f4")
    assert (~np.isfinite(lying)).any() or ((lying < -0.5) | (lying > 1.5)).any()
    return [
        raw("rgb8 ok", "rgb8", 4, 2, 12, rgb, "ok"),
        raw("rgb8 is_bigendian ignored", "rgb8", 4, 2, 12, rgb, "ok", is_bigendian=1),
        raw("rgb8 padded rows, last row unpadded", "rgb8", 2, 2, 8, bytes(14), "ok"),
        raw("rgb8 data longer than needed", "rgb8", 2, 2, 6, bytes(100), "ok"),
        raw("step too small", "rgb8", 4, 2, 11, rgb, "step_too_small"),
        raw("step zero", "mono8", 4, 2, 0, rgb, "step_too_small"),
        raw("data shorter than height*step", "rgb8", 4, 4, 12, bytes(20), "data_too_short"),
        raw("last row one byte short", "rgb8", 2, 2, 8, bytes(13), "data_too_short"),
        raw("no data", "mono8", 1, 1, 1, b"", "data_too_short"),
        raw("step u32::MAX", "mono8", 1, 2, U32_MAX, bytes(8), "data_too_short"),
        raw("width*bpp beyond u32", "bgra8", 16384, 4096, 65536, bytes(64), "data_too_short"),
        raw("zero width", "rgb8", 0, 2, 0, rgb, "zero_size"),
        raw("zero height", "rgb8", 4, 0, 12, rgb, "zero_size"),
        raw("zero both", "mono8", 0, 0, 0, b"", "zero_size"),
        raw("20000x20000 tiny data", "rgb8", 20000, 20000, 60000, bytes(16), "too_large"),
        raw("16384x16384 (too many pixels)", "mono8", 16384, 16384, 16384, bytes(16), "too_large"),
        raw("1 x u32::MAX", "mono8", 1, U32_MAX, 1, bytes(16), "too_large"),
        raw("u32::MAX x u32::MAX", "32FC3", U32_MAX, U32_MAX, U32_MAX, bytes(16), "too_large"),
        raw("unknown encoding", "yuv422", 4, 2, 8, bytes(16), "unsupported_encoding"),
        raw("empty encoding", "", 4, 2, 12, rgb, "unsupported_encoding"),
        raw("bayer", "bayer_rggb8", 4, 2, 4, bytes(8), "unsupported_encoding"),
        raw("16UC3", "16UC3", 1, 1, 6, bytes(6), "unsupported_encoding"),
        raw("64FC1", "64FC1", 1, 1, 8, bytes(8), "unsupported_encoding"),
        raw("control characters", "rgb8\n\x1b[31mFAKE LOG LINE", 4, 2, 12, rgb, "unsupported_encoding"),
        raw("long encoding", "x" * 5000, 4, 2, 12, rgb, "unsupported_encoding"),
        raw("upper-case alias", "RGB8", 4, 2, 12, rgb, "ok"),
        raw("mono16 little endian", "mono16", 2, 1, 4, b"\x34\x12\xff\xab", "ok"),
        raw("mono16 big endian", "16UC1", 2, 1, 4, b"\x12\x34\xab\xff", "ok", is_bigendian=1),
        raw("mono16 is_bigendian 255", "mono16", 2, 1, 4, b"\x12\x34\xab\xff", "ok", is_bigendian=255),
        raw("mono16 odd step", "mono16", 2, 2, 5, bytes(9), "ok"),
        raw("mono16 step half a row", "mono16", 2, 2, 3, bytes(9), "step_too_small"),
        raw("32FC1 ok", "32FC1", 8, 8, 32, f32(ramp), "ok"),
        raw("32FC1 big endian ok", "32FC1", 8, 8, 32, f32(ramp, True), "ok", is_bigendian=1),
        raw("32FC1 little-endian data flagged big endian", "32FC1", 8, 8, 32, f32(ramp), "out_of_range", is_bigendian=1),
        raw("32FC1 NaN", "32FC1", 2, 2, 8, f32([0.5, float("nan"), 0.5, 0.5]), "non_finite"),
        raw("32FC1 +Inf", "32FC1", 2, 2, 8, f32([0.5, 0.5, 0.5, float("inf")]), "non_finite"),
        raw("32FC1 -Inf big endian", "32FC1", 2, 1, 8, f32([float("-inf"), 0.5], True), "non_finite", is_bigendian=1),
        raw("32FC1 0..255 scale", "32FC1", 4, 1, 16, f32([0, 17, 255, 128]), "out_of_range"),
        raw("32FC1 filter overshoot clamped", "32FC1", 2, 1, 8, f32([-0.2, 1.3]), "ok"),
        raw("32FC3 ok", "32FC3", 2, 1, 24, f32([0, 0.5, 1, 1, 0, 0]), "ok"),
        raw("32FC3 NaN", "32FC3", 2, 1, 24, f32([0, 0.5, 1, 1, float("nan"), 0]), "non_finite"),
        raw("32FC3 step one float short", "32FC3", 2, 1, 20, bytes(24), "step_too_small"),
    ]


def encoded(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def lying_png(width, height):
    """A PNG whose IHDR (with a valid checksum) claims width x height, with one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + png_chunk(b"IEND", b""))


def lying_jpeg(jpeg, width, height):
    """A JPEG whose SOF0 frame header claims width x height."""
    b = bytearray(jpeg)
    i = b.find(b"\xff\xc0")
    assert i > 0
    b[i + 5:i + 7] = struct.pack(">H", height)
    b[i + 7:i + 9] = struct.pack(">H", width)
    return bytes(b)


def compressed():
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:24, 0:32]
    rgb = np.stack([xx * 8, yy * 10, (xx + yy) * 4], -1).astype(np.uint8)
    img = Image.fromarray(rgb)
    png = encoded(img, "PNG")
    jpeg = encoded(img, "JPEG", quality=90)
    files = {
        "ok_rgb.png": (png, "ok"),
        "ok_rgba.png": (encoded(img.convert("RGBA"), "PNG"), "ok"),
        "ok_gray16.png": (encoded(Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)), "PNG"), "ok"),
        "ok_palette.png": (encoded(img.convert("P"), "PNG"), "ok"),
        "ok_1x1.png": (encoded(Image.new("L", (1, 1), 7), "PNG"), "ok"),
        "ok.jpg": (jpeg, "ok"),
        "ok_progressive.jpg": (encoded(img, "JPEG", quality=90, progressive=True), "ok"),
        "ok_gray.jpg": (encoded(img.convert("L"), "JPEG"), "ok"),
        "ok_trailing_garbage.jpg": (jpeg + b"\x00garbage after EOI", "ok"),
        "truncated_half.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated_no_eoi.jpg": (jpeg[:-2], "truncated"),
        "truncated_soi_only.jpg": (jpeg[:2], "truncated"),
        "truncated_half.png": (png[: len(png) // 2], "truncated"),
        "truncated_signature.png": (png[:5], "truncated"),
        "truncated_after_ihdr.png": (png[:33], "truncated"),
        "empty.bin": (b"", "truncated"),
        "corrupt_idat.png": (png[:60] + bytes([png[60] ^ 0xFF]) + png[61:], "corrupt"),
        "corrupt_ihdr_crc.png": (png[:29] + bytes([png[29] ^ 1]) + png[30:], "corrupt"),
        "random.bin": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "corrupt"),
        "text.bin": (b"hello, I am not an image\n", "corrupt"),
        "gif.gif": (encoded(img.convert("P"), "GIF"), "corrupt"),
        "bmp.bmp": (encoded(img, "BMP"), "corrupt"),
        "png_signature_then_garbage.png": (b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 256, dtype=np.uint8).tobytes(), "corrupt"),
        "lying_ihdr_20000x20000.png": (lying_png(20000, 20000), "too_large"),
        "lying_ihdr_9000x9000.png": (lying_png(9000, 9000), "too_large"),
        "lying_ihdr_u32max.png": (lying_png(2**31 - 1, 2**31 - 1), "too_large"),
        "lying_sof_65000x65000.jpg": (lying_jpeg(jpeg, 65000, 65000), "too_large"),
    }
    out = HERE / "compressed"
    out.mkdir(exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    for name, (data, _) in files.items():
        (out / name).write_bytes(data)
    formats = {
        "jpeg": "ok", "png": "ok", "JPG": "ok", "": "ok",
        "rgb8; jpeg compressed bgr8": "ok", "mono8; png compressed mono8": "ok",
        "theora": "unknown_format", "h264": "unknown_format", "webp": "unknown_format",
        "16UC1; compressedDepth png": "unknown_format", "jpeg png": "unknown_format",
        "\x1b[31mjpeg\n": "unknown_format",
    }
    return {"files": {k: v[1] for k, v in files.items()}, "formats": formats}


def main():
    (HERE / "raw_frames.json").write_text(json.dumps(raw_frames(), indent=1) + "\n")
    (HERE / "compressed.json").write_text(json.dumps(compressed(), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

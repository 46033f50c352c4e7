"""What an image file really is: format from its magic bytes, and whether OpenCV can decode it.

The extension is never trusted: a PNG named `.jpg` is a PNG, a text file named `.jpg` is not an
image. Every failure comes back as a reason in words, never as an exception, so one bad file
cannot stop a stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# (prefix, format); checked in order
_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def detect_format(data: bytes) -> str:
    """The image format named by the file's first bytes, or `unknown`/`empty`."""
    if not data:
        return "empty"
    for prefix, name in _MAGIC:
        if data.startswith(prefix):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "unknown"


@dataclass(frozen=True)
class Decoded:
    image: np.ndarray | None  # H x W (grey) or H x W x C, OpenCV channel order (BGR/BGRA)
    error: str  # empty when decoded

    @property
    def ok(self) -> bool:
        return self.image is not None


def decode(data: bytes) -> Decoded:
    """Decode image bytes unchanged (keeps 16-bit depth and alpha, so they can be reported)."""
    fmt = detect_format(data)
    if fmt == "empty":
        return Decoded(None, "empty file (0 bytes)")
    if fmt == "unknown":
        return Decoded(None, "not an image (no known image signature in the first bytes)")
    # OpenCV decodes a cut-off JPEG or PNG without complaint (the rest is grey): check the end marker
    if fmt == "jpeg" and b"\xff\xd9" not in data[-1024:]:
        return Decoded(None, "truncated jpeg (no end-of-image marker)")
    if fmt == "png" and b"IEND" not in data[-64:]:
        return Decoded(None, "truncated png (no IEND chunk)")
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # OpenCV raises on some malformed headers instead of returning None
        return Decoded(None, f"cannot decode {fmt}: {str(exc).strip().splitlines()[-1]}")
    if image is None or image.size == 0:
        return Decoded(None, f"cannot decode {fmt}: truncated or corrupt file")
    return Decoded(image, "")


def shape_of(image: np.ndarray) -> tuple[int, int, int, int]:
    """(width, height, channels, bit depth) of a decoded image."""
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    bit_depth = image.dtype.itemsize * 8
    return width, height, channels, bit_depth

"""Thumbnails of the images the reports show: the data-quality summary's offenders and the
evaluation gallery's mistakes, made the same way from any decoded image."""

from __future__ import annotations

import cv2
import numpy as np

from imgpipe.images.transforms import to_colour


def thumbnail(image: np.ndarray, side: int) -> np.ndarray:
    """8-bit RGB with its longest side `side`, from any decoded image (16-bit scaled, alpha dropped)."""
    rgb = to_colour(image, "rgb")
    height, width = rgb.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # shrinking: average the pixels merged; enlarging (a 28x28 digit): keep them as crisp squares
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)


def encoded(image: np.ndarray, side: int, extension: str, params: tuple[int, ...] = ()) -> bytes:
    """The thumbnail as the bytes of an image file (`extension` ".png", ".jpg"; OpenCV `params`)."""
    ok, data = cv2.imencode(extension, cv2.cvtColor(thumbnail(image, side), cv2.COLOR_RGB2BGR), list(params))
    if not ok:  # OpenCV reports a failed encode in this flag, not with an exception
        raise ValueError(f"OpenCV could not encode a {extension} thumbnail")
    return data.tobytes()

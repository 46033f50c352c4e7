"""Any decoded image as 8-bit pixels: the one conversion the facts (ingest) and the transforms
(preprocess, reports) share, so that both see the same pixels of a 16-bit or float image."""

from __future__ import annotations

import cv2
import numpy as np


def to_uint8(image: np.ndarray) -> np.ndarray:
    """The image with 8 bits a channel (OpenCV layout kept): 16 bits scaled down exactly, other depths
    (float TIFFs and the like) stretched from their minimum to their maximum."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image // 257).astype(np.uint8)  # 65535 -> 255, exactly
    # no fixed range to scale from: stretch to the 8-bit range
    return cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def grey8(image: np.ndarray) -> np.ndarray:
    """One 8-bit grey channel (H x W) from any decoded image (OpenCV BGR/BGRA order, any depth)."""
    if image.dtype != np.uint8:  # tested here too: most images are 8-bit, and ingest's hot path skips a call
        image = to_uint8(image)
    if image.ndim == 2:
        return image
    channels = image.shape[2]
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    return np.ascontiguousarray(image[:, :, 0])  # 1 or 2 channels (grey, grey + alpha)

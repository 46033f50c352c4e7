"""Preprocess's pixels: OpenCV turns each decoded image into a training-ready array.

Per image, in this order (each step driven by `params.preprocess`):
  colour mode (grey or RGB; 16-bit is scaled to 8-bit, alpha dropped)
  -> Gaussian blur (optional) -> Otsu binarisation (optional, grey only)
  -> resize to `size` (area interpolation when shrinking, which avoids aliasing)
  -> normalisation: none | unit (/255) | minmax (per image) | standardize (per image, or with
     the train split's per-channel mean and std, which ChannelStats streams).
"""

from __future__ import annotations

import cv2
import numpy as np

from imgpipe.core.params import Preprocess
from imgpipe.images.pixels import grey8, to_uint8


def to_colour(image: np.ndarray, mode: str) -> np.ndarray:
    """8-bit grey (H x W x 1) or RGB (H x W x 3) from any decoded image (OpenCV BGR/BGRA order)."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    if mode == "grey" or channels < 3:  # grey (+ alpha) has no colour: in RGB, three equal channels
        out = grey8(image)
        if mode == "rgb":
            out = cv2.cvtColor(out, cv2.COLOR_GRAY2RGB)
    else:
        out = cv2.cvtColor(to_uint8(image), cv2.COLOR_BGR2RGB if channels == 3 else cv2.COLOR_BGRA2RGB)
    return out.reshape(out.shape[0], out.shape[1], -1)


def transform(image: np.ndarray, p: Preprocess) -> np.ndarray:
    """Colour, blur, Otsu and resize: uint8 H x W x C at `p.size` (before normalisation)."""
    x = to_colour(image, p.colour_mode)
    channels = x.shape[2]
    if p.blur_kernel:
        x = cv2.GaussianBlur(x, (p.blur_kernel, p.blur_kernel), 0)
    if p.otsu:
        _, x = cv2.threshold(x.reshape(x.shape[:2]), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    height, width = p.size
    shrinking = x.shape[0] > height or x.shape[1] > width
    x = cv2.resize(x, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return x.reshape(height, width, channels)


def normalize(x: np.ndarray, p: Preprocess, mean=None, std=None) -> np.ndarray:
    """float32 pixels in the configured scale; `mean`/`std` are per channel (dataset scope)."""
    x = x.astype(np.float32)
    if p.normalization == "unit":
        return x / 255.0
    if p.normalization == "minmax":
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    if p.normalization == "standardize":
        if p.standardize_scope == "sample":
            # floor the std as tf.image.per_image_standardization does, so flat images stay finite
            return (x - x.mean()) / max(float(x.std()), 1.0 / np.sqrt(x.size))
        return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x


class ChannelStats:
    """Streaming per-channel mean and std (sums in float64: exact enough for millions of images)."""

    def __init__(self, channels: int):
        self.n = 0
        self.total = np.zeros(channels)
        self.total_sq = np.zeros(channels)

    def add(self, x: np.ndarray) -> None:
        flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
        self.n += flat.shape[0]
        self.total += flat.sum(axis=0)
        self.total_sq += np.square(flat).sum(axis=0)

    def merge(self, other: "ChannelStats") -> None:
        """Add the sums of another part of the data (a worker's batch)."""
        self.n += other.n
        self.total += other.total
        self.total_sq += other.total_sq

    def mean_std(self) -> tuple[list[float], list[float]]:
        mean = self.total / self.n
        std = np.sqrt(np.maximum(self.total_sq / self.n - np.square(mean), 0.0))
        return mean.tolist(), np.maximum(std, 1e-6).tolist()

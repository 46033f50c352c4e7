"""What a decoded image looks like: sharpness, brightness, contrast, and two perceptual hashes.

Computed by `ingest` for every image it decodes (one image at a time, while streaming), so that
`validate` can flag blurry, dark, washed-out or near-duplicate images without decoding again.

- sharpness: variance of the Laplacian of the grey image. A blurred image has weak edges, so
  its Laplacian is flat. Measured at a working size (longest side at most FACTS_SIDE), because
  the raw figure grows with resolution: the same photo at 4000 px and at 128 px would otherwise
  need different thresholds.
- brightness, contrast: mean and standard deviation of the grey pixels, on a 0-255 scale
  (16-bit images are scaled down first).
- phash: the 64-bit perceptual hash (DCT hash): the grey image resized to 32x32, its 8x8 lowest
  DCT frequencies, one bit per coefficient (above the median or not). Re-encoding, resizing or
  a slight colour change flips few bits; a different photo flips about half of them.
- phash_mirror: the phash of the image mirrored left to right, without mirroring it: the DCT
  of a mirror image is the same but for the sign of the odd horizontal frequencies. A flipped
  copy (the most common augmentation, and so the most common leak of a test image into
  train) has a phash close to the original's phash_mirror, which a DCT hash alone misses.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

FACTS_SIDE = 256
HASH_SIDE = 32  # the DCT runs on a 32x32 image and keeps its 8x8 lowest frequencies
HASH_BITS = 64


class ImageFacts(NamedTuple):  # not a dataclass: one per image, and a named tuple is built faster
    sharpness: float
    brightness: float
    contrast: float
    phash: str  # 16 hex digits (64 bits)
    phash_mirror: str  # the phash of the image mirrored left to right

    def row(self) -> tuple:
        """The manifest's values, in its column order (the fields' order)."""
        # two decimals: enough for thresholds, and the manifest stays readable and byte-stable
        return round(self.sharpness, 2), round(self.brightness, 2), round(self.contrast, 2), self.phash, self.phash_mirror


def grey8(image: np.ndarray) -> np.ndarray:
    """One 8-bit grey channel from any decoded image (OpenCV BGR/BGRA order, 8 or 16 bits)."""
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)  # 65535 -> 255, exactly
    elif image.dtype != np.uint8:  # float TIFFs and the like: stretch to the 8-bit range
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return image
    channels = image.shape[2]
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    return np.ascontiguousarray(image[:, :, 0])  # 1 or 2 channels (grey, grey + alpha)


def _shrink(grey: np.ndarray, side: int) -> np.ndarray:
    height, width = grey.shape
    scale = side / max(height, width)
    if scale >= 1:
        return grey
    # area interpolation averages the pixels it merges: no aliasing, no invented edges
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA)


def _dct_rows(n: int, rows: int) -> np.ndarray:
    """The first `rows` basis vectors of the orthonormal n-point DCT-II (what cv2.dct uses)."""
    k = np.arange(n)
    basis = np.cos(np.pi * (2 * k[None, :] + 1) * k[:rows, None] / (2 * n)) * np.sqrt(2 / n)
    basis[0] /= np.sqrt(2)
    return basis.astype(np.float32)


# Only the 8x8 lowest frequencies are kept: two small products give them, a third of the cost
# of the full 32x32 DCT and its slice (same bits on every flowers photo).
_LOW = _dct_rows(HASH_SIDE, 8)
_LOW_T = np.ascontiguousarray(_LOW.T)


# Mirroring left to right multiplies the DCT coefficient of horizontal frequency v by (-1)^v;
# the 8x8 block is raveled row by row (vertical frequency u, then v).
_MIRROR = np.tile(np.array([1, -1] * 4, dtype=np.float32), 8)


def phashes(grey: np.ndarray) -> tuple[str, str]:
    """The 64-bit DCT perceptual hash of an 8-bit grey image and of its mirror image, as 16 hex digits each."""
    shrinking = max(grey.shape) > HASH_SIDE
    small = cv2.resize(grey, (HASH_SIDE, HASH_SIDE),
                       interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    low = (_LOW @ small.astype(np.float32) @ _LOW_T).ravel()
    return _bits(low), _bits(low * _MIRROR)


def phash(grey: np.ndarray) -> str:
    """The 64-bit DCT perceptual hash of an 8-bit grey image, as 16 hex digits."""
    return phashes(grey)[0]


def _bits(low: np.ndarray) -> str:
    ranked = np.sort(low)  # the median of 64 values, several times faster than np.median
    bits = low > (ranked[31] + ranked[32]) / 2
    return np.packbits(bits).tobytes().hex()


def laplacian_variance(grey: np.ndarray) -> float:
    """The variance of the 3x3 Laplacian of an 8-bit grey image: high when edges are sharp."""
    # 16-bit signed output: the Laplacian of 8-bit pixels stays within +-1020. Its sum and sum
    # of squares are exact in a double (under 2^53 up to 8e9 pixels), and cv2.sumElems plus
    # cv2.norm cost a third of cv2.meanStdDev, which has no fast path for 16-bit input.
    edges = cv2.Laplacian(grey, cv2.CV_16S)
    mean = cv2.sumElems(edges)[0] / edges.size
    return max(0.0, cv2.norm(edges, cv2.NORM_L2SQR) / edges.size - mean * mean)


def facts(image: np.ndarray) -> ImageFacts:
    grey = grey8(image)
    work = _shrink(grey, FACTS_SIDE)
    mean, std = cv2.meanStdDev(work)
    straight, mirrored = phashes(work)
    return ImageFacts(sharpness=laplacian_variance(work), brightness=float(mean[0, 0]),
                      contrast=float(std[0, 0]), phash=straight, phash_mirror=mirrored)

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

from imgpipe.images.pixels import grey8

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


def hash_input(grey: np.ndarray) -> np.ndarray:
    """The 32x32 grey image the hashes of an 8-bit grey image are computed from."""
    shrinking = max(grey.shape) > HASH_SIDE
    return cv2.resize(grey, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


# row 0 keeps the DCT coefficients as they are (phash), row 1 mirrors them (phash_mirror)
_SIGNS = np.stack([np.ones(HASH_BITS, np.float32), _MIRROR])


def phash_pairs(smalls: np.ndarray) -> list[tuple[str, str]]:
    """(phash, phash_mirror) of each image of a k x 32 x 32 stack of hash inputs, 16 hex digits each.

    All of them in one go: for a single image, numpy's cost per call is most of the work, so
    hashing a batch of images together costs less than half as much per image (with the resize:
    18 -> 10.5 µs per 128 px photo) and gives the same bits.
    """
    count = len(smalls)
    low = (_LOW @ smalls.astype(np.float32) @ _LOW_T).reshape(count, 1, HASH_BITS) * _SIGNS
    ranked = np.sort(low, axis=2)  # the median of 64 values, several times faster than np.median
    bits = low > (ranked[:, :, 31:32] + ranked[:, :, 32:33]) / 2
    digits = np.packbits(bits, axis=2).tobytes().hex()  # per image: 16 digits straight, 16 mirrored
    return [(digits[i:i + 16], digits[i + 16:i + 32]) for i in range(0, 32 * count, 32)]


def phash(grey: np.ndarray) -> str:
    """The 64-bit DCT perceptual hash of an 8-bit grey image, as 16 hex digits."""
    return phash_pairs(hash_input(grey)[None])[0][0]


def laplacian_variance(grey: np.ndarray) -> float:
    """The variance of the 3x3 Laplacian of an 8-bit grey image: high when edges are sharp."""
    # 16-bit signed output: the Laplacian of 8-bit pixels stays within +-1020. Its sum and sum
    # of squares are exact in a double (under 2^53 up to 8e9 pixels), and cv2.sumElems plus
    # cv2.norm cost a third of cv2.meanStdDev, which has no fast path for 16-bit input.
    edges = cv2.Laplacian(grey, cv2.CV_16S)
    mean = cv2.sumElems(edges)[0] / edges.size
    return max(0.0, cv2.norm(edges, cv2.NORM_L2SQR) / edges.size - mean * mean)


def measure(image: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """Sharpness, brightness and contrast of one decoded image, and the input of its hashes (hash_input)."""
    work = _shrink(grey8(image), FACTS_SIDE)
    mean, std = cv2.meanStdDev(work)
    return laplacian_variance(work), float(mean[0, 0]), float(std[0, 0]), hash_input(work)


def facts(image: np.ndarray) -> ImageFacts:
    """The facts of one decoded image (any depth and channels). For many, FactsBatch is cheaper."""
    *measures, small = measure(image)
    return ImageFacts(*measures, *phash_pairs(small[None])[0])


class FactsBatch:
    """The facts of many images: each measured as it comes (the image can then be dropped), all
    hashed together by `finish` (see phash_pairs): what ingest does with a worker's batch."""

    def __init__(self) -> None:
        self._rows: list[list] = []
        self._measures: list[list[float]] = []  # sharpness, brightness, contrast
        self._smalls: list[np.ndarray] = []

    def add(self, image: np.ndarray, row: list) -> None:
        """Measure `image` now; `finish` appends its facts to `row`, in ImageFacts.row() order."""
        *measures, small = measure(image)
        self._rows.append(row)
        self._measures.append(measures)
        self._smalls.append(small)

    def finish(self) -> None:
        """Hash the images added and complete their rows: once, after the last `add`."""
        if self._smalls:
            pairs = phash_pairs(np.stack(self._smalls))
            for row, measures, pair in zip(self._rows, self._measures, pairs):
                row += ImageFacts(*measures, *pair).row()

"""The SavedModel's preprocessing in TensorFlow ops (imgpipe/model/serving_preprocess.py) against
the OpenCV path that preprocess and predict take (imgpipe/images/transforms.py: transform, then
normalize, then float16 as the shards store it), per preprocess configuration, on real flower
photos re-encoded in each format TF Serving decodes: JPEG (the photo's own file), PNG (8- and
16-bit), GIF and BMP. No model: the pixels the model would be given are what must agree.

The bounds are the ones serving_preprocess.py states: decoding, colour conversion and
normalisation exact; blur and resizing within a grey level on some pixels (measured here: the
share of pixels off by one, per configuration, on these photos).
"""

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imgpipe.core.params import Preprocess
from imgpipe.images.formats import detect_format
from imgpipe.model.predict import pixels
from imgpipe.model.serving_preprocess import serving_pixels

FLOWERS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "flowers5-128px" / "flowers"
# the first photo of each class, by name: 128 x 128 JPEGs
PHOTOS = [min((FLOWERS / label).glob("*.jpg")) for label in ("daisy", "dandelion", "rose", "sunflower", "tulip")]
# dataset standardisation's mean and std per channel, as meta.json would hold them
STATS = {"rgb": ([120.5, 110.25, 90.0], [60.0, 55.5, 58.25]), "grey": ([100.0], [50.0])}


def encodings(photo: Path) -> dict[str, bytes]:
    """The photo's bytes in each format."""
    bgr = cv2.imread(str(photo), cv2.IMREAD_COLOR)
    gif = io.BytesIO()
    Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).save(gif, "GIF")  # OpenCV writes no GIF
    return {
        "jpeg": photo.read_bytes(),
        "png": cv2.imencode(".png", bgr)[1].tobytes(),
        "png16": cv2.imencode(".png", bgr.astype(np.uint16) * 257 + 100)[1].tobytes(),
        "gif": gif.getvalue(),
        "bmp": cv2.imencode(".bmp", bgr)[1].tobytes(),
    }


@pytest.fixture(scope="module")
def files() -> list[tuple[str, bytes]]:
    out = [(fmt, data) for photo in PHOTOS for fmt, data in encodings(photo).items()]
    assert [detect_format(data) for fmt, data in out[:5]] == ["jpeg", "png", "png", "gif", "bmp"]
    return out


def compare(files, **settings) -> tuple[float, float]:
    """(largest difference, share of pixels that differ) between the two paths over every file."""
    worst, differ, total = 0.0, 0, 0
    for fmt, data in files:
        p = Preprocess(**{"size": (128, 128), **settings})
        mean, std = STATS[p.colour_mode]
        opencv = pixels(data, p, {"max_pixels": None, "mean": mean, "std": std})
        served = serving_pixels(tf.constant(data), p, mean, std).numpy()
        assert served.shape == opencv.shape == (*p.size, 1 if p.colour_mode == "grey" else 3), fmt
        diff = np.abs(served.astype(np.float64) - opencv)
        worst, differ, total = max(worst, float(diff.max())), differ + int((diff > 0).sum()), total + diff.size
    return worst, differ / total


# decoding, colour conversion and every normalisation: the same float32 values, bit for bit
EXACT = {
    "grey": {"colour_mode": "grey"},
    "rgb": {"colour_mode": "rgb"},
    "otsu": {"colour_mode": "grey", "otsu": True},
    "minmax": {"colour_mode": "rgb", "normalization": "minmax"},
    "sample standardisation": {"colour_mode": "rgb", "normalization": "standardize", "standardize_scope": "sample"},
    "dataset standardisation": {"colour_mode": "rgb", "normalization": "standardize", "standardize_scope": "dataset"},
    "grey dataset standardisation": {"colour_mode": "grey", "normalization": "standardize"},
    # a 2x2 area average is exact too: OpenCV rounds its halves up, and so does resize()
    "halving": {"colour_mode": "rgb", "size": (64, 64)},
}


@pytest.mark.parametrize("settings", EXACT.values(), ids=EXACT.keys())
def test_serving_pixels_equal_the_opencv_path(files, settings):
    assert compare(files, **settings) == (0.0, 0.0)


# OpenCV's fixed-point blur and resize: a grey level at most, on (measured) this share of pixels;
# compared before normalisation (`none`), so one grey level is 1.0
WITHIN_A_GREY_LEVEL = {
    "blur 5": ({"colour_mode": "rgb", "blur_kernel": 5}, 0.005),  # measured 0.0030
    "shrinking by area": ({"colour_mode": "rgb", "size": (48, 40)}, 0.012),  # measured 0.0068
    "enlarging bilinear": ({"colour_mode": "grey", "size": (150, 160)}, 0.15),  # measured 0.128
}


@pytest.mark.parametrize(("settings", "share"), WITHIN_A_GREY_LEVEL.values(), ids=WITHIN_A_GREY_LEVEL.keys())
def test_serving_pixels_are_within_a_grey_level_of_the_opencv_path(files, settings, share):
    worst, differing = compare(files, normalization="none", **settings)
    assert worst == 1.0 and 0 < differing <= share


def test_otsu_after_blur_flips_only_the_pixels_a_grey_level_moved_across_the_threshold(files):
    # Otsu alone is exact (above); after a blur, a pixel that the blur puts a grey level apart,
    # right at the threshold, comes out 0 on one side and 255 on the other: a few in 10,000
    worst, differing = compare(files, colour_mode="grey", blur_kernel=3, otsu=True, normalization="none")
    assert worst == 255.0 and 0 < differing <= 2e-4  # measured 8.8e-5

"""The preprocess stage in TensorFlow ops, for the exported SavedModel (imgpipe/model/export.py).

TF Serving runs no Python and no OpenCV, so the SavedModel carries its own preprocessing, rebuilt
here from TensorFlow ops: JPEG and PNG decoding, colour conversion and normalisation match the
OpenCV code of imgpipe/images/transforms.py exactly; blur, Otsu and resizing may differ by a grey
level on some pixels (OpenCV computes them in fixed point). tests/model/test_predict.py measures it.
"""

from __future__ import annotations

import cv2
import numpy as np
import tensorflow as tf

from imgpipe.core.params import Preprocess
from imgpipe.model import shards


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """int32 H x W x C pixels (RGB order, 0-255) of one encoded image, as imagefile.decode + to_colour see them."""
    png = tf.strings.substr(encoded, 0, 8) == b"\x89PNG\r\n\x1a\n"

    def png_pixels():
        # 16-bit PNGs keep 16 bits here; 8-bit ones come out times 257, so // 257 is to_colour's
        # 16-to-8-bit step for the first and exact for the second
        return tf.cast(tf.io.decode_png(encoded, dtype=tf.uint16), tf.int32) // 257

    def jpeg_pixels():
        # OpenCV's libjpeg settings (accurate integer IDCT, smooth chroma upsampling): the same pixels
        return tf.cast(tf.io.decode_jpeg(encoded, dct_method="INTEGER_ACCURATE"), tf.int32)

    def other_pixels():  # GIF (first frame), BMP, WebP
        return tf.cast(tf.io.decode_image(encoded, expand_animations=False), tf.int32)

    x = tf.cond(png, png_pixels, lambda: tf.cond(tf.io.is_jpeg(encoded), jpeg_pixels, other_pixels))
    # grey (+ alpha) becomes three equal channels, alpha is dropped: what to_colour does
    x = tf.cond(tf.shape(x)[-1] < 3, lambda: tf.tile(x[..., :1], [1, 1, 3]), lambda: x[..., :3])
    return tf.ensure_shape(x, [None, None, 3])


def to_grey(rgb: tf.Tensor) -> tf.Tensor:
    """OpenCV's 8-bit RGB-to-grey: weights 0.299, 0.587, 0.114 in 15-bit fixed point, rounded
    (cv2.cvtColor's coefficients; with 14 bits, one colour in 400 came out a grey level off)."""
    r, g, b = rgb[..., 0:1], rgb[..., 1:2], rgb[..., 2:3]
    return tf.bitwise.right_shift(r * 9798 + g * 19235 + b * 3735 + 16384, 15)


def gaussian_blur(x: tf.Tensor, kernel_size: int) -> tf.Tensor:
    """cv2.GaussianBlur(x, (k, k), 0): OpenCV's own kernel, mirrored borders (BORDER_REFLECT_101)."""
    k = cv2.getGaussianKernel(kernel_size, 0).astype(np.float32).ravel()
    half = kernel_size // 2
    channels = x.shape[-1]
    # REFLECT mirrors without repeating the edge pixel, as OpenCV's default border does
    padded = tf.pad(x[None], [[0, 0], [half, half], [half, half], [0, 0]], mode="REFLECT")
    rows = tf.constant(np.tile(k.reshape(-1, 1, 1, 1), (1, 1, channels, 1)))
    cols = tf.constant(np.tile(k.reshape(1, -1, 1, 1), (1, 1, channels, 1)))
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, cols, [1, 1, 1, 1], "VALID")
    return tf.round(blurred[0])


def otsu(grey: tf.Tensor) -> tf.Tensor:
    """cv2.threshold(..., THRESH_BINARY + THRESH_OTSU): 255 above the Otsu threshold, else 0."""
    hist = tf.cast(tf.math.bincount(tf.cast(tf.reshape(grey, [-1]), tf.int32), minlength=256, maxlength=256), tf.float64)
    p = hist / tf.reduce_sum(hist)
    levels = tf.range(256, dtype=tf.float64)
    q1 = tf.cumsum(p)
    mu_all = tf.reduce_sum(p * levels)
    mu1_sum = tf.cumsum(p * levels)
    q2 = 1.0 - q1
    # between-class variance per candidate threshold; OpenCV skips the empty-class ones
    valid = (q1 > 1e-12) & (q2 > 1e-12)
    mu1 = mu1_sum / tf.where(valid, q1, 1.0)
    mu2 = (mu_all - mu1_sum) / tf.where(valid, q2, 1.0)
    sigma = tf.where(valid, q1 * q2 * tf.square(mu1 - mu2), -1.0)
    threshold = tf.cast(tf.argmax(sigma), tf.float32)
    return tf.where(grey > threshold, 255.0, 0.0)


def resize(x: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """cv2.resize as `transform` calls it: area averaging when shrinking, bilinear otherwise; rounded to 8 bits."""
    shape = tf.shape(x)
    shrinking = (shape[0] > height) | (shape[1] > width)
    resized = tf.cond(
        shrinking,
        lambda: tf.image.resize(x, [height, width], method="area"),
        lambda: tf.image.resize(x, [height, width], method="bilinear"),
    )
    # OpenCV rounds halves to even, except in its 2x2 area average, which rounds them up
    halving = (shape[0] == 2 * height) & (shape[1] == 2 * width)
    rounded = tf.where(halving, tf.floor(resized + 0.5), tf.round(resized))
    return tf.clip_by_value(rounded, 0.0, 255.0)


def normalize(x: tf.Tensor, p: Preprocess, mean, std) -> tf.Tensor:
    """stages.preprocess.normalize in TensorFlow ops."""
    if p.normalization == "unit":
        return x / 255.0
    if p.normalization == "minmax":
        lo, hi = tf.reduce_min(x), tf.reduce_max(x)
        return tf.where(hi > lo, (x - lo) / tf.maximum(hi - lo, 1e-12), tf.zeros_like(x))
    if p.normalization == "standardize":
        if p.standardize_scope == "sample":
            size = tf.cast(tf.size(x), tf.float32)
            return (x - tf.reduce_mean(x)) / tf.maximum(tf.math.reduce_std(x), tf.math.rsqrt(size))
        return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
    return x


def serving_pixels(encoded: tf.Tensor, p: Preprocess, mean, std) -> tf.Tensor:
    """One encoded image -> float32 pixels as the shards hold them (the preprocess stage in TF ops)."""
    x = decode(encoded)
    if p.colour_mode == "grey":
        x = to_grey(x)
    x = tf.cast(x, tf.float32)
    if p.blur_kernel:
        x = gaussian_blur(x, p.blur_kernel)
    if p.otsu:
        x = otsu(x)
    x = resize(x, *p.size)
    x = normalize(x, p, mean, std)
    # the shards store float16: the model was trained and evaluated on pixels rounded to it
    return tf.cast(tf.cast(x, shards.STORE_DTYPE), tf.float32)

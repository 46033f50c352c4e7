"""Export: the trained model packaged for use outside the pipeline, preprocessing included.

Written by the evaluate stage into `evaluate.export_dir`:

    model.keras       the trained model, which takes preprocessed pixels (load it with
                      stages.model_io.load: safe mode, except with a TF Hub backbone)
    preprocess.json   what `predict` needs to turn an image file into those pixels exactly as the
                      preprocess stage did: classes, preprocess params, the train split's mean/std
    saved_model/      a TensorFlow SavedModel for TF Serving. Its `serve` signature (also
                      `serving_default`) takes encoded image files (JPEG, PNG, GIF, BMP bytes) and
                      returns `probabilities` [N, classes] and `label` [N]: the preprocessing is
                      rebuilt from TensorFlow ops, so a server needs no Python and no OpenCV.

`predict` runs the preprocess stage's own OpenCV code, so its pixels are those of the shards bit
for bit. The SavedModel's TensorFlow ops reproduce that code exactly for JPEG and PNG decoding,
colour conversion and normalisation; blur, Otsu and resizing may differ by a grey level on some
pixels (OpenCV computes them in fixed point), which moves probabilities by far less than the
gaps between classes (tests/model/test_predict.py measures it on real photos).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import keras
import numpy as np
import tensorflow as tf

from imgpipe.model import shards
from imgpipe.core.atomic_write import atomic_dir, write_json
from imgpipe.core.params import Preprocess, params_from_dict

MODEL = "model.keras"
PREPROCESS = "preprocess.json"
SAVED_MODEL = "saved_model"


# -- what predict needs ----------------------------------------------------------------------


def preprocess_spec(meta: dict, max_pixels: int) -> dict:
    """preprocess.json: classes, preprocess params and normalisation stats, as the shards were made."""
    return {
        "classes": meta["classes"],
        "preprocess": meta["preprocess"],
        "mean": meta["mean"],
        "std": meta["std"],
        "input_shape": [meta["height"], meta["width"], meta["channels"]],
        # an image file claiming more pixels is refused before decoding (a decompression bomb)
        "max_pixels": max_pixels,
    }


def spec_preprocess(spec: dict) -> Preprocess:
    """The typed Preprocess params of a preprocess.json (checked like params.yaml's)."""
    return params_from_dict({"preprocess": spec["preprocess"]}).preprocess


# -- the preprocess stage in TensorFlow ops, for the SavedModel -------------------------------


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
    """OpenCV's 8-bit RGB-to-grey: weights 0.299, 0.587, 0.114 in 14-bit fixed point, rounded."""
    r, g, b = rgb[..., 0:1], rgb[..., 1:2], rgb[..., 2:3]
    return tf.bitwise.right_shift(r * 4899 + g * 9617 + b * 1868 + 8192, 14)


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


def serving_pixels(encoded: tf.Tensor, spec: dict) -> tf.Tensor:
    """One encoded image -> float32 pixels as the shards hold them (the preprocess stage in TF ops)."""
    p = spec_preprocess(spec)
    x = decode(encoded)
    if p.colour_mode == "grey":
        x = to_grey(x)
    x = tf.cast(x, tf.float32)
    if p.blur_kernel:
        x = gaussian_blur(x, p.blur_kernel)
    if p.otsu:
        x = otsu(x)
    x = resize(x, *p.size)
    x = normalize(x, p, spec["mean"], spec["std"])
    # the shards store float16: the model was trained and evaluated on pixels rounded to it
    return tf.cast(tf.cast(x, shards.STORE_DTYPE), tf.float32)


def write_saved_model(model: keras.Model, spec: dict, folder: Path) -> None:
    classes = tf.constant(spec["classes"])
    shape = tuple(spec["input_shape"])

    def serve(images):
        pixels = tf.map_fn(
            lambda encoded: serving_pixels(encoded, spec), images,
            fn_output_signature=tf.TensorSpec(shape, tf.float32),
        )
        probabilities = model(pixels, training=False)
        return {"probabilities": probabilities, "label": tf.gather(classes, tf.argmax(probabilities, axis=1))}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    archive.write_out(str(folder), verbose=False)


# -- I/O -------------------------------------------------------------------------------------


def export(model: keras.Model, model_path: Path, spec: dict, export_dir: Path) -> None:
    """Write model.keras, preprocess.json and saved_model/ into `export_dir`, atomically."""
    with atomic_dir(export_dir) as out:
        shutil.copyfile(model_path, out / MODEL)
        write_json(out / PREPROCESS, spec)
        write_saved_model(model, spec, out / SAVED_MODEL)

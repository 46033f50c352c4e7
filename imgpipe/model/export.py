"""Export: the trained model packaged for use outside the pipeline, preprocessing included.

Written by the evaluate stage into `evaluate.export_dir`:

    model.keras       the trained model, which takes preprocessed pixels (load it with
                      imgpipe.model.loading.load: safe mode, except with a TF Hub backbone)
    preprocess.json   what `predict` needs to turn an image file into those pixels exactly as the
                      preprocess stage did: classes, preprocess params, the train split's mean/std
    saved_model/      a TensorFlow SavedModel for TF Serving. Its `serve` signature (also
                      `serving_default`) takes encoded image files (JPEG, PNG, GIF, BMP bytes) and
                      returns `probabilities` [N, classes] and `label` [N]: the preprocessing is
                      rebuilt from TensorFlow ops (imgpipe/model/serving_preprocess.py), so a
                      server needs no Python and no OpenCV.

`predict` runs the preprocess stage's own OpenCV code, so its pixels are those of the shards bit
for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import tensorflow as tf

from imgpipe.core.atomic_write import atomic_dir, write_json
from imgpipe.core.params import Preprocess, params_from_dict
from imgpipe.model.serving_preprocess import serving_pixels

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


def write_saved_model(model: keras.Model, spec: dict, folder: Path) -> None:
    classes = tf.constant(spec["classes"])
    shape = tuple(spec["input_shape"])
    p = spec_preprocess(spec)

    def serve(images):
        pixels = tf.map_fn(
            lambda encoded: serving_pixels(encoded, p, spec["mean"], spec["std"]), images,
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

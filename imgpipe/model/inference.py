"""The trained model on a split of the shards: loaded and checked against them, then run in batches.

The split streams through the model; only each image's class probabilities are kept, with its
id, path and label, for the evaluation package to score.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from imgpipe.model import loading
from imgpipe.model import shards
from imgpipe.core.errors import StageError

log = logging.getLogger(__name__)

# Images per forward pass: a matter of speed and memory only, the results do not depend on it.
BATCH_SIZE = 256


# -- I/O -------------------------------------------------------------------------------------


def predict_split(model: keras.Model, folder: Path, meta: dict, split: str = "test") -> tuple[pd.DataFrame, np.ndarray]:
    """Per image of `split`, in shard order: a frame (path, id, label, predicted, confidence, p_true)
    and the class probabilities [images, classes]."""
    parts, probs = [], []
    batches = shards.dataset(folder, split, meta).batch(BATCH_SIZE).prefetch(tf.data.AUTOTUNE)
    for batch in batches.as_numpy_iterator():
        p = model.predict_on_batch(batch["image"])
        labels = batch["label"]
        probs.append(p)
        parts.append(pd.DataFrame({
            "path": [x.decode() for x in batch["path"]],
            "id": [x.decode() for x in batch["id"]],
            "label": labels,
            "predicted": p.argmax(axis=1),
            "confidence": p.max(axis=1),
            "p_true": p[np.arange(len(labels)), labels],
        }))
    return pd.concat(parts, ignore_index=True), np.concatenate(probs)


def load_model(model_path: Path, meta: dict) -> keras.Model:
    if not model_path.is_file():
        raise StageError(f"{model_path}: model not found; run the train stage first")
    # Safe mode (a model that would run Python code is refused), except for a TF Hub backbone:
    # paths.model is this pipeline's own train stage's output, so its SavedModel is trusted.
    model = loading.load(model_path, trust=True)
    expected = (meta["height"], meta["width"], meta["channels"])
    if tuple(model.input_shape[1:]) != expected or model.output_shape[-1] != len(meta["classes"]):
        raise StageError(
            f"{model_path} takes {model.input_shape[1:]} images into {model.output_shape[-1]} classes, "
            f"the shards hold {expected} images of {len(meta['classes'])} classes; re-run train"
        )
    return model


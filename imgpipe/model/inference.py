"""The trained model on a split of the shards: loaded and checked against them, then run in batches.

The split streams through the model; only each image's class probabilities are kept, with its
id, path and label, for the evaluation package to score. With a cache folder, they are kept per
shard file too, keyed by the model's and the file's digests: evaluate run again with the same
model (a change to the gate, say, or new test images while the model stays) predicts only the
files it has not seen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from imgpipe.core.atomic_write import atomic_path
from imgpipe.core.errors import StageError
from imgpipe.core.hashing import file_hexdigest
from imgpipe.model import loading
from imgpipe.model import shards

log = logging.getLogger(__name__)

# Images per forward pass: a matter of speed and memory only, the results do not depend on it.
BATCH_SIZE = 256


# -- I/O -------------------------------------------------------------------------------------


def predict_split(model: keras.Model, folder: Path, meta: dict, split: str = "test",
                  cache: Path | None = None, model_digest: str = "") -> tuple[pd.DataFrame, np.ndarray]:
    """Per image of `split`, in shard order: a frame (path, id, label, predicted, confidence, p_true)
    and the class probabilities [images, classes]. With `cache` (a folder) and `model_digest`, each
    file's predictions are read from the cache when there, and stored there when computed."""
    parts = []
    computed = 0
    for path in shards.split_files(folder, split, meta):
        stored = Path(cache) / model_digest / f"{file_hexdigest(path, 'sha1')}.npz" if cache and model_digest else None
        if stored is not None and stored.is_file():
            with np.load(stored, allow_pickle=False) as found:
                parts.append({k: found[k] for k in found.files})
            continue
        part = _predict_file(model, path, meta)
        computed += 1
        if stored is not None:
            stored.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(stored) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **part)
        parts.append(part)
    if cache and model_digest:
        log.info("predictions: %d of %d %s files computed, the rest from %s", computed, len(parts), split, cache)
    probs = np.concatenate([p["probs"] for p in parts]) if parts else np.zeros((0, len(meta["classes"])), np.float32)
    labels = np.concatenate([p["label"] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
    frame = pd.DataFrame({
        "path": np.concatenate([p["path"] for p in parts]).astype(str) if parts else [],
        "id": np.concatenate([p["id"] for p in parts]).astype(str) if parts else [],
        "label": labels,
        "predicted": probs.argmax(axis=1),
        "confidence": probs.max(axis=1),
        "p_true": probs[np.arange(len(labels)), labels],
    })
    return frame, probs


def _predict_file(model: keras.Model, path: str, meta: dict) -> dict[str, np.ndarray]:
    """One shard file through the model: its ids, paths, labels and class probabilities."""
    parse = shards.parse_batch(meta)
    batches = tf.data.TFRecordDataset([path]).batch(BATCH_SIZE).map(parse).prefetch(tf.data.AUTOTUNE)
    out = {"probs": [], "label": [], "id": [], "path": []}
    for batch in batches.as_numpy_iterator():
        out["probs"].append(np.asarray(model.predict_on_batch(batch["image"]), np.float32))
        out["label"].append(batch["label"])
        out["id"].append(np.array([x.decode() for x in batch["id"]]))
        out["path"].append(np.array([x.decode("utf-8", "surrogateescape") for x in batch["path"]]))
    n_classes = len(meta["classes"])
    empty = {"probs": np.zeros((0, n_classes), np.float32), "label": np.zeros(0, np.int64),
             "id": np.zeros(0, "U40"), "path": np.zeros(0, "U1")}
    return {k: np.concatenate(v) if v else empty[k] for k, v in out.items()}


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


"""Evaluate: the trained model on the test split.

Reads  <paths.model> and the test split of <paths.shards>/.
Writes <paths.reports>/metrics.json    accuracy, loss, macro/weighted F1, per-class scores
       <paths.reports>/confusion.csv   one row per test image: actual,predicted (class names)
       <paths.reports>/misclassified.csv  the worst mistakes first: path,id,true,predicted,confidence

The test split streams through the model in batches; only a few numbers per image are kept.
The metrics are plain NumPy on those numbers (pure functions, tested on hand-computed cases).
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from stages import shards
from stages.atomic import write_csv, write_json
from stages.cli import StageError, stage_main
from stages.params import Params

log = logging.getLogger(__name__)

# Images per forward pass: a matter of speed and memory only, the results do not depend on it.
BATCH_SIZE = 256
# Keras clips probabilities to [EPSILON, 1 - EPSILON] in its crossentropy; the same here, so
# the test loss compares with the training log's.
EPSILON = 1e-7
DIGITS = 6


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts: row = actual class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """precision, recall, f1 and support per class; a score with nothing to divide by is 0."""
    hits = np.diag(matrix).astype(float)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = _ratio(hits, predicted)
    recall = _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def mean_crossentropy(p_true: np.ndarray) -> float:
    """Mean sparse categorical crossentropy from each image's probability of its true class."""
    return float(np.mean(-np.log(np.clip(p_true, EPSILON, 1 - EPSILON))))


def metrics_report(y_true: np.ndarray, y_pred: np.ndarray, p_true: np.ndarray, classes: list[str]) -> dict:
    """metrics.json: overall and per-class figures, floats rounded so reruns give the same bytes.

    macro_f1 averages over the classes that occur in the test labels or the predictions (as
    scikit-learn does), so a class absent from both does not count as a zero.
    """
    matrix = confusion_matrix(y_true, y_pred, len(classes))
    scores = per_class_scores(matrix)
    support = scores["support"]
    occurring = (support > 0) | (matrix.sum(axis=0) > 0)
    return {
        "accuracy": _round(np.trace(matrix) / len(y_true)),
        "loss": _round(mean_crossentropy(p_true)),
        "macro_f1": _round(scores["f1"][occurring].mean()),
        "weighted_f1": _round((scores["f1"] * support).sum() / support.sum()),
        "num_test": int(len(y_true)),
        "per_class": {
            name: {
                "precision": _round(scores["precision"][i]),
                "recall": _round(scores["recall"][i]),
                "f1": _round(scores["f1"][i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
    }


def _round(value) -> float:
    return round(float(value), DIGITS)


def worst_mistakes(predictions: pd.DataFrame, limit: int) -> pd.DataFrame:
    """The wrong predictions, the most confident first (ties by id, for a stable order), at most `limit`."""
    wrong = predictions[predictions["true"] != predictions["predicted"]]
    wrong = wrong.sort_values(["confidence", "id"], ascending=[False, True])
    return wrong.head(limit)[["path", "id", "true", "predicted", "confidence"]].reset_index(drop=True)


def predict_split(model: keras.Model, folder: Path, meta: dict, split: str = "test") -> pd.DataFrame:
    """One row per image of `split`, in shard order: path, id, label, predicted, confidence, p_true."""
    parts = []
    batches = shards.dataset(folder, split, meta).batch(BATCH_SIZE).prefetch(tf.data.AUTOTUNE)
    for batch in batches.as_numpy_iterator():
        probs = model.predict_on_batch(batch["image"])
        labels = batch["label"]
        parts.append(pd.DataFrame({
            "path": [p.decode() for p in batch["path"]],
            "id": [i.decode() for i in batch["id"]],
            "label": labels,
            "predicted": probs.argmax(axis=1),
            "confidence": probs.max(axis=1),
            "p_true": probs[np.arange(len(labels)), labels],
        }))
    return pd.concat(parts, ignore_index=True)


def run(params: Params) -> None:
    folder = Path(params.paths.shards)
    try:
        meta = shards.read_meta(folder)
    except FileNotFoundError as exc:
        raise StageError(str(exc)) from None
    classes = meta["classes"]
    if not meta["counts"].get("test"):
        raise StageError(f"{folder}: the shards hold no test images")
    model_path = Path(params.paths.model)
    if not model_path.is_file():
        raise StageError(f"{model_path}: model not found; run the train stage first")
    # compile=False: predicting needs no optimizer; safe_mode refuses models that would run
    # arbitrary Python code (lambda layers) on loading.
    model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    expected = (meta["height"], meta["width"], meta["channels"])
    if tuple(model.input_shape[1:]) != expected or model.output_shape[-1] != len(classes):
        raise StageError(
            f"{model_path} takes {model.input_shape[1:]} images into {model.output_shape[-1]} classes, "
            f"the shards hold {expected} images of {len(classes)} classes; re-run train"
        )

    predictions = predict_split(model, folder, meta)
    metrics = metrics_report(
        predictions["label"].to_numpy(), predictions["predicted"].to_numpy(), predictions["p_true"].to_numpy(), classes
    )
    names = np.asarray(classes, dtype=object)
    named = pd.DataFrame({
        "path": predictions["path"],
        "id": predictions["id"],
        "true": names[predictions["label"]],
        "predicted": names[predictions["predicted"]],
        "confidence": predictions["confidence"].astype(float).round(DIGITS),
    })

    reports = Path(params.paths.reports)
    write_json(reports / "metrics.json", metrics)
    write_csv(reports / "confusion.csv", named.rename(columns={"true": "actual"})[["actual", "predicted"]])
    write_csv(reports / "misclassified.csv", worst_mistakes(named, params.evaluate.max_misclassified))
    log.info(
        "%d test images: accuracy %.4f, loss %.4f, macro F1 %.4f",
        metrics["num_test"], metrics["accuracy"], metrics["loss"], metrics["macro_f1"],
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

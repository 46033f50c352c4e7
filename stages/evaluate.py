"""Evaluate: the trained model on the test split, judged by the gate, reported, and exported.

Reads  <paths.model>, the test split of <paths.shards>/, <paths.reports>/train_log.csv,
       <paths.data_quality>/summary.json, and the original images of the worst mistakes (from
       ingest.source, for the gallery's thumbnails).
Writes <paths.reports>/metrics.json       accuracy, loss, macro/weighted F1, ROC AUC, average
                                          precision, per-class scores, the gate's verdict and checks
       <paths.reports>/confusion.csv      one row per test image: actual,predicted (class names)
       <paths.reports>/misclassified.csv  the worst mistakes first: path,id,true,predicted,confidence
       <paths.reports>/roc.csv, precision_recall.csv   the curves (see `ranking_scores`)
       <paths.reports>/evaluation/        index.html (the report), gallery.html + thumbnails, the
                                          plots as PNG, predictions.csv (every test image)
       <evaluate.export_dir>/             the model for predict and TF Serving (stages/export.py)
       <evaluate.blessed_file>            one more record when the gate blesses the model (stages/gate.py)

The test split streams through the model in batches; only the class probabilities per image are
kept. The metrics are plain NumPy on those numbers (pure functions, tested on hand-computed cases).
A failing gate (gate_action: fail) fails the stage after every report is written, so the
reviewer can read why; the model is then neither exported nor blessed.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from stages import export, gate, model_io, report, shards
from stages.atomic import write_csv, write_json
from stages.cli import StageError, stage_main
from stages.params import Params
from stages.train import TRAIN_LOG

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


# At most this many points per curve in roc.csv and precision_recall.csv: enough for the plot,
# while micro-averaged curves of a large test set would have a point per image and class.
CURVE_POINTS = 500


def ranking_scores(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, is positive) pairs that ROC and precision-recall curves rank.

    Two classes: each image's probability of the second class (in sorted order), positive when it
    is that class. More: micro-averaged one-vs-rest, every (image, class) pair with the image's
    probability of that class, positive when it is the image's class: one curve of how well the
    probabilities rank right answers above wrong ones.
    """
    if probs.shape[1] == 2:
        return probs[:, 1], labels == 1
    positive = np.zeros(probs.shape, dtype=bool)
    positive[np.arange(len(labels)), labels] = True
    return probs.ravel(), positive.ravel()


def _counts_by_threshold(scores: np.ndarray, positive: np.ndarray):
    """Distinct scores, highest first, with the true and false positives scoring at least each."""
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # last position of each distinct score
    tp = np.cumsum(hits)[last]
    return ranked[last], tp, last + 1 - tp


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> pd.DataFrame:
    """fpr, tpr, threshold (positive when score >= threshold), from (0, 0) to (1, 1)."""
    thresholds, tp, fp = _counts_by_threshold(scores, positive)
    return pd.DataFrame({
        "fpr": np.r_[0.0, _ratio(fp, np.full(len(fp), fp[-1]))],
        "tpr": np.r_[0.0, _ratio(tp, np.full(len(tp), tp[-1]))],
        "threshold": np.r_[np.inf, thresholds],
    })


def precision_recall_curve(scores: np.ndarray, positive: np.ndarray) -> pd.DataFrame:
    """recall, precision, threshold, starting at recall 0, precision 1."""
    thresholds, tp, fp = _counts_by_threshold(scores, positive)
    return pd.DataFrame({
        "recall": np.r_[0.0, _ratio(tp, np.full(len(tp), tp[-1]))],
        "precision": np.r_[1.0, _ratio(tp, tp + fp)],
        "threshold": np.r_[np.inf, thresholds],
    })


def ranking_report(roc: pd.DataFrame, pr: pd.DataFrame, positive: np.ndarray) -> dict:
    """roc_auc (area under the ROC curve) and average_precision (precision averaged over the
    recall steps, as scikit-learn computes it); None where there are no positives or no negatives."""
    if positive.all() or not positive.any():
        return {"roc_auc": None, "average_precision": None}
    auc = np.trapezoid(roc["tpr"], roc["fpr"])
    ap = float(np.sum(np.diff(pr["recall"]) * pr["precision"].to_numpy()[1:]))
    return {"roc_auc": _round(auc), "average_precision": _round(ap)}


def thin(curve: pd.DataFrame, max_points: int = CURVE_POINTS) -> pd.DataFrame:
    """At most `max_points` rows, evenly spread, first and last kept; values rounded for stable bytes."""
    if len(curve) > max_points:
        curve = curve.iloc[np.unique(np.linspace(0, len(curve) - 1, max_points).round().astype(int))]
    return curve.round(DIGITS).reset_index(drop=True)


def ids_fingerprint(ids) -> str:
    """sha1 of the sorted test image ids: two evaluations compare like with like only when equal."""
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()


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


def file_md5(path: Path) -> str:
    """The md5 DVC records for the file in dvc.lock (and names its cache entry by)."""
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(model_path: Path, meta: dict) -> keras.Model:
    if not model_path.is_file():
        raise StageError(f"{model_path}: model not found; run the train stage first")
    # Safe mode (a model that would run Python code is refused), except for a TF Hub backbone:
    # paths.model is this pipeline's own train stage's output, so its SavedModel is trusted.
    model = model_io.load(model_path, trust=True)
    expected = (meta["height"], meta["width"], meta["channels"])
    if tuple(model.input_shape[1:]) != expected or model.output_shape[-1] != len(meta["classes"]):
        raise StageError(
            f"{model_path} takes {model.input_shape[1:]} images into {model.output_shape[-1]} classes, "
            f"the shards hold {expected} images of {len(meta['classes'])} classes; re-run train"
        )
    return model


def run(params: Params) -> None:
    folder = Path(params.paths.shards)
    meta = shards.read_meta(folder)
    classes = meta["classes"]
    if not meta["counts"].get("test"):
        raise StageError(f"{folder}: the shards hold no test images")
    model_path = Path(params.paths.model)
    model = load_model(model_path, meta)

    predictions, probs = predict_split(model, folder, meta)
    labels = predictions["label"].to_numpy()
    metrics = metrics_report(labels, predictions["predicted"].to_numpy(), predictions["p_true"].to_numpy(), classes)
    scores, positive = ranking_scores(probs, labels)
    roc, pr = roc_curve(scores, positive), precision_recall_curve(scores, positive)
    metrics.update(ranking_report(roc, pr, positive))

    p = params.evaluate
    model_md5, test_set = file_md5(model_path), ids_fingerprint(predictions["id"])
    blessed = gate.read_blessed(p.blessed_file)
    metrics["gate"] = gate.judge(metrics, p, gate.baseline(blessed, model_md5), test_set)

    names = np.asarray(classes, dtype=object)
    named = pd.DataFrame({
        "path": predictions["path"],
        "id": predictions["id"],
        "true": names[labels],
        "predicted": names[predictions["predicted"]],
        "confidence": predictions["confidence"].astype(float).round(DIGITS),
    })
    mistakes = worst_mistakes(named, p.max_misclassified)
    reports = Path(params.paths.reports)
    write_json(reports / "metrics.json", metrics)
    write_csv(reports / "confusion.csv", named.rename(columns={"true": "actual"})[["actual", "predicted"]])
    write_csv(reports / "misclassified.csv", mistakes)
    write_csv(reports / "roc.csv", thin(roc))
    write_csv(reports / "precision_recall.csv", thin(pr))
    probabilities = pd.DataFrame(probs.astype(float).round(DIGITS), columns=[f"p_{c}" for c in classes])
    report.write(
        params, metrics, classes,
        matrix=confusion_matrix(labels, predictions["predicted"].to_numpy(), len(classes)),
        curves=(roc, pr), predictions=pd.concat([named, probabilities], axis=1), mistakes=mistakes,
        model_md5=model_md5, train_log=reports / TRAIN_LOG,
    )
    log.info(
        "%d test images: accuracy %.4f, loss %.4f, macro F1 %.4f; report: %s",
        metrics["num_test"], metrics["accuracy"], metrics["loss"], metrics["macro_f1"],
        reports / report.FOLDER / report.INDEX,
    )

    verdict = metrics["gate"]["verdict"]
    if verdict == "failed":
        raise StageError(f"{gate.message(metrics['gate'])}; report: {reports / report.FOLDER / report.INDEX}")
    if verdict == "warned":
        log.warning("%s (evaluate.gate_action: warn, so the run goes on; the model is not blessed)",
                    gate.message(metrics["gate"]))

    spec = export.preprocess_spec(meta, params.preprocess, params.ingest.max_pixels)
    export.export(model, model_path, spec, Path(p.export_dir))
    log.info("exported to %s", p.export_dir)
    # last: a model is recorded as blessed only once everything about it has been written
    if verdict == "blessed":
        record = gate.blessing(metrics, str(model_path), model_md5, test_set, datetime.datetime.now(datetime.timezone.utc))
        if gate.bless(p.blessed_file, record):
            log.info("model gate passed: blessed %s (md5 %s), recorded in %s", model_path, model_md5, p.blessed_file)


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

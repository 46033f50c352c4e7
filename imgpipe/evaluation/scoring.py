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

import hashlib
import logging

import numpy as np
import pandas as pd


log = logging.getLogger(__name__)

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


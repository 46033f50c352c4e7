"""Scores of a model from its predictions on the test split: metrics.json, the curves, the tables.

The metrics and curves are scikit-learn's; what is ours is the choice of what they are computed
on (`ranking_scores`), the Keras-compatible loss, and the rounding that keeps output bytes stable.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from sklearn import metrics as skm

# Keras clips probabilities to [EPSILON, 1 - EPSILON] in its crossentropy; the same here, so
# the test loss compares with the training log's.
EPSILON = 1e-7
# Decimals of every float written to metrics.json and the CSV files: reruns give the same bytes.
DIGITS = 6


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts: row = actual class, column = predicted class, every class listed."""
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))


def per_class_scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """precision, recall, f1 and support per class; a score with nothing to divide by is 0."""
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(num_classes), average=None, zero_division=0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def mean_crossentropy(p_true: np.ndarray) -> float:
    """Mean sparse categorical crossentropy from each image's probability of its true class.

    Ours, not sklearn's log_loss: that clips at the dtype's eps (not Keras's 1e-7) and wants every
    class's probability.
    """
    return float(np.mean(-np.log(np.clip(p_true, EPSILON, 1 - EPSILON))))


def metrics_report(y_true: np.ndarray, y_pred: np.ndarray, p_true: np.ndarray, classes: list[str]) -> dict:
    """metrics.json: overall and per-class figures, floats rounded so reruns give the same bytes.

    macro_f1 averages over the classes that occur in the test labels or the predictions (sklearn's
    default labels), so a class absent from both does not count as a zero.
    """
    scores = per_class_scores(y_true, y_pred, len(classes))
    return {
        "accuracy": _round(skm.accuracy_score(y_true, y_pred)),
        "loss": _round(mean_crossentropy(p_true)),
        "macro_f1": _round(skm.f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "weighted_f1": _round(skm.f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "num_test": int(len(y_true)),
        "per_class": {
            name: {
                "precision": _round(scores["precision"][i]),
                "recall": _round(scores["recall"][i]),
                "f1": _round(scores["f1"][i]),
                "support": int(scores["support"][i]),
            }
            for i, name in enumerate(classes)
        },
    }


def _round(value) -> float:
    return round(float(value), DIGITS)


def prediction_table(predictions: pd.DataFrame, probs: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """predictions.csv: path, id, true, predicted (class names), confidence and p_<class> per image, rounded."""
    names = np.asarray(classes, dtype=object)
    named = pd.DataFrame({
        "path": predictions["path"],
        "id": predictions["id"],
        "true": names[predictions["label"]],
        "predicted": names[predictions["predicted"]],
        "confidence": predictions["confidence"].astype(float).round(DIGITS),
    })
    probabilities = pd.DataFrame(probs.astype(float).round(DIGITS), columns=[f"p_{c}" for c in classes])
    return pd.concat([named, probabilities], axis=1)


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


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> pd.DataFrame:
    """fpr, tpr, threshold (positive when score >= threshold), from (0, 0) at threshold inf to (1, 1).

    A row per distinct score (drop_intermediate=False: thin() bounds the rows, evenly along the
    ranking); without negatives (positives) fpr (tpr) is NaN, with sklearn's warning.
    """
    fpr, tpr, threshold = skm.roc_curve(positive, scores, pos_label=True, drop_intermediate=False)
    # back to the scores' dtype (sklearn widens them to float64 here, not in precision_recall_curve),
    # so both files round and write the same threshold alike
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": threshold.astype(np.asarray(scores).dtype)})


def precision_recall_curve(scores: np.ndarray, positive: np.ndarray) -> pd.DataFrame:
    """recall, precision, threshold, from recall 0, precision 1 at threshold inf, thresholds falling.

    sklearn's curve turned round (it ends at recall 0, with no threshold there), a row per distinct
    score like `roc_curve`; without positives recall is 1 past the start, with sklearn's warning.
    """
    precision, recall, threshold = skm.precision_recall_curve(positive, scores, pos_label=True, drop_intermediate=False)
    return pd.DataFrame({
        "recall": recall[::-1],
        "precision": precision[::-1],
        "threshold": np.r_[np.inf, threshold[::-1]],
    })


def ranking(probs: np.ndarray, labels: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The ROC and precision-recall curves of `ranking_scores`, and their `ranking_report` for metrics.json."""
    scores, positive = ranking_scores(probs, labels)
    roc, pr = roc_curve(scores, positive), precision_recall_curve(scores, positive)
    return roc, pr, ranking_report(roc, pr, positive)


def ranking_report(roc: pd.DataFrame, pr: pd.DataFrame, positive: np.ndarray) -> dict:
    """roc_auc (area under the ROC curve) and average_precision (precision summed over the recall
    steps); None where there are no positives or no negatives.

    Both from the curves already computed (average_precision_score would rank the scores again),
    so the figures are those of the plotted curves; the step sum is sklearn's formula.
    """
    if positive.all() or not positive.any():
        return {"roc_auc": None, "average_precision": None}
    auc = skm.auc(roc["fpr"], roc["tpr"])
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



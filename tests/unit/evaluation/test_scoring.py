"""The evaluate stage's metrics core (scores, confusion, ROC and precision-recall) against small cases computed by hand."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from imgpipe.evaluation.scoring import (
    confusion_matrix, mean_crossentropy, metrics_report, per_class_scores, precision_recall_curve, ranking_report,
    ranking_scores, roc_curve, thin, worst_mistakes,
)

# Three classes; six test images, four right.
#   actual a a a b b c
#   pred   a a b b c c
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PRED = np.array([0, 0, 1, 1, 2, 2])


def test_confusion_matrix_rows_are_actual_columns_predicted():
    expected = [
        [2, 1, 0],
        [0, 1, 1],
        [0, 0, 1],
    ]
    assert confusion_matrix(Y_TRUE, Y_PRED, 3).tolist() == expected


def test_per_class_scores_by_hand():
    scores = per_class_scores(confusion_matrix(Y_TRUE, Y_PRED, 3))
    # a: 2 of 2 predictions right, 2 of 3 found; b: 1 of 2, 1 of 2; c: 1 of 2, 1 of 1
    np.testing.assert_allclose(scores["precision"], [1.0, 0.5, 0.5])
    np.testing.assert_allclose(scores["recall"], [2 / 3, 0.5, 1.0])
    np.testing.assert_allclose(scores["f1"], [0.8, 0.5, 2 / 3])
    assert scores["support"].tolist() == [3, 2, 1]


def test_metrics_report_by_hand():
    p_true = np.array([0.5, 0.5, 0.25, 1.0, 0.5, 0.5])
    report = metrics_report(Y_TRUE, Y_PRED, p_true, ["a", "b", "c"])
    assert report["accuracy"] == round(4 / 6, 6)
    assert report["loss"] == round((4 * math.log(2) + math.log(4) - math.log(1 - 1e-7)) / 6, 6)
    assert report["macro_f1"] == round((0.8 + 0.5 + 2 / 3) / 3, 6)
    assert report["weighted_f1"] == round((0.8 * 3 + 0.5 * 2 + 2 / 3 * 1) / 6, 6)
    assert report["num_test"] == 6
    assert report["per_class"]["c"] == {"precision": 0.5, "recall": 1.0, "f1": round(2 / 3, 6), "support": 1}
    assert set(report) == {"accuracy", "loss", "macro_f1", "weighted_f1", "num_test", "per_class"}


def test_report_is_plain_json_with_stable_bytes():
    p_true = np.full(6, 0.3, dtype=np.float32)
    first = json.dumps(metrics_report(Y_TRUE, Y_PRED, p_true, ["a", "b", "c"]), sort_keys=True)
    again = json.dumps(metrics_report(Y_TRUE.copy(), Y_PRED.copy(), p_true.copy(), ["a", "b", "c"]), sort_keys=True)
    assert first == again


def test_perfect_predictions():
    report = metrics_report(Y_TRUE, Y_TRUE, np.ones(6), ["a", "b", "c"])
    assert report["accuracy"] == report["macro_f1"] == report["weighted_f1"] == 1.0
    assert report["loss"] == pytest.approx(0.0, abs=1e-6)


def test_a_zero_probability_gives_a_finite_loss():
    # Keras clips at 1e-7 too: -log(1e-7) = 16.118...
    assert mean_crossentropy(np.array([0.0])) == pytest.approx(-math.log(1e-7))


def test_class_absent_from_test_set_and_predictions_does_not_lower_macro_f1():
    with_d = metrics_report(Y_TRUE, Y_PRED, np.ones(6), ["a", "b", "c", "d"])
    without_d = metrics_report(Y_TRUE, Y_PRED, np.ones(6), ["a", "b", "c"])
    assert with_d["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert with_d["macro_f1"] == without_d["macro_f1"]
    assert with_d["weighted_f1"] == without_d["weighted_f1"]


def test_class_only_predicted_counts_as_zero_in_macro_f1():
    # actual a a, predicted a b: b was never right, but it was predicted, so it is a real miss
    report = metrics_report(np.array([0, 0]), np.array([0, 1]), np.ones(2), ["a", "b"])
    assert report["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["per_class"]["a"]["f1"] == round(2 / 3, 6)  # precision 1, recall 1/2
    assert report["macro_f1"] == round((2 / 3 + 0) / 2, 6)
    assert report["weighted_f1"] == round(2 / 3, 6)  # b has no support, so no weight


def test_worst_mistakes_most_confident_wrong_first():
    predictions = pd.DataFrame(
        {
            "path": ["p1", "p2", "p3", "p4", "p5"],
            "id": ["i1", "i2", "i3", "i4", "i5"],
            "true": ["a", "a", "b", "b", "c"],
            "predicted": ["a", "b", "a", "b", "a"],
            "confidence": [0.99, 0.6, 0.9, 0.8, 0.9],
        }
    )
    worst = worst_mistakes(predictions, limit=10)
    assert list(worst.columns) == ["path", "id", "true", "predicted", "confidence"]
    # right answers (i1, i4) left out; 0.9 before 0.6; the tie at 0.9 broken by id
    assert worst["id"].tolist() == ["i3", "i5", "i2"]
    assert worst_mistakes(predictions, limit=2)["id"].tolist() == ["i3", "i5"]
    assert worst_mistakes(predictions, limit=0).empty


# -- ROC and precision-recall ----------------------------------------------------------------
# Four images, two positive; scores 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.6 (neg).
#   threshold 0.9: tp 1 fp 0 -> tpr 1/2 fpr 0,   precision 1
#   threshold 0.8: tp 1 fp 1 -> tpr 1/2 fpr 1/2, precision 1/2
#   threshold 0.7: tp 2 fp 1 -> tpr 1   fpr 1/2, precision 2/3
#   threshold 0.6: tp 2 fp 2 -> tpr 1   fpr 1,   precision 1/2
# AUC = 3/4 (3 of the 4 positive-negative pairs ranked right); AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
SCORES = np.array([0.6, 0.9, 0.7, 0.8])
POSITIVE = np.array([False, True, True, False])


def test_roc_curve_by_hand():
    roc = roc_curve(SCORES, POSITIVE)
    np.testing.assert_allclose(roc["fpr"], [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(roc["tpr"], [0, 0.5, 0.5, 1, 1])
    assert roc["threshold"].tolist() == [np.inf, 0.9, 0.8, 0.7, 0.6]


def test_precision_recall_curve_by_hand():
    pr = precision_recall_curve(SCORES, POSITIVE)
    np.testing.assert_allclose(pr["recall"], [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(pr["precision"], [1, 1, 0.5, 2 / 3, 0.5])


def test_auc_and_average_precision_by_hand():
    report = ranking_report(roc_curve(SCORES, POSITIVE), precision_recall_curve(SCORES, POSITIVE), POSITIVE)
    assert report == {"roc_auc": 0.75, "average_precision": round(5 / 6, 6)}


def test_auc_is_the_share_of_positive_negative_pairs_ranked_right():
    rng = np.random.default_rng(0)
    scores = rng.choice(np.linspace(0, 1, 11), 300)  # many ties: a tie counts half
    positive = rng.random(300) < scores
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    report = ranking_report(roc_curve(scores, positive), precision_recall_curve(scores, positive), positive)
    assert report["roc_auc"] == pytest.approx(pairs, abs=1e-6)


def test_perfect_ranking_and_undefined_cases():
    positive = np.array([True, True, False])
    scores = np.array([0.9, 0.8, 0.1])
    assert ranking_report(roc_curve(scores, positive), precision_recall_curve(scores, positive), positive) == {
        "roc_auc": 1.0, "average_precision": 1.0}
    all_positive = np.ones(3, dtype=bool)
    report = ranking_report(roc_curve(scores, all_positive), precision_recall_curve(scores, all_positive), all_positive)
    assert report == {"roc_auc": None, "average_precision": None}  # null in JSON, not NaN


def test_ranking_scores_two_classes_rank_the_second():
    probs = np.array([[0.9, 0.1], [0.3, 0.7]])
    scores, positive = ranking_scores(probs, np.array([1, 1]))
    np.testing.assert_allclose(scores, [0.1, 0.7])
    assert positive.tolist() == [True, True]


def test_ranking_scores_more_classes_are_micro_averaged_one_vs_rest():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    scores, positive = ranking_scores(probs, np.array([0, 1]))
    np.testing.assert_allclose(scores, [0.6, 0.3, 0.1, 0.2, 0.2, 0.6])
    assert positive.tolist() == [True, False, False, False, True, False]


def test_thin_keeps_the_ends_and_at_most_the_points_asked():
    curve = pd.DataFrame({"x": np.linspace(0, 1, 10_001), "y": np.linspace(0, 1, 10_001) ** 2})
    thinned = thin(curve, 500)
    assert len(thinned) <= 500
    assert thinned.iloc[0].tolist() == [0.0, 0.0] and thinned.iloc[-1].tolist() == [1.0, 1.0]
    assert thin(curve.head(3), 500).equals(curve.head(3).round(6))

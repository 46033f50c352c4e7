"""The evaluate stage's metrics core (scores, confusion, ROC and precision-recall) against small cases computed by hand."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from imgpipe.evaluation.scoring import (
    confusion_matrix, mean_crossentropy, metrics_report, per_class_scores, precision_recall_curve, prediction_table,
    ranking, ranking_report, ranking_scores, roc_curve, thin, worst_mistakes,
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
    scores = per_class_scores(Y_TRUE, Y_PRED, 3)
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


@pytest.mark.filterwarnings("ignore:No negative samples")  # the curve of the undefined case; its own test below
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


def test_curves_without_negatives_or_positives_are_undefined_not_zero():
    scores = np.array([0.9, 0.8, 0.1])
    with pytest.warns(UserWarning, match="No negative samples"):
        roc = roc_curve(scores, np.ones(3, dtype=bool))
    assert roc["fpr"].isna().all() and roc["tpr"].tolist() == [0, 1 / 3, 2 / 3, 1]
    with pytest.warns(UserWarning, match="No positive"):
        pr = precision_recall_curve(scores, np.zeros(3, dtype=bool))
    assert pr["precision"].tolist() == [1, 0, 0, 0]


def test_both_curve_files_write_a_threshold_alike():
    # float32 scores, as the model gives them: rounded as float32 in one file and float64 in the
    # other, a few thresholds would differ in the last digit
    rng = np.random.default_rng(0)
    scores = rng.random(300).astype(np.float32)
    positive = rng.random(300) < scores
    roc, pr = thin(roc_curve(scores, positive)), thin(precision_recall_curve(scores, positive))
    assert roc["threshold"].to_csv(index=False) == pr["threshold"].to_csv(index=False)


def test_prediction_table_names_the_classes_and_rounds():
    predictions = pd.DataFrame({"path": ["p1", "p2"], "id": ["i1", "i2"], "label": [0, 1], "predicted": [1, 1],
                                "confidence": np.array([0.61234567, 0.9], dtype=np.float32), "p_true": [0.3, 0.9]})
    probs = np.array([[0.3, 0.61234567], [0.1, 0.9]], dtype=np.float32)
    table = prediction_table(predictions, probs, ["cat", "dog"])
    assert list(table.columns) == ["path", "id", "true", "predicted", "confidence", "p_cat", "p_dog"]
    assert table["true"].tolist() == ["cat", "dog"] and table["predicted"].tolist() == ["dog", "dog"]
    assert table["confidence"].tolist() == [0.612346, 0.9] and table["p_dog"].tolist() == [0.612346, 0.9]
    assert table["p_cat"].tolist() == [0.3, 0.1]  # float32 widened before rounding: no 0.30000001


# -- a random case against figures computed here from the definitions ------------------------
# 500 images, 4 classes: c never occurs among the test labels but is predicted, d occurs but is
# never predicted (its probability is kept low); probabilities on a 0.01 grid, so scores tie.
RNG = np.random.default_rng(7)
N, K = 500, 4
LABELS = RNG.choice([0, 1, 3], N)
_logits = RNG.normal(size=(N, K)) + 1.5 * np.eye(K)[LABELS]
_logits[:, 3] -= 10
PROBS = np.round(np.exp(_logits) / np.exp(_logits).sum(axis=1, keepdims=True), 2).astype(np.float32)
PREDICTED = PROBS.argmax(axis=1)
P_TRUE = PROBS[np.arange(N), LABELS]
CLASSES = ["a", "b", "c", "d"]


def test_the_random_case_is_the_one_described():
    assert set(LABELS) == {0, 1, 3} and set(PREDICTED) == {0, 1, 2}
    assert 0.3 < (LABELS == PREDICTED).mean() < 0.9  # neither trivial nor hopeless
    assert len(np.unique(PROBS)) < 0.1 * PROBS.size  # many ties


def test_random_case_report_matches_the_confusion_matrix():
    # counted pair by pair, not by the code under test
    matrix = np.array([[np.sum((LABELS == i) & (PREDICTED == j)) for j in range(K)] for i in range(K)])
    assert confusion_matrix(LABELS, PREDICTED, K).tolist() == matrix.tolist()
    hits, support, predicted = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(hits / predicted)
        recall = np.nan_to_num(hits / support)
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))  # the harmonic mean
    report = metrics_report(LABELS, PREDICTED, P_TRUE, CLASSES)
    close = dict(abs=1e-6)
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / N, **close)
    assert report["loss"] == pytest.approx(np.mean([-math.log(min(max(p, 1e-7), 1 - 1e-7)) for p in P_TRUE]), **close)
    assert report["macro_f1"] == pytest.approx(f1.sum() / K, **close)  # c and d both occur: both count, as zeros
    assert report["weighted_f1"] == pytest.approx((f1 * support).sum() / N, **close)
    for i, name in enumerate(CLASSES):
        got = report["per_class"][name]
        assert got["support"] == support[i]
        assert [got["precision"], got["recall"], got["f1"]] == pytest.approx([precision[i], recall[i], f1[i]], **close)
    # predicted but absent, and present but never predicted: zeros, not NaN
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": int(support[3])}


def brute_force_counts(scores: np.ndarray, positive: np.ndarray):
    """(threshold, true positives, false positives) at each distinct score, highest first, one threshold at a time."""
    thresholds = np.unique(scores)[::-1]
    return [(t, np.sum(positive & (scores >= t)), np.sum(~positive & (scores >= t))) for t in thresholds]


def test_random_case_curves_keep_their_shape_and_points():
    scores, positive = ranking_scores(PROBS, LABELS)
    roc, pr, _ = ranking(PROBS, LABELS)
    counts = brute_force_counts(scores, positive)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    assert list(roc.columns) == ["fpr", "tpr", "threshold"] and list(pr.columns) == ["recall", "precision", "threshold"]
    # a row per distinct score after the start: (0, 0) / (recall 0, precision 1), both at threshold inf
    assert roc.iloc[0].tolist() == [0.0, 0.0, np.inf] and pr.iloc[0].tolist() == [0.0, 1.0, np.inf]
    assert roc.iloc[-1][["fpr", "tpr"]].tolist() == [1.0, 1.0]
    expected_roc = [(fp / n_neg, tp / n_pos, t) for t, tp, fp in counts]
    expected_pr = [(tp / n_pos, tp / (tp + fp), t) for t, tp, fp in counts]
    np.testing.assert_allclose(roc.iloc[1:].to_numpy(), expected_roc, atol=1e-12)
    np.testing.assert_allclose(pr.iloc[1:].to_numpy(), expected_pr, atol=1e-12)
    assert (np.diff(roc["threshold"]) < 0).all()  # thresholds fall, curves run from strict to lenient


def test_random_case_auc_and_average_precision_from_their_definitions():
    scores, positive = ranking_scores(PROBS, LABELS)
    pos, neg = scores[positive], scores[~positive]
    auc = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    recall_before, ap = 0.0, 0.0
    for _, tp, fp in brute_force_counts(scores, positive):
        ap += (tp / positive.sum() - recall_before) * tp / (tp + fp)
        recall_before = tp / positive.sum()
    _, _, areas = ranking(PROBS, LABELS)
    assert areas["roc_auc"] == pytest.approx(auc, abs=1e-6)
    assert areas["average_precision"] == pytest.approx(ap, abs=1e-6)

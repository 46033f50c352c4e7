"""What evaluate writes for a person to act on: curves, plots, the report page, the gallery, the export.

Checked on the shared real run (MNIST 3s and 5s, a few 5s labelled 3), and the report's pure
parts on small hand-made cases.
"""

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from imgpipe.reports import evaluation as report
from imgpipe.data.sources import Source

from .mnist_run import DATA_QUALITY, MISLABELLED, MNIST

# trains a real model: `make test-fast` leaves it out
pytestmark = pytest.mark.slow


def outputs(mnist_run):
    params, split = mnist_run
    reports = Path(params.paths.reports)
    metrics = json.loads((reports / "metrics.json").read_text())
    predictions = pd.read_csv(reports / "evaluation" / "predictions.csv", dtype={"true": str, "predicted": str})
    return params, split, reports, metrics, predictions


def test_predictions_csv_has_every_test_image_with_its_probabilities(mnist_run):
    params, split, reports, metrics, predictions = outputs(mnist_run)
    assert list(predictions.columns) == ["path", "id", "true", "predicted", "confidence", "p_3", "p_5"]
    test = split[split["split"] == "test"]
    assert sorted(predictions["id"]) == sorted(test["id"])
    np.testing.assert_allclose(predictions[["p_3", "p_5"]].sum(axis=1), 1.0, atol=1e-5)
    assert (predictions["predicted"] == np.where(predictions["p_5"] > predictions["p_3"], "5", "3")).all()
    confusion = pd.read_csv(reports / "confusion.csv", dtype=str)
    assert confusion.to_numpy().tolist() == predictions[["true", "predicted"]].to_numpy().tolist()


def test_two_classes_get_roc_auc_and_curves_of_the_second_class(mnist_run):
    params, split, reports, metrics, predictions = outputs(mnist_run)
    # AUC = the share of (5, 3) pairs in which the 5 gets the higher probability of being a 5
    fives, threes = predictions[predictions["true"] == "5"]["p_5"], predictions[predictions["true"] == "3"]["p_5"]
    pairs = (fives.to_numpy()[:, None] > threes.to_numpy()[None, :]).mean()
    assert metrics["roc_auc"] == pytest.approx(pairs, abs=2e-3)  # probabilities are rounded in the CSV
    assert metrics["roc_auc"] > 0.8 and 0 < metrics["average_precision"] <= 1
    roc = pd.read_csv(reports / "roc.csv")
    pr = pd.read_csv(reports / "precision_recall.csv")
    assert list(roc.columns) == ["fpr", "tpr", "threshold"] and list(pr.columns) == ["recall", "precision", "threshold"]
    assert roc.iloc[0][["fpr", "tpr"]].tolist() == [0, 0] and roc.iloc[-1][["fpr", "tpr"]].tolist() == [1, 1]
    assert roc["fpr"].is_monotonic_increasing and roc["tpr"].is_monotonic_increasing
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(metrics["roc_auc"], abs=1e-6)


def test_report_page_shows_the_metrics_the_gate_and_links_that_resolve(mnist_run):
    params, split, reports, metrics, predictions = outputs(mnist_run)
    folder = reports / "evaluation"
    page = (folder / "index.html").read_text()
    table = re.search(r'<table id="metrics">(.*?)</table>', page, re.S).group(1)
    assert f"<td>accuracy</td><td class=\"num\">{metrics['accuracy']:.4f}</td>" in table
    assert f"{metrics['roc_auc']:.4f}" in table and "ROC AUC (class 5 against 3)" in table
    assert "Model gate: <strong>blessed</strong>" in page
    # the data-quality summary is shown and linked
    assert f'<td>quarantined</td><td class="num">{DATA_QUALITY["quarantined"]}</td>' in page
    # every relative link and image points at a file that exists
    targets = re.findall(r'(?:href|src)="([^"#]+)', page)
    assert {"gallery.html", "confusion.png", "confusion_normalized.png", "roc.png", "precision_recall.png",
            "training.png", "predictions.csv"} <= set(targets)
    for target in targets:
        assert (folder / target).resolve().exists(), target
    data_docs = (reports / "data_quality" / "site" / "index.html").resolve()
    assert (folder / "../data_quality/site/index.html").resolve() == data_docs
    for png in ("confusion.png", "confusion_normalized.png", "roc.png", "precision_recall.png", "training.png"):
        image = cv2.imread(str(folder / png))
        assert image is not None and min(image.shape[:2]) > 200, png


def test_gallery_groups_the_worst_mistakes_with_thumbnails_of_the_originals(mnist_run):
    params, split, reports, metrics, predictions = outputs(mnist_run)
    folder = reports / "evaluation"
    mistakes = pd.read_csv(reports / "misclassified.csv", dtype={"true": str, "predicted": str})
    page = (folder / "gallery.html").read_text()
    assert f"The {len(mistakes)} worst mistakes" in page
    # the 5s labelled 3 are found: group 3_to_5, and their thumbnails are the original digits
    found = mistakes[mistakes["path"].isin(split[split["mislabelled"]]["path"])]
    assert len(found) == MISLABELLED and (found["predicted"] == "5").all()
    assert '<h2 id="3_to_5">' in page
    with Source(MNIST, "idx") as source:
        for row in found.itertuples():
            thumb = cv2.imread(str(folder / "gallery" / "3_to_5" / f"{row.id}.png"), cv2.IMREAD_GRAYSCALE)
            original = source.read_idx_pixels(row.path)
            assert thumb.shape == (report.THUMB, report.THUMB)
            np.testing.assert_array_equal(thumb, report.thumbnail(original)[..., 0])
    # one figure per mistake, each with an image
    assert page.count("<figure>") == len(mistakes) == len(re.findall(r'<img src="gallery/', page))


def test_export_holds_what_predict_and_tf_serving_need(mnist_run):
    params, *_ = outputs(mnist_run)
    export = Path(params.evaluate.export_dir)
    assert (export / "model.keras").read_bytes() == Path(params.paths.model).read_bytes()
    assert (export / "saved_model" / "saved_model.pb").is_file()
    spec = json.loads((export / "preprocess.json").read_text())
    assert spec["classes"] == ["3", "5"] and spec["input_shape"] == [28, 28, 1]
    assert spec["preprocess"] == {"colour_mode": "grey", "blur_kernel": 0, "otsu": False, "size": [28, 28],
                                  "normalization": "unit", "standardize_scope": "dataset"}


# -- the report's pure parts -------------------------------------------------------------------


def test_groups_largest_first_keeping_the_worst_first_order():
    mistakes = pd.DataFrame({"path": list("abcde"), "id": list("12345"), "true": ["x", "y", "x", "y", "x"],
                             "predicted": ["y", "x", "y", "z", "y"], "confidence": [0.9, 0.8, 0.7, 0.6, 0.5]})
    grouped = report.groups(mistakes)
    assert [name for name, _ in grouped] == ["x_to_y", "y_to_x", "y_to_z"]
    assert grouped[0][1]["id"].tolist() == ["1", "3", "5"]


def test_top_confusions_count_and_share_of_the_true_class():
    matrix = np.array([[8, 2, 0], [5, 5, 0], [0, 1, 9]])
    assert report.top_confusions(matrix, ["a", "b", "c"], limit=2) == [("b", "a", 5, 0.5), ("a", "b", 2, 0.2)]


def test_class_names_become_safe_folder_names_and_are_escaped_in_html():
    assert report.safe_name("../etc/passwd_to_a b") == "_etc_passwd_to_a_b"
    mistakes = pd.DataFrame({"path": ["<p>.jpg"], "id": ["i"], "true": ["<b>"], "predicted": ["x&y"], "confidence": [0.5]})
    page = report.gallery_html(report.groups(mistakes), {}, {"i": "original not readable: gone"})
    assert "true <b>&lt;b&gt;</b>, predicted <b>x&amp;y</b>" in page
    assert "&lt;p&gt;.jpg" in page and "<p>.jpg" not in page
    assert "original not readable: gone" in page


def test_thumbnails_keep_the_aspect_and_enlarge_small_images_crisply():
    small = np.arange(28 * 14, dtype=np.uint8).reshape(28, 14)
    thumb = report.thumbnail(small)
    assert thumb.shape == (report.THUMB, report.THUMB // 2, 3)
    assert set(np.unique(thumb)) <= set(np.unique(small))  # nearest neighbour: no new grey levels
    big = np.zeros((600, 300, 4), np.uint8)
    assert report.thumbnail(big).shape == (report.THUMB, report.THUMB // 2, 3)

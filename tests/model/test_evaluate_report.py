"""What evaluate writes for a person to act on: curves, plots, the report page, the gallery, the export.

Checked on the shared real run (MNIST 3s and 5s, a few 5s labelled 3), and the report's pure
parts on small hand-made cases.
"""

import html
import json
import re
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pandas as pd
import pytest

from imgpipe.reports import evaluation as report
from imgpipe.reports import thumbnails
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
    argmax = np.where(predictions["p_5"] > predictions["p_3"], "5", "3")
    assert (predictions["predicted"] == argmax).all()
    # confusion.csv (for `dvc plots`): per test image, its label in split.csv and the class it scored highest
    confusion = pd.read_csv(reports / "confusion.csv", dtype=str)
    labels = predictions["path"].map(test.set_index("path")["label"])
    assert confusion.to_numpy().tolist() == [list(pair) for pair in zip(labels, argmax)]


def test_two_classes_get_roc_auc_and_curves_of_the_second_class(mnist_run):
    params, split, reports, metrics, predictions = outputs(mnist_run)
    # AUC = the share of (5, 3) pairs in which the 5 gets the higher probability of being a 5
    fives, threes = predictions[predictions["true"] == "5"]["p_5"], predictions[predictions["true"] == "3"]["p_5"]
    pairs = (fives.to_numpy()[:, None] > threes.to_numpy()[None, :]).mean()
    assert metrics["roc_auc"] == pytest.approx(pairs, abs=2e-3)  # probabilities are rounded in the CSV
    assert metrics["roc_auc"] > 0.8
    # AP = precision summed over the recall gained at each distinct probability, highest first
    ranked = pd.DataFrame({"p": fives.tolist() + threes.tolist(), "five": [1] * len(fives) + [0] * len(threes)})
    steps = ranked.groupby("p")["five"].agg(["sum", "count"]).sort_index(ascending=False)
    precision = steps["sum"].cumsum() / steps["count"].cumsum()
    assert metrics["average_precision"] == pytest.approx((precision * steps["sum"]).sum() / len(fives), abs=2e-3)
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
    # every relative link and image points at a file that exists, the Data Docs beside the report
    targets = re.findall(r'(?:href|src)="([^"#]+)', page)
    assert {"gallery.html", "confusion.png", "confusion_normalized.png", "roc.png", "precision_recall.png",
            "training.png", "predictions.csv"} <= set(targets)
    for target in targets:
        assert (folder / target).resolve().exists(), target
    gallery = (folder / "gallery.html").read_text()
    anchors = re.findall(r'href="gallery\.html#([^"]+)"', page)
    assert anchors and all(f'<h2 id="{html.escape(unquote(anchor))}">' in gallery for anchor in anchors)
    quality_page = re.search(r'<a id="data-quality-page" href="([^"]+)"', page).group(1)
    assert (folder / quality_page).resolve() == (Path(params.paths.data_quality) / "index.html").resolve()
    data_docs = re.search(r'<a id="data-quality-report" href="([^"]+)"', page).group(1)
    assert (folder / data_docs).resolve() == (Path(params.paths.data_quality) / "site" / "index.html").resolve()
    # self-contained: nothing to fetch from the network, no script to run
    assert not re.search(r'(?:href|src)="(?:[a-z]+:)?//', page) and "<script" not in page and "<link" not in page
    assert f"<code>imgpipe predict --model {params.evaluate.export_dir} IMAGE_OR_FOLDER ...</code>" in page
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
            thumb = cv2.imread(str(folder / "gallery" / "3_to_5" / f"{row.id}.png"), cv2.IMREAD_UNCHANGED)
            original = source.read_idx_pixels(row.path)
            # the 28 x 28 digit, grey in three channels, each pixel a crisp square
            square = cv2.resize(original, (report.THUMB, report.THUMB), interpolation=cv2.INTER_NEAREST)
            np.testing.assert_array_equal(thumb, np.dstack([square] * 3))
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


def test_report_page_escapes_class_names_and_marks_low_recall():
    metrics = {"accuracy": 0.5, "loss": 1.25, "macro_f1": 0.4, "weighted_f1": 0.45, "num_test": 30,
               "per_class": {"<i>a": {"precision": 0.5, "recall": 0.2, "f1": 0.3, "support": 10},
                             "b&c": {"precision": 0.5, "recall": 0.9, "f1": 0.6, "support": 20}},
               "gate": {"verdict": "failed", "checks": []}}
    links = {"gallery": "gallery.html", "predictions": "predictions.csv", "metrics": "../metrics.json",
             "misclassified": "../miss ed.csv", "data_quality_page": "../dq/index.html",
             "data_quality_report": "../dq/site/index.html",
             "data_quality_summary": "../dq/summary.json"}
    model = {"path": "m.keras", "md5": "0f", "export": "export"}
    page = report.index_html(metrics, ["<i>a", "b&c"], [("<i>a", "b&c", 8, 0.8)], {"roc": "r o c.png"}, links,
                             model, None, 0.5, "micro")
    rows = re.search(r'<table id="per-class">(.*?)</table>', page, re.S).group(1)
    assert ('<tr class="low"><td>&lt;i&gt;a</td><td class="num">0.5000</td><td class="num">0.2000</td>'
            '<td class="num">0.3000</td><td class="num">10</td></tr>') in rows
    assert '<tr><td>b&amp;c</td>' in rows
    # a missing metric reads n/a; links and file names are URL-quoted, the text HTML-escaped
    assert '<td>ROC AUC (micro)</td><td class="num">n/a</td>' in page
    assert '<td><a href="gallery.html#%3Ci%3Ea_to_b%26c">b&amp;c</a></td><td class="num">8</td><td>80.0%</td>' in page
    assert 'href="../miss%20ed.csv"' in page and '<img id="roc" src="r%20o%20c.png" alt="roc">' in page
    assert "<i>" not in page and "No data-quality summary at ../dq/summary.json" in page


def test_thumbnails_keep_the_aspect_and_enlarge_small_images_crisply():
    small = (np.arange(28 * 14) % 5 * 60).astype(np.uint8).reshape(28, 14)  # 5 grey levels, 0 to 240
    thumb = thumbnails.thumbnail(small, report.THUMB)
    assert thumb.shape == (report.THUMB, report.THUMB // 2, 3)
    assert set(np.unique(thumb)) <= set(np.unique(small))  # nearest neighbour: no new grey levels
    big = np.zeros((600, 300, 4), np.uint8)
    assert thumbnails.thumbnail(big, report.THUMB).shape == (report.THUMB, report.THUMB // 2, 3)
    # 16 bits scaled to 8 exactly; a BGR image comes out RGB
    deep = (small.astype(np.uint16) * 257)[:, :, None].repeat(3, axis=2)
    deep[..., 0] = 0
    np.testing.assert_array_equal(thumbnails.thumbnail(deep, 56)[..., :2], thumbnails.thumbnail(small, 56)[..., :2])
    assert not thumbnails.thumbnail(deep, 56)[..., 2].any()

"""The Prefect metrics artifact (flows/artifacts.py) built from a metrics.json the real evaluate
stage wrote: the shared MNIST run (3s and 5s, three test 5s labelled 3), so the rows and the
description carry that run's numbers, checked against the file and against confusion.csv.
"""

import json
from pathlib import Path

import pandas as pd
import pytest

from flows.artifacts import metrics_description, metrics_rows
from imgpipe.reports.evaluation import FOLDER, INDEX

from .mnist_run import MISLABELLED, PER_CLASS

# trains a real model (the shared run): `make test-fast` leaves it out
pytestmark = pytest.mark.slow


def test_metrics_artifact_rows_and_description_from_the_real_metrics_json(mnist_run):
    params, _ = mnist_run
    reports = Path(params.paths.reports)
    metrics = json.loads((reports / "metrics.json").read_text())
    confusion = pd.read_csv(reports / "confusion.csv", dtype=str)

    rows = metrics_rows(metrics)

    # one row per class, in the classes' order, each row the file's own numbers
    per_class = metrics["per_class"]
    assert list(per_class) == ["3", "5"]
    assert rows == [
        {"class": name, "precision": per_class[name]["precision"], "recall": per_class[name]["recall"],
         "f1": per_class[name]["f1"], "support": per_class[name]["support"]}
        for name in ("3", "5")
    ]
    # and those numbers are the test images' own: supports from split.csv's labels, scores from
    # the (actual, predicted) pairs evaluate wrote, rounded to metrics.json's 6 decimals
    assert [row["support"] for row in rows] == [PER_CLASS["test"] + MISLABELLED, PER_CLASS["test"] - MISLABELLED]
    for row in rows:
        name = row["class"]
        tp = int(((confusion["actual"] == name) & (confusion["predicted"] == name)).sum())
        predicted, actual = int((confusion["predicted"] == name).sum()), int((confusion["actual"] == name).sum())
        precision, recall = tp / predicted, tp / actual
        assert actual == row["support"]
        assert row["precision"] == round(precision, 6) and row["recall"] == round(recall, 6)
        assert row["f1"] == round(2 * tp / (predicted + actual), 6)
    accuracy = (confusion["actual"] == confusion["predicted"]).mean()
    assert metrics["accuracy"] == round(accuracy, 6) and metrics["num_test"] == 2 * PER_CLASS["test"] == len(confusion)

    # the description: the file's overall figures to 4 decimals, the gate's verdict and each of
    # its checks' findings, and where the report is
    report = reports / FOLDER / INDEX
    assert report.is_file()
    gate = metrics["gate"]
    assert gate["verdict"] == "blessed"
    details = "; ".join(check["detail"] for check in gate["checks"])
    assert details
    assert metrics_description(metrics, str(report)) == (
        f"Test set: 80 images. Accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}, "
        f"macro F1 {metrics['macro_f1']:.4f}, weighted F1 {metrics['weighted_f1']:.4f}. "
        f"Gate: blessed ({details}). Full report: `{report}`"
    )

"""The model gate's pass, fail and warn paths through a real evaluate run (its checks alone: tests/unit/evaluation/test_gate_checks.py)."""

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from imgpipe.core.hashing import file_hexdigest
from stages import evaluate
from imgpipe.evaluation import scoring
from imgpipe.evaluation import gate
from imgpipe.core.errors import StageError

from tests.unit.evaluation.test_gate_checks import BASELINE

from .mnist_run import run_params

# trains a real model: `make test-fast` leaves it out
pytestmark = pytest.mark.slow

# -- through evaluate.run, with the model of the shared MNIST run ----------------------------


def evaluate_again(mnist_run, tmp_path, **evaluate_params):
    """evaluate.run on the shared run's model, into reports, export and blessed file of this test."""
    params, _ = mnist_run
    root = Path(params.paths.model).parents[1]
    again = run_params(root, reports=tmp_path / "reports", **{
        "export_dir": str(tmp_path / "export"), "blessed_file": str(tmp_path / "blessed.json"), **evaluate_params})
    return again, tmp_path / "reports"


def accuracy_of(mnist_run) -> float:
    params, _ = mnist_run
    return json.loads((Path(params.paths.reports) / "metrics.json").read_text())["accuracy"]


def test_the_shared_run_passed_the_default_gate_and_was_blessed(mnist_run):
    params, _ = mnist_run
    metrics = json.loads((Path(params.paths.reports) / "metrics.json").read_text())
    assert metrics["gate"]["verdict"] == "blessed"
    (record,) = gate.read_blessed(params.evaluate.blessed_file)
    assert record["md5"] == file_hexdigest(params.paths.model, "md5")
    assert record["metrics"]["accuracy"] == metrics["accuracy"]


def test_failing_gate_fails_evaluate_after_writing_the_report(mnist_run, tmp_path):
    accuracy = accuracy_of(mnist_run)
    params, reports = evaluate_again(mnist_run, tmp_path, min_accuracy=0.99, gate_action="fail")
    with pytest.raises(StageError) as failure:
        evaluate.run(params.evaluate, params.paths, params.ingest)
    shortfall = f"accuracy {accuracy:.4f} is {0.99 - accuracy:.4f} below the minimum 0.9900 (evaluate.min_accuracy)"
    assert shortfall in str(failure.value)
    assert str(reports / "evaluation" / "index.html") in str(failure.value)
    # the reviewer can read why: metrics and the report are there, and say so
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["gate"]["verdict"] == "failed"
    assert "Model gate: <strong>failed</strong>" in (reports / "evaluation" / "index.html").read_text()
    # a failed model is neither exported nor blessed
    assert not (tmp_path / "export").exists()
    assert not (tmp_path / "blessed.json").exists()


def test_warning_gate_goes_on_exports_but_does_not_bless(mnist_run, tmp_path, caplog):
    accuracy = accuracy_of(mnist_run)
    # a previous model, blessed with better accuracy than this one reaches
    better = {**BASELINE, "test_set": "other", "metrics": {"accuracy": round(accuracy + 0.1, 6)}}
    (tmp_path / "blessed.json").write_text(json.dumps({"blessed": [better]}))
    params, reports = evaluate_again(mnist_run, tmp_path, max_accuracy_drop=0.05, gate_action="warn")
    with caplog.at_level(logging.WARNING, logger="stages.evaluate"):
        evaluate.run(params.evaluate, params.paths, params.ingest)
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["gate"]["verdict"] == "warned"
    drop = {c["name"]: c for c in metrics["gate"]["checks"]}["max_accuracy_drop"]
    assert not drop["passed"] and drop["value"] == pytest.approx(0.1) and drop["baseline_md5"] == BASELINE["md5"]
    assert "0.0500 more than the allowed drop 0.0500 (evaluate.max_accuracy_drop)" in caplog.text
    assert (tmp_path / "export" / "saved_model" / "saved_model.pb").is_file()
    assert gate.read_blessed(tmp_path / "blessed.json") == [better]  # unchanged


def test_passing_gate_blesses_the_model_with_its_metrics(mnist_run, tmp_path):
    params, reports = evaluate_again(mnist_run, tmp_path, min_accuracy=0.5)
    evaluate.run(params.evaluate, params.paths, params.ingest)
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["gate"]["verdict"] == "blessed"
    (record,) = gate.read_blessed(tmp_path / "blessed.json")
    assert record["md5"] == file_hexdigest(params.paths.model, "md5")
    assert record["metrics"]["accuracy"] == metrics["accuracy"]
    test_ids = pd.read_csv(reports / "evaluation" / "predictions.csv", dtype=str)["id"]
    assert record["test_set"] == scoring.ids_fingerprint(test_ids)

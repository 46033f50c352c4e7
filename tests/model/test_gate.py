"""The model gate: its checks on hand-made metrics, and its pass, fail and warn paths through a real evaluate run."""

import datetime
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
from imgpipe.core.params import Evaluate

from .mnist_run import run_params

# trains a real model: `make test-fast` leaves it out
pytestmark = pytest.mark.slow

METRICS = {
    "accuracy": 0.8, "loss": 0.5, "macro_f1": 0.79, "weighted_f1": 0.8, "num_test": 100,
    "per_class": {
        "cat": {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 50},
        "dog": {"precision": 0.7, "recall": 0.7, "f1": 0.7, "support": 50},
        "fox": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},  # no test images: not judged
    },
}
BASELINE = {"md5": "b" * 32, "blessed_at": "2026-01-01T00:00:00+00:00", "test_set": "t1", "metrics": {"accuracy": 0.9}}


def checks(result: dict) -> dict:
    return {c["name"]: c for c in result["checks"]}


def test_passing_every_check_blesses():
    result = gate.judge(METRICS, Evaluate(min_accuracy=0.8, min_class_recall=0.7, max_accuracy_drop=0.1), BASELINE, "t1")
    assert result["verdict"] == "blessed"
    assert [c["passed"] for c in result["checks"]] == [True, True, True]
    assert checks(result)["min_class_recall"]["class"] == "dog"  # the lowest recall among judged classes
    assert checks(result)["max_accuracy_drop"]["value"] == pytest.approx(0.1)


def test_failing_checks_say_which_threshold_and_by_how_much():
    p = Evaluate(min_accuracy=0.85, min_class_recall=0.75, max_accuracy_drop=0.02, gate_action="fail")
    result = gate.judge(METRICS, p, BASELINE, "t2")
    assert result["verdict"] == "failed"
    assert not any(c["passed"] for c in result["checks"])
    text = gate.message(result)
    assert "accuracy 0.8000 is 0.0500 below the minimum 0.8500 (evaluate.min_accuracy)" in text
    assert "below the minimum recall 0.7500 (evaluate.min_class_recall): dog 0.7000 (0.0500 below)" in text
    assert "accuracy 0.8000 is 0.1000 below the last blessed model's 0.9000" in text
    assert "0.0800 more than the allowed drop 0.0200 (evaluate.max_accuracy_drop)" in text
    assert "measured on a different test set" in text


def test_warn_action_warns_instead_of_failing():
    result = gate.judge(METRICS, Evaluate(min_accuracy=0.85, gate_action="warn"), None, "t1")
    assert result["verdict"] == "warned"
    assert [c["name"] for c in result["checks"] if not c["passed"]] == ["min_accuracy"]


def test_defaults_never_block_a_first_model():
    # the e2e run trains 2 epochs on 106 photos: whatever it reaches, the default gate lets it through
    weak = {**METRICS, "accuracy": 0.0, "per_class": {"cat": {**METRICS["per_class"]["cat"], "recall": 0.0}}}
    assert gate.judge(weak, Evaluate(), None, "t1")["verdict"] == "blessed"
    assert Evaluate().gate_action == "warn"


def test_thresholds_hold_at_equality_despite_float_noise():
    p = Evaluate(min_accuracy=0.8 + 1e-12, max_accuracy_drop=0.1)
    assert gate.judge(METRICS, p, BASELINE, "t1")["verdict"] == "blessed"


def test_baseline_is_the_last_other_blessed_model():
    records = [{"md5": "a", "metrics": {}}, {"md5": "b", "metrics": {}}, {"md5": "c", "metrics": {}}]
    assert gate.baseline(records, "x")["md5"] == "c"
    assert gate.baseline(records, "c")["md5"] == "b"  # re-evaluating c compares it with b, not itself
    assert gate.baseline([], "x") is None


def test_bless_appends_once_per_model(tmp_path):
    path = tmp_path / "models" / "blessed.json"
    now = datetime.datetime(2026, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    record = gate.blessing({**METRICS, "roc_auc": 0.9}, "models/model.keras", "a" * 32, "t1", now)
    assert record["blessed_at"] == "2026-05-01T12:00:00+00:00"
    assert record["metrics"] == {
        "accuracy": 0.8, "loss": 0.5, "macro_f1": 0.79, "weighted_f1": 0.8, "roc_auc": 0.9, "num_test": 100}
    assert gate.bless(path, record) is True
    assert gate.bless(path, record) is False
    assert gate.read_blessed(path) == [record]


def test_a_broken_blessed_file_is_a_clear_error(tmp_path):
    path = tmp_path / "blessed.json"
    path.write_text("{not json")
    with pytest.raises(StageError, match=f"{path}: not a blessed-models file"):
        gate.read_blessed(path)
    path.write_text(json.dumps({"blessed": [{"md5": "a"}]}))
    with pytest.raises(StageError, match="records with md5 and metrics"):
        gate.read_blessed(path)


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

"""The model gate's checks on hand-made metrics: pass, fail and warn, the baseline, the blessed file."""

import datetime
import json

import pytest

from imgpipe.core.errors import StageError
from imgpipe.core.params import Evaluate
from imgpipe.evaluation import gate

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

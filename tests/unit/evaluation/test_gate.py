"""The model gate's pure functions and its blessed file, on tmp files.

test_gate_checks.py holds the checks' pass, fail and warn messages, the baseline order,
appending a blessing once and a broken file's error; here what those leave out.
"""

import datetime
import json

import pytest

from imgpipe.core.params import Evaluate
from imgpipe.evaluation import gate

METRICS = {
    "accuracy": 0.8, "loss": 0.5, "macro_f1": 0.79, "weighted_f1": 0.8, "num_test": 100,
    "per_class": {"cat": {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 50},
                  "dog": {"precision": 0.7, "recall": 0.7, "f1": 0.7, "support": 50}},
}
NOW = datetime.datetime(2026, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)


def record(md5: str, accuracy: float = 0.8) -> dict:
    return gate.blessing({**METRICS, "accuracy": accuracy}, "models/model.keras", md5, "t1", NOW)


def drop_check(result: dict) -> dict:
    return {c["name"]: c for c in result["checks"]}["max_accuracy_drop"]


def test_no_record_on_a_missing_file_writes_an_empty_one(tmp_path):
    # the file is a DVC output of evaluate: it must exist after a run that blessed nothing
    path = tmp_path / "models" / "blessed.json"
    assert gate.bless(path, None) is False
    assert json.loads(path.read_text()) == {"blessed": []}
    assert gate.read_blessed(path) == []
    assert gate.bless(path, record("a" * 32)) is True  # and a later blessing appends to it
    assert [r["md5"] for r in gate.read_blessed(path)] == ["a" * 32]


def test_no_record_leaves_an_existing_file_as_it_is(tmp_path):
    path = tmp_path / "blessed.json"
    gate.bless(path, record("a" * 32))
    before = path.read_bytes()
    assert gate.bless(path, None) is False
    assert path.read_bytes() == before


def test_a_missing_file_is_no_blessed_model_yet(tmp_path):
    assert gate.read_blessed(tmp_path / "blessed.json") == []
    assert not (tmp_path / "blessed.json").exists()  # reading never creates it


def test_records_keep_their_order_through_the_file(tmp_path):
    path = tmp_path / "blessed.json"
    for md5 in ("a" * 32, "b" * 32, "c" * 32):
        gate.bless(path, record(md5))
    records = gate.read_blessed(path)
    assert [r["md5"] for r in records] == ["a" * 32, "b" * 32, "c" * 32]  # oldest first: baseline takes the last


def test_baseline_of_the_only_blessed_model_is_none():
    # re-evaluating the one blessed model: nothing else to compare it with
    assert gate.baseline([record("a" * 32)], "a" * 32) is None


def test_first_model_passes_the_drop_check_with_nothing_to_compare():
    check = drop_check(gate.judge(METRICS, Evaluate(), None, "t1"))
    assert check["passed"] and check["value"] == 0.0
    assert check["detail"] == "no blessed model to compare with yet"
    assert "baseline_md5" not in check


def test_a_better_model_passes_the_drop_check_on_the_same_test_set():
    baseline = record("b" * 32, accuracy=0.7)
    check = drop_check(gate.judge(METRICS, Evaluate(max_accuracy_drop=0.0), baseline, "t1"))
    assert check["passed"] and check["value"] == pytest.approx(-0.1)
    assert check["baseline_md5"] == "b" * 32
    assert "drop 0.0000 <= 0.0000" in check["detail"]  # an improvement is no drop, not a negative one
    assert "different test set" not in check["detail"]


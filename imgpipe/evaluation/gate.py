"""The model gate: may this model be shipped? Thresholds from params.yaml `evaluate:`, as TFX blesses models.

Three checks, each recorded in metrics.json under `gate.checks`:
  min_accuracy       test accuracy >= evaluate.min_accuracy
  min_class_recall   every class with test images has recall >= evaluate.min_class_recall
  max_accuracy_drop  accuracy is at most evaluate.max_accuracy_drop below the last blessed model's

Verdict: `blessed` when all pass (the model is then recorded in the blessed file), otherwise
`failed` (evaluate.gate_action: fail, the stage fails) or `warned` (gate_action: warn, logged).

The blessed file (evaluate.blessed_file, default models/blessed.json) is a `persist: true`
output of the evaluate stage: DVC neither deletes it before the stage runs nor replaces it with
an older copy, so it outlives runs and is a baseline, and DVC versions it with each dvc.lock. A
fresh project has none: the first model is judged on the absolute thresholds only. A queued
`dvc exp run` starts from the committed record and carries its own blessing in its experiment
(`dvc exp apply` brings it back); `dvc repro` in the workspace appends to it. To start afresh,
delete the file and re-run evaluate.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from imgpipe.core.atomic_write import write_json
from imgpipe.core.errors import StageError
from imgpipe.core.params import Evaluate
from imgpipe.evaluation.scoring import DIGITS

# Numbers compared as rounded in metrics.json; a hair of float noise must not fail a check.
TOLERANCE = 1e-9
# The top-level figures of metrics.json a blessed record keeps (per-class ones stay in git history).
RECORDED = ("accuracy", "loss", "macro_f1", "weighted_f1", "roc_auc", "average_precision", "num_test")


# -- the pure core ---------------------------------------------------------------------------


def judge(metrics: dict, p: Evaluate, baseline: dict | None, test_set: str) -> dict:
    """metrics.json's `gate`: {verdict, checks: [{name, value, threshold, passed, detail}]}."""
    checks = [_min_accuracy(metrics, p), _min_class_recall(metrics, p), _max_drop(metrics, p, baseline, test_set)]
    if all(c["passed"] for c in checks):
        verdict = "blessed"
    else:
        verdict = "failed" if p.gate_action == "fail" else "warned"
    return {"verdict": verdict, "checks": checks}


def _min_accuracy(metrics: dict, p: Evaluate) -> dict:
    value, threshold = metrics["accuracy"], p.min_accuracy
    passed = value >= threshold - TOLERANCE
    detail = (f"accuracy {value:.4f} >= {threshold:.4f}" if passed else
              f"accuracy {value:.4f} is {threshold - value:.4f} below the minimum {threshold:.4f} (evaluate.min_accuracy)")
    return {"name": "min_accuracy", "value": value, "threshold": threshold, "passed": passed, "detail": detail}


def _min_class_recall(metrics: dict, p: Evaluate) -> dict:
    # a class without test images has no recall to judge
    recalls = {name: s["recall"] for name, s in metrics["per_class"].items() if s["support"] > 0}
    threshold = p.min_class_recall
    worst = min(recalls, key=lambda name: (recalls[name], name))
    below = sorted((r, name) for name, r in recalls.items() if r < threshold - TOLERANCE)
    passed = not below
    if passed:
        detail = f"lowest class recall {recalls[worst]:.4f} ({worst}) >= {threshold:.4f}"
    else:
        shortfalls = ", ".join(f"{name} {r:.4f} ({threshold - r:.4f} below)" for r, name in below)
        detail = f"{len(below)} class(es) below the minimum recall {threshold:.4f} (evaluate.min_class_recall): {shortfalls}"
    return {"name": "min_class_recall", "value": recalls[worst], "class": worst, "threshold": threshold,
            "passed": passed, "detail": detail}


def _max_drop(metrics: dict, p: Evaluate, baseline: dict | None, test_set: str) -> dict:
    threshold = p.max_accuracy_drop
    if baseline is None:
        return {"name": "max_accuracy_drop", "value": 0.0, "threshold": threshold, "passed": True,
                "detail": "no blessed model to compare with yet"}
    before, now = baseline["metrics"]["accuracy"], metrics["accuracy"]
    drop = round(before - now, DIGITS)
    passed = drop <= threshold + TOLERANCE
    against = f"the last blessed model's {before:.4f} (md5 {baseline['md5']}, blessed {baseline['blessed_at']})"
    if baseline.get("test_set") != test_set:
        against += ", measured on a different test set"
    if passed:
        detail = f"accuracy {now:.4f} vs {against}: drop {max(drop, 0.0):.4f} <= {threshold:.4f}"
    else:
        detail = (f"accuracy {now:.4f} is {drop:.4f} below {against}, "
                  f"{drop - threshold:.4f} more than the allowed drop {threshold:.4f} (evaluate.max_accuracy_drop)")
    return {"name": "max_accuracy_drop", "value": drop, "threshold": threshold, "passed": passed,
            "baseline_md5": baseline["md5"], "detail": detail}


def message(gate: dict) -> str:
    """The failed checks, one per line, for the stage error or the warning."""
    failed = [c for c in gate["checks"] if not c["passed"]]
    return "model gate: " + "; ".join(c["detail"] for c in failed)


def baseline(records: list[dict], model_md5: str) -> dict | None:
    """The last blessed model other than this one (re-evaluating a model must not compare it with itself)."""
    others = [r for r in records if r["md5"] != model_md5]
    return others[-1] if others else None


def blessing(metrics: dict, model_path: str, model_md5: str, test_set: str, now: datetime.datetime) -> dict:
    return {
        "model": model_path,
        "md5": model_md5,
        "blessed_at": now.astimezone(datetime.timezone.utc).isoformat(timespec="seconds"),
        "test_set": test_set,
        "metrics": {key: metrics[key] for key in RECORDED if key in metrics},
    }


# -- I/O -------------------------------------------------------------------------------------


def read_blessed(path: str | Path) -> list[dict]:
    """The blessed models, oldest first; none when the file does not exist yet."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["blessed"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{path}: not a blessed-models file ({exc}); fix it or delete it to start afresh") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and {"md5", "metrics"} <= set(r) for r in records):
        raise StageError(f"{path}: 'blessed' must be a list of records with md5 and metrics; fix it or delete it")
    return records


def bless(path: str | Path, record: dict | None) -> bool:
    """Append `record` unless its model is already blessed; True when appended.

    With no record (a model not blessed) the file is still written when missing, empty: it is a
    stage output, which DVC expects to find after every run.
    """
    records = read_blessed(path)
    if record is None or any(r["md5"] == record["md5"] for r in records):
        if not Path(path).is_file():
            write_json(path, {"blessed": records})
        return False
    write_json(path, {"blessed": [*records, record]})
    return True

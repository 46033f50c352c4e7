"""Evaluate: the trained model on the test split, judged by the gate, reported, and exported.

Reads  <paths.model>, the test split of <paths.shards>/, <paths.reports>/train_log.csv,
       <paths.data_quality>/summary.json, and the original images of the worst mistakes (from
       ingest.source, for the gallery's thumbnails).
Writes <paths.reports>/metrics.json       accuracy, loss, macro/weighted F1, ROC AUC, average
                                          precision, per-class scores, the gate's verdict and checks
       <paths.reports>/confusion.csv      one row per test image: actual,predicted (class names)
       <paths.reports>/misclassified.csv  the worst mistakes first: path,id,true,predicted,confidence
       <paths.reports>/roc.csv, precision_recall.csv   the curves (see `ranking_scores`)
       <paths.reports>/evaluation/        index.html (the report), gallery.html + thumbnails, the
                                          plots as PNG, predictions.csv (every test image)
       <evaluate.export_dir>/             the model for predict and TF Serving (imgpipe/model/export.py)
       <evaluate.blessed_file>            one more record when the gate blesses the model (imgpipe/evaluation/gate.py)

The test split streams through the model in batches; only the class probabilities per image are
kept. The metrics are plain NumPy on those numbers (pure functions, tested on hand-computed cases).
A failing gate (gate_action: fail) fails the stage after every report is written, so the
reviewer can read why; the model is then neither exported nor blessed.
"""

from __future__ import annotations

import datetime
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from imgpipe.core.atomic_write import write_csv, write_json
from imgpipe.core.errors import StageError
from imgpipe.core.hashing import file_hexdigest
from imgpipe.core.params import Evaluate, Ingest, Paths
from imgpipe.core.runner import stage_main
from imgpipe.evaluation import gate
from imgpipe.evaluation.scoring import (DIGITS, confusion_matrix, ids_fingerprint, metrics_report, precision_recall_curve,
                                        ranking_report, ranking_scores, roc_curve, thin, worst_mistakes)
from imgpipe.model import export, shards
from imgpipe.model.inference import load_model, predict_split
from imgpipe.reports import evaluation as report

# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("evaluate", "paths", "ingest")
log = logging.getLogger(__name__)



def run(p: Evaluate, paths: Paths, ingest: Ingest) -> None:
    folder = Path(paths.shards)
    meta = shards.read_meta(folder)
    classes = meta["classes"]
    if not meta["counts"].get("test"):
        raise StageError(f"{folder}: the shards hold no test images")
    model_path = Path(paths.model)
    model = load_model(model_path, meta)

    predictions, probs = predict_split(model, folder, meta)
    labels = predictions["label"].to_numpy()
    metrics = metrics_report(labels, predictions["predicted"].to_numpy(), predictions["p_true"].to_numpy(), classes)
    scores, positive = ranking_scores(probs, labels)
    roc, pr = roc_curve(scores, positive), precision_recall_curve(scores, positive)
    metrics.update(ranking_report(roc, pr, positive))

    model_md5, test_set = file_hexdigest(model_path, "md5"), ids_fingerprint(predictions["id"])
    blessed = gate.read_blessed(p.blessed_file)
    metrics["gate"] = gate.judge(metrics, p, gate.baseline(blessed, model_md5), test_set)

    names = np.asarray(classes, dtype=object)
    named = pd.DataFrame({
        "path": predictions["path"],
        "id": predictions["id"],
        "true": names[labels],
        "predicted": names[predictions["predicted"]],
        "confidence": predictions["confidence"].astype(float).round(DIGITS),
    })
    mistakes = worst_mistakes(named, p.max_misclassified)
    reports = Path(paths.reports)
    write_json(reports / "metrics.json", metrics)
    write_csv(reports / "confusion.csv", named.rename(columns={"true": "actual"})[["actual", "predicted"]])
    write_csv(reports / "misclassified.csv", mistakes)
    write_csv(reports / "roc.csv", thin(roc))
    write_csv(reports / "precision_recall.csv", thin(pr))
    probabilities = pd.DataFrame(probs.astype(float).round(DIGITS), columns=[f"p_{c}" for c in classes])
    report.write(
        paths, p, ingest, metrics, classes,
        matrix=confusion_matrix(labels, predictions["predicted"].to_numpy(), len(classes)),
        curves=(roc, pr), predictions=pd.concat([named, probabilities], axis=1), mistakes=mistakes,
        model_md5=model_md5, train_log=Path(paths.train_log),
    )
    log.info(
        "%d test images: accuracy %.4f, loss %.4f, macro F1 %.4f; report: %s",
        metrics["num_test"], metrics["accuracy"], metrics["loss"], metrics["macro_f1"],
        reports / report.FOLDER / report.INDEX,
    )

    verdict = metrics["gate"]["verdict"]
    if verdict == "failed":
        raise StageError(f"{gate.message(metrics['gate'])}; report: {reports / report.FOLDER / report.INDEX}")
    if verdict == "warned":
        log.warning("%s (evaluate.gate_action: warn, so the run goes on; the model is not blessed)",
                    gate.message(metrics["gate"]))

    spec = export.preprocess_spec(meta, ingest.max_pixels)
    export.export(model, model_path, spec, Path(p.export_dir))
    log.info("exported to %s", p.export_dir)
    # last: a model is recorded as blessed only once everything about it has been written
    record = None
    if verdict == "blessed":
        record = gate.blessing(metrics, str(model_path), model_md5, test_set, datetime.datetime.now(datetime.timezone.utc))
    if gate.bless(p.blessed_file, record):
        log.info("model gate passed: blessed %s (md5 %s), recorded in %s", model_path, model_md5, p.blessed_file)


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())

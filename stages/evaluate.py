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
       <evaluate.blessed_file>            one more record when the gate blesses the model
                                          (imgpipe/evaluation/gate.py); written empty when missing

The test split streams through the model in batches; only the class probabilities per image are
kept. The metrics are scikit-learn's on those numbers (imgpipe/evaluation/scoring.py).
A failing gate (gate_action: fail) fails the stage after every report is written, so the
reviewer can read why; the model is then neither exported nor blessed.
"""

from __future__ import annotations

import datetime
import logging
import sys
from pathlib import Path

from imgpipe.core.atomic_write import write_csv, write_json
from imgpipe.core.errors import StageError
from imgpipe.core.hashing import file_hexdigest
from imgpipe.core.params import Evaluate, Ingest, Paths, Runtime
from imgpipe.core.runner import stage_main
from imgpipe.evaluation import gate, scoring
from imgpipe.model import export, shards
from imgpipe.model.inference import load_model, predict_split
from imgpipe.reports import evaluation as report

# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("evaluate", "paths", "ingest", "runtime")
log = logging.getLogger(__name__)
# under runtime.train_cache_dir: each test shard file's predictions, per model (imgpipe/model/inference.py)
PREDICTIONS = "predictions"


def run(p: Evaluate, paths: Paths, ingest: Ingest, runtime: Runtime | None = None) -> None:
    folder = Path(paths.shards)
    meta = shards.read_meta(folder)
    classes = meta["classes"]
    if not meta["counts"].get("test"):
        raise StageError(f"{folder}: the shards hold no test images")
    model_path = Path(paths.model)
    model = load_model(model_path, meta)
    model_md5 = file_hexdigest(model_path, "md5")

    cache = Path(runtime.train_cache_dir) / PREDICTIONS if runtime and runtime.train_cache_dir else None
    predictions, probs = predict_split(model, folder, meta, cache=cache, model_digest=model_md5)
    labels, predicted = predictions["label"].to_numpy(), predictions["predicted"].to_numpy()
    metrics = scoring.metrics_report(labels, predicted, predictions["p_true"].to_numpy(), classes)
    roc, pr, areas = scoring.ranking(probs, labels)
    metrics.update(areas)

    test_set = scoring.ids_fingerprint(predictions["id"])
    baseline = gate.baseline(gate.read_blessed(p.blessed_file), model_md5)
    metrics["gate"] = gate.judge(metrics, p, baseline, test_set)

    table = scoring.prediction_table(predictions, probs, classes)
    mistakes = scoring.worst_mistakes(table, p.max_misclassified)
    reports = Path(paths.reports)
    write_json(reports / "metrics.json", metrics)
    write_csv(reports / "confusion.csv", table.rename(columns={"true": "actual"})[["actual", "predicted"]])
    write_csv(reports / "misclassified.csv", mistakes)
    write_csv(reports / "roc.csv", scoring.thin(roc))
    write_csv(reports / "precision_recall.csv", scoring.thin(pr))
    report.write(
        paths, p, ingest, metrics, classes,
        matrix=scoring.confusion_matrix(labels, predicted, len(classes)),
        curves=(roc, pr), predictions=table, mistakes=mistakes,
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

"""train.run and evaluate.run on real MNIST digits written into real shards.

Three digits (0, 1, 7), 100 training images each, MobileNet 0.25 with the shared ImageNet
weights at 64 pixels: training takes a few seconds and reaches about 0.98 test accuracy, so
the thresholds below leave a wide margin.
"""

import csv
import gzip
import hashlib
import json
import math
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from imgpipe.core.runner import run_stage
from stages import evaluate
from stages import train
from imgpipe.model import training
from imgpipe.core.errors import StageError
from imgpipe.core.params import Preprocess, params_from_dict
from imgpipe.model import shards
from imgpipe.model.shards import ShardWriter
from tests.model.mnist_run import PLAIN_RECIPE

# trains a real model: `make test-fast` leaves it out
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MNIST = ROOT.parent / "shared" / "datasets" / "mnist-t10k"
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
DIGITS = (0, 1, 7)
CLASSES = [str(d) for d in DIGITS]
PER_CLASS = {"train": 100, "val": 20, "test": 30}
# Test images of digit 0 deliberately labelled 1: a trained model calls them 0, confidently.
MISLABELLED = 3


def read_mnist() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(MNIST / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def write_shards(folder: Path, per_class: dict[str, int]) -> dict[str, list[tuple[str, int]]]:
    """Shards of MNIST digits as preprocess writes them (grey, 28x28, unit range); returns (id, label) per split."""
    images, labels = read_mnist()
    folder.mkdir(parents=True)
    indices = {d: iter(np.flatnonzero(labels == d)) for d in DIGITS}
    meta = {
        "height": 28, "width": 28, "channels": 1, "dtype": "float16", "classes": CLASSES,
        "counts": {}, "class_counts": {}, "files": {}, "mean": None, "std": None,
        "preprocess": shards.pixel_params(Preprocess(colour_mode="grey", size=(28, 28), normalization="unit")),
    }
    written = {}
    for split, n in per_class.items():
        written[split] = []
        with ShardWriter(folder, split, per_shard=64) as writer:
            for label, digit in enumerate(DIGITS):
                for _ in range(n):
                    i = next(indices[digit])
                    if split == "test" and digit == 0 and len(written[split]) < MISLABELLED:
                        label = CLASSES.index("1")
                    image_id = hashlib.sha1(images[i].tobytes()).hexdigest()
                    writer.write(images[i][..., None] / 255.0, label, image_id, f"mnist/t10k/{i}.png")
                    written[split].append((image_id, label))
                    label = CLASSES.index(str(digit))
        meta["counts"][split] = writer.count
        meta["class_counts"][split] = {c: sum(1 for _, l in written[split] if l == k) for k, c in enumerate(CLASSES)}
        meta["files"][split] = writer.files
    (folder / "meta.json").write_text(json.dumps(meta))
    return written


def write_rebalance(folder: Path, train_ids: list[tuple[str, int]], method="none", copies=None, class_weight=None):
    """plan.json and copies.csv as the rebalance stage writes them; `copies` maps a label to its copies."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = copies or {}
    plan = {"method": method, "class_weight": class_weight, "counts_before": {}, "counts_after": {}}
    (folder / "plan.json").write_text(json.dumps(plan))
    with (folder / "copies.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "label", "copies"])
        for image_id, label in train_ids:
            out.writerow([image_id, CLASSES[label], copies.get(label, 1)])


def make_params(shards: Path, out: Path, rebalance: Path | None = None, **train_params):
    settings = {**PLAIN_RECIPE, "backbone": "mobilenet", "weights": str(WEIGHTS), "backbone_size": 64, "epochs": 2, "batch_size": 32, "learning_rate": 0.01}
    return params_from_dict(
        {
            "paths": {
                "shards": str(shards),
                "rebalance": str(rebalance or out / "rebalance"),
                "model": str(out / "models" / "model.keras"),
                "warm_start": str(out / "warm_start"),
                "reports": str(out / "reports"),
                "train_log": str(out / "reports" / "train_log.csv"),
            },
            "train": {**settings, **train_params},
            "runtime": {"train_cache_dir": str(out / "cache")},
            "evaluate": {"max_misclassified": 200, "export_dir": str(out / "export"), "blessed_file": str(out / "blessed.json")},
        }
    )


def shard_data(tmp_path_factory, per_class: dict) -> tuple[Path, dict]:
    """A folder with shards of `per_class` images per split and their rebalance plan; (folder, written)."""
    folder = tmp_path_factory.mktemp("data")
    written = write_shards(folder / "shards", per_class)
    write_rebalance(folder / "rebalance", written["train"])
    return folder, written


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shard_data(tmp_path_factory, PER_CLASS)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One real train + evaluate run, inspected by several tests."""
    folder, written = data
    params = make_params(folder / "shards", tmp_path_factory.mktemp("run"), rebalance=folder / "rebalance")
    train.run(params.train, params.paths, params.base, params.runtime)
    evaluate.run(params.evaluate, params.paths, params.ingest)
    return params, written


def test_model_is_saved_and_reloads(trained):
    params, _ = trained
    model_path = Path(params.paths.model)
    model = keras.saving.load_model(model_path, safe_mode=True)
    assert model.predict_on_batch(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, len(CLASSES))
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["model.keras"]
    reports = Path(params.paths.reports)
    assert sorted(p.name for p in reports.iterdir()) == [
        "confusion.csv", "evaluation", "metrics.json", "misclassified.csv", "precision_recall.csv", "roc.csv", "train_log.csv"
    ]


def test_train_log_has_one_row_per_epoch(trained):
    params, _ = trained
    log = pd.read_csv(params.paths.train_log)
    assert list(log.columns) == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss", "learning_rate", "phase"]
    assert log["epoch"].tolist() == list(range(params.train.epochs))
    assert log["loss"].iloc[-1] < log["loss"].iloc[0]
    assert (log["phase"] == "head").all() and log["learning_rate"].tolist() == pytest.approx([params.train.learning_rate] * 2)


def test_metrics_are_complete_and_well_above_chance(trained):
    params, _ = trained
    metrics = json.loads((Path(params.paths.reports) / "metrics.json").read_text())
    assert set(metrics) == {"accuracy", "loss", "macro_f1", "weighted_f1", "num_test", "per_class", "roc_auc", "average_precision", "gate"}
    assert metrics["num_test"] == len(CLASSES) * PER_CLASS["test"]
    # chance is 1/3; the three mislabelled images cap accuracy at 87/90
    assert metrics["accuracy"] > 0.85
    assert metrics["macro_f1"] > 0.85
    assert metrics["loss"] < 1.0
    assert {name: m["support"] for name, m in metrics["per_class"].items()} == {"0": 27, "1": 33, "7": 30}


def test_confusion_has_one_row_per_test_image_and_agrees_with_metrics(trained):
    params, _ = trained
    reports = Path(params.paths.reports)
    confusion = pd.read_csv(reports / "confusion.csv", dtype=str)
    metrics = json.loads((reports / "metrics.json").read_text())
    assert list(confusion.columns) == ["actual", "predicted"]
    assert len(confusion) == metrics["num_test"]
    assert set(confusion["actual"]) | set(confusion["predicted"]) <= set(CLASSES)
    assert (confusion["actual"] == confusion["predicted"]).mean() == pytest.approx(metrics["accuracy"], abs=1e-6)


def test_misclassified_lists_the_wrong_predictions_worst_first(trained):
    params, written = trained
    reports = Path(params.paths.reports)
    wrong = pd.read_csv(reports / "misclassified.csv", dtype={"true": str, "predicted": str})
    confusion = pd.read_csv(reports / "confusion.csv", dtype=str)
    assert list(wrong.columns) == ["path", "id", "true", "predicted", "confidence"]
    assert len(wrong) == (confusion["actual"] != confusion["predicted"]).sum()
    assert (wrong["true"] != wrong["predicted"]).all()
    assert wrong["confidence"].is_monotonic_decreasing
    # the deliberately mislabelled zeros are found and called 0
    mislabelled = {image_id for image_id, _ in written["test"][:MISLABELLED]}
    found = wrong[wrong["id"].isin(mislabelled)]
    assert len(found) == MISLABELLED
    assert (found["true"] == "1").all() and (found["predicted"] == "0").all()


def test_evaluate_is_deterministic_and_caps_the_mistakes_listed(trained, tmp_path):
    params, _ = trained
    reports = Path(params.paths.reports)
    capped = params_from_dict(
        {"paths": {**vars(params.paths), "reports": str(tmp_path)}, "evaluate": {**vars(params.evaluate), "max_misclassified": 2}}
    )
    evaluate.run(capped.evaluate, capped.paths, capped.ingest)
    assert (tmp_path / "metrics.json").read_bytes() == (reports / "metrics.json").read_bytes()
    assert (tmp_path / "confusion.csv").read_bytes() == (reports / "confusion.csv").read_bytes()
    full = (reports / "misclassified.csv").read_text().splitlines()
    assert (tmp_path / "misclassified.csv").read_text().splitlines() == full[:3]  # header + the worst two


def test_copies_set_the_images_and_steps_of_an_epoch(data):
    folder, written = data
    shards = folder / "shards"
    meta = json.loads((shards / "meta.json").read_text())
    # oversample digit 0 three times, keep 1 once, drop 7
    copies = {image_id: {0: 3, 1: 1, 2: 0}[label] for image_id, label in written["train"]}
    params = make_params(shards, folder, batch_size=32)
    ds = training.training_dataset(shards, meta, copies, params.train, seed=0)
    expected_steps = math.ceil((3 * 100 + 100) / 32)
    assert int(ds.cardinality()) == expected_steps  # what Keras counts as the steps of an epoch
    labels = np.concatenate([batch_labels for _, batch_labels in ds.as_numpy_iterator()])
    assert sum(1 for _ in ds) == expected_steps
    assert np.bincount(labels, minlength=3).tolist() == [300, 100, 0]


def test_class_weight_reaches_the_loss(data, tmp_path):
    # Weighing 7 a thousand times less than the others leaves the model no reason to learn it:
    # with the weights really applied, 7s are then hardly ever predicted.
    folder, written = data
    write_rebalance(tmp_path / "rebalance", written["train"], "class_weight", class_weight={"0": 1.0, "1": 1.0, "7": 0.001})
    params = make_params(folder / "shards", tmp_path, epochs=1)
    train.run(params.train, params.paths, params.base, params.runtime)
    evaluate.run(params.evaluate, params.paths, params.ingest)
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["per_class"]["7"]["recall"] < 0.5
    assert metrics["per_class"]["0"]["recall"] > 0.8 and metrics["per_class"]["1"]["recall"] > 0.8


def test_trains_without_a_validation_split(tmp_path):
    written = write_shards(tmp_path / "shards", {"train": 20, "val": 0, "test": 5})
    write_rebalance(tmp_path / "rebalance", written["train"])
    params = make_params(tmp_path / "shards", tmp_path, epochs=1, backbone_size=32)
    train.run(params.train, params.paths, params.base, params.runtime)
    log = pd.read_csv(tmp_path / "reports" / "train_log.csv")
    # the validation columns stay, marked NA, so the log's layout never changes
    assert list(log.columns) == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss", "learning_rate", "phase"]
    assert len(log) == 1
    assert log[["val_accuracy", "val_loss"]].isna().all(axis=None)


def test_missing_inputs_are_stage_errors_naming_them(data, tmp_path):
    folder, written = data
    with pytest.raises(StageError, match="meta.json"):
        run_stage(train, make_params(tmp_path / "no-shards", tmp_path))
    with pytest.raises(StageError, match=str(tmp_path / "rebalance" / "plan.json")):
        run_stage(train, make_params(folder / "shards", tmp_path))
    write_rebalance(tmp_path / "rebalance", written["train"][:-1])
    with pytest.raises(StageError, match="lists 299 training images but the shards hold 300"):
        run_stage(train, make_params(folder / "shards", tmp_path))
    with pytest.raises(StageError, match=str(tmp_path / "models" / "model.keras")):
        run_stage(evaluate, make_params(folder / "shards", tmp_path))


def test_evaluate_with_the_same_model_again_predicts_only_files_it_has_not_seen(trained, caplog):
    """runtime.train_cache_dir keeps each test file's predictions per model: a second evaluate
    with the same model reads them; the numbers are those the model gives."""
    import logging

    from imgpipe.model.inference import load_model, predict_split

    params, _ = trained
    reports = Path(params.paths.reports)
    with caplog.at_level(logging.INFO, logger="imgpipe.model.inference"):
        evaluate.run(params.evaluate, params.paths, params.ingest, params.runtime)
        first = (reports / "confusion.csv").read_text(), (reports / "evaluation" / "predictions.csv").read_text()
        assert "predictions: 2 of 2 test files computed" in caplog.text, caplog.text
        caplog.clear()
        evaluate.run(params.evaluate, params.paths, params.ingest, params.runtime)
        assert "predictions: 0 of 2 test files computed" in caplog.text, caplog.text
    assert ((reports / "confusion.csv").read_text(), (reports / "evaluation" / "predictions.csv").read_text()) == first

    folder = Path(params.paths.shards)
    meta = shards.read_meta(folder)
    model = load_model(Path(params.paths.model), meta)
    cached, cached_probs = predict_split(model, folder, meta, cache=Path(params.runtime.train_cache_dir) / evaluate.PREDICTIONS,
                                         model_digest=training_md5(params))
    fresh, fresh_probs = predict_split(model, folder, meta)
    np.testing.assert_array_equal(cached_probs, fresh_probs)
    pd.testing.assert_frame_equal(cached, fresh)
    assert len(fresh) == sum(PER_CLASS["test"] for _ in DIGITS)


def training_md5(params) -> str:
    return hashlib.md5(Path(params.paths.model).read_bytes()).hexdigest()

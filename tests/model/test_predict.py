"""predict on real photos: the labels evaluate recorded, bad files reported, unsafe models refused,
and the TF Serving SavedModel (preprocessing in TensorFlow ops) agreeing with both.

One real preprocess -> rebalance -> train -> evaluate run on flower photos (RGB, blurred,
standardised with the training split's mean and std, so predict must apply all three as the
preprocess stage did), then predict on the test photos' files.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from imgpipe.core.runner import run_stage
from stages import evaluate
from stages import preprocess
from stages import rebalance
from stages import train
from imgpipe.core.params import params_from_dict
from tests.model.mnist_run import PLAIN_RECIPE

# trains a real model: `make test-fast` leaves it out
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FLOWERS = ROOT.parent / "shared" / "datasets" / "flowers5-128px" / "flowers"
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
IMGPIPE = Path(sys.executable).with_name("imgpipe")  # the installed command, run as a user runs it
CLASSES = ("daisy", "rose", "tulip")
PER_CLASS = {"train": 20, "val": 5, "test": 8}


@pytest.fixture(scope="module")
def flowers_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowers-run")
    rows = []
    for label in CLASSES:
        files = iter(sorted((FLOWERS / label).glob("*.jpg")))
        for split, n in PER_CLASS.items():
            for _ in range(n):
                f = next(files)
                rows.append({"id": hashlib.sha1(f.read_bytes()).hexdigest(), "label": label,
                             "path": f"{label}/{f.name}", "format": "jpeg", "split": split})
    pd.DataFrame(rows).to_csv(root / "split.csv", index=False)
    params = params_from_dict({
        "paths": {"split": str(root / "split.csv"), "shards": str(root / "shards"), "rebalance": str(root / "rebalance"),
                  "model": str(root / "models" / "model.keras"), "reports": str(root / "reports"),
                  "train_log": str(root / "reports" / "train_log.csv"),
                  "data_quality": str(root / "reports" / "data_quality")},
        "ingest": {"source": str(FLOWERS), "layout": "folders"},
        "preprocess": {"colour_mode": "rgb", "size": [48, 48], "blur_kernel": 3, "normalization": "standardize",
                       "standardize_scope": "dataset"},
        "train": {**PLAIN_RECIPE, "backbone": "mobilenet", "weights": str(WEIGHTS), "backbone_size": 64, "epochs": 4,
                  "batch_size": 16, "learning_rate": 0.01},
        "runtime": {"train_cache_dir": str(root / "cache")},
        "evaluate": {"export_dir": str(root / "models" / "export"), "blessed_file": str(root / "models" / "blessed.json")},
    })
    for stage in (preprocess, rebalance, train, evaluate):
        run_stage(stage, params)
    recorded = pd.read_csv(root / "reports" / "evaluation" / "predictions.csv")
    return params, recorded


def run_predict(*argv) -> tuple[int, str, str]:
    done = subprocess.run([IMGPIPE, "predict", *map(str, argv)], capture_output=True, text=True, check=False)
    return done.returncode, done.stdout, done.stderr


def test_predict_gives_the_labels_and_probabilities_evaluate_recorded(flowers_run, tmp_path):
    params, recorded = flowers_run
    files = [FLOWERS / path for path in recorded["path"]]
    code, _, err = run_predict("--model", params.evaluate.export_dir, "--output", tmp_path / "p.csv", *files)
    assert code == 0, err
    got = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert list(got.columns) == ["path", "label", "confidence", "p_daisy", "p_rose", "p_tulip", "error"]
    assert got["path"].tolist() == [str(f) for f in files]
    assert got["label"].tolist() == recorded["predicted"].tolist()
    probs = [f"p_{c}" for c in CLASSES]
    np.testing.assert_allclose(got[probs].to_numpy(), recorded[probs].to_numpy(), atol=2e-6)  # both rounded to 6 digits
    # a model that called everything one class would make equal labels prove little
    assert recorded["predicted"].nunique() > 1


def test_bad_files_get_a_message_and_the_others_still_get_predictions(flowers_run, tmp_path):
    params, recorded = flowers_run
    folder = tmp_path / "inbox"
    (folder / "sub").mkdir(parents=True)
    good = [FLOWERS / recorded["path"][0], FLOWERS / recorded["path"][1]]
    shutil.copy(good[0], folder / "a.jpg")
    shutil.copy(good[1], folder / "sub" / "b.jpg")
    (folder / "notes.jpg").write_text("not an image at all")
    (folder / "cut.jpg").write_bytes(good[0].read_bytes()[:600])
    (folder / "empty.png").write_bytes(b"")
    (folder / ".hidden.jpg").write_text("ignored")
    code, out, err = run_predict("--model", params.evaluate.export_dir, "--format", "json", folder,
                                 tmp_path / "missing.jpg")
    assert code == 1
    results = {Path(r["path"]).name: r for r in json.loads(out)}
    assert set(results) == {"a.jpg", "b.jpg", "cut.jpg", "empty.png", "notes.jpg", "missing.jpg"}
    for name, source in (("a.jpg", recorded.iloc[0]), ("b.jpg", recorded.iloc[1])):
        assert results[name]["error"] == "" and results[name]["label"] == source["predicted"]
        assert sum(results[name]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    for name in ("cut.jpg", "empty.png", "notes.jpg", "missing.jpg"):
        assert results[name]["label"] == "" and results[name]["error"]
        assert f"{name}: skipped, " in err
    assert "not an image" in results["notes.jpg"]["error"] or "unknown" in results["notes.jpg"]["error"]
    assert "No such file" in results["missing.jpg"]["error"]
    assert "4 of 6 file(s) got no prediction" in err


def test_table_output_is_one_line_per_predicted_file(flowers_run):
    params, recorded = flowers_run
    code, out, _ = run_predict("--model", params.evaluate.export_dir, FLOWERS / recorded["path"][0])
    assert code == 0
    path, label, confidence = out.split()
    assert label == recorded["predicted"][0] and float(confidence) == pytest.approx(recorded["confidence"][0], abs=1e-4)


def test_saved_model_takes_raw_files_and_agrees_with_predict(flowers_run):
    params, recorded = flowers_run
    served = tf.saved_model.load(str(Path(params.evaluate.export_dir) / "saved_model"))
    files = [(FLOWERS / path).read_bytes() for path in recorded["path"]]
    out = served.serve(tf.constant(files))
    # OpenCV's fixed-point blur and resize differ from TensorFlow's by a grey level on a few
    # pixels: probabilities move by a hundredth at most (measured: 0.016)...
    expected = recorded[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=0.03)
    # ... so the label is the same wherever the top two classes are further apart than that
    top_two = np.sort(expected, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 0.06
    labels = np.array([label.decode() for label in out["label"].numpy()])
    assert clear.sum() >= len(clear) // 2
    assert (labels[clear] == recorded["predicted"].to_numpy()[clear]).all()
    assert "serving_default" in served.signatures


def test_model_file_with_code_in_it_is_refused(flowers_run, tmp_path):
    params, _ = flowers_run
    export = tmp_path / "export"
    shutil.copytree(params.evaluate.export_dir, export, ignore=shutil.ignore_patterns("saved_model"))
    inputs = keras.Input((48, 48, 3))
    outputs = keras.layers.Lambda(lambda x: x[:, 0, 0, :])(inputs)  # a Lambda layer holds Python code
    keras.Model(inputs, outputs).save(export / "model.keras")
    code, _, err = run_predict("--model", export, sorted((FLOWERS / "daisy").glob("*.jpg"))[0])
    assert code == 2
    assert f"{export / 'model.keras'}: cannot load the model safely" in err and "safe_mode" in err


def test_missing_export_is_a_clear_error(tmp_path):
    code, _, err = run_predict("--model", tmp_path / "nowhere", tmp_path)
    assert code == 2 and "no files in" in err
    (tmp_path / "x.jpg").write_bytes(b"x")
    code, _, err = run_predict("--model", tmp_path / "nowhere", tmp_path / "x.jpg")
    assert code == 2 and f"{tmp_path / 'nowhere' / 'preprocess.json'} not found" in err

"""A model with a TF Hub backbone (a TFSMLayer, which Keras loads only outside safe mode) through
train, evaluate and predict: evaluate loads it and says why, predict only with --trust-model, and
a moved SavedModel is an error naming it.

The "TF Hub module" is a tiny SavedModel the tests export themselves (test_model.TinyHubModel: RGB
in [0, 1] -> 8 features, as tfhub.dev image feature vectors), so nothing is downloaded; a few
MNIST digits, one epoch at 32 pixels: seconds.
"""

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from stages import evaluate
from imgpipe.model import inference
from imgpipe.model import loading
from imgpipe.model import shards
from stages import train
from imgpipe.core.errors import StageError
from imgpipe.model.export import MODEL, PREPROCESS
from imgpipe.model.builder import build
from imgpipe.core.params import Train
from tests.model.test_model import TinyHubModel
from tests.model.test_train_evaluate import CLASSES, make_params, read_mnist, write_rebalance, write_shards

IMGPIPE = Path(sys.executable).with_name("imgpipe")  # the installed command, run as a user runs it

# trains a real model: `make test-fast` leaves it out
pytestmark = pytest.mark.slow

PER_CLASS = {"train": 20, "val": 5, "test": 8}
SIZE = 32  # the hub module's input size (train.backbone_size)


def save_hub_module(folder: Path) -> None:
    module = TinyHubModel(SIZE)
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory):
    """(params, the hub SavedModel folder) of one real train + evaluate run with a hub backbone."""
    root = tmp_path_factory.mktemp("hub-run")
    save_hub_module(root / "hub")
    written = write_shards(root / "shards", PER_CLASS)
    write_rebalance(root / "rebalance", written["train"])
    params = make_params(root / "shards", root, rebalance=root / "rebalance", backbone="hub",
                         hub_handle=str(root / "hub"), backbone_size=SIZE, weights="none", epochs=1)
    train.run(params.train, params.paths, params.base, params.runtime)
    evaluate.run(params.evaluate, params.paths, params.ingest)
    return params, root / "hub"


def run_predict(*argv) -> tuple[int, str, str]:
    """`imgpipe predict`, run as a user runs it; stderr keeps predict's own lines (TensorFlow logs
    a few lines of its own when it starts, whatever TF_CPP_MIN_LOG_LEVEL says)."""
    done = subprocess.run([IMGPIPE, "predict", *map(str, argv)], capture_output=True, text=True, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    own = "".join(line + "\n" for line in done.stderr.splitlines() if line.startswith("predict:"))
    return done.returncode, done.stdout, own


def test_evaluate_loads_the_hub_model_and_says_why(hub_run, caplog):
    params, hub = hub_run
    metrics = json.loads((Path(params.paths.reports) / "metrics.json").read_text())
    assert metrics["num_test"] == len(CLASSES) * PER_CLASS["test"]
    export = Path(params.evaluate.export_dir)
    assert (export / MODEL).is_file() and (export / "saved_model" / "saved_model.pb").is_file()
    # the saved model refers to the SavedModel by its (absolute) path
    assert loading.savedmodel_paths(params.paths.model) == [str(hub)]
    caplog.set_level(logging.INFO)
    inference.load_model(Path(params.paths.model), shards.read_meta(params.paths.shards))
    (line,) = [r.getMessage() for r in caplog.records if "safe_mode=False" in r.getMessage()]
    assert "TF Hub" in line and str(hub) in line


def test_predict_refuses_the_hub_model_without_trust_model(hub_run, tmp_path):
    params, _ = hub_run
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.zeros((28, 28), np.uint8))
    export = Path(params.evaluate.export_dir)
    code, out, err = run_predict("--model", export, image)
    assert code == 2 and out == ""
    assert err.count("\n") == 1  # one line
    assert err.startswith(f"predict: error: {export / MODEL} holds a TF Hub SavedModel layer")
    assert "--trust-model" in err


def test_predict_with_trust_model_gives_the_probabilities_evaluate_recorded(hub_run, tmp_path):
    params, _ = hub_run
    recorded = pd.read_csv(Path(params.paths.reports) / "evaluation" / "predictions.csv", dtype={"predicted": str})
    # the test digits as PNG files: their pixels / 255 are the shards' pixels
    images, _ = read_mnist()
    by_id = {hashlib.sha1(image.tobytes()).hexdigest(): image for image in images}
    files = []
    for image_id in recorded["id"]:
        files.append(tmp_path / f"{image_id}.png")
        cv2.imwrite(str(files[-1]), by_id[image_id])
    code, _, err = run_predict("--trust-model", "--model", params.evaluate.export_dir,
                               "--output", tmp_path / "p.csv", *files)
    assert code == 0, err
    got = pd.read_csv(tmp_path / "p.csv", keep_default_na=False, dtype={"label": str})
    assert got["label"].tolist() == recorded["predicted"].tolist()
    probs = [f"p_{c}" for c in CLASSES]
    np.testing.assert_allclose(got[probs].to_numpy(), recorded[probs].to_numpy(), atol=2e-6)  # both rounded


def test_a_moved_savedmodel_is_an_error_naming_it(hub_run, tmp_path):
    params, _ = hub_run
    save_hub_module(tmp_path / "hub")
    model = build(len(CLASSES), (28, 28, 1), Train(backbone="hub", hub_handle=str(tmp_path / "hub"), backbone_size=SIZE),
                  "unit").model
    export = tmp_path / "export"
    export.mkdir()
    model.save(export / MODEL)
    shutil.copyfile(Path(params.evaluate.export_dir) / PREPROCESS, export / PREPROCESS)
    assert loading.load(export / MODEL, trust=True).output_shape == (None, len(CLASSES))
    shutil.move(tmp_path / "hub", tmp_path / "moved")

    message = f"the SavedModel {tmp_path / 'hub'}, is not there"
    with pytest.raises(StageError, match=message):
        inference.load_model(export / MODEL, shards.read_meta(params.paths.shards))
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.zeros((28, 28), np.uint8))
    code, _, err = run_predict("--trust-model", "--model", export, image)
    assert code == 2 and err.count("\n") == 1
    assert f"{export / MODEL}: its TF Hub backbone, {message}" in err


def test_a_hub_model_holding_python_code_is_refused_even_when_trusted(tmp_path):
    save_hub_module(tmp_path / "hub")
    inputs = keras.Input((SIZE, SIZE, 3))
    features = keras.layers.TFSMLayer(str(tmp_path / "hub"), call_endpoint="serving_default")(inputs)
    outputs = keras.layers.Lambda(lambda x: x * 2)(features["feature_vector"])  # a Lambda layer holds Python code
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    with pytest.raises(StageError, match="holds Python code \\(Lambda"):
        loading.load(tmp_path / "model.keras", trust=True)


def test_the_embedding_cache_of_a_hub_backbone_is_computed_here_even_on_dask(tmp_path, caplog):
    """A TFSMLayer loads a SavedModel from this machine's disk, so a Dask worker could not rebuild
    the extractor from its config: the stage computes the features itself and says so, and starts
    no cluster."""
    from imgpipe.data.parallel import Batches
    from imgpipe.model import feature_cache

    save_hub_module(tmp_path / "hub")
    written = write_shards(tmp_path / "shards", {"train": 2})
    meta = shards.read_meta(tmp_path / "shards")
    clf = build(len(CLASSES), (meta["height"], meta["width"], meta["channels"]),
                Train(backbone="hub", hub_handle=str(tmp_path / "hub"), backbone_size=SIZE, weights="none"),
                meta["preprocess"]["normalization"])
    assert feature_cache.portable(clf.extractor) is None
    ids = np.array([i.encode() for i, _ in written["train"]], feature_cache.ID_DTYPE)
    with Batches("dask", 2) as runner, caplog.at_level(logging.INFO):
        cache = feature_cache.update(tmp_path / "c.npy", clf.extractor, tmp_path / "shards", meta, ("train",), ids, 4,
                                     runner)
        assert runner._client is None and runner._cluster is None
    assert "a TF Hub backbone is not rebuilt on Dask workers; computing here" in caplog.text
    assert len(cache) == len(ids) == 2 * len(CLASSES) and cache.gather(cache.rows(ids)).shape == (len(ids), 8)

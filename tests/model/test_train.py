"""train.run beyond one plain run: the streaming input, the embedding cache, the callbacks, two
phases, and resuming, after an exception and after a real SIGKILL of `python -m stages.train`."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import yaml

from imgpipe.core.runner import run_stage
from stages import train
from imgpipe.model import training
from tests.model.test_train_evaluate import ROOT, make_params, shard_data

# trains a real model: `make test-fast` leaves it out
pytestmark = pytest.mark.slow

# MNIST 0, 1 and 7: few images, so that each run takes seconds
PER_CLASS = {"train": 30, "val": 10, "test": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shard_data(tmp_path_factory, PER_CLASS)


def params_for(data, out: Path, **train_params):
    folder, _ = data
    return make_params(folder / "shards", out, rebalance=folder / "rebalance", **train_params)


def read_log(params) -> pd.DataFrame:
    return pd.read_csv(params.paths.train_log)


def epoch_labels(ds) -> np.ndarray:
    return np.concatenate([labels for _, labels in ds.as_numpy_iterator()])


def test_stream_is_reproducible_reshuffled_every_epoch_and_complete(data):
    folder, written = data
    shards = folder / "shards"
    meta = json.loads((shards / "meta.json").read_text())
    copies = {image_id: 1 for image_id, _ in written["train"]}
    params = params_for(data, folder, batch_size=16, shuffle_buffer=32)
    ds = training.training_dataset(shards, meta, copies, params.train, seed=3)
    first, second = epoch_labels(ds), epoch_labels(ds)
    np.testing.assert_array_equal(first, epoch_labels(training.training_dataset(shards, meta, copies, params.train, 3)))
    assert not np.array_equal(first, second)
    assert np.bincount(first).tolist() == np.bincount(second).tolist() == [30, 30, 30]
    fast = params_for(data, folder, batch_size=16, deterministic=False).train
    assert np.bincount(epoch_labels(training.training_dataset(shards, meta, copies, fast, 3))).tolist() == [30, 30, 30]


def test_head_trains_on_cached_features_computed_once(data, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    params = params_for(data, tmp_path, epochs=1)
    train.run(params.train, params.paths, params.base, params.runtime)
    (cache_file,) = (tmp_path / "cache" / "embeddings").glob("*.npy")
    assert len(np.load(cache_file, mmap_mode="r")) == 3 * (PER_CLASS["train"] + PER_CLASS["val"])
    assert json.loads(cache_file.with_suffix(".json").read_text())["backbone"] == "mobilenet"
    assert "computing 120" in caplog.text
    # a head-only variation computes nothing; the saved model is still the whole classifier
    caplog.clear()
    run_stage(train, params_for(data, tmp_path, epochs=1, learning_rate=0.02, dropout=0.5))
    assert "computing 0" in caplog.text
    model = keras.saving.load_model(tmp_path / "models" / "model.keras", safe_mode=True)
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 3)
    assert not (tmp_path / "cache" / "runs").exists() or not any((tmp_path / "cache" / "runs").iterdir())


def fitted_models(monkeypatch) -> list[list[str]]:
    """The layer names of each model train compiles (one per phase), recorded as it runs."""
    seen, compile_for_training = [], training.compile_for_training

    def spy(model, *args):
        seen.append([layer.name for layer in model.layers])
        compile_for_training(model, *args)

    monkeypatch.setattr(training, "compile_for_training", spy)
    return seen


def test_augmentation_in_phase1_beyond_flips_bypasses_the_cache(data, tmp_path, monkeypatch):
    seen = fitted_models(monkeypatch)
    run_stage(train, params_for(data, tmp_path, epochs=1, backbone_size=32, augment_flip="horizontal",
                                augment_rotation=10.0))
    assert not (tmp_path / "cache" / "embeddings").exists()
    assert len(seen) == 1 and "augment" in seen[0]


def test_a_flip_in_phase1_trains_the_head_on_cached_features_of_both_views(data, tmp_path, monkeypatch, caplog):
    """The default photo training (a flip in phase 1): the images' features and their flips' are
    cached, the flips' for the training images only, and the head trains on them."""
    caplog.set_level(logging.INFO)
    seen = fitted_models(monkeypatch)
    params = params_for(data, tmp_path, epochs=2, backbone_size=32, augment_flip="horizontal")
    train.run(params.train, params.paths, params.base, params.runtime)
    assert seen == [["features", "dropout", "classes"]]
    views = {tuple(json.loads(f.with_suffix(".json").read_text()).get("view", ())): len(np.load(f, mmap_mode="r"))
             for f in (tmp_path / "cache" / "embeddings").glob("*.npy")}
    assert views == {(): 3 * (PER_CLASS["train"] + PER_CLASS["val"]), (1,): 3 * PER_CLASS["train"]}
    assert "phase 1 on cached features of the images and of their horizontal flips" in caplog.text
    assert read_log(params)["phase"].tolist() == ["head", "head"]
    # a second run computes nothing
    caplog.clear()
    run_stage(train, params_for(data, tmp_path, epochs=1, backbone_size=32, augment_flip="horizontal",
                                learning_rate=0.01))
    assert caplog.text.count("computing 0") == 2


def test_augmentation_kept_for_fine_tuning_leaves_phase1_the_cache(data, tmp_path, monkeypatch):
    seen = fitted_models(monkeypatch)
    params = params_for(data, tmp_path, epochs=1, backbone_size=32, augment_flip="horizontal",
                        augment_in_phase1=False, fine_tune_layers=3, fine_tune_epochs=1)
    train.run(params.train, params.paths, params.base, params.runtime)
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.npy"))) == 1
    assert seen[0] == ["features", "dropout", "classes"]  # the head, on cached features
    assert "augment" in seen[1]
    assert read_log(params)["phase"].tolist() == ["head", "fine_tune"]


def test_plateau_reduces_the_learning_rate_then_stops_early(data, tmp_path):
    # So small a learning rate moves no float32 weight: the validation loss stays exactly put.
    params = params_for(data, tmp_path, epochs=10, learning_rate=1e-12, reduce_lr_patience=1, reduce_lr_factor=0.5,
                        early_stopping_patience=2)
    train.run(params.train, params.paths, params.base, params.runtime)
    log = read_log(params)
    assert log["epoch"].tolist() == [0, 1, 2]  # no improvement after epoch 0: stopped after two more
    assert log["learning_rate"].tolist() == pytest.approx([1e-12, 1e-12, 5e-13])


@pytest.mark.parametrize("restore_best", [True, False])
def test_the_saved_model_is_the_best_epoch(data, tmp_path, restore_best):
    # a learning rate far too high: the validation loss jumps around, the best epoch is not the last
    params = params_for(data, tmp_path, epochs=4, learning_rate=3.0, dropout=0.0, restore_best=restore_best)
    train.run(params.train, params.paths, params.base, params.runtime)
    val_loss = read_log(params)["val_loss"].tolist()
    best, last = min(val_loss), val_loss[-1]
    # the run this test needs: the best epoch is not the last, by far more than the tolerance below
    assert val_loss.index(best) < len(val_loss) - 1 and last > 1.01 * best, val_loss
    model = keras.saving.load_model(Path(params.paths.model), safe_mode=True)
    folder = Path(params.paths.shards)
    ds = training.validation_dataset(folder, json.loads((folder / "meta.json").read_text()), 64)
    model.compile(loss="sparse_categorical_crossentropy")
    # restore_best: the best epoch's weights; without it, the last epoch's
    assert model.evaluate(ds, verbose=0) == pytest.approx(best if restore_best else last, rel=1e-4)


class Interrupt(Exception):
    pass


def test_two_phases_and_resuming_an_interrupted_fine_tuning(data, tmp_path, monkeypatch):
    params = params_for(data, tmp_path, backbone_size=32, epochs=2, fine_tune_layers=8, fine_tune_epochs=3,
                        fine_tune_learning_rate=1e-4)
    original = training.EpochLog.on_epoch_end

    def crash_in_the_second_fine_tuning_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 3:
            raise Interrupt

    monkeypatch.setattr(training.EpochLog, "on_epoch_end", crash_in_the_second_fine_tuning_epoch)
    with pytest.raises(Interrupt):
        train.run(params.train, params.paths, params.base, params.runtime)
    (run_dir,) = (tmp_path / "cache" / "runs").iterdir()
    before = pd.read_csv(run_dir / training.TRAIN_LOG)
    assert before["epoch"].tolist() == [0, 1, 2, 3]

    monkeypatch.setattr(training.EpochLog, "on_epoch_end", original)
    monkeypatch.setattr(training, "cached_datasets", None)  # phase 1 is done: it must not run again
    train.run(params.train, params.paths, params.base, params.runtime)
    log = read_log(params)
    assert log["epoch"].tolist() == [0, 1, 2, 3, 4]
    assert log["phase"].tolist() == ["head", "head", "fine_tune", "fine_tune", "fine_tune"]
    pd.testing.assert_frame_equal(log.iloc[:3], before.iloc[:3])  # kept, not re-run
    assert log["learning_rate"].tolist() == pytest.approx([0.01, 0.01, 1e-4, 1e-4, 1e-4])
    assert not run_dir.exists()


def test_a_killed_train_stage_resumes_from_its_last_epoch(data, tmp_path):
    folder, _ = data
    epochs = 8
    params_file = tmp_path / "params.yaml"
    settings = {"backbone": "lenet", "weights": "none", "backbone_size": 28, "epochs": epochs, "batch_size": 16}
    params_file.write_text(yaml.safe_dump({
        "paths": {"shards": str(folder / "shards"), "rebalance": str(folder / "rebalance"),
                  "model": str(tmp_path / "model.keras"), "reports": str(tmp_path / "reports"),
                  "train_log": str(tmp_path / "reports" / "train_log.csv")},
        "train": settings,
        "runtime": {"train_cache_dir": str(tmp_path / "cache")},
    }))
    command = [sys.executable, "-m", "stages.train", "--params", str(params_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    backup = tmp_path / "cache" / "runs"
    deadline = time.monotonic() + 120
    while backed_up_epoch(backup) < 1:  # epoch 1 finished and backed up
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else "timeout"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    resume_at = backed_up_epoch(backup)
    assert 1 <= resume_at < epochs and not (tmp_path / "model.keras").exists()

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resuming lenet" in second.stderr
    logged = [int(n) for n in re.findall(r"epoch (\d+)/", second.stderr)]
    assert logged == list(range(resume_at + 1, epochs + 1))  # 1-based: continued from where the backup was
    log = pd.read_csv(tmp_path / "reports" / training.TRAIN_LOG)
    assert log["epoch"].tolist() == list(range(epochs))
    assert (tmp_path / "model.keras").is_file()


def backed_up_epoch(runs: Path) -> int:
    """The epoch BackupAndRestore will resume from (0 before its first backup)."""
    for metadata in runs.glob("*/scratch-backup/training_metadata.json"):
        try:
            return json.loads(metadata.read_text())["epoch"]
        except (ValueError, OSError):  # caught while being written
            pass
    return 0


@pytest.mark.parametrize("settings, message", [
    ({"backbone": "resnet"}, "train.backbone must be one of"),
    ({"backbone": "hub"}, "train.backbone hub needs train.hub_handle"),
    ({"backbone": "lenet"}, "train.weights: lenet learns from scratch"),
    ({"fine_tune_epochs": 2}, "train.fine_tune_epochs needs train.fine_tune_layers"),
    ({"backbone": "lenet", "weights": "none", "fine_tune_epochs": 2, "fine_tune_layers": 3}, "cannot be fine-tuned"),
    ({"augment_flip": "diagonal"}, "train.augment_flip must be one of"),
    ({"augment_rotation": 270.0}, "train.augment_rotation is in degrees"),
    ({"augment_zoom": 1.5}, "train.augment_zoom must be between 0 and 1"),
    ({"erasing_area": [0.5, 0.1]}, "train.erasing_area must be"),
    ({"erasing_aspect": [0.0, 2.0]}, "train.erasing_aspect must be"),
    ({"augment_flip": "horizontal", "augment_in_phase1": False}, "would never apply"),
    ({"reduce_lr_factor": 1.0}, "train.reduce_lr_factor must be between 0 and 1"),
    # the defaults' warm-up and flip, named with what to change
    ({"lr_schedule": "constant"}, "warmup_epochs .1.0; the default is 1.0. warms up the cosine schedule: with "
                                  "train.lr_schedule: constant set it to 0"),
    ({"augment_in_phase1": False}, "the default train.augment_flip is horizontal: set it to none"),
    ({"warmup_epochs": -1.0}, "train.warmup_epochs must be >= 0"),
])
def test_bad_train_params_are_named(settings, message):
    from imgpipe.core.params import ParamsError, params_from_dict

    with pytest.raises(ParamsError, match=message):
        params_from_dict({"train": settings})

"""train's warm start: from the weights in paths.warm_start, only the last phase, fewer epochs;
from nothing (and saying why) when there is no model there or it does not fit."""

import logging
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from imgpipe.core.atomic_write import write_json
from imgpipe.core.errors import StageError
from imgpipe.core.hashing import file_hexdigest
from imgpipe.model import warm_start
from stages import train
from tests.model.test_train import data, params_for, read_log  # noqa: F401 (data: the fixture)

# trains real models: `make test-fast` leaves it out
pytestmark = pytest.mark.slow

# so small a learning rate moves no float32 weight: what a run saves is what it started from
FROZEN = 1e-12


def trained(shard_data, out: Path, **settings) -> Path:
    params = params_for(shard_data, out, backbone_size=32, **settings)
    train.run(params.train, params.paths, params.base, params.runtime)
    return Path(params.paths.model)


def seed(model: Path, folder: Path, classes: list[str]) -> None:
    folder.mkdir(parents=True)
    shutil.copyfile(model, folder / warm_start.MODEL)
    write_json(folder / warm_start.RECORD, {"classes": classes, "md5": file_hexdigest(model, "md5"),
                                            "blessed_at": "2026-12-01T00:00:00+00:00"})


def weights(model: Path) -> list[np.ndarray]:
    return keras.saving.load_model(model, safe_mode=True).get_weights()


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def blessed(data, tmp_path_factory) -> Path:  # noqa: F811
    """A model trained from nothing (head on the frozen backbone, 3 epochs)."""
    return trained(data, tmp_path_factory.mktemp("first"), epochs=3)


CLASSES = ["0", "1", "7"]


def test_a_warm_start_begins_from_the_seeded_weights_and_runs_phase1_only_for_its_epochs(
        data, blessed, tmp_path, caplog):  # noqa: F811
    seed(blessed, tmp_path / "warm_start", CLASSES)
    with caplog.at_level(logging.INFO):
        model = trained(data, tmp_path, epochs=6, learning_rate=FROZEN, warm_start_epochs=2)
    assert_same(weights(model), weights(blessed))
    log = read_log(params_for(data, tmp_path))
    assert log["phase"].tolist() == ["head", "head"]
    assert f"warm start from {tmp_path / 'warm_start'}" in caplog.text and "phase 1 only, 2 epochs" in caplog.text
    # the same run from nothing ends elsewhere (its own initial head) and runs every epoch
    cold = trained(data, tmp_path / "cold", epochs=6, learning_rate=FROZEN, warm_start=False)
    assert not all(np.array_equal(x, y) for x, y in zip(weights(cold), weights(blessed)))
    assert len(read_log(params_for(data, tmp_path / "cold"))) == 6


def test_with_fine_tuning_a_warm_start_runs_the_fine_tuning_only_without_warm_up(data, blessed, tmp_path):  # noqa: F811
    seed(blessed, tmp_path / "warm_start", CLASSES)
    trained(data, tmp_path, epochs=3, fine_tune_layers=4, fine_tune_epochs=5, fine_tune_learning_rate=1e-4,
            warm_start_epochs=2, lr_schedule="cosine", warmup_epochs=1.0)
    log = read_log(params_for(data, tmp_path))
    assert log["phase"].tolist() == ["fine_tune", "fine_tune"]
    # the rate at each epoch's end: cosine from the peak, half-way down after one of two epochs
    # (warmup_epochs 1 would have put the peak there)
    assert log["learning_rate"].tolist() == pytest.approx([5e-5, 0.0], abs=1e-9)


def test_a_warm_start_that_does_not_fit_trains_from_nothing_and_says_why(data, blessed, tmp_path, caplog):  # noqa: F811
    # other classes (same count): the head's outputs would mean other things
    seed(blessed, tmp_path / "warm_start", ["0", "1", "9"])
    with caplog.at_level(logging.INFO):
        trained(data, tmp_path, epochs=3)
    assert "was trained on the classes ['0', '1', '9'], the shards hold ['0', '1', '7']; training from nothing" in caplog.text
    assert len(read_log(params_for(data, tmp_path))) == 3
    # another network: the small CNN's weights into MobileNet
    other = tmp_path / "other"
    cnn = trained(data, other, backbone="cnn", weights="none", epochs=1)
    seed(cnn, other / "warm", CLASSES)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        model = trained(data, tmp_path / "third", epochs=3, learning_rate=FROZEN, warm_start=True)
    assert "no model in" in caplog.text  # its own folder is empty
    shutil.copytree(other / "warm", tmp_path / "fourth" / "warm_start")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        fourth = trained(data, tmp_path / "fourth", epochs=3, learning_rate=FROZEN)
    assert "does not fit this model" in caplog.text and "training from nothing" in caplog.text
    assert len(read_log(params_for(data, tmp_path / "fourth"))) == 3
    # nothing of the CNN was left in the model: it is the one a run without a warm start makes
    assert_same(weights(fourth), weights(model))


def test_a_model_that_is_not_the_one_its_record_names_is_refused(data, blessed, tmp_path):  # noqa: F811
    seed(blessed, tmp_path / "warm_start", CLASSES)
    with (tmp_path / "warm_start" / warm_start.MODEL).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(StageError, match="its md5 is not the one .*warm_start.json records"):
        trained(data, tmp_path, epochs=1)

"""The model builder alone: shapes, a frozen backbone, weight loading, pixel ranges, safe reloading."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"

# Offline ImageNet weights: Keras looks in $KERAS_HOME/models/ and reads KERAS_HOME once, when
# it is first imported, so this runs before the imports below. (If another test module imports
# Keras first, set KERAS_HOME in tests/conftest.py instead.)
os.environ.setdefault("KERAS_HOME", str(Path("/tmp") / f"imgpipe-tests-keras-{os.getuid()}"))
_models = Path(os.environ["KERAS_HOME"]) / "models"
_models.mkdir(parents=True, exist_ok=True)
try:
    (_models / WEIGHTS.name).symlink_to(WEIGHTS)
except FileExistsError:
    pass

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from stages.cli import StageError  # noqa: E402
from stages.model import build_model, to_pixel_range  # noqa: E402
from stages.params import Train  # noqa: E402


def h5_conv1_kernel() -> np.ndarray:
    with h5py.File(WEIGHTS, "r") as f:
        return f["conv1/conv1/kernel:0"][()]


def backbone_of(model: keras.Model) -> keras.Model:
    (backbone,) = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return backbone


def test_output_is_a_distribution_over_the_classes_for_grey_and_colour_input():
    train = Train(weights="none", backbone_size=32)
    for channels in (1, 3):
        model = build_model(4, (28, 28, channels), train, "unit")
        assert model.input_shape == (None, 28, 28, channels)
        assert model.output_shape == (None, 4)
        probs = model.predict_on_batch(np.random.default_rng(0).random((5, 28, 28, channels), dtype=np.float32))
        assert probs.shape == (5, 4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_only_the_head_trains_and_batchnorm_statistics_stay_put():
    model = build_model(3, (28, 28, 1), Train(weights=str(WEIGHTS), backbone_size=32), "unit")
    backbone = backbone_of(model)
    assert not backbone.trainable
    assert [w.path for w in model.trainable_weights] == ["classes/kernel", "classes/bias"]
    before = [w.numpy().copy() for w in backbone.weights]  # includes BatchNorm moving means/variances
    head_before = model.get_layer("classes").kernel.numpy().copy()
    rng = np.random.default_rng(0)
    model.fit(rng.random((16, 28, 28, 1), dtype=np.float32), rng.integers(0, 3, 16), epochs=1, verbose=0)
    for old, new in zip(before, backbone.weights):
        np.testing.assert_array_equal(old, new.numpy())
    assert not np.array_equal(head_before, model.get_layer("classes").kernel.numpy())


def test_weights_path_loads_that_file():
    model = build_model(2, (28, 28, 1), Train(weights=str(WEIGHTS), backbone_size=40), "unit")
    np.testing.assert_array_equal(backbone_of(model).get_layer("conv1").kernel.numpy(), h5_conv1_kernel())


def test_imagenet_weights_load_offline_at_a_size_without_its_own_file():
    # there is a 224 file only (in $KERAS_HOME/models/); 64 pixels must load it
    model = build_model(2, (28, 28, 1), Train(weights="imagenet", backbone_size=64), "unit")
    np.testing.assert_array_equal(backbone_of(model).get_layer("conv1").kernel.numpy(), h5_conv1_kernel())


def test_missing_weights_file_is_a_stage_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "weights.h5"
    with pytest.raises(StageError, match=str(missing)):
        build_model(2, (28, 28, 1), Train(weights=str(missing), backbone_size=32), "unit")


def test_imagenet_alpha_the_backbone_lacks_is_a_stage_error():
    with pytest.raises(StageError, match="mobilenet_v2"):
        build_model(2, (28, 28, 1), Train(backbone="mobilenet_v2", alpha=0.25, weights="imagenet"), "unit")


def test_pixel_ranges_map_onto_0_255():
    for normalization, (lo, hi) in {"none": (0, 255), "unit": (0, 1), "minmax": (0, 1), "standardize": (-1, 1)}.items():
        scale, offset = to_pixel_range(normalization)
        assert (lo * scale + offset, hi * scale + offset) == (0, 255)
    with pytest.raises(StageError, match="normalization"):
        to_pixel_range("zscore")


def test_same_image_in_any_value_range_gives_the_same_prediction():
    image = np.random.default_rng(1).integers(0, 256, (4, 28, 28, 1)).astype(np.float32)
    train = Train(weights=str(WEIGHTS), backbone_size=32)
    raw = build_model(3, (28, 28, 1), train, "none")
    unit = build_model(3, (28, 28, 1), train, "unit")
    unit.get_layer("classes").set_weights(raw.get_layer("classes").get_weights())
    np.testing.assert_allclose(raw.predict_on_batch(image), unit.predict_on_batch(image / 255), atol=1e-5)


# mobilenet and vgg16 cover the kinds of scaling operations in the graph (divide and subtract;
# channel flip and mean); the other two take 5-10 s each to build and trace on a CPU.
@pytest.mark.parametrize(
    "backbone",
    ["mobilenet", "vgg16", *(pytest.param(b, marks=pytest.mark.slow) for b in ("mobilenet_v2", "efficientnet_b0"))],
)
def test_saved_model_reloads_in_safe_mode_with_the_same_predictions(backbone, tmp_path):
    alpha = 0.35 if backbone == "mobilenet_v2" else 0.25
    model = build_model(3, (32, 32, 3), Train(backbone=backbone, alpha=alpha, weights="none", backbone_size=32), "unit")
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras", compile=False, safe_mode=True)
    images = np.random.default_rng(2).random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(model.predict_on_batch(images), reloaded.predict_on_batch(images), atol=1e-6)

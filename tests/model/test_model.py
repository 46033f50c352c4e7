"""The model builder alone: shapes, frozen and unfrozen backbones, weight loading, pixel ranges,
the four views of a classifier, LeNet, a TF Hub SavedModel, mixed precision, safe reloading."""

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
import tensorflow as tf  # noqa: E402

from imgpipe.model import training  # noqa: E402
from imgpipe.model.backbones import unfreeze_top  # noqa: E402
from imgpipe.core.errors import StageError  # noqa: E402
from imgpipe.model.builder import build, compile_for_training, to_pixel_range  # noqa: E402
from imgpipe.core.params import Train  # noqa: E402

AUGMENT_ALL = {"augment_flip": "horizontal", "augment_rotation": 15.0, "augment_shift": 0.1, "augment_zoom": 0.1,
               "augment_shear": 0.1, "augment_brightness": 0.2, "augment_contrast": 0.2, "erasing_probability": 0.5}


def h5_conv1_kernel() -> np.ndarray:
    with h5py.File(WEIGHTS, "r") as f:
        return f["conv1/conv1/kernel:0"][()]


def images(n, shape=(28, 28, 1), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def test_output_is_a_distribution_over_the_classes_for_grey_and_colour_input():
    train = Train(backbone="mobilenet", weights="none", backbone_size=32)
    for channels in (1, 3):
        model = build(4, (28, 28, channels), train, "unit").model
        assert model.input_shape == (None, 28, 28, channels)
        assert model.output_shape == (None, 4)
        probs = model.predict_on_batch(images(5, (28, 28, channels)))
        assert probs.shape == (5, 4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_the_four_views_share_their_weights():
    clf = build(3, (28, 28, 1), Train(backbone="mobilenet", weights=str(WEIGHTS), backbone_size=32, augment_flip="none"),
                "unit")
    x = images(4)
    features = clf.extractor.predict_on_batch(x)
    assert features.shape == (4, 256)  # MobileNet 0.25's pooled features
    np.testing.assert_allclose(clf.head.predict_on_batch(features), clf.model.predict_on_batch(x), atol=1e-6)
    compile_for_training(clf.head, 0.1)
    clf.head.fit(features, np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    # training the head alone trained the classifier's head
    np.testing.assert_allclose(clf.head.predict_on_batch(features), clf.model.predict_on_batch(x), atol=1e-6)
    assert clf.training is clf.model  # no augmentation: nothing to add in front


def test_only_the_head_trains_and_batchnorm_statistics_stay_put():
    clf = build(3, (28, 28, 1), Train(backbone="mobilenet", weights=str(WEIGHTS), backbone_size=32), "unit")
    backbone = clf.backbone.network
    assert not backbone.trainable
    assert [w.path for w in clf.model.trainable_weights] == ["classes/kernel", "classes/bias"]
    before = [w.numpy().copy() for w in backbone.weights]  # includes BatchNorm moving means/variances
    head_before = clf.model.get_layer("classes").kernel.numpy().copy()
    compile_for_training(clf.training, 1e-3)
    clf.training.fit(images(16), np.random.default_rng(0).integers(0, 3, 16), epochs=1, verbose=0)
    for old, new in zip(before, backbone.weights):
        np.testing.assert_array_equal(old, new.numpy())
    assert not np.array_equal(head_before, clf.model.get_layer("classes").kernel.numpy())


def test_fine_tuning_trains_the_top_layers_only_and_never_batchnorm():
    clf = build(3, (28, 28, 1), Train(backbone="mobilenet", weights=str(WEIGHTS), backbone_size=32), "unit")
    network = clf.backbone.network
    unfreeze_top(network, 10)
    top = network.layers[-10:]
    assert {layer.name for layer in network.layers if layer.trainable_weights} == {
        layer.name for layer in top if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)}
    before = {w.path: w.numpy().copy() for w in network.weights}
    compile_for_training(clf.training, 1e-2)
    clf.training.fit(images(16), np.random.default_rng(0).integers(0, 3, 16), epochs=1, verbose=0)
    changed = {w.path for w in network.weights if not np.array_equal(before[w.path], w.numpy())}
    assert changed and changed <= {w.path for w in network.trainable_weights}
    # BatchNorm moving statistics too stay put: the backbone runs in inference mode
    assert not any("moving" in path for path in changed)


def test_weights_path_loads_that_file():
    clf = build(2, (28, 28, 1), Train(backbone="mobilenet", weights=str(WEIGHTS), backbone_size=40), "unit")
    np.testing.assert_array_equal(clf.backbone.network.get_layer("conv1").kernel.numpy(), h5_conv1_kernel())


def test_imagenet_weights_load_offline_at_a_size_without_its_own_file():
    # there is a 224 file only (in $KERAS_HOME/models/); 64 pixels must load it
    clf = build(2, (28, 28, 1), Train(backbone="mobilenet", weights="imagenet", backbone_size=64), "unit")
    np.testing.assert_array_equal(clf.backbone.network.get_layer("conv1").kernel.numpy(), h5_conv1_kernel())


def test_missing_weights_file_is_a_stage_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "weights.h5"
    with pytest.raises(StageError, match=str(missing)):
        build(2, (28, 28, 1), Train(backbone="mobilenet", weights=str(missing), backbone_size=32), "unit")


def test_imagenet_alpha_the_backbone_lacks_is_a_stage_error():
    with pytest.raises(StageError, match="mobilenet_v2"):
        build(2, (28, 28, 1), Train(backbone="mobilenet_v2", alpha=0.25, weights="imagenet"), "unit")


def test_pixel_ranges_map_onto_0_255():
    for normalization, (lo, hi) in {"none": (0, 255), "unit": (0, 1), "minmax": (0, 1), "standardize": (-1, 1)}.items():
        scale, offset = to_pixel_range(normalization)
        assert (lo * scale + offset, hi * scale + offset) == (0, 255)
    with pytest.raises(StageError, match="normalization"):
        to_pixel_range("zscore")


def test_same_image_in_any_value_range_gives_the_same_prediction():
    image = np.random.default_rng(1).integers(0, 256, (4, 28, 28, 1)).astype(np.float32)
    train = Train(backbone="mobilenet", weights=str(WEIGHTS), backbone_size=32)
    raw = build(3, (28, 28, 1), train, "none").model
    unit = build(3, (28, 28, 1), train, "unit").model
    unit.get_layer("classes").set_weights(raw.get_layer("classes").get_weights())
    np.testing.assert_allclose(raw.predict_on_batch(image), unit.predict_on_batch(image / 255), atol=1e-5)


def test_augmentation_acts_in_training_only_and_stays_out_of_the_saved_model(tmp_path):
    clf = build(3, (32, 32, 3), Train(backbone="mobilenet", weights=str(WEIGHTS), backbone_size=32, **AUGMENT_ALL), "unit", seed=1)
    x = images(8, (32, 32, 3))
    assert "augment" in [layer.name for layer in clf.training.layers]
    assert "augment" not in [layer.name for layer in clf.model.layers]
    augmented = keras.ops.convert_to_numpy(clf.training(x, training=True))
    assert not np.allclose(augmented, clf.model.predict_on_batch(x), atol=1e-4)
    np.testing.assert_allclose(clf.training.predict_on_batch(x), clf.model.predict_on_batch(x), atol=1e-6)
    # every augmentation layer (RandomErasing included) serialises: the training model reloads in safe mode
    clf.training.save(tmp_path / "training.keras")
    reloaded = keras.saving.load_model(tmp_path / "training.keras", safe_mode=True)
    np.testing.assert_allclose(reloaded.predict_on_batch(x), clf.model.predict_on_batch(x), atol=1e-6)


def test_lenet_learns_from_scratch_on_small_grey_images():
    clf = build(10, (28, 28, 1), Train(backbone="lenet", weights="none", backbone_size=28), "unit")
    assert clf.backbone.network.trainable and len(clf.model.trainable_weights) == 8  # 2 conv + dense + head
    assert "resize" not in [layer.name for layer in clf.model.layers]  # already at its size
    x = np.zeros((20, 28, 28, 1), np.float32)
    y = np.arange(20) % 2
    x[y == 1, 10:18, 10:18] = 1.0  # a square or nothing
    compile_for_training(clf.training, 1e-3)
    clf.training.fit(x, y, epochs=15, verbose=0)
    assert (clf.model.predict_on_batch(x).argmax(axis=1) == y).all()


class TinyHubModel(tf.Module):
    """A SavedModel in the shape of a TF Hub image feature vector: RGB in [0, 1] -> 8 features."""

    def __init__(self, size):
        super().__init__()
        self.kernel = tf.Variable(tf.random.stateless_normal([3, 3, 3, 8], seed=[1, 2]), name="kernel")
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])

    def _serve(self, images):
        x = tf.nn.relu(tf.nn.conv2d(images, self.kernel, 2, "SAME"))
        return {"feature_vector": tf.reduce_mean(x, axis=[1, 2])}


def test_tf_hub_handle_becomes_a_frozen_backbone(tmp_path):
    module = TinyHubModel(32)
    tf.saved_model.save(module, str(tmp_path / "hub"), signatures={"serving_default": module.serve})
    train = Train(backbone="hub", hub_handle=str(tmp_path / "hub"), backbone_size=32)
    clf = build(3, (28, 28, 1), train, "unit")
    x = images(4)
    expected = module.serve(tf.image.resize(tf.concat([x, x, x], axis=-1), (32, 32)))["feature_vector"]
    np.testing.assert_allclose(clf.extractor.predict_on_batch(x), expected.numpy(), atol=1e-5)
    assert [w.path for w in clf.model.trainable_weights] == ["classes/kernel", "classes/bias"]
    compile_for_training(clf.training, 1e-2)
    clf.training.fit(x, np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    # Keras refuses a TFSMLayer in safe mode (it runs an external SavedModel's graph); trusted, it reloads
    clf.model.save(tmp_path / "model.keras")
    with pytest.raises(ValueError, match="TFSMLayer"):
        keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    reloaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=False)
    np.testing.assert_allclose(reloaded.predict_on_batch(x), clf.model.predict_on_batch(x), atol=1e-6)


def test_missing_hub_handle_is_a_stage_error_naming_it(tmp_path):
    with pytest.raises(StageError, match="train.hub_handle"):
        build(3, (28, 28, 1), Train(backbone="hub", hub_handle=str(tmp_path / "nothing"), backbone_size=32), "unit")


def test_mixed_precision_keeps_float32_probabilities_and_falls_back_to_float32_on_a_cpu():
    with training.precision(True):
        assert keras.config.dtype_policy().name == "float32"  # no GPU here
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build(3, (28, 28, 1), Train(backbone="mobilenet", weights="none", backbone_size=32), "unit").model
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("dropout").compute_dtype == "float16"
    probs = model.predict_on_batch(images(2))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


# mobilenet and vgg16 cover the kinds of scaling operations in the graph (divide and subtract;
# channel flip and mean); the other two take 5-10 s each to build and trace on a CPU.
@pytest.mark.parametrize(
    "backbone",
    ["mobilenet", "vgg16", *(pytest.param(b, marks=pytest.mark.slow) for b in ("mobilenet_v2", "efficientnet_b0"))],
)
def test_saved_model_reloads_in_safe_mode_with_the_same_predictions(backbone, tmp_path):
    alpha = 0.35 if backbone == "mobilenet_v2" else 0.25
    model = build(3, (32, 32, 3), Train(backbone=backbone, alpha=alpha, weights="none", backbone_size=32), "unit").model
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras", compile=False, safe_mode=True)
    x = images(2, (32, 32, 3), seed=2)
    np.testing.assert_allclose(model.predict_on_batch(x), reloaded.predict_on_batch(x), atol=1e-6)

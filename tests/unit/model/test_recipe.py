"""The training recipe, one element at a time, on tiny in-memory inputs: mixup, cutmix,
RandAugment, the learning-rate schedule, AdamW's weight decay, label smoothing, weight EMA,
XLA, and the backbone `auto` picks."""

import numpy as np
import pytest
import tensorflow as tf

import keras

from imgpipe.core.errors import StageError
from imgpipe.core.params import ParamsError, Train
from imgpipe.model import augment
from imgpipe.model import backbones
from imgpipe.model import training
from imgpipe.model.builder import build, compile_for_training, learning_rate_schedule, optimizer

CLASSES = 8
# the defaults are the default run's recipe; these tests switch it off where they measure one element
PLAIN = {"lr_schedule": "constant", "warmup_epochs": 0.0, "label_smoothing": 0.0, "augment_flip": "none"}


def numbered_batch(size=16):
    """Image i is the constant i + 1 (distinct values, none 0); its label is class i % CLASSES, one-hot."""
    images = np.broadcast_to(np.arange(1, CLASSES + 1, dtype="float32")[:, None, None, None], (CLASSES, size, size, 1))
    return tf.constant(images), tf.one_hot(np.arange(CLASSES), CLASSES)


def mixed(train, seed=0):
    images, labels = numbered_batch()
    out_images, out_labels = augment.batch_mixing(train, seed)(images, labels)
    return np.asarray(out_images), np.asarray(out_labels)


def test_mixup_labels_are_the_same_convex_combination_as_its_images():
    images, labels = mixed(Train(mixup_alpha=0.4))
    assert np.allclose(labels.sum(axis=1), 1.0) and (labels >= 0).all()
    assert ((labels > 1e-6).sum(axis=1) <= 2).all()  # two images at most in each
    # each image is still constant: w * value_i + (1 - w) * value_j, with the labels' w
    assert np.allclose(images, images[:, :1, :1, :])
    values = labels @ np.arange(1, CLASSES + 1)
    np.testing.assert_allclose(images[:, 0, 0, 0], values, rtol=1e-5)
    assert (np.abs(values - np.round(values)) > 1e-3).sum() >= CLASSES // 2  # really mixed, not copies


def test_cutmix_label_weights_are_the_shares_of_pasted_pixels():
    images, labels = mixed(Train(cutmix_alpha=1.0), seed=3)
    assert np.allclose(labels.sum(axis=1), 1.0)
    for image, label in zip(images, labels):
        # the pixels are whole images' values (pasted, not blended), in the labels' proportions
        shares = np.array([(image == value).mean() for value in range(1, CLASSES + 1)])
        np.testing.assert_allclose(shares, label, atol=1e-6)
    assert ((labels > 0).sum(axis=1) == 2).sum() >= CLASSES // 2  # boxes were pasted


def test_with_mixup_and_cutmix_each_batch_gets_one_of_the_two():
    kinds = set()
    for seed in range(12):
        images, _ = mixed(Train(mixup_alpha=0.4, cutmix_alpha=1.0), seed)
        pasted_only = np.isin(images, np.arange(1, CLASSES + 1)).all()
        kinds.add("cutmix" if pasted_only else "mixup")
        if not pasted_only:  # mixup: blended everywhere, each image still constant
            assert np.allclose(images, images[:, :1, :1, :])
    assert kinds == {"mixup", "cutmix"}


def test_no_mixing_unless_asked():
    assert augment.batch_mixing(Train(), 0) is None


def test_the_training_stream_mixes_only_when_asked_and_then_has_one_hot_labels(tmp_path):
    assert Train(mixup_alpha=0.2).augments and Train(cutmix_alpha=0.5).soft_labels
    ds = tf.data.Dataset.from_tensor_slices(numbered_batch()).batch(4)
    one_hot = training.with_targets(ds.map(lambda x, y: (x, tf.argmax(y, axis=1))), Train(label_smoothing=0.1), CLASSES)
    np.testing.assert_array_equal(np.concatenate([y for _, y in one_hot.as_numpy_iterator()]), np.eye(CLASSES))
    hard = training.with_targets(ds.map(lambda x, y: (x, tf.argmax(y, axis=1))), Train(**PLAIN), CLASSES)
    assert np.concatenate([y for _, y in hard.as_numpy_iterator()]).tolist() == list(range(CLASSES))


def test_randaugment_is_a_layer_of_the_augmentation_that_changes_grey_images_only_in_training():
    stack = augment.augmentation(Train(**PLAIN, randaugment_ops=2, randaugment_magnitude=0.3), seed=1)
    (layer,) = stack.layers
    assert isinstance(layer, keras.layers.RandAugment) and layer.num_ops == 2 and layer.value_range == (0.0, 255.0)
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1)).astype("float32")
    changed = np.asarray(stack(images, training=True))
    assert changed.shape == images.shape and not np.allclose(changed, images)
    np.testing.assert_array_equal(np.asarray(stack(images, training=False)), images)


@pytest.mark.parametrize("warmup_epochs", [0.0, 2.0])
def test_cosine_schedule_warms_up_linearly_then_decays_to_zero_at_the_last_step(warmup_epochs):
    train = Train(lr_schedule="cosine", warmup_epochs=warmup_epochs, epochs=10)
    schedule = learning_rate_schedule(train, 0.01, steps_per_epoch=100, epochs=10)
    warmup, last = int(warmup_epochs * 100), 1000

    def lr(step):
        return float(schedule(step))

    if warmup:
        assert lr(0) == 0.0 and lr(warmup // 2) == pytest.approx(0.005)
    assert lr(warmup) == pytest.approx(0.01)  # the peak: the end of the warm-up
    assert lr(warmup + (last - warmup) // 2) == pytest.approx(0.005)  # half-way down the cosine
    assert lr(last) == pytest.approx(0.0, abs=1e-9)  # the last step
    assert lr(last - 1) > 0


def test_a_warm_up_as_long_as_the_phase_leaves_it_its_last_step_to_decay():
    # e.g. `dvc exp run -S train.epochs=1` with the default warm-up of 1 epoch
    schedule = learning_rate_schedule(Train(lr_schedule="cosine", warmup_epochs=1.0), 0.01, steps_per_epoch=10, epochs=1)
    assert float(schedule(9)) == pytest.approx(0.01) and float(schedule(10)) == pytest.approx(0.0, abs=1e-9)


def test_constant_schedule_is_the_learning_rate():
    assert learning_rate_schedule(Train(**PLAIN), 0.003, steps_per_epoch=100, epochs=10) == 0.003


def small_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, bias_initializer="ones", name="dense")(inputs)
    x = keras.layers.BatchNormalization(beta_initializer="ones", name="bn")(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="out")(x))


def test_adamw_decays_kernels_but_not_biases_or_batchnorm():
    model = small_model()
    opt = optimizer(model, Train(optimizer="adamw", weight_decay=0.5), learning_rate=0.1)
    assert isinstance(opt, keras.optimizers.AdamW)
    before = {v.path: np.array(v) for v in model.trainable_variables}
    # zero gradients: Adam's step is 0, so whatever changes is the decoupled weight decay
    opt.apply_gradients([(keras.ops.zeros_like(v), v) for v in model.trainable_variables])
    for v in model.trainable_variables:
        if len(v.shape) >= 2:  # kernels: decayed by lr * weight_decay
            np.testing.assert_allclose(np.array(v), before[v.path] * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=v.path)
        else:  # biases, BatchNorm gamma and beta
            np.testing.assert_array_equal(np.array(v), before[v.path], err_msg=v.path)
    assert sorted(v.path for v in model.trainable_variables if len(v.shape) <= 1) == [
        "bn/beta", "bn/gamma", "dense/bias", "out/bias"]


def test_adam_by_default_and_ema_when_asked():
    model = small_model()
    assert type(optimizer(model, Train(), 0.1)) is keras.optimizers.Adam
    ema = optimizer(model, Train(ema_momentum=0.99), 0.1)
    assert ema.use_ema and ema.ema_momentum == 0.99


def test_label_smoothing_targets_one_minus_s_plus_s_over_classes():
    model = small_model()
    compile_for_training(model, 0.1, Train(label_smoothing=0.2))
    # 2 classes, s = 0.2: the target [1, 0] becomes [0.9, 0.1]
    loss = float(model.loss(np.array([[1.0, 0.0]]), np.array([[0.9, 0.1]])))
    assert loss == pytest.approx(-(0.9 * np.log(0.9) + 0.1 * np.log(0.1)), rel=1e-5)
    compile_for_training(model, 0.1, Train(**PLAIN))
    assert model.loss == "sparse_categorical_crossentropy"


@pytest.fixture
def without_op_determinism():
    """A train run earlier in the session may have turned TensorFlow's op determinism on (Keras then refuses XLA)."""
    from tensorflow.python.framework import config

    was = config.is_op_determinism_enabled()
    config.disable_op_determinism()
    yield
    if was:
        config.enable_op_determinism()


def test_jit_compile_is_passed_to_keras(without_op_determinism):
    model = small_model()
    compile_for_training(model, 0.1, Train(jit_compile=True, deterministic=False))
    assert model.jit_compile is True
    compile_for_training(model, 0.1, Train())
    assert model.jit_compile is False
    with pytest.raises(ParamsError, match="jit_compile needs train.deterministic: false"):
        Train(jit_compile=True).check()


def fitted(folder, ema_momentum):
    """A small model after 3 epochs of fit_phase, and the validation losses it logged."""
    model = small_model()
    train = Train(**PLAIN, ema_momentum=ema_momentum, restore_best=False)
    compile_for_training(model, 0.05, train)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(64, 4)).astype("float32"), rng.integers(0, 2, 64)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    folder.mkdir()
    training.fit_phase(model, data, data, (0, 3), "scratch", folder, train,
                       training.BestCheckpoint(model, folder, "val_loss"), None)
    val_loss = [float(row["val_loss"]) for row in training.read_log(folder / training.TRAIN_LOG)]
    return model, model.evaluate(data, verbose=0)[0], val_loss


def test_ema_weights_are_what_is_validated_and_kept(tmp_path):
    model, final_loss, val_loss = fitted(tmp_path / "ema", 0.9)
    # the model left is the moving average, and that is what the last epoch's validation measured
    # (without the swap, Keras validates the raw weights and leaves the average in the model)
    assert final_loss == pytest.approx(val_loss[-1], rel=1e-5)
    plain, _, plain_val_loss = fitted(tmp_path / "plain", 0.0)
    assert any(not np.allclose(np.array(a), np.array(b)) for a, b in zip(model.weights, plain.weights))
    assert val_loss != plain_val_loss


def test_auto_picks_the_small_cnn_for_small_grey_images_and_mobilenet_for_photos():
    grey = backbones.resolve(Train(backbone="auto"), (32, 32, 1))
    assert (grey.backbone, grey.weights, grey.backbone_size) == ("cnn", "none", 32) and not grey.pretrained
    assert backbones.resolve(Train(backbone="auto"), (128, 128, 3)).backbone == "mobilenet"
    assert backbones.resolve(Train(backbone="auto"), (96, 96, 1)).backbone == "mobilenet"
    assert backbones.resolve(Train(backbone="lenet", weights="none"), (32, 32, 1)).backbone == "lenet"
    with pytest.raises(StageError, match="cannot be fine-tuned"):
        backbones.resolve(Train(backbone="auto", fine_tune_layers=5, fine_tune_epochs=2), (28, 28, 1))


def test_the_small_cnn_learns_whole_at_the_shard_size():
    clf = build(10, (32, 32, 1), Train(backbone="auto"), "unit")
    assert clf.model.name == "cnn_classifier" and clf.model.output_shape == (None, 10)
    assert 600_000 < clf.model.count_params() < 650_000
    assert all(layer.trainable for layer in clf.backbone.network.layers)
    assert not any(layer.name == "resize" for layer in clf.model.layers)

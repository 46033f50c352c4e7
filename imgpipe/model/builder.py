"""The model builder: a backbone (imgpipe/model/backbones.py) plus a small softmax head, in four views.

    model      shard image -> class probabilities      what is saved, evaluated and served
    training   the same, with augmentation in front    what fit() trains on images
    extractor  shard image -> backbone features         what the embedding cache stores
    head       features -> class probabilities         what phase 1 trains on cached features

The four share their layers, hence their weights: training one trains the others. The saved
model is the plain `model`: the augmentation layers (inactive outside training anyway) are not
in it, so loading it needs no custom classes and works in safe mode. It takes images exactly
as the shards hold them; everything the backbone needs is a layer of the model.
"""

from __future__ import annotations

from typing import NamedTuple

import keras

from imgpipe.model import augment
from imgpipe.model import backbones
from imgpipe.core.errors import StageError
from imgpipe.core.params import Train


class Classifier(NamedTuple):
    model: keras.Model
    training: keras.Model
    extractor: keras.Model
    head: keras.Model
    backbone: backbones.Backbone


def to_pixel_range(normalization: str) -> tuple[float, float]:
    """(scale, offset) that brings shard pixels back to the 0-255 range the backbones start from.

    unit and minmax pixels are in [0, 1]; none keeps 0-255. Standardised pixels are z-scores,
    most of them within [-1, 1]: mapping that interval onto 0-255 hands them to the backbone
    roughly as they are (for MobileNet, which wants [-1, 1], the two maps cancel exactly).
    """
    ranges = {"none": (1.0, 0.0), "unit": (255.0, 0.0), "minmax": (255.0, 0.0), "standardize": (127.5, 127.5)}
    if normalization not in ranges:
        raise StageError(f"unknown normalization {normalization!r} in the shard metadata; expected one of {', '.join(ranges)}")
    return ranges[normalization]


def build(num_classes: int, input_shape: tuple[int, int, int], train: Train, normalization: str,
          seed: int = 0) -> Classifier:
    """The classifier for images of `input_shape` (H, W, C) preprocessed with `normalization` (not compiled)."""
    height, width, channels = input_shape
    if channels not in (1, 3):
        raise StageError(f"the shards hold {channels}-channel images; the model takes 1 (grey) or 3 (RGB)")
    train = backbones.resolve(train, input_shape)
    backbone = backbones.build(train, input_shape)
    inputs = keras.Input(shape=(height, width, channels), name="image")
    scale, offset = to_pixel_range(normalization)
    pixels = keras.layers.Rescaling(scale, offset, name="to_0_255")(inputs) if (scale, offset) != (1.0, 0.0) else inputs
    features = backbone(pixels)

    dropout = keras.layers.Dropout(train.dropout, name="dropout")
    # float32 probabilities even under mixed precision: a float16 softmax underflows
    classes = keras.layers.Dense(num_classes, activation="softmax", name="classes", dtype="float32")
    feature_input = keras.Input(shape=features.shape[1:], name="features")
    head = keras.Model(feature_input, classes(dropout(feature_input)), name="head")
    model = keras.Model(inputs, classes(dropout(features)), name=f"{train.backbone}_classifier")
    extractor = keras.Model(inputs, features, name="extractor")

    augmentation = augment.augmentation(train, seed)
    training = model
    if augmentation is not None:
        augmented = classes(dropout(backbone(augmentation(pixels))))
        training = keras.Model(inputs, augmented, name=f"{train.backbone}_classifier_training")
    return Classifier(model, training, extractor, head, backbone)


def learning_rate_schedule(train: Train, learning_rate: float, steps_per_epoch: int, epochs: int):
    """The learning rate of a phase of `epochs` epochs: `learning_rate` (constant), or a linear
    warm-up from 0 to it over train.warmup_epochs (at most all but the last step), then cosine
    decay to 0 at the phase's last step. Keras counts the steps (fit's optimizer.iterations), so
    a resumed run continues the schedule where it stopped.
    """
    if train.lr_schedule == "constant":
        return learning_rate
    steps = steps_per_epoch * epochs
    warmup = min(round(train.warmup_epochs * steps_per_epoch), steps - 1)
    if not warmup:
        return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)
    # CosineDecay warms up from its initial rate to warmup_target, then decays over decay_steps
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=steps - warmup, warmup_target=learning_rate,
                                                  warmup_steps=warmup)


def optimizer(model: keras.Model, train: Train, learning_rate) -> keras.optimizers.Optimizer:
    """Adam, or AdamW whose weight decay spares biases and BatchNorm's scales and offsets.

    Decaying those pulls them towards 0 for no gain in generalisation (they do not make the
    model more complex); the reference scripts exclude them, as here, by rank: every
    trainable variable with at most one axis (a bias, a BatchNorm gamma or beta) is excluded.
    ema_momentum > 0: the optimizer also keeps an exponential moving average of the weights
    (training.py validates and saves that average).
    """
    ema = {"use_ema": True, "ema_momentum": train.ema_momentum} if train.ema_momentum else {}
    if train.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate, **ema)
    adamw = keras.optimizers.AdamW(learning_rate, weight_decay=train.weight_decay, **ema)
    adamw.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
    return adamw


def compile_for_training(model: keras.Model, learning_rate: float, train: Train | None = None,
                         steps_per_epoch: int = 1, epochs: int = 1) -> None:
    """Compile `model` for a phase of `epochs` epochs at `learning_rate`, with train's recipe
    (train None: plain Adam on class indices, a constant rate).

    Soft labels (mixup, cutmix, label smoothing) come as class probabilities: categorical
    cross-entropy then, sparse on class indices otherwise (the same loss on hard labels).
    """
    if train is None:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        return
    if train.soft_labels:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing)
    else:
        loss = "sparse_categorical_crossentropy"
    schedule = learning_rate_schedule(train, learning_rate, steps_per_epoch, epochs)
    model.compile(optimizer=optimizer(model, train, schedule), loss=loss, metrics=["accuracy"],
                  jit_compile=train.jit_compile)

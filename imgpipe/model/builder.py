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


def compile_for_training(model: keras.Model, learning_rate: float) -> None:
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])

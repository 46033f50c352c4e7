"""The model builder: a frozen ImageNet backbone from keras.applications plus a small softmax head.

Everything the backbone needs (grey to RGB, resizing, the backbone's own pixel scaling) is a
layer of the model, so the saved model takes images exactly as the shards hold them and
`evaluate` and `predict` need no preprocessing code of their own.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import keras

from stages.cli import StageError
from stages.params import Train

# train.backbone -> (constructor, its preprocess_input, which takes RGB pixels in 0-255)
BACKBONES = {
    "mobilenet": (keras.applications.MobileNet, keras.applications.mobilenet.preprocess_input),
    "mobilenet_v2": (keras.applications.MobileNetV2, keras.applications.mobilenet_v2.preprocess_input),
    "efficientnet_b0": (keras.applications.EfficientNetB0, keras.applications.efficientnet.preprocess_input),
    "vgg16": (keras.applications.VGG16, keras.applications.vgg16.preprocess_input),
}

# The backbones with a width multiplier (train.alpha); the others have one fixed width.
WITH_ALPHA = ("mobilenet", "mobilenet_v2")


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


def build_backbone(train: Train, size: int) -> keras.Model:
    """The keras.applications backbone without its top, global-average-pooled, with train.weights loaded.

    weights: "imagenet" (from $KERAS_HOME/models/ if the file is there, else downloaded),
    "none" (random initialisation) or the path of a weights file for this backbone.
    """
    constructor, _ = BACKBONES[train.backbone]
    options = {"input_shape": (size, size, 3), "include_top": False, "pooling": "avg"}
    if train.backbone in WITH_ALPHA:
        options["alpha"] = train.alpha
    if train.weights == "imagenet":
        try:
            # MobileNet offers ImageNet files only for some sizes (128-224); at other sizes Keras
            # loads the 224 file, which fits because convolution weights do not depend on the
            # size, and warns about it: expected here, so not worth a warning in every run's log.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="`input_shape` is undefined or non-square")
                return constructor(weights="imagenet", **options)
        except ValueError as exc:  # e.g. an alpha with no ImageNet weights
            raise StageError(f"{train.backbone} with ImageNet weights: {exc}") from exc
        except Exception as exc:  # Keras raises a bare Exception when the download fails
            raise StageError(
                f"could not load the ImageNet weights of {train.backbone}: {exc} "
                "(offline? copy the weights file into $KERAS_HOME/models/ or set train.weights to its path)"
            ) from exc
    backbone = constructor(weights=None, **options)
    if train.weights != "none":
        path = Path(train.weights)
        if not path.is_file():
            raise StageError(f"train.weights: weights file not found: {path}")
        try:
            backbone.load_weights(path)
        except ValueError as exc:
            raise StageError(f"train.weights: {path} does not fit the {train.backbone} backbone: {exc}") from exc
    return backbone


def build_model(num_classes: int, input_shape: tuple[int, int, int], train: Train, normalization: str) -> keras.Model:
    """A compiled classifier for images of `input_shape` (H, W, C) preprocessed with `normalization`."""
    height, width, channels = input_shape
    if channels not in (1, 3):
        raise StageError(f"the shards hold {channels}-channel images; the model takes 1 (grey) or 3 (RGB)")
    inputs = keras.Input(shape=(height, width, channels), name="image")
    x = inputs
    if channels == 1:
        # ImageNet backbones learnt from colour photos: a grey image is the same value in R, G and B.
        x = keras.layers.Concatenate(name="grey_to_rgb")([x, x, x])
    x = keras.layers.Resizing(train.backbone_size, train.backbone_size, name="resize")(x)
    scale, offset = to_pixel_range(normalization)
    if (scale, offset) != (1.0, 0.0):
        x = keras.layers.Rescaling(scale, offset, name="to_0_255")(x)
    # Each backbone's own scaling ([-1, 1], 0-255, or caffe-style BGR minus the ImageNet mean),
    # recorded as plain operations in the model graph, so the saved model loads in safe mode.
    _, preprocess_input = BACKBONES[train.backbone]
    x = preprocess_input(x)
    backbone = build_backbone(train, train.backbone_size)
    backbone.trainable = False
    # training=False keeps the BatchNorm layers in inference mode: they normalise with their
    # ImageNet statistics instead of each batch's, which small batches of our images would
    # skew (and which would wreck the features if the backbone were later unfrozen to fine-tune).
    x = backbone(x, training=False)
    x = keras.layers.Dropout(train.dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="classes")(x)
    model = keras.Model(inputs, outputs, name=f"{train.backbone}_classifier")
    model.compile(
        optimizer=keras.optimizers.Adam(train.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model

"""Backbones: the network that turns an image into a feature vector, and what it needs in front.

- keras.applications MobileNet, MobileNetV2, EfficientNetB0, VGG16, with `train.weights`
  imagenet | none | the path of a weights file; frozen in phase 1, partly unfrozen in phase 2;
- hub: a TF Hub handle or a local SavedModel folder, resolved by `tensorflow_hub.resolve`
  (downloaded into $TFHUB_CACHE_DIR on a machine with internet, a local folder as it is) and
  loaded with `keras.layers.TFSMLayer` (`hub.KerasLayer` does not work with Keras 3); frozen.
  The saved model refers to the SavedModel by its path and loads only outside Keras' safe mode
  (imgpipe/model/loading.py);
- lenet: a small LeNet-style CNN learnt from scratch, for small grey images (MNIST-like);
- cnn: a small VGG-style CNN learnt from scratch (three 3x3 convolution stages and a dense
  layer), cheaper per image than lenet and more accurate on Fashion-MNIST (bench/RESULTS.md);
- auto: cnn for small grey images (one channel, at most AUTO_SMALL pixels a side, like MNIST
  and Fashion-MNIST, where ImageNet features of upscaled 28x28 clothes are a poor start),
  mobilenet (transfer learning) for anything else (photos). `resolve` decides, from the shards.

Every backbone takes 0-255 pixels as the model holds them (1 or 3 channels, the shard size)
and brings them to what it was trained on: RGB, its own size, its own pixel scaling. These
steps are layers and plain operations of the model graph, so the saved model needs no
preprocessing code outside it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import keras

from imgpipe.core.errors import StageError
from imgpipe.core.params import FROM_SCRATCH, Train

# train.backbone -> (constructor, its preprocess_input, which takes RGB pixels in 0-255)
APPLICATIONS = {
    "mobilenet": (keras.applications.MobileNet, keras.applications.mobilenet.preprocess_input),
    "mobilenet_v2": (keras.applications.MobileNetV2, keras.applications.mobilenet_v2.preprocess_input),
    "efficientnet_b0": (keras.applications.EfficientNetB0, keras.applications.efficientnet.preprocess_input),
    "vgg16": (keras.applications.VGG16, keras.applications.vgg16.preprocess_input),
}

# The backbones with a width multiplier (train.alpha); the others have one fixed width.
WITH_ALPHA = ("mobilenet", "mobilenet_v2")

# backbone auto: images with one channel and at most this many pixels a side get the cnn
AUTO_SMALL = 64


def resolve(train: Train, input_shape: tuple[int, int, int]) -> Train:
    """`train` with backbone auto replaced by what suits images of `input_shape` (H, W, C); others as they are.

    auto -> cnn takes the images at their own size (backbone_size = the larger side) and no
    ImageNet weights (weights imagenet becomes none; a weights file is kept).
    """
    if train.backbone != "auto":
        return train
    height, width, channels = input_shape
    if channels == 1 and max(height, width) <= AUTO_SMALL:
        weights = "none" if train.weights == "imagenet" else train.weights
        chosen = dataclasses.replace(train, backbone="cnn", weights=weights, backbone_size=max(height, width))
    else:
        chosen = dataclasses.replace(train, backbone="mobilenet")
    if chosen.fine_tune_epochs and not chosen.pretrained:
        raise StageError(f"train.backbone auto chose {chosen.backbone} for {height}x{width}x{channels} images, "
                         "which learns from scratch and cannot be fine-tuned: set train.fine_tune_epochs to 0 "
                         "or name a pretrained backbone")
    return chosen


class Backbone:
    """`backbone(pixels)`: features of 0-255 images; `network` is the part with the (pretrained) weights.

    The adapting layers are created once and shared, so the training graph (with augmentation
    in front) and the inference graph use the very same weights.
    """

    def __init__(self, network, adapters: list, pretrained: bool):
        self.network, self.adapters, self.pretrained = network, adapters, pretrained

    def __call__(self, pixels):
        x = pixels
        for adapt in self.adapters:
            x = adapt(x)
        if not self.pretrained:
            return self.network(x)
        # training=False keeps BatchNorm layers in inference mode for good: they normalise with
        # their ImageNet statistics instead of each batch's. Small batches of our images would
        # skew those statistics, and while fine-tuning, updating them wrecks what the
        # unfrozen layers above them learnt (the keras-io fine-tuning recipe).
        features = self.network(x, training=False)
        if isinstance(features, dict):  # a SavedModel signature returns its outputs by name
            if len(features) != 1:
                raise StageError(f"train.hub_handle: the model returns {sorted(features)}; "
                                 "it must return one feature vector")
            (features,) = features.values()
        if features.shape[-1] is None or len(features.shape) != 2:
            raise StageError(f"train.backbone {self.network.name} returns {features.shape}; expected [batch, features]")
        return features


def build(train: Train, input_shape: tuple[int, int, int]) -> Backbone:
    height, width, channels = input_shape
    size = train.backbone_size
    resize = [] if (height, width) == (size, size) else [keras.layers.Resizing(size, size, name="resize")]
    if train.backbone in FROM_SCRATCH:
        network = (lenet if train.backbone == "lenet" else cnn)(train, channels)
        return Backbone(network, resize + [keras.layers.Rescaling(1 / 255, name="to_unit")], False)
    # ImageNet backbones learnt from colour photos: a grey image is the same value in R, G and B.
    grey_to_rgb = keras.layers.Concatenate(name="grey_to_rgb")
    rgb = [lambda x: grey_to_rgb([x, x, x])] if channels == 1 else []
    if train.backbone == "hub":
        # TF Hub image modules take RGB in [0, 1] (the convention of tfhub.dev's image models)
        return Backbone(hub(train), rgb + resize + [keras.layers.Rescaling(1 / 255, name="to_unit")], True)
    # Each application's own scaling ([-1, 1], 0-255, or caffe-style BGR minus the ImageNet mean),
    # recorded as plain operations in the model graph, so the saved model loads in safe mode.
    _, preprocess_input = APPLICATIONS[train.backbone]
    return Backbone(application(train), rgb + resize + [preprocess_input], True)


def application(train: Train) -> keras.Model:
    """The keras.applications backbone without its top, global-average-pooled, frozen, with train.weights loaded.

    weights: "imagenet" (from $KERAS_HOME/models/ if the file is there, else downloaded),
    "none" (random initialisation) or the path of a weights file for this backbone.
    """
    constructor, _ = APPLICATIONS[train.backbone]
    size = train.backbone_size
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
                network = constructor(weights="imagenet", **options)
        except ValueError as exc:  # e.g. an alpha with no ImageNet weights
            raise StageError(f"{train.backbone} with ImageNet weights: {exc}") from exc
        except Exception as exc:  # Keras raises a bare Exception when the download fails
            raise StageError(
                f"could not load the ImageNet weights of {train.backbone}: {exc} "
                "(offline? copy the weights file into $KERAS_HOME/models/ or set train.weights to its path)"
            ) from exc
    else:
        network = constructor(weights=None, **options)
        _load_weights(network, train)
    network.trainable = False
    return network


def hub(train: Train) -> keras.layers.Layer:
    """The TF Hub model as a frozen Keras layer."""
    import tensorflow_hub  # imported only when asked for: it pulls in tf_keras, several seconds

    try:
        # The saved model keeps this path, not the SavedModel (imgpipe/model/loading.py): absolute, so that
        # it loads from any working directory (a local folder resolves to itself, maybe relative).
        path = os.path.abspath(tensorflow_hub.resolve(train.hub_handle))
        return keras.layers.TFSMLayer(path, call_endpoint=train.hub_endpoint, trainable=False, name="hub")
    except (OSError, ValueError) as exc:
        raise StageError(f"train.hub_handle {train.hub_handle!r}: {exc}") from exc


def lenet(train: Train, channels: int) -> keras.Sequential:
    """LeNet-5's layout (two 5x5 convolution + 2x2 pooling stages, then a dense layer), widened
    from 6/16/120 to 32/64/256 units with ReLU and max-pooling, as current MNIST examples do."""
    size = train.backbone_size
    network = keras.Sequential([
        keras.Input((size, size, channels)),
        keras.layers.Conv2D(32, 5, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 5, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(256, activation="relu"),
    ], name="lenet")
    _load_weights(network, train)
    return network


def cnn(train: Train, channels: int) -> keras.Sequential:
    """Three VGG-style stages (a 3x3 convolution with ReLU, 2x2 max-pooling) of 32, 64 and 128
    filters, flattened (the head sees where things are: 4x4 cells of a 32x32 image), then a
    dense layer of 256: 0.62 M weights, about 10 M multiply-adds an image (lenet: 1.1 M weights,
    15 M). No BatchNorm: Keras 3 has no fused BatchNorm kernel; on this CPU a BatchNorm after
    each convolution took 1.8x the CPU time of an epoch, and that variant (without the dense
    layer) reached 0.928 on Fashion-MNIST against this one's 0.933 (bench/RESULTS.md)."""
    size = train.backbone_size
    layers = [keras.Input((size, size, channels))]
    for stage, filters in enumerate((32, 64, 128), start=1):
        layers += [keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{stage}"),
                   keras.layers.MaxPooling2D(name=f"pool{stage}")]
    layers += [keras.layers.Flatten(name="flatten"), keras.layers.Dense(256, activation="relu", name="dense")]
    network = keras.Sequential(layers, name="cnn")
    _load_weights(network, train)
    return network


def _load_weights(network: keras.Model, train: Train) -> None:
    if train.weights == "none":
        return
    path = Path(train.weights)
    if not path.is_file():
        raise StageError(f"train.weights: weights file not found: {path}")
    try:
        network.load_weights(path)
    except ValueError as exc:
        raise StageError(f"train.weights: {path} does not fit the {train.backbone} backbone: {exc}") from exc


def unfreeze_top(network: keras.Model, layers: int) -> None:
    """Phase 2: the top `layers` layers of the backbone learn, except BatchNorm layers.

    The low layers (edges, textures) suit any photo and stay frozen; the top ones (object
    parts) adapt to our classes. BatchNorm layers stay frozen: their moving statistics must
    keep matching the weights around them (and the backbone runs with training=False anyway,
    see Backbone.__call__).
    """
    network.trainable = True
    for i, layer in enumerate(network.layers):
        top = i >= len(network.layers) - layers
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)

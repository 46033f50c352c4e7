"""Augmentation: Keras preprocessing layers in front of the backbone, active only while training.

They are layers of the training model, so they run where the model runs (on the GPU when
there is one) and Keras switches them off outside `fit()`; the saved model leaves them out
altogether (imgpipe/model/builder.py). All of them see pixels in the 0-255 range, whatever the shards'
normalisation, so brightness and erasing values mean the same in every set-up.

RandomErasing is the method of Zhong et al., "Random Erasing Data Augmentation" (2017), with
the parameters of its reference implementation: with probability p, a rectangle whose area
is a random fraction of the image (area range) and whose height/width ratio is random (aspect
range) is filled with random values (value range), one value for the whole rectangle or one
per pixel. Keras 3 has a RandomErasing layer too; this one stays because Keras' is not the
paper's method: it draws each side independently (the square root of a fraction in `scale`),
so there is no area range and no aspect range; its `factor` p erases with a probability itself
drawn from [0, p] per image (p/2 on average); its noise is normal, not uniform in a range.

RandAugment (Cubuk et al. 2019) is Keras' layer: `randaugment_ops` operations drawn from its
11 per image, at strength `randaugment_magnitude` (0-1, Keras' `factor`).

Mixup (Zhang et al. 2017) and CutMix (Yun et al. 2019) mix images *and labels* of a batch, so
they cannot be layers of the model (which never sees labels): `batch_mixing` returns the step
of the training input pipeline (imgpipe/model/training.py) that applies them to one-hot labels,
with Keras' MixUp and CutMix layers. When both are on, each batch gets one of them, at random
(as timm does).
"""

from __future__ import annotations

import itertools
import math

import keras
import tensorflow as tf
from keras import ops

from imgpipe.core.params import Train

PIXEL_RANGE = (0.0, 255.0)


@keras.saving.register_keras_serializable(package="imgpipe")
class RandomErasing(keras.layers.Layer):
    """Erase one random rectangle per image, with probability `probability`, while training.

    area: [min, max] fraction of the image the rectangle covers; aspect: [min, max] of its
    height / width; values: [min, max] of the fill; per_pixel: a fill value per pixel and
    channel (noise) instead of one per rectangle.
    """

    # Candidate rectangles drawn per image; the first that fits the image (and, after rounding
    # to whole pixels, still has its area and aspect in range) is used. The reference
    # implementation retries until one fits; a fixed number of tries keeps the layer one
    # vectorised computation. With the default ranges 95% of candidates fit a square image, so
    # all ten failing (that image is not erased) happens about once in 10^13 images.
    TRIES = 10

    def __init__(self, probability=0.5, area=(0.02, 0.4), aspect=(0.3, 3.3), values=PIXEL_RANGE, per_pixel=False,
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be between 0 and 1, got {probability}")
        if not 0.0 < area[0] <= area[1] <= 1.0:
            raise ValueError(f"area must be [min, max] with 0 < min <= max <= 1, got {list(area)}")
        if not 0.0 < aspect[0] <= aspect[1]:
            raise ValueError(f"aspect must be [min, max] with 0 < min <= max, got {list(aspect)}")
        if values[0] > values[1]:
            raise ValueError(f"values must be [min, max], got {list(values)}")
        self.probability = float(probability)
        self.area = tuple(float(a) for a in area)
        self.aspect = tuple(float(a) for a in aspect)
        self.values = tuple(float(v) for v in values)
        self.per_pixel = bool(per_pixel)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        shape = ops.shape(images)
        batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
        h, w = ops.cast(height, "float32"), ops.cast(width, "float32")
        uniform = self._uniform

        # Candidate sizes: area uniform in its range; aspect log-uniform, so that a rectangle
        # r times taller than wide is as likely as one r times wider than tall.
        area = uniform((batch, self.TRIES), *self.area) * h * w
        aspect = ops.exp(uniform((batch, self.TRIES), math.log(self.aspect[0]), math.log(self.aspect[1])))
        rect_h = ops.round(ops.sqrt(area * aspect))
        rect_w = ops.round(ops.sqrt(area / aspect))
        pixels = rect_h * rect_w
        fits = ((rect_h >= 1) & (rect_w >= 1) & (rect_h <= h) & (rect_w <= w)
                & (pixels >= self.area[0] * h * w) & (pixels <= self.area[1] * h * w)
                & (rect_h >= self.aspect[0] * rect_w) & (rect_h <= self.aspect[1] * rect_w))
        first = ops.argmax(ops.cast(fits, "int32"), axis=1)[:, None]  # the first candidate that fits
        rect_h = ops.take_along_axis(rect_h, first, axis=1)[:, 0]
        rect_w = ops.take_along_axis(rect_w, first, axis=1)[:, 0]
        erase = (uniform((batch,), 0.0, 1.0) < self.probability) & ops.any(fits, axis=1)

        # Top-left corner uniform over the positions where the rectangle fits inside the image.
        top = ops.floor(uniform((batch,), 0.0, 1.0) * (h - rect_h + 1))
        left = ops.floor(uniform((batch,), 0.0, 1.0) * (w - rect_w + 1))
        rows = ops.arange(height, dtype="float32")[None, :, None]
        cols = ops.arange(width, dtype="float32")[None, None, :]

        def per_image(v):
            return v[:, None, None]

        inside = ((rows >= per_image(top)) & (rows < per_image(top + rect_h))
                  & (cols >= per_image(left)) & (cols < per_image(left + rect_w)) & per_image(erase))
        fill_shape = (batch, height, width, channels) if self.per_pixel else (batch, 1, 1, 1)
        fill = ops.cast(uniform(fill_shape, *self.values), images.dtype)
        return ops.where(inside[..., None], fill, images)

    def _uniform(self, shape, low, high):
        return keras.random.uniform(shape, minval=low, maxval=high, dtype="float32", seed=self.seed_generator)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "probability": self.probability, "area": list(self.area),
                "aspect": list(self.aspect), "values": list(self.values), "per_pixel": self.per_pixel, "seed": self.seed}


def augmentation(train: Train, seed: int) -> keras.Sequential | None:
    """The augmentation layers `train` asks for, in a Sequential named "augment"; None when there are none.

    Geometric transforms first, then colour, then erasing (as in the random-erasing paper, which
    erases after the other augmentations). Each layer gets its own seed: layers with equal seeds
    would draw the same random numbers and move together.
    """
    seeds = itertools.count(seed)
    fill = {"fill_mode": train.augment_fill_mode}
    layers = []
    if train.augment_flip != "none":
        layers.append(keras.layers.RandomFlip(train.augment_flip, seed=next(seeds)))
    if train.augment_rotation:
        # Keras takes the angle as a fraction of a full turn
        layers.append(keras.layers.RandomRotation(train.augment_rotation / 360.0, seed=next(seeds), **fill))
    if train.augment_shift:
        layers.append(keras.layers.RandomTranslation(train.augment_shift, train.augment_shift, seed=next(seeds), **fill))
    if train.augment_zoom:
        layers.append(keras.layers.RandomZoom(train.augment_zoom, seed=next(seeds), **fill))
    if train.augment_shear:
        # (0, s), not s: Keras saves s as (-s, s), which its own loader then rejects. The layer
        # flips the sign at random, so both draw shears uniformly from -s to s.
        shear = (0.0, train.augment_shear)
        layers.append(keras.layers.RandomShear(shear, shear, seed=next(seeds), **fill))
    if train.augment_brightness:
        layers.append(keras.layers.RandomBrightness(train.augment_brightness, value_range=PIXEL_RANGE, seed=next(seeds)))
    if train.augment_contrast:
        layers.append(keras.layers.RandomContrast(train.augment_contrast, value_range=PIXEL_RANGE, seed=next(seeds)))
    if train.randaugment_ops:
        # after the project's own geometric and colour layers, before erasing (torchvision's order)
        layers.append(keras.layers.RandAugment(PIXEL_RANGE, num_ops=train.randaugment_ops,
                                               factor=train.randaugment_magnitude, seed=next(seeds)))
    if train.erasing_probability:
        layers.append(RandomErasing(train.erasing_probability, train.erasing_area, train.erasing_aspect,
                                    train.erasing_values, train.erasing_per_pixel, seed=next(seeds)))
    return keras.Sequential(layers, name="augment") if layers else None


class ExactCutMix(keras.layers.CutMix):
    """Keras' CutMix, with each label weighted by the share of pixels actually pasted.

    Keras weights the labels by the area of the real-valued box, but pastes the whole pixels
    inside it: on 32x32 images the two differ by up to a few percent. timm corrects the same
    way (`correct_lam`).
    """

    def get_random_transformation(self, data, training=True, seed=None):
        transformation = super().get_random_transformation(data, training, seed)
        if transformation is not None:
            pasted = ops.mean(ops.cast(transformation["batch_masks"], "float32"), axis=(1, 2, 3))
            transformation["mix_weight"] = 1.0 - pasted
        return transformation


def batch_mixing(train: Train, seed: int):
    """`mix(images, labels) -> (images, labels)` for batches with one-hot labels; None when neither is on."""
    mixers = []
    if train.mixup_alpha:
        mixers.append(keras.layers.MixUp(alpha=train.mixup_alpha, seed=seed))
    if train.cutmix_alpha:
        # Keras draws CutMix's alpha from the range `factor`; a one-point range is that alpha
        mixers.append(ExactCutMix(factor=(train.cutmix_alpha, train.cutmix_alpha), seed=seed + 1))
    if not mixers:
        return None
    labels_dtype = "float32"

    def apply(layer, images, labels):
        out = layer({"images": images, "labels": labels}, training=True)
        return ops.cast(out["images"], images.dtype), ops.cast(out["labels"], labels_dtype)

    if len(mixers) == 1:
        return lambda images, labels: apply(mixers[0], images, labels)
    choice = keras.random.SeedGenerator(seed + 2)

    def either(images, labels):
        use_mixup = keras.random.uniform((), seed=choice) < 0.5
        return tf.cond(use_mixup, lambda: apply(mixers[0], images, labels), lambda: apply(mixers[1], images, labels))

    return either

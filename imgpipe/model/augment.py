"""Augmentation: Keras preprocessing layers in front of the backbone, active only while training.

They are layers of the training model, so they run where the model runs (on the GPU when
there is one) and Keras switches them off outside `fit()`; the saved model leaves them out
altogether (imgpipe/model/builder.py). All of them see pixels in the 0-255 range, whatever the shards'
normalisation, so brightness and erasing values mean the same in every set-up.

RandomErasing is the method of Zhong et al., "Random Erasing Data Augmentation" (2017), with
the parameters of its reference implementation: with probability p, a rectangle whose area
is a random fraction of the image (area range) and whose height/width ratio is random (aspect
range) is filled with random values (value range), one value for the whole rectangle or one
per pixel.
"""

from __future__ import annotations

import itertools
import math

import keras
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
    if train.erasing_probability:
        layers.append(RandomErasing(train.erasing_probability, train.erasing_area, train.erasing_aspect,
                                    train.erasing_values, train.erasing_per_pixel, seed=next(seeds)))
    return keras.Sequential(layers, name="augment") if layers else None

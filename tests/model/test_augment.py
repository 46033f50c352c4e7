"""Augmentation: RandomErasing checked by its statistics, and the layers params.yaml asks for."""

import math

import keras
import numpy as np
import pytest

from imgpipe.model.augment import RandomErasing, augmentation
from imgpipe.core.params import Train

N, SIZE = 4000, 32
BACKGROUND = -1.0  # outside every value range below, so an erased pixel always shows


def erase(layer: RandomErasing, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(images after the layer, mask of changed pixels [N, H, W]) for N blank images, in training mode."""
    blank = np.full((N, SIZE, SIZE, channels), BACKGROUND, np.float32)
    out = keras.ops.convert_to_numpy(layer(blank, training=True))
    return out, (out != BACKGROUND).any(axis=-1)


def rectangles(mask: np.ndarray) -> list[tuple[int, int, int]]:
    """(height, width, changed pixels) of the bounding box of each erased image's changed pixels."""
    found = []
    for m in mask[mask.any(axis=(1, 2))]:
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        found.append((rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1, int(m.sum())))
    return found


@pytest.mark.parametrize("probability", [0.25, 0.5, 1.0])
def test_erases_with_the_set_probability(probability):
    _, mask = erase(RandomErasing(probability, seed=1))
    erased = mask.any(axis=(1, 2)).sum()
    # binomial: mean N p, standard deviation sqrt(N p (1 - p)); 4 deviations is a 1-in-15,000 false alarm
    assert abs(erased - N * probability) <= 4 * math.sqrt(N * probability * (1 - probability)) + 1


def test_erased_area_and_aspect_stay_within_their_ranges_and_cover_them():
    area, aspect = (0.05, 0.3), (0.5, 2.0)
    _, mask = erase(RandomErasing(1.0, area, aspect, seed=2))
    found = rectangles(mask)
    assert len(found) == N
    heights, widths, pixels = (np.array(v, float) for v in zip(*found))
    assert (pixels == heights * widths).all()  # each erased region is one full rectangle
    fraction, ratio = pixels / SIZE**2, heights / widths
    assert fraction.min() >= area[0] and fraction.max() <= area[1]
    assert ratio.min() >= aspect[0] and ratio.max() <= aspect[1]
    # the ranges are used, not a corner of them: uniform area, log-uniform aspect
    assert fraction.min() < 0.06 and fraction.max() > 0.29
    assert abs(fraction.mean() - sum(area) / 2) < 0.01
    assert abs(np.log(ratio).mean()) < 0.05  # as many tall rectangles as wide ones


def test_rectangles_sit_anywhere_in_the_image():
    _, mask = erase(RandomErasing(1.0, (0.02, 0.05), seed=3))
    coverage = mask.mean(axis=0)  # fraction of images in which each pixel was erased
    assert (coverage > 0).all()  # corners and edges too
    # small rectangles placed uniformly: the centre is not erased far more often than the middle of an edge
    assert coverage[SIZE // 2, SIZE // 2] < 2 * coverage[SIZE // 2, 2] + 0.01


def test_constant_fill_is_one_value_per_rectangle_within_the_value_range():
    out, mask = erase(RandomErasing(1.0, values=(10.0, 20.0), per_pixel=False, seed=4))
    values = [np.unique(image[m]) for image, m in zip(out, mask)]
    assert all(len(v) == 1 for v in values)
    fills = np.concatenate(values)
    assert fills.min() >= 10.0 and fills.max() <= 20.0 and fills.std() > 2.0  # uniform on [10, 20]: std 2.9


def test_per_pixel_fill_is_noise_within_the_value_range():
    out, mask = erase(RandomErasing(1.0, area=(0.2, 0.3), values=(0.0, 255.0), per_pixel=True, seed=5), channels=3)
    pixels = out[mask]
    assert pixels.min() >= 0.0 and pixels.max() <= 255.0
    assert abs(pixels.mean() - 127.5) < 2.0 and len(np.unique(pixels)) > 1000


def test_identity_at_inference():
    layer = RandomErasing(1.0, seed=6)
    x = np.random.default_rng(0).random((8, SIZE, SIZE, 1), dtype=np.float32)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    model = keras.Sequential([keras.Input((SIZE, SIZE, 1)), layer])
    np.testing.assert_array_equal(model.predict_on_batch(x), x)


def test_config_round_trip_and_bad_arguments():
    layer = RandomErasing(0.3, (0.1, 0.2), (0.5, 2.0), (0.0, 1.0), per_pixel=True, seed=7)
    again = RandomErasing.from_config(layer.get_config())
    assert (again.probability, again.area, again.aspect, again.values, again.per_pixel) == (
        0.3, (0.1, 0.2), (0.5, 2.0), (0.0, 1.0), True)
    for bad in ({"probability": 1.5}, {"area": (0.5, 0.2)}, {"aspect": (0.0, 2.0)}, {"values": (9.0, 1.0)}):
        with pytest.raises(ValueError):
            RandomErasing(**bad)


def test_no_augmentation_when_off_and_each_param_adds_its_layer():
    off = {"augment_flip": "none"}  # the default flips (the default data is clothes)
    assert augmentation(Train(**off), seed=0) is None
    assert not Train(**off).augments
    assert [type(layer).__name__ for layer in augmentation(Train(), seed=0).layers] == ["RandomFlip"]
    settings = {"augment_flip": "horizontal", "augment_rotation": 10.0, "augment_shift": 0.1, "augment_zoom": 0.1,
                "augment_shear": 0.1, "augment_brightness": 0.1, "augment_contrast": 0.1, "erasing_probability": 0.5}
    expected = ["RandomFlip", "RandomRotation", "RandomTranslation", "RandomZoom", "RandomShear", "RandomBrightness",
                "RandomContrast", "RandomErasing"]
    layers = augmentation(Train(**settings), seed=0).layers
    assert [type(layer).__name__ for layer in layers] == expected
    assert len({layer.seed for layer in layers}) == len(layers)  # independent random streams
    rotation = layers[1]
    assert rotation.factor == pytest.approx((-10 / 360, 10 / 360)) and rotation.fill_mode == "reflect"
    for key, value in settings.items():
        assert [type(x).__name__ for x in augmentation(Train(**{**off, key: value}), seed=0).layers] == [
            expected[list(settings).index(key)]]

import numpy as np
import pytest

from imgpipe.core.params import Preprocess
from imgpipe.images.transforms import ChannelStats, normalize, to_colour, transform


def test_colour_conversions_handle_depth_alpha_and_grey():
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 2] = 255  # pure red in OpenCV's BGR order
    assert to_colour(bgr, "rgb")[0, 0].tolist() == [255, 0, 0]
    assert to_colour(bgr, "grey").shape == (4, 5, 1)
    bgra = np.dstack([bgr, np.full((4, 5), 7, np.uint8)])
    assert to_colour(bgra, "rgb")[0, 0].tolist() == [255, 0, 0]
    sixteen = np.full((2, 2), 65535, np.uint16)
    assert to_colour(sixteen, "grey").dtype == np.uint8 and to_colour(sixteen, "grey").max() == 255
    assert to_colour(np.zeros((3, 3), np.uint8), "rgb").shape == (3, 3, 3)


def test_transform_resizes_and_otsu_binarises():
    rng = np.random.default_rng(0)
    image = np.concatenate([rng.integers(0, 60, (40, 20)), rng.integers(190, 255, (40, 20))], axis=1).astype(np.uint8)
    x = transform(image, Preprocess(colour_mode="grey", otsu=True, blur_kernel=3, size=(10, 10)))
    assert x.shape == (10, 10, 1)
    assert x[:, :4].max() == 0 and x[:, 6:].min() == 255


@pytest.mark.parametrize("mode, check", [
    ("none", lambda y: y.max() == 200),
    ("unit", lambda y: np.isclose(y.max(), 200 / 255)),
    ("minmax", lambda y: y.min() == 0 and y.max() == 1),
])
def test_normalizations(mode, check):
    x = np.array([[[10], [200]], [[50], [100]]], np.uint8)
    assert check(normalize(x, Preprocess(normalization=mode)))


def test_standardize_per_sample_and_flat_images_stay_finite():
    p = Preprocess(normalization="standardize", standardize_scope="sample")
    y = normalize(np.arange(16, dtype=np.uint8).reshape(4, 4, 1), p)
    assert abs(y.mean()) < 1e-6 and abs(y.std() - 1) < 1e-5
    assert np.isfinite(normalize(np.full((4, 4, 1), 9, np.uint8), p)).all()


def test_dataset_standardization_uses_streamed_stats():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(20)]
    stats = ChannelStats(3)
    for im in images:
        stats.add(im)
    mean, std = stats.mean_std()
    stacked = np.stack(images).reshape(-1, 3).astype(np.float64)
    assert np.allclose(mean, stacked.mean(0)) and np.allclose(std, stacked.std(0))
    p = Preprocess(normalization="standardize", standardize_scope="dataset")
    out = np.stack([normalize(im, p, mean, std) for im in images]).reshape(-1, 3)
    assert np.allclose(out.mean(0), 0, atol=1e-4) and np.allclose(out.std(0), 1, atol=1e-3)

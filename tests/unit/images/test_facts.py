"""The per-image facts ingest records: sharpness, brightness, contrast, perceptual hash."""

import cv2
import numpy as np
import pytest

from imgpipe.images import facts as image_facts
from tests.data.test_ingest import photo


def distance(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def test_brightness_and_contrast_are_the_grey_mean_and_deviation():
    half = np.zeros((16, 16), np.uint8)
    half[:, 8:] = 200
    facts = image_facts.facts(half)
    assert (facts.brightness, facts.contrast) == (100.0, 100.0)
    flat = image_facts.facts(np.full((16, 16, 3), 42, np.uint8))
    assert (flat.brightness, flat.contrast, flat.sharpness) == (42.0, 0.0, 0.0)


def test_blur_lowers_sharpness():
    image = cv2.imread(str(photo(0)))
    sharp = image_facts.facts(image).sharpness
    blurred = image_facts.facts(cv2.GaussianBlur(image, (7, 7), 0)).sharpness
    assert blurred < sharp / 2


def test_sharpness_is_the_variance_of_the_laplacian():
    """The sum-and-squares shortcut gives numpy's variance of OpenCV's Laplacian, in doubles."""
    for i in range(8):
        grey = cv2.cvtColor(cv2.imread(str(photo(i))), cv2.COLOR_BGR2GRAY)
        expected = cv2.Laplacian(grey, cv2.CV_64F).var()
        assert image_facts.laplacian_variance(grey) == pytest.approx(expected, rel=1e-12)
    ramp = np.tile(np.arange(0, 256, 2, dtype=np.uint8), (64, 1))  # straight ramp: no curvature inside
    assert image_facts.laplacian_variance(ramp) == pytest.approx(cv2.Laplacian(ramp, cv2.CV_64F).var(), rel=1e-12)


def test_sixteen_bits_and_alpha_give_the_same_facts_as_eight_bit_grey():
    grey = cv2.cvtColor(cv2.imread(str(photo(1))), cv2.COLOR_BGR2GRAY)
    expected = image_facts.facts(grey)
    assert image_facts.facts(grey.astype(np.uint16) * 257) == expected
    assert image_facts.facts(grey[:, :, None]) == expected
    bgra = cv2.cvtColor(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), cv2.COLOR_BGR2BGRA)
    assert image_facts.facts(bgra) == expected


def test_sharpness_is_measured_at_the_working_size():
    grey = cv2.cvtColor(cv2.imread(str(photo(2))), cv2.COLOR_BGR2GRAY)
    big = cv2.resize(grey, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    work = cv2.resize(big, (256, 256), interpolation=cv2.INTER_AREA)
    assert image_facts.facts(big) == image_facts.facts(work)
    # at full size the enlarged photo would look 4 times blurrier: one threshold could not serve both
    assert cv2.Laplacian(big, cv2.CV_64F).var() < image_facts.facts(work).sharpness / 4


@pytest.mark.parametrize("change", [
    lambda im: cv2.imdecode(cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 60])[1], cv2.IMREAD_UNCHANGED),
    lambda im: cv2.resize(im, (64, 64), interpolation=cv2.INTER_AREA),
    lambda im: cv2.resize(im, (300, 300), interpolation=cv2.INTER_LINEAR),
    lambda im: cv2.convertScaleAbs(im, alpha=1.05, beta=5),
], ids=["re-encoded", "halved", "enlarged", "brighter"])
def test_phash_barely_moves_for_a_copy_and_far_for_another_photo(change):
    images = [cv2.imread(str(photo(i))) for i in range(8)]
    for image in images:
        assert distance(image_facts.facts(image).phash, image_facts.facts(change(image)).phash) <= 2
    hashes = [image_facts.facts(image).phash for image in images]
    assert min(distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]) >= 12


def test_facts_row_is_rounded_for_a_stable_manifest():
    facts = image_facts.ImageFacts(sharpness=1 / 3, brightness=2 / 3, contrast=10.0, phash="00ff00ff00ff00ff",
                                   phash_mirror="ff00ff00ff00ff00")
    assert facts.row() == (0.33, 0.67, 10.0, "00ff00ff00ff00ff", "ff00ff00ff00ff00")


def test_phash_keeps_the_lowest_frequencies_of_opencvs_dct():
    for i in range(6):
        grey = cv2.cvtColor(cv2.imread(str(photo(i))), cv2.COLOR_BGR2GRAY)
        small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
        low = cv2.dct(small)[:8, :8].ravel()
        expected = np.packbits(low > np.median(low)).tobytes().hex()
        assert image_facts.phash(grey) == expected


def test_the_mirror_hash_is_the_hash_of_the_mirror_image():
    for i in range(6):
        image = cv2.imread(str(photo(i)))
        facts, mirrored = image_facts.facts(image), image_facts.facts(cv2.flip(image, 1))
        assert mirrored.phash == facts.phash_mirror and mirrored.phash_mirror == facts.phash
        assert distance(facts.phash, facts.phash_mirror) > 8  # a photo is not its own mirror image


def test_a_batch_gives_each_image_the_facts_it_has_alone():
    """FactsBatch hashes its images together (one product over the stack): the rows must not change."""
    photos = [cv2.imread(str(photo(i))) for i in range(5)]
    images = [*photos, cv2.resize(photos[0], (300, 200)), np.full((1, 1), 7, np.uint8),
              cv2.cvtColor(photos[1], cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257]
    batch, rows = image_facts.FactsBatch(), [[f"row {i}"] for i in range(len(images))]
    for image, row in zip(images, rows):
        batch.add(image, row)
    assert all(row == [row[0]] for row in rows)  # nothing until the batch is finished
    batch.finish()
    assert rows == [[f"row {i}", *image_facts.facts(image).row()] for i, image in enumerate(images)]
    assert len({row[4] for row in rows[:5]}) == 5  # different photos, different hashes: not one row copied

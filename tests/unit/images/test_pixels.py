"""Any decoded image as 8-bit pixels: one conversion for the facts ingest records and the arrays
preprocess makes."""

import cv2
import numpy as np

from imgpipe.images import facts as image_facts
from imgpipe.images.pixels import grey8, to_uint8
from imgpipe.images.transforms import to_colour
from tests.data.test_ingest import photo


def test_sixteen_bits_scale_down_exactly_and_eight_bits_are_kept_as_they_are():
    assert to_uint8(np.array([[0, 256, 257, 65535]], np.uint16)).tolist() == [[0, 0, 1, 255]]
    eight = np.zeros((2, 2), np.uint8)
    assert to_uint8(eight) is eight  # no copy on the hot path


def test_other_depths_are_stretched_from_their_minimum_to_their_maximum():
    assert to_uint8(np.array([[-1.0, 0.0, 1.0]], np.float32)).tolist() == [[0, 127, 255]]


def test_grey_of_colour_and_of_grey_with_alpha():
    red = np.zeros((2, 3, 3), np.uint8)
    red[..., 2] = 255  # OpenCV's BGR order
    assert grey8(red).shape == (2, 3) and (grey8(red) == 76).all()  # 0.299 x 255
    assert (grey8(cv2.cvtColor(red, cv2.COLOR_BGR2BGRA)) == 76).all()
    grey_alpha = np.dstack([np.full((2, 3), 9, np.uint8), np.zeros((2, 3), np.uint8)])
    assert grey8(grey_alpha).tolist() == [[9] * 3] * 2
    # preprocess drops the alpha too: grey, or in RGB three equal channels, as the exported model does
    assert to_colour(grey_alpha, "grey").tolist() == [[[9]] * 3] * 2
    assert to_colour(grey_alpha, "rgb").tolist() == [[[9, 9, 9]] * 3] * 2


def test_facts_and_transforms_see_the_same_pixels_of_a_deep_image():
    colour = cv2.imread(str(photo(3)))
    for deep in (colour.astype(np.float32) / 3 - 20, colour.astype(np.uint16) * 200,
                 cv2.cvtColor(colour, cv2.COLOR_BGR2BGRA).astype(np.uint16) * 257):
        grey = to_colour(deep, "grey")[:, :, 0]
        assert image_facts.facts(deep) == image_facts.facts(grey)
        assert to_colour(deep, "rgb").dtype == np.uint8

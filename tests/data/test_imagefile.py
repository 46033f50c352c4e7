"""What an image file is, from its bytes: the header sizes that stop a decompression bomb."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from stages import imagefile
from tests.data.test_ingest import bomb_png

# (PIL format, options): every format header_size reads, in the variants its header differs by
VARIANTS = [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("GIF", {}), ("BMP", {}),
            ("WEBP", {}), ("WEBP", {"lossless": True}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"})]


@pytest.mark.parametrize("fmt, options, mode", [(f, o, m) for f, o in VARIANTS for m in ("RGB", "L", "RGBA")
                                                  if not (f == "JPEG" and m == "RGBA")])  # JPEG has no alpha
def test_header_size_matches_the_pixels(fmt, options, mode):
    pixels = np.random.default_rng(0).integers(0, 255, (37, 53, len(mode)), dtype=np.uint8).squeeze()
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, fmt, **options)
    data = out.getvalue()
    assert imagefile.header_size(data, imagefile.detect_format(data)) == (53, 37)


def test_header_size_of_a_cut_header_is_unknown():
    assert imagefile.header_size(b"\x89PNG\r\n\x1a\n\x00\x00", "png") is None
    assert imagefile.header_size(b"\xff\xd8\xff\xe0\x00", "jpeg") is None


def test_bomb_is_refused_without_calling_the_decoder(monkeypatch):
    calls = []
    monkeypatch.setattr(imagefile.cv2, "imdecode", lambda *args: calls.append(args))
    decoded = imagefile.decode(bomb_png(100_000, 100_000), max_pixels=100_000_000)
    assert decoded.error == ("too large to decode: the png header says 100000x100000 pixels, over the limit of "
                             "100000000 (ingest.max_pixels)")
    assert calls == []  # the decoder never saw it, so it never allocated the 10 GB the header asks for
    imagefile.decode(bomb_png(100, 100), max_pixels=100_000_000)
    assert len(calls) == 1  # a small image goes on to the decoder


def test_the_limit_is_on_pixels_not_sides():
    def png(height, width):
        return cv2.imencode(".png", np.zeros((height, width), np.uint8))[1].tobytes()

    assert imagefile.decode(png(5, 20), max_pixels=100).ok
    assert imagefile.decode(png(6, 20), max_pixels=100).error == (
        "too large to decode: the png header says 20x6 pixels, over the limit of 100 (ingest.max_pixels)")
    assert imagefile.decode(png(6, 20)).ok  # no limit given: preprocess reads only validated images

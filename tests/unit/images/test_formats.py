"""What an image file is, from its bytes: the header sizes that stop a decompression bomb."""

import io
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from imgpipe.images import facts
from imgpipe.images import formats
from tests.data.test_ingest import bomb_png, extraneous_jpeg, flipped_jpeg, photo

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
    assert formats.header_size(data, formats.detect_format(data)) == (53, 37)


@pytest.mark.parametrize("extension", [".pgm", ".ppm", ".pbm", ".pam", ".pfm", ".hdr", ".ras", ".jp2", "j2k", "avif"])
def test_every_format_opencv_decodes_is_found_sized_and_decoded(extension):
    """Netpbm, Radiance HDR, Sun raster, JPEG 2000 (file and codestream) and AVIF are images too."""
    image = cv2.imread(str(photo(0)))[:37, :53]
    if extension in (".pgm", ".pbm"):
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif extension in (".pfm", ".hdr"):
        image = image.astype(np.float32) / 255
    if extension in ("j2k", "avif"):  # OpenCV writes no JPEG 2000 codestream, PIL does; AVIF from PIL too
        out = io.BytesIO()
        Image.fromarray(image[:, :, ::-1]).save(out, "JPEG2000" if extension == "j2k" else "AVIF", no_jp2=True)
        data = out.getvalue()
    else:
        data = cv2.imencode(extension, image)[1].tobytes()
    fmt = formats.detect_format(data)
    assert fmt == {".pgm": "pnm", ".ppm": "pnm", ".pbm": "pnm", ".pam": "pnm", ".pfm": "pnm"}.get(extension,
                                                                                                   extension.strip("."))
    assert formats.header_size(data, fmt) == (53, 37)
    looked = formats.look(data, 100_000_000, 256)
    assert (looked.error, looked.shape[:2]) == ("", (53, 37))
    assert formats.look(data, 53 * 37 - 1, 256).error.startswith(f"too large to decode: the {fmt} header says 53x37")


def test_netpbm_headers_with_comments_and_bombs():
    assert formats.header_size(b"P6\n# made by hand\n# twice\n120 # width\n100\n255\n", "pnm") == (120, 100)
    bomb = b"P4\n100000 100000\n" + bytes(64)  # 1 bit a pixel: 1.25 GB for 64 bytes' worth of claim
    assert formats.look(bomb, 100_000_000, 256).error == (
        "too large to decode: the pnm header says 100000x100000 pixels, over the limit of 100000000 (ingest.max_pixels)")
    assert formats.detect_format(b"Plain text, not an image") == "unknown"


def test_header_size_of_a_cut_header_is_unknown():
    assert formats.header_size(b"\x89PNG\r\n\x1a\n\x00\x00", "png") is None
    assert formats.header_size(b"\xff\xd8\xff\xe0\x00", "jpeg") is None


def test_bomb_is_refused_without_calling_the_decoder(monkeypatch):
    calls = []
    monkeypatch.setattr(formats.cv2, "imdecode", lambda *args: calls.append(args))
    decoded = formats.decode(bomb_png(100_000, 100_000), max_pixels=100_000_000)
    assert decoded.error == ("too large to decode: the png header says 100000x100000 pixels, over the limit of "
                             "100000000 (ingest.max_pixels)")
    assert calls == []  # the decoder never saw it, so it never allocated the 10 GB the header asks for
    formats.decode(bomb_png(100, 100), max_pixels=100_000_000)
    assert len(calls) == 1  # a small image goes on to the decoder


def test_the_limit_is_on_pixels_not_sides():
    def png(height, width):
        return cv2.imencode(".png", np.zeros((height, width), np.uint8))[1].tobytes()

    assert formats.decode(png(5, 20), max_pixels=100).ok
    assert formats.decode(png(6, 20), max_pixels=100).error == (
        "too large to decode: the png header says 20x6 pixels, over the limit of 100 (ingest.max_pixels)")
    assert formats.decode(png(6, 20)).ok  # no limit given: preprocess reads only validated images


# --- look: what ingest decodes of a file ------------------------------------------------------

def jpeg(image: np.ndarray, **options) -> bytes:
    mode = "L" if image.ndim == 2 else "RGB"
    out = io.BytesIO()
    Image.fromarray(image, mode).save(out, "JPEG", quality=90, **options)
    return out.getvalue()


@pytest.mark.parametrize("options", [{}, {"progressive": True}])
@pytest.mark.parametrize("channels", [1, 3])
def test_look_reports_what_decode_reports_and_gives_the_grey_pixels(channels, options):
    rgb = cv2.cvtColor(cv2.imread(str(photo(3))), cv2.COLOR_BGR2RGB)
    data = jpeg(rgb if channels == 3 else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), **options)
    looked = formats.look(data, max_pixels=10**8, side=256)
    decoded = formats.decode(data, max_pixels=10**8)
    assert looked.error == "" and looked.shape == formats.shape_of(decoded.image)
    assert looked.shape[2] == channels
    # the grey plane OpenCV decodes directly, pixel for pixel
    assert np.array_equal(looked.pixels, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE))


def test_look_decodes_a_large_jpeg_at_a_reduced_scale_with_the_same_facts():
    big = cv2.resize(cv2.imread(str(photo(4))), None, fx=9, fy=9, interpolation=cv2.INTER_CUBIC)  # about 1150 px
    data = jpeg(cv2.cvtColor(big, cv2.COLOR_BGR2RGB))
    looked = formats.look(data, max_pixels=10**8, side=256)
    height, width = big.shape[:2]
    assert looked.shape == (width, height, 3, 8)
    # 1/4 scale: the largest reduction that keeps the longest side at 256 px or more
    assert looked.pixels.shape == (-(-height // 4), -(-width // 4))
    reduced, full = facts.facts(looked.pixels), facts.facts(formats.decode(data).image)
    assert abs(reduced.brightness - full.brightness) < 1 and abs(reduced.contrast - full.contrast) < 1
    assert abs(reduced.sharpness - full.sharpness) < 0.1 * full.sharpness
    assert bin(int(reduced.phash, 16) ^ int(full.phash, 16)).count("1") <= 2


def test_look_ignores_the_exif_rotation_as_decode_does():
    rgb = np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(photo(5))), cv2.COLOR_BGR2RGB)[:, :90])  # not square
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    data = jpeg(rgb, exif=exif.tobytes())
    looked = formats.look(data, max_pixels=10**8, side=256)
    height, width = rgb.shape[:2]
    assert looked.shape[:2] == (width, height) and looked.pixels.shape == (height, width)
    assert formats.decode(data).image.shape[:2] == (height, width)


def test_look_refuses_what_decode_refuses():
    whole = jpeg(cv2.cvtColor(cv2.imread(str(photo(6))), cv2.COLOR_BGR2RGB))
    for data in (b"", b"hello", whole[: len(whole) // 2], bomb_png(100_000, 100_000)):
        looked, decoded = formats.look(data, max_pixels=10**8, side=256), formats.decode(data, max_pixels=10**8)
        assert looked.error == decoded.error != "" and looked.shape is None and looked.pixels is None


def test_look_decodes_other_files_unchanged():
    rgba = np.random.default_rng(1).integers(0, 255, (20, 30, 4), dtype=np.uint8)
    data = cv2.imencode(".png", rgba)[1].tobytes()
    looked = formats.look(data, max_pixels=10**8, side=256)
    assert looked.shape == (30, 20, 4, 8) and np.array_equal(looked.pixels, rgba)


def test_look_without_a_pixel_limit_checks_no_size():
    data = jpeg(cv2.cvtColor(cv2.imread(str(photo(2))), cv2.COLOR_BGR2RGB))
    looked = formats.look(data, max_pixels=None, side=256)
    assert looked.error == "" and looked.shape == formats.look(data, max_pixels=10**8, side=256).shape


def test_heif_is_named_and_the_reason_says_what_to_do():
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200)  # an iPhone photo's first box
    assert formats.detect_format(heic) == "heif"
    assert formats.look(heic, 100_000_000, 256).error == (
        "cannot decode heif (HEIC): no HEIF decoder in this OpenCV, or a damaged file; convert it to JPEG or PNG")


def test_decoder_warnings_are_tied_to_the_image_and_the_rest_of_stderr_passes(capfd):
    """libjpeg prints "Corrupt JPEG data" on fd 2 and decodes anyway: caught per decode, it refuses the JPEG."""
    good = photo(0).read_bytes()
    with formats.DecoderMessages() as messages:
        results = [formats.look(data, None, 256).error
                   for data in (good, flipped_jpeg(good), good, extraneous_jpeg(good), good[:1500] + b"\xff\xd9")]
        decoded = formats.decode(flipped_jpeg(good))
        os.write(2, b"not the decoder's\n")  # printed meanwhile, by something else: passed on
    assert results == ["", "corrupt JPEG data: premature end of data segment", "",
                       "corrupt JPEG data: 3 extraneous bytes before marker 0xda",
                       "corrupt JPEG data: premature end of data segment"]  # cut, an end marker put back
    assert decoded == (None, "corrupt JPEG data: premature end of data segment") and messages.notes == []
    assert capfd.readouterr().err == "not the decoder's\n"
    # outside the context nothing is caught: the decoder's own behaviour, garbled pixels and a warning
    assert formats.look(flipped_jpeg(good), None, 256).error == ""
    assert "Corrupt JPEG data: premature end of data segment" in capfd.readouterr().err

"""What an image file really is: format from its magic bytes, and whether OpenCV can decode it.

The extension is never trusted: a PNG named `.jpg` is a PNG, a text file named `.jpg` is not an
image. Every failure comes back as a reason in words, never as an exception, so one bad file
cannot stop a stage.
"""

from __future__ import annotations

import os
import re
import struct
import sys
import tempfile
from typing import NamedTuple

import cv2
import numpy as np

# (prefix, format); checked in order
_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jp2"),  # JPEG 2000 file
    (b"\xff\x4f\xff\x51", "j2k"),  # JPEG 2000 codestream
    (b"#?RADIANCE", "hdr"),
    (b"#?RGBE", "hdr"),
    (b"\x59\xa6\x6a\x95", "ras"),  # Sun raster
)
# Netpbm: P1-P6 (PBM, PGM, PPM), P7 (PAM), PF/Pf (PFM), then whitespace
_PNM = re.compile(rb"P[1-7Ff]\s")


# ISO media files (a first box `ftyp`) hold AVIF and HEIF images, and MP4/QuickTime videos: the
# major brand or a compatible brand says which
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


def detect_format(data: bytes) -> str:
    """The format named by the file's first bytes: an image format, `media` (an MP4 or QuickTime
    file, not an image), `unknown` or `empty`."""
    if not data:
        return "empty"
    for prefix, name in _MAGIC:
        if data.startswith(prefix):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if _PNM.match(data):
        return "pnm"
    if data[4:8] == b"ftyp":
        end = min(int.from_bytes(data[:4], "big"), len(data), 256)
        brands = {data[8:12]} | {data[i:i + 4] for i in range(16, end - 3, 4)}
        return "avif" if brands & _AVIF_BRANDS else "heif" if brands & _HEIF_BRANDS else "media"
    return "unknown"


class Decoded(NamedTuple):
    image: np.ndarray | None  # H x W (grey) or H x W x C, OpenCV channel order (BGR/BGRA)
    error: str  # empty when decoded

    @property
    def ok(self) -> bool:
        return self.image is not None


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) as the file's header states it, read without decoding; None if unknown.

    A few bytes can claim a 100000 x 100000 image (a decompression bomb): the size is checked
    before the decoder allocates anything. Formats follow their specifications (PNG IHDR, JPEG
    SOF marker, GIF logical screen, BMP DIB header, WebP VP8/VP8L/VP8X, TIFF first IFD, AVIF and
    HEIF `ispe` boxes).
    """
    try:
        if fmt == "png" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if fmt == "jpeg":
            return _jpeg_size(data)
        if fmt == "gif":
            return struct.unpack("<HH", data[6:10])
        if fmt == "bmp":
            if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
                return struct.unpack("<HH", data[18:22])
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)  # a negative height means rows stored top-down
        if fmt == "webp":
            return _webp_size(data)
        if fmt == "tiff":
            return _tiff_size(data)
        if fmt in ("avif", "heif"):
            return _ispe_size(data)
        if fmt == "pnm":
            return _pnm_size(data)
        if fmt == "jp2":  # the image header box: height, then width
            pos = data.find(b"ihdr", 0, 4096)
            return struct.unpack(">II", data[pos + 4:pos + 12])[::-1] if pos >= 0 else None
        if fmt == "j2k":  # the SIZ segment: the grid's size, less its offset
            width, height, left, top = struct.unpack(">IIII", data[8:24])
            return width - left, height - top
        if fmt == "ras":
            return struct.unpack(">II", data[4:12])
        if fmt == "hdr":  # after the header's blank line: "-Y <height> +X <width>" (or another order)
            found = re.search(rb"\n\n([-+][XY]) (\d+) ([-+][XY]) (\d+)", data[:4096])
            if found:
                first, second = int(found[2]), int(found[4])
                return (second, first) if found[1].endswith(b"Y") else (first, second)
    except struct.error:  # the header is cut short: the decoder will say what is wrong
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    frame = jpeg_frame(data)
    return frame[:2] if frame else None


# SOF0..SOF15 hold the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOS = frozenset({0xDA})


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, bits per sample) from a JPEG's frame header; None if not found."""
    pos = _jpeg_segment(data, _SOF)
    if pos is None:
        return None
    precision, height, width, components = struct.unpack(">BHHB", data[pos + 4:pos + 10])
    return width, height, components, precision


def jpeg_scan_start(data: bytes) -> int | None:
    """Where a JPEG's first start-of-scan marker is; None if not found."""
    return _jpeg_segment(data, _SOS)


def _jpeg_segment(data: bytes, markers: frozenset) -> int | None:
    """Where the first segment with one of `markers` starts, walking the segments from the start of
    the file up to the first scan (the frame header comes before it); None if not found."""
    pos = 2  # after the SOI marker
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker in markers:
            return pos
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        elif marker == 0xDA:  # start of scan: what comes next is compressed data
            return None
        else:
            pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return None


def _ispe_size(data: bytes) -> tuple[int, int] | None:
    """The largest image size an AVIF/HEIF file's `ispe` (image spatial extents) boxes state.

    Each image item (the picture, its thumbnail, each tile of a grid) has one, in the metadata
    at the start of the file: the largest is at least the picture's, enough to refuse a bomb.
    """
    sizes, pos = [], data.find(b"ispe", 0, 1 << 16)
    while pos >= 0:  # the box: size, "ispe", version and flags, width, height (4 bytes each)
        sizes.append(struct.unpack(">II", data[pos + 8:pos + 16]))
        pos = data.find(b"ispe", pos + 4, 1 << 16)
    return max(sizes, key=lambda size: size[0] * size[1]) if sizes else None


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    header = data[:1024]
    if header[1:2] == b"7":  # PAM: WIDTH and HEIGHT lines
        width, height = re.search(rb"\bWIDTH\s+(\d+)", header), re.search(rb"\bHEIGHT\s+(\d+)", header)
        return (int(width[1]), int(height[1])) if width and height else None
    # width and height are the first two numbers after the magic; a comment runs to the line's end
    numbers = re.match(rb"(?:\s|#[^\n]*\n)*(\d+)(?:\s|#[^\n]*\n)+(\d+)", header[2:])
    return (int(numbers[1]), int(numbers[2])) if numbers else None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the frame tag and start code
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":  # lossless: 14-bit (size - 1) fields after the signature byte
        bits = struct.unpack("<I", data[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: 24-bit (size - 1) canvas fields
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    count = struct.unpack(order + "H", data[ifd:ifd + 2])[0]
    size = {}
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength: a SHORT (type 3) or a LONG
            value, end = ("H", entry + 10) if kind == 3 else ("I", entry + 12)
            size[tag] = struct.unpack(order + value, data[entry + 8:end])[0]
    return (size[256], size[257]) if len(size) == 2 else None


def refusal(data: bytes, fmt: str, max_pixels: int | None, size: tuple[int, int] | None = None) -> str:
    """Why these bytes must not go to the decoder ("" if they may): checks that need no decoding.

    `size`: the header's (width, height), when the caller has already read it.
    """
    if fmt == "empty":
        return "empty file (0 bytes)"
    if fmt == "unknown":
        return "not an image (no known image signature in the first bytes)"
    if fmt == "media":
        return "not an image (an MP4 or QuickTime video, or other ISO media file)"
    size = (size or header_size(data, fmt)) if max_pixels else None  # no limit: no size to check
    if size and size[0] * size[1] > max_pixels:
        return (f"too large to decode: the {fmt} header says {size[0]}x{size[1]} pixels, "
                f"over the limit of {max_pixels} (ingest.max_pixels)")
    # OpenCV decodes a cut-off JPEG or PNG without complaint (the rest is grey): check the end marker
    if fmt == "jpeg" and not _jpeg_has_end(data):
        return "truncated jpeg (no end-of-image marker)"
    if fmt == "png" and data.rfind(b"IEND", max(0, len(data) - 64)) < 0:
        return "truncated png (no IEND chunk)"
    return ""


def _jpeg_has_end(data: bytes) -> bool:
    """Whether the JPEG's end-of-image marker follows the start of its image data.

    Searched from the end, where it almost always is (5x faster than from the front). When it is
    not in the last 1 KB, data may follow the image (a phone's motion photo appends a video):
    then any end marker after the start of the scan counts. The compressed data cannot hold one
    (a 0xFF byte there is followed by 0x00 or a restart marker), and one before the scan, in an
    embedded thumbnail, does not count.
    """
    if data.rfind(b"\xff\xd9", max(0, len(data) - 1024)) >= 0:
        return True
    scan = jpeg_scan_start(data)
    return scan is not None and data.rfind(b"\xff\xd9", scan) >= 0


def decode(data: bytes, max_pixels: int | None = None) -> Decoded:
    """Decode image bytes unchanged (keeps 16-bit depth and alpha, so they can be reported).

    With `max_pixels`, an image whose header claims more pixels is refused before decoding.
    """
    fmt = detect_format(data)
    reason = refusal(data, fmt, max_pixels)
    return Decoded(None, reason) if reason else _imdecode(data, fmt, cv2.IMREAD_UNCHANGED)


class DecoderMessages:
    """While active, what the decoders print is tied to the image that made them print it.

    libjpeg reports damaged compressed data ("Corrupt JPEG data: 3 extraneous bytes before
    marker 0xda", "... premature end of data segment") as a warning, decodes anyway (the rest
    of the picture garbled) and prints the warning on stderr itself: OpenCV leaves libjpeg's
    default output_message in place, so neither cv2.utils.logging nor cv2.setLogLevel sees it,
    and a check of the compressed bytes in Python could find bad marker sequences but not a bad
    Huffman code. So fd 2 is pointed at a temporary file for a batch of decodes (a few system
    calls per batch), and a decode looks at the file's offset before and after (two lseeks, about
    0.5 µs of a 41 µs look at a flowers photo): what appeared in between is that image's. Whatever else was printed meanwhile
    goes to the real stderr at the end. One thread decodes at a time (ingest's workers are
    processes): a decoder running in another thread could mix its messages in.
    """

    def __init__(self) -> None:
        self.notes: list[str] = []  # messages that do not make an image unusable, for the caller to name

    def __enter__(self) -> "DecoderMessages":
        global _messages
        self._file = tempfile.TemporaryFile()
        self._fd = self._file.fileno()
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(self._fd, 2)  # fd 2 and _fd now share one file offset
        self._claimed: list[tuple[int, int]] = []
        self._previous, _messages = _messages, self
        return self

    def __exit__(self, *exc) -> None:
        global _messages
        _messages = self._previous
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        end, start = os.lseek(self._fd, 0, os.SEEK_CUR), 0
        for first, last in [*self._claimed, (end, end)]:  # pass on what no decode printed
            if first > start:
                os.write(self._saved, os.pread(self._fd, first - start, start))
            start = last
        os.close(self._saved)
        self._file.close()

    def mark(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def since(self, mark: int) -> list[str]:
        """The lines printed since `mark` (none, almost always)."""
        end = os.lseek(self._fd, 0, os.SEEK_CUR)
        if end == mark:
            return []
        self._claimed.append((mark, end))
        text = os.pread(self._fd, end - mark, mark).decode("utf-8", "replace")
        return [line.strip() for line in text.splitlines() if line.strip()]


_messages: DecoderMessages | None = None  # the active one, if any

# libjpeg's warnings that its output is not the picture (jerror.h: JWRN_EXTRANEOUS_DATA,
# JWRN_HIT_MARKER, JWRN_HUFF_BAD_CODE, JWRN_JPEG_EOF, JWRN_MUST_RESYNC, JWRN_BOGUS_PROGRESSION,
# JWRN_NOT_SEQUENTIAL, JWRN_TOO_MUCH_DATA). The others (an unknown JFIF revision, an odd Adobe
# transform, a bad ICC profile) leave the pixels alone: noted, not refused.
_CORRUPT = ("Corrupt JPEG data", "Premature end of JPEG file", "Inconsistent progression sequence",
            "Invalid SOS parameters", "Application transferred too many scanlines")
_HARMLESS = ("Corrupt JPEG data: bad ICC marker",)


def _corrupt_jpeg(messages: list[str]) -> str:
    """The reason to refuse a JPEG its decoder printed `messages` for ("" if they are harmless)."""
    bad = [m for m in messages if m.startswith(_CORRUPT) and not m.startswith(_HARMLESS)]
    if not bad:
        return ""
    # "Corrupt JPEG data: 3 extraneous ..." -> "corrupt JPEG data: 3 extraneous ..."
    words = [m.split(": ", 1)[1] if m.startswith("Corrupt JPEG data: ") else m[0].lower() + m[1:] for m in bad]
    return "corrupt JPEG data: " + "; ".join(dict.fromkeys(words))


def _imdecode(data: bytes, fmt: str, flags: int) -> Decoded:
    messages = _messages
    mark = messages.mark() if messages else 0
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:  # OpenCV raises on some malformed headers instead of returning None
        return Decoded(None, f"cannot decode {fmt}: {str(exc).strip().splitlines()[-1]}")
    finally:
        printed = messages.since(mark) if messages else None
    if printed:
        reason = _corrupt_jpeg(printed) if fmt == "jpeg" else ""
        if reason:
            return Decoded(None, reason)
        messages.notes += printed
    if image is None or image.size == 0:
        if fmt == "heif":  # OpenCV's wheels have no HEIF decoder (AVIF, yes)
            return Decoded(None, "cannot decode heif (HEIC): no HEIF decoder in this OpenCV, or a damaged file; "
                                 "convert it to JPEG or PNG")
        return Decoded(None, f"cannot decode {fmt}: truncated or corrupt file")
    return Decoded(image, "")


class Looked(NamedTuple):
    """One file as ingest records it: the image's layout as `decode` gives it, and pixels to describe.

    A named tuple, not a dataclass: ingest makes one per image, and a tuple is cheaper to build.
    """
    format: str  # from the magic bytes (detect_format)
    shape: tuple[int, int, int, int] | None  # (width, height, channels, bit depth); None if not decoded
    pixels: np.ndarray | None  # the decoded image, or only its grey plane, perhaps at a reduced scale
    error: str  # empty when decoded


# IMREAD_REDUCED_GRAYSCALE_<n>: the JPEG decoder scales down by n inside its inverse DCT
_REDUCED_GREY = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                 (2, cv2.IMREAD_REDUCED_GRAYSCALE_2))


def look(data: bytes, max_pixels: int | None, side: int) -> Looked:
    """Decode enough of an image to check it and describe it at a working size of about `side` px.

    The common case, an 8-bit grey or colour JPEG, is decoded straight to grey, at 1/2, 1/4 or
    1/8 scale when its longest side is still at least `side` after it: the decoder then skips
    the colour conversion and most of the inverse DCT (2x cheaper for a 128 px photo, far more
    for a large one), and it still reads every byte of the compressed data, so a corrupt file
    fails as it would at full size. The header gives the layout `decode` would report. Any
    other file is decoded unchanged, as `decode` does.
    """
    fmt = detect_format(data)
    frame = jpeg_frame(data) if fmt == "jpeg" else None
    reason = refusal(data, fmt, max_pixels, frame[:2] if frame else None)
    if reason:
        return Looked(fmt, None, None, reason)
    if frame and frame[2] in (1, 3) and frame[3] == 8:  # not CMYK, not 12-bit: OpenCV converts those
        width, height, components, _ = frame
        flags = cv2.IMREAD_GRAYSCALE
        for n, reduced in _REDUCED_GREY:
            if -(-max(width, height) // n) >= side:
                flags = reduced
                break
        # the header's width and height are the stored ones: do not let EXIF rotate the pixels
        image, error = _imdecode(data, fmt, flags | cv2.IMREAD_IGNORE_ORIENTATION)
        return Looked(fmt, None if error else (width, height, components, 8), image, error)
    image, error = _imdecode(data, fmt, cv2.IMREAD_UNCHANGED)
    return Looked(fmt, None if error else shape_of(image), image, error)


def shape_of(image: np.ndarray) -> tuple[int, int, int, int]:
    """(width, height, channels, bit depth) of a decoded image."""
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    bit_depth = image.dtype.itemsize * 8
    return width, height, channels, bit_depth

"""Ingest (and validate's verdict) on real images from ../shared/datasets, and on the bad-input
corpus: every odd file the pipeline must survive, built here from real photos (no binaries in git).
"""

import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imgpipe.core.runner import run_stage
from stages import ingest
from imgpipe.data import ingestion
from stages import validate
from imgpipe.data import validation
from imgpipe.data.manifest import BYTE_COLUMNS, read_manifest
from imgpipe.core.errors import StageError
from imgpipe.core.params import ParamsError, params_from_dict
from imgpipe.data.sources import Source

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
FLOWERS = SHARED / "flowers5-128px" / "flowers"
MNIST = SHARED / "mnist-t10k"


def run_ingest(tmp_path, source, workers: int = 0, **ingest_params) -> pd.DataFrame:
    manifest = tmp_path / "manifest.csv"
    params = params_from_dict({"ingest": {"source": str(source), **ingest_params}, "paths": {"manifest": str(manifest)},
                               "runtime": {"workers": workers, "ingest_cache_dir": ""}})
    ingest.run(params.ingest, params.paths, params.runtime)
    return pd.read_csv(manifest, dtype={"id": str, "label": str, "path": str}, keep_default_na=False)


def flower_files(n: int, cls: str = "daisy"):
    return sorted((FLOWERS / cls).glob("*.jpg"))[:n]


# --- the bad-input corpus --------------------------------------------------------------------

def photo(i: int, cls: str = "daisy") -> Path:
    """The i-th real photo of a class: each case gets its own, so no two are near-duplicates."""
    return flower_files(i + 1, cls)[i]


def pil_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header claims width x height 8-bit grey pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def scan_data(data: bytes) -> int:
    """Where a JPEG's compressed data starts: after its start-of-scan segment."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + struct.unpack(">H", data[sos + 2:sos + 4])[0]


def flipped_jpeg(data: bytes) -> bytes:
    """The JPEG with 20 bytes in the middle of its compressed data flipped: its end marker kept."""
    middle = (scan_data(data) + len(data)) // 2
    return data[:middle] + bytes(b ^ 0x55 for b in data[middle:middle + 20]) + data[middle + 20:]


def extraneous_jpeg(data: bytes) -> bytes:
    """The JPEG with 3 stray bytes before its start-of-scan marker."""
    sos = data.index(b"\xff\xda")
    return data[:sos] + b"\x12\x34\x56" + data[sos:]


def grey(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2GRAY)


OUTSIDE = "outside.jpg"  # a file next to the source folder, which a link inside points to
OUTSIDE_FOLDER = "outside-folder"  # a folder next to the source folder (with a photo), which a link points to
# what a link in the corpus points to (relative to the folder the corpus is built in)
LINK_TO_FILE_OUTSIDE, LINK_TO_FOLDER_OUTSIDE, LINK_TO_FOLDER_INSIDE = OUTSIDE, OUTSIDE_FOLDER, "src/cat"

NAMED_PIPE = "a named pipe"  # made with os.mkfifo
NOT_REGULAR = "cannot read file: not a regular file (a folder, named pipe, socket or device)"


def folder_link(target: str) -> str:
    """The reason a link to the folder `target` gets ({root}: the folder the corpus is built in)."""
    return "symbolic link to the folder {root}/" + target + ": links to folders are not followed"


ACCEPTED = "accepted"
# path in the source -> (its bytes, manifest facts: format, width, height, channels, bit_depth, error,
# validate's verdict: ACCEPTED or the exact quarantine reason). NaN sizes: not decoded.
CORPUS = {
    "cat/photo.jpg": (lambda: photo(0).read_bytes(), ("jpeg", 128, 128, 3, 8, ""), ACCEPTED),
    "cat/truncated.jpg": (lambda: photo(1).read_bytes()[:1500],
                          ("jpeg", None, None, None, None, "truncated jpeg (no end-of-image marker)"),
                          "truncated jpeg (no end-of-image marker)"),
    "cat/empty.jpg": (lambda: b"", ("empty", None, None, None, None, "empty file (0 bytes)"), "empty file (0 bytes)"),
    "cat/notes.jpg": (lambda: b"this is not an image\n",
                      ("unknown", None, None, None, None, "not an image (no known image signature in the first bytes)"),
                      "not an image (no known image signature in the first bytes)"),
    # the real format is recorded; the extension is never trusted
    "cat/really a png.jpg": (lambda: cv2.imencode(".png", cv2.imread(str(photo(2))))[1].tobytes(),
                             ("png", 128, 128, 3, 8, ""), ACCEPTED),
    "cat/grey16.png": (lambda: cv2.imencode(".png", grey(photo(3)).astype(np.uint16) * 257)[1].tobytes(),
                       ("png", 128, 128, 1, 16, ""), ACCEPTED),
    # OpenCV converts CMYK to BGR: 3 channels, the photo's colours
    "cat/cmyk.jpg": (lambda: pil_bytes(Image.open(photo(4)).convert("CMYK"), "JPEG", quality=95),
                     ("jpeg", 128, 128, 3, 8, ""), ACCEPTED),
    "cat/alpha.png": (lambda: pil_bytes(Image.open(photo(5)).convert("RGBA"), "PNG"), ("png", 128, 128, 4, 8, ""),
                      ACCEPTED),
    "cat/grey.png": (lambda: cv2.imencode(".png", grey(photo(6)))[1].tobytes(), ("png", 128, 128, 1, 8, ""), ACCEPTED),
    "cat/dot.png": (lambda: pil_bytes(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), ("png", 1, 1, 3, 8, ""),
                    "too small: 1x1 pixels, minimum 8x8"),
    # a decompression bomb: refused from its header (100000 x 100000 grey = 10 GB), never decoded
    "cat/bomb.png": (lambda: bomb_png(100_000, 100_000),
                     ("png", None, None, None, None, "too large to decode: the png header says 100000x100000 "
                                                     "pixels, over the limit of 100000000 (ingest.max_pixels)"),
                     "too large to decode: the png header says 100000x100000 pixels, over the limit of 100000000 "
                     "(ingest.max_pixels)"),
    "cat/flower.gif": (lambda: pil_bytes(Image.open(photo(7)), "GIF"), ("gif", 128, 128, 3, 8, ""), ACCEPTED),
    # AVIF: found in its ISO media `ftyp` box, size from its `ispe` box, decoded by OpenCV
    "cat/flower.avif": (lambda: pil_bytes(Image.open(photo(15)), "AVIF"), ("avif", 128, 128, 3, 8, ""), ACCEPTED),
    # ... and a video in the same kind of file: not an image, and said so
    "cat/clip.jpg": (lambda: b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(100),
                     ("media", None, None, None, None,
                      "not an image (an MP4 or QuickTime video, or other ISO media file)"),
                     "not an image (an MP4 or QuickTime video, or other ISO media file)"),
    # damaged compressed data, end marker intact: libjpeg warns and decodes garbled pixels; its
    # warning, caught per file, is the reason. (A flip the Huffman decoder never trips over gives
    # no warning and is not found: 20 flipped bytes are noticed in 46% of the flowers, 300 in 98%.)
    "cat/flipped.jpg": (lambda: flipped_jpeg(photo(19).read_bytes()),
                        ("jpeg", None, None, None, None, "corrupt JPEG data: premature end of data segment"),
                        "corrupt JPEG data: premature end of data segment"),
    "cat/extraneous.jpg": (lambda: extraneous_jpeg(photo(17).read_bytes()),
                           ("jpeg", None, None, None, None,
                            "corrupt JPEG data: 3 extraneous bytes before marker 0xda"),
                           "corrupt JPEG data: 3 extraneous bytes before marker 0xda"),
    "cat/my photo.jpg": (lambda: photo(8).read_bytes(), ("jpeg", 128, 128, 3, 8, ""), ACCEPTED),
    "cat/fleur-été-花.jpg": (lambda: photo(9).read_bytes(), ("jpeg", 128, 128, 3, 8, ""), ACCEPTED),
    "cat/-rf.jpg": (lambda: photo(10).read_bytes(), ("jpeg", 128, 128, 3, 8, ""), ACCEPTED),
    "cat/link-out.jpg": (LINK_TO_FILE_OUTSIDE, ("unknown", None, None, None, None,
                                                "symbolic link to {root}/outside.jpg, outside the source folder"),
                         "symbolic link to {root}/outside.jpg, outside the source folder"),
    # a link to a folder is one input, never followed (it could lead to / and the whole disk)
    "lion": (LINK_TO_FOLDER_OUTSIDE, ("unknown", None, None, None, None, folder_link(OUTSIDE_FOLDER)),
             folder_link(OUTSIDE_FOLDER)),
    "dog/more cats": (LINK_TO_FOLDER_INSIDE, ("unknown", None, None, None, None, folder_link("src/cat")),
                      folder_link("src/cat")),
    # a named pipe would make a reader wait for a writer, forever
    "cat/pipe.jpg": (NAMED_PIPE, ("unknown", None, None, None, None, NOT_REGULAR), NOT_REGULAR),
    # a link to itself: a loop, not a crash
    "cat/loop.jpg": ("src/cat/loop.jpg", ("unknown", None, None, None, None,
                                          "cannot read file: Too many levels of symbolic links"),
                     "cannot read file: Too many levels of symbolic links"),
    # an image outside any class folder has no label
    "stray.jpg": (lambda: photo(11).read_bytes(), ("jpeg", 128, 128, 3, 8, ""), "no label"),
    # the same bytes under two labels: every copy quarantined; twice under one label: the first kept
    "cat/same.jpg": (lambda: photo(0, "rose").read_bytes(), ("jpeg", 128, 128, 3, 8, ""),
                     "label conflict: same image labelled cat and dog"),
    "dog/same.jpg": (lambda: photo(0, "rose").read_bytes(), ("jpeg", 128, 128, 3, 8, ""),
                     "label conflict: same image labelled cat and dog"),
    "dog/dup-a.jpg": (lambda: photo(1, "rose").read_bytes(), ("jpeg", 128, 128, 3, 8, ""), ACCEPTED),
    "dog/dup-b.jpg": (lambda: photo(1, "rose").read_bytes(), ("jpeg", 128, 128, 3, 8, ""),
                      "duplicate of dog/dup-a.jpg"),
    # a near-copy (re-encoded) under another label: both kept, grouped, reported
    "cat/original.jpg": (lambda: photo(12).read_bytes(), ("jpeg", 128, 128, 3, 8, ""), ACCEPTED),
    "dog/reencoded.jpg": (lambda: cv2.imencode(".jpg", cv2.imread(str(photo(12))), [cv2.IMWRITE_JPEG_QUALITY, 70])[1]
                          .tobytes(), ("jpeg", 128, 128, 3, 8, ""), ACCEPTED),
}


# hidden files and folders: not inputs (no manifest row), but counted (why -> paths)
HIDDEN = {"hidden": ["cat/.DS_Store", "cat/._photo.jpg", ".hidden-class.jpg"],
          "in_hidden_folders": [".ipynb_checkpoints/photo.jpg", ".ipynb_checkpoints/deeper/photo.jpg",
                                "dog/.thumbnails/photo.jpg"]}


def build_corpus(root: Path) -> Path:
    source = root / "src"
    (source / "bird").mkdir(parents=True)  # an empty class folder: no input, so no row
    for rel in [*HIDDEN["hidden"], *HIDDEN["in_hidden_folders"]]:
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        # macOS's AppleDouble `._photo.jpg` holds the photo's metadata, not an image; the others are photos
        (source / rel).write_bytes(b"\x00\x05\x16\x07" + bytes(80) if "._" in rel else photo(18).read_bytes())
    (root / OUTSIDE).write_bytes(photo(13).read_bytes())
    (root / OUTSIDE_FOLDER).mkdir()
    (root / OUTSIDE_FOLDER / "photo.jpg").write_bytes(photo(14).read_bytes())
    for rel, (make, _, _) in CORPUS.items():
        path = source / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if make is NAMED_PIPE:
            os.mkfifo(path)
        elif isinstance(make, str):  # a link
            path.symlink_to(root / make)
        else:
            path.write_bytes(make())
    return source


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus, ingested (two worker processes) and validated: (folder, manifest, result, data quality)."""
    root = tmp_path_factory.mktemp("corpus")
    source = build_corpus(root)
    params = params_from_dict({
        "ingest": {"source": str(source)},
        "runtime": {"workers": 2, "ingest_cache_dir": ""},
        "paths": {"manifest": str(root / "manifest.csv"), "accepted": str(root / "accepted.csv"),
                  "data_quality": str(root / "dq")},
        # everything is reported, nothing gates: this checks each file's outcome
        "validate": {"min_images_per_class": 1, "max_quarantined_fraction": 1.0},
    })
    ingest.run(params.ingest, params.paths, params.runtime)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the stage keeps its GX project in ./gx: not the repository's
        validate.run(params.validate, params.paths, params.ingest)
    manifest = read_manifest(root / "manifest.csv").set_index("path")
    return root, manifest, validation.triage(manifest.reset_index(), params.validate), root / "dq"


@pytest.mark.parametrize("rel", CORPUS)
def test_corpus_file_is_described_by_its_bytes(corpus, rel):
    root, manifest, _, _ = corpus
    fmt, width, height, channels, bit_depth, error = CORPUS[rel][1]
    row = manifest.loc[rel]
    as_int = [None if pd.isna(v) else int(v) for v in row[["width", "height", "channels", "bit_depth"]]]
    assert (row.format, *as_int, row.error if pd.notna(row.error) else "") == \
           (fmt, width, height, channels, bit_depth, error.format(root=root))
    if width is not None:  # decoded: the pixel facts are there
        assert row[["sharpness", "brightness", "contrast"]].notna().all() and re.fullmatch("[0-9a-f]{16}", row.phash)
    if callable(CORPUS[rel][0]):
        assert row.id == hashlib.sha1((Path(root) / "src" / rel).read_bytes()).hexdigest()
        assert row.bytes == (Path(root) / "src" / rel).stat().st_size


@pytest.mark.parametrize("rel", CORPUS)
def test_corpus_file_gets_its_verdict(corpus, rel):
    root, _, result, _ = corpus
    verdict = CORPUS[rel][2].format(root=root)
    quarantined = dict(zip(result.quarantine["path"], result.quarantine["reason"]))
    if verdict == ACCEPTED:
        assert rel in set(result.accepted["path"]) and rel not in quarantined
    else:
        assert quarantined.get(rel) == verdict


def test_corpus_every_input_is_accounted_for(corpus):
    root, manifest, result, dq = corpus
    summary = json.loads((dq / "summary.json").read_text())
    assert summary["inputs"] == len(CORPUS) == len(manifest)  # the empty class folder adds no row
    # hidden files are not inputs, but counted: the summary says what was left out, and why
    assert summary["skipped"] == {"hidden": 3, "in_hidden_folders": 3, "other_files": 0}
    assert json.loads((root / "manifest.csv.skipped.json").read_text()) == summary["skipped"]
    assert not set(manifest.index) & {*HIDDEN["hidden"], *HIDDEN["in_hidden_folders"]}
    assert ("Skipped, not inputs: **6** files: 3 hidden (a name starting with a dot: `.DS_Store`, macOS's "
            "`._photo.jpg`); 3 in hidden folders (`.ipynb_checkpoints/`, `.git/`...).\n") in (dq / "summary.md").read_text()
    # the stage's quarantine list is exactly the files CORPUS gives a reason (counted here, not by the summary)
    bad = {rel for rel, (_, _, verdict) in CORPUS.items() if verdict != ACCEPTED}
    quarantined = pd.read_csv(dq / "quarantine.csv", dtype=str, keep_default_na=False)["path"]
    assert sorted(quarantined) == sorted(bad) and summary["quarantined"] == len(bad)
    assert summary["ingested"] == len(CORPUS) - len(bad)
    assert set(summary["classes"]) == {"cat", "dog"}
    # the original and its re-encoded copy (other label): one group, named by the smaller id
    pair = result.accepted.set_index("path").loc[["cat/original.jpg", "dog/reencoded.jpg"]]
    assert pair["group"].nunique() == 1 and pair["group"].iloc[0] == min(pair["id"])
    assert summary["near_duplicates"]["groups_mixing_labels"] == 1
    accepted_csv = pd.read_csv(root / "accepted.csv", dtype=str, keep_default_na=False)
    assert list(accepted_csv["path"]) == list(result.accepted["path"])  # odd names survive the CSV round trip


def test_corpus_summary_page_shows_offenders_with_thumbnails(corpus):
    _, _, result, dq = corpus
    page = (dq / "summary.md").read_text()
    links = re.findall(r"\]\((summary_files/[^)]+)\)", page)
    assert "summary_files/classes.png" in links and len(links) > 1
    for link in links:  # every picture the page shows is there, next to it
        assert (dq / link).is_file(), link
    thumbnails = [cv2.imread(str(dq / link)) for link in links if link.endswith(".jpg")]
    assert thumbnails and all(max(t.shape[:2]) == 96 for t in thumbnails)
    # the near-duplicate group that mixes labels, named by its image with the smaller id
    named_by = result.accepted.set_index("path").loc[["cat/original.jpg", "dog/reencoded.jpg"], "id"].idxmin()
    assert f"| {named_by} | 2 | 2 | 0 |" in page


def test_manifest_bytes_do_not_depend_on_the_number_of_workers(tmp_path, corpus):
    source = corpus[0] / "src"
    run_ingest(tmp_path, source, workers=1)
    serial = (tmp_path / "manifest.csv").read_bytes()
    run_ingest(tmp_path, source, workers=2)
    assert (tmp_path / "manifest.csv").read_bytes() == serial == (corpus[0] / "manifest.csv").read_bytes()


def test_empty_class_folder_is_named_in_a_warning(tmp_path, caplog):
    (tmp_path / "bird").mkdir()
    (tmp_path / "cat").mkdir()
    shutil.copy(photo(0), tmp_path / "cat" / "a.jpg")
    with caplog.at_level(logging.WARNING, logger="imgpipe.data.sources"):
        records = list(Source(tmp_path).records())
    assert [r.path for r in records] == ["cat/a.jpg"]
    assert caplog.messages == ["bird/ holds no files, so there is no class 'bird' from it"]


def test_split_folders_are_recorded(tmp_path):
    root = tmp_path / "src"
    for split in ("train", "test"):
        (root / split / "tulip").mkdir(parents=True)
        for f in flower_files(2, "tulip") if split == "train" else flower_files(3, "tulip")[2:]:
            shutil.copy(f, root / split / "tulip" / f.name)
    m = run_ingest(tmp_path, root)
    assert m.source_split.tolist() == ["test", "train", "train"] and set(m.label) == {"tulip"}


def test_a_file_too_large_to_be_an_image_is_hashed_as_it_streams_not_read(tmp_path):
    root = tmp_path / "src"
    (root / "cat").mkdir(parents=True)
    shutil.copy(photo(0), root / "cat" / "photo.jpg")
    limit = ingestion.max_file_bytes(1000)  # 8 bytes a pixel + 64 MiB
    with open(root / "cat" / "clip.jpg", "wb") as fh:  # a video named .jpg, one byte too many (sparse: no disk used)
        fh.write(b"\x00\x00\x00\x18ftypmp42")
        fh.truncate(limit + 1)
    m = run_ingest(tmp_path, root, max_pixels=1000).set_index("path")
    clip = m.loc["cat/clip.jpg"]
    digest = hashlib.sha1(b"\x00\x00\x00\x18ftypmp42" + bytes(limit + 1 - 12)).hexdigest()
    assert (clip.id, clip.format, clip.bytes, clip.width) == (digest, "media", limit + 1, "")
    assert clip.error == (f"too large to read: {limit + 1} bytes, more than an image of 1000 pixels "
                          f"(ingest.max_pixels) can take ({limit} bytes)")
    assert m.loc["cat/photo.jpg"].error.startswith("too large to decode")  # read: 128 x 128 is over 1000 pixels


def test_a_jpeg_with_data_after_its_end_is_whole(tmp_path):
    """A phone's motion photo is a JPEG with a video after its end marker: not a truncated JPEG."""
    root = tmp_path / "src"
    (root / "cat").mkdir(parents=True)
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(50_000)
    (root / "cat" / "motion.jpg").write_bytes(photo(1).read_bytes() + video)
    # a JPEG with a thumbnail (a whole JPEG, end marker included) in a comment before its image data
    thumbnail = cv2.imencode(".jpg", cv2.imread(str(photo(3)))[:16, :16])[1].tobytes()
    data = photo(2).read_bytes()
    with_thumbnail = data[:2] + b"\xff\xfe" + struct.pack(">H", len(thumbnail) + 2) + thumbnail + data[2:]
    (root / "cat" / "whole.jpg").write_bytes(with_thumbnail + video)
    (root / "cat" / "cut.jpg").write_bytes(with_thumbnail[:-2] + video)  # no end marker after the image data
    assert b"\xff\xd9" in with_thumbnail[:-2]  # the thumbnail's
    m = run_ingest(tmp_path, root).set_index("path")
    assert [(m.loc[f"cat/{name}.jpg"].error, str(m.loc[f"cat/{name}.jpg"].width)) for name in ("motion", "whole")] \
        == [("", "128"), ("", "128")]
    assert m.loc["cat/cut.jpg"].error == "truncated jpeg (no end-of-image marker)"


def test_names_that_are_not_utf8_are_quarantined_and_odd_ones_kept(tmp_path):
    """Linux file names are bytes: one that is not UTF-8 cannot go into the UTF-8 manifest as it is."""
    root = tmp_path / "src"
    (root / "cat").mkdir(parents=True)
    os.mkdir(os.fsencode(root) + b"/caf\xe9s")  # a class folder named in Latin-1
    names = {b"cat/caf\xe9.jpg": 0, b"caf\xe9s/one.jpg": 1, "cat/new\nline.jpg".encode(): 2,
             'cat/com,ma "quote".jpg'.encode(): 3}
    for name, i in names.items():
        shutil.copy(photo(i), os.fsencode(root) + b"/" + name)
    run_stage(ingest, params_from_dict({"ingest": {"source": str(root)}, "paths": {"manifest": str(tmp_path / "m.csv")},
                                       "runtime": {"ingest_cache_dir": ""}}))
    m = read_manifest(tmp_path / "m.csv").set_index("path")
    reason = "the file or folder name is not UTF-8 text (shown with \\x escapes): rename it"
    assert sorted(m.index) == ["caf\\xe9s/one.jpg", "cat/caf\\xe9.jpg", 'cat/com,ma "quote".jpg', "cat/new\nline.jpg"]
    assert m.loc["cat/caf\\xe9.jpg", "error"] == m.loc["caf\\xe9s/one.jpg", "error"] == reason
    assert m.loc["caf\\xe9s/one.jpg", "label"] == "caf\\xe9s"
    assert m.loc[["cat/new\nline.jpg", 'cat/com,ma "quote".jpg'], "error"].isna().all()  # read and decoded


def test_links_to_folders_are_listed_not_followed(tmp_path):
    """A class folder (or split folder) that is a link is one input with a reason: one to / is not a walk of the disk."""
    root = tmp_path / "src"
    (root / "train" / "tulip").mkdir(parents=True)
    shutil.copy(flower_files(1, "tulip")[0], root / "train" / "tulip")
    (root / "train" / "everything").symlink_to("/")
    (root / "test").symlink_to(root / "train")
    with Source(root) as source:
        records = list(source.records())
    assert [(r.path, r.label, r.source_split, r.problem) for r in records] == [
        ("test", "", "", f"symbolic link to the folder {root}/train: links to folders are not followed"),
        ("train/everything", "", "train", "symbolic link to the folder /: links to folders are not followed"),
        (f"train/tulip/{flower_files(1, 'tulip')[0].name}", "tulip", "train", ""),
    ]


def write_idx(folder: Path, prefix: str, n: int):
    with gzip.open(MNIST / "t10k-images-idx3-ubyte.gz") as fh:
        header = fh.read(16)
        pixels = fh.read(28 * 28 * n)
    with gzip.open(MNIST / "t10k-labels-idx1-ubyte.gz") as fh:
        fh.read(8)
        labels = fh.read(n)
    assert struct.unpack(">I", header[:4])[0] == 2051
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as out:
        out.write(struct.pack(">IIII", 2051, n, 28, 28) + pixels)
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as out:
        out.write(struct.pack(">II", 2049, n) + labels)
    return np.frombuffer(pixels, np.uint8).reshape(n, 28, 28), list(labels)


def test_idx_pairs_with_class_names_and_source_split(tmp_path):
    root = tmp_path / "idx"
    root.mkdir()
    pixels, labels = write_idx(root, "t10k", 30)
    write_idx(root, "train", 20)
    (root / "classes.txt").write_text("\n".join(f"digit{i}" for i in range(10)))
    (root / "README.md").write_text("the first images of MNIST's test set\n")  # not an input, counted
    (root / ".DS_Store").write_bytes(bytes(10))
    m = run_ingest(tmp_path, root)
    assert json.loads((tmp_path / "manifest.csv.skipped.json").read_text()) == {
        "hidden": 1, "in_hidden_folders": 0, "other_files": 1}
    assert len(m) == 50 and m.source_split.value_counts().to_dict() == {"test": 30, "train": 20}
    first = m.iloc[0]
    assert first.path == "t10k-images-idx3-ubyte.gz#0" and first.label == f"digit{labels[0]}"
    assert first.id == __import__("hashlib").sha1(pixels[0].tobytes()).hexdigest()
    assert (first.format, int(first.width), int(first.height), int(first.channels)) == ("idx", 28, 28, 1)
    # raw pixels get the same facts as a decoded image of them
    png = cv2.imencode(".png", pixels[0])[1].tobytes()
    decoded = dict(zip(BYTE_COLUMNS, ingestion.describe(png, max_pixels=10**6)))
    assert first.phash == decoded["phash"] and float(first.sharpness) == decoded["sharpness"]


def test_truncated_idx_is_a_clear_error(tmp_path):
    root = tmp_path / "idx"
    root.mkdir()
    write_idx(root, "t10k", 5)
    data = gzip.decompress((root / "t10k-images-idx3-ubyte.gz").read_bytes())
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(StageError, match="t10k-images-idx3-ubyte.gz: truncated IDX file"):
        run_ingest(tmp_path, root)


@pytest.fixture
def csv_source(tmp_path):
    root = tmp_path / "csvsrc"
    (root / "img").mkdir(parents=True)
    for f in flower_files(3):
        shutil.copy(f, root / "img" / f.name)
    return root


def test_labels_csv_by_path_and_by_id(tmp_path, csv_source):
    a, b, c = (f.name for f in flower_files(3))
    (csv_source / "labels.csv").write_text(f"objectId,value\nimg/{a},yes\n{Path(b).stem},no\nimg/{a},yes\n")
    m = run_ingest(tmp_path, csv_source).set_index("path")
    assert m.loc[f"img/{a}", "label"] == "yes" and m.loc[f"img/{b}", "label"] == "no"
    assert m.loc[f"img/{c}", "label"] == ""  # not in the CSV: listed, unlabelled


def test_labels_csv_with_odd_names_and_an_unknown_label(tmp_path, csv_source):
    names = ["my photo.jpg", "-rf.jpg", "ünï-写真.jpg"]
    for name, f in zip(names, flower_files(6)[3:]):
        shutil.copy(f, csv_source / "img" / name)
    (csv_source / "labels.csv").write_text(
        'file,label\n"img/my photo.jpg",yes\nimg/-rf.jpg,no\nimg/ünï-写真.jpg,maybe\n', encoding="utf-8")
    run_ingest(tmp_path, csv_source)
    manifest = read_manifest(tmp_path / "manifest.csv")
    rules = params_from_dict({"validate": {"classes": ["yes", "no"]}}).validate
    result = validation.triage(manifest, rules)
    assert dict(zip(result.accepted["path"], result.accepted["label"])) == {"img/my photo.jpg": "yes",
                                                                           "img/-rf.jpg": "no"}
    assert dict(zip(result.quarantine["path"], result.quarantine["reason"])) == {
        **{f"img/{f.name}": "no label" for f in flower_files(3)},  # files the CSV does not name
        "img/ünï-写真.jpg": "unknown label 'maybe' (not in validate.classes)"}


BAD_ROWS = "{csv}: {n} bad row{s} (expected `<file or id>,<label>` naming a file in the source folder):"


@pytest.mark.parametrize("rows, reason", [
    ("img/missing.jpg,yes\n", "line 2: 'img/missing.jpg' names no file in {root}"),
    ("img/{a},yes\nimg/{a},no\n", "line 3: 'img/{a}' labelled 'no', but line 2 labels it 'yes'"),
    ("../outside.jpg,yes\n", "line 2: '../outside.jpg' points outside the source folder"),
    ("img/{a}\n", "line 2: expected `<file or id>,<label>`, got 'img/{a}'"),
])
def test_bad_labels_csv_rows_are_named(tmp_path, csv_source, rows, reason):
    a = flower_files(1)[0].name
    (csv_source / "labels.csv").write_text("file,label\n" + rows.format(a=a))
    with pytest.raises(StageError) as error:
        run_ingest(tmp_path, csv_source)
    assert str(error.value).splitlines() == [BAD_ROWS.format(csv=csv_source / "labels.csv", n=1, s=""),
                                             "  " + reason.format(a=a, root=csv_source)]


def test_every_bad_row_of_a_labels_csv_is_named_in_one_error(tmp_path, csv_source):
    """A spreadsheet's ';' on one row, a path outside the source, a name in the wrong case and 22 missing
    files: one run names them all (the first 20, then a count), not one row per run."""
    a, b, c = (f.name for f in flower_files(3))
    missing = "".join(f"img/gone-{i:02}.jpg,yes\n" for i in range(22))
    (csv_source / "labels.csv").write_text(
        f"file,label\nimg/{a};yes\n../outside.jpg,no\nimg/{b.upper()},yes\nimg/{c},no\n{missing}")
    with pytest.raises(StageError) as error:
        run_ingest(tmp_path, csv_source)
    assert str(error.value).splitlines() == [
        BAD_ROWS.format(csv=csv_source / "labels.csv", n=25, s="s"),
        f"  line 2: expected `<file or id>,<label>`, got 'img/{a};yes' (separated by ';': the separator is a comma)",
        "  line 3: '../outside.jpg' points outside the source folder",
        f"  line 4: 'img/{b.upper()}' names no file in {csv_source} (there is 'img/{b}': the letter case differs)",
        *(f"  line {6 + i}: 'img/gone-{i:02}.jpg' names no file in {csv_source}" for i in range(17)),
        "  ... and 5 more bad rows",
    ]


def test_labels_csv_not_utf8(tmp_path, csv_source):
    (csv_source / "labels.csv").write_bytes("file,label\nimg/x.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(StageError, match="labels.csv: not UTF-8 text"):
        run_ingest(tmp_path, csv_source)


@pytest.mark.parametrize("values, message", [
    ({"max_pixels": 0}, "ingest.max_pixels must be >= 1, got 0"),
])
def test_bad_ingest_params_are_named(values, message):
    with pytest.raises(ParamsError, match=message):
        params_from_dict({"ingest": values})


def test_bad_runtime_params_are_named():
    with pytest.raises(ParamsError, match=r"runtime.workers must be >= 0 \(0 = one per CPU core\), got -1"):
        params_from_dict({"runtime": {"workers": -1}})


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match=f"ingest.source {tmp_path / 'nowhere'} does not exist"):
        run_ingest(tmp_path, tmp_path / "nowhere")


def test_class_names_alike_in_folders_and_in_a_labels_csv_are_named(tmp_path, csv_source):
    """`cats/` and `Cats/`; `cat` and `Cat ` in a labels file: kept as written, reported as look-alikes."""
    folders = tmp_path / "folders"
    for name, photos in (("cats", (0, 1)), ("Cats", (2,)), ("dog", (3,))):
        (folders / name).mkdir(parents=True)
        for i in photos:
            shutil.copy(photo(i), folders / name / f"{i}.jpg")
    a, b, c = (f.name for f in flower_files(3))
    (csv_source / "labels.csv").write_text(f"file,label\nimg/{a},cat\nimg/{b},Cat \nimg/{c},cat\n")
    rules = params_from_dict({"validate": {"min_images_per_class": 1}}).validate
    found = []
    for source in (folders, csv_source):
        run_ingest(tmp_path, source)
        result = validation.triage(read_manifest(tmp_path / "manifest.csv"), rules)
        found.append((validation.lookalike_classes(result.classes), result.classes["same_name_as"].notna().sum()))
    assert found == [({"cats": {"Cats": 1, "cats": 2}}, 2), ({"cat": {"Cat": 1, "cat": 2}}, 2)]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_decoder_message_that_is_not_damage_is_logged_with_the_file_name(tmp_path, caplog, workers):
    """libpng warns of a comment chunk with a bad checksum and drops it: the pixels are whole, the
    image is accepted, and the warning, otherwise a bare line on stderr, names its file. It is
    logged by the stage's own process, also when a worker process read the file (a Dask worker's
    log, on another machine, is not the one the user reads)."""
    root = tmp_path / "src"
    (root / "cat").mkdir(parents=True)
    png = cv2.imencode(".png", cv2.imread(str(photo(2))))[1].tobytes()
    comment = png_chunk(b"tEXt", b"Comment\x00hello")
    (root / "cat" / "comment.png").write_bytes(png[:33] + comment[:-4] + bytes(4) + png[33:])  # after IHDR
    shutil.copy(photo(3), root / "cat" / "photo.jpg")
    with caplog.at_level(logging.WARNING, logger="imgpipe.data.ingestion"):
        m = run_ingest(tmp_path, root, workers=workers).set_index("path")
    assert (m.loc["cat/comment.png", "error"], int(m.loc["cat/comment.png", "width"])) == ("", 128)
    assert caplog.messages == ["cat/comment.png: the decoder says: libpng warning: tEXt: CRC error"]

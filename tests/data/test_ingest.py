"""Ingest on real images from ../shared/datasets, plus broken inputs built here."""

import gzip
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from stages import ingest
from stages.cli import StageError
from stages.params import params_from_dict

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
FLOWERS = SHARED / "flowers5-128px" / "flowers"
MNIST = SHARED / "mnist-t10k"


def run_ingest(tmp_path, source, **ingest_params) -> pd.DataFrame:
    manifest = tmp_path / "manifest.csv"
    params = params_from_dict({"ingest": {"source": str(source), **ingest_params}, "paths": {"manifest": str(manifest)}})
    ingest.run(params)
    return pd.read_csv(manifest, dtype={"id": str, "label": str, "path": str}, keep_default_na=False)


def flower_files(n: int, cls: str = "daisy"):
    return sorted((FLOWERS / cls).glob("*.jpg"))[:n]


@pytest.fixture
def folder_source(tmp_path):
    root = tmp_path / "src"
    for cls in ("daisy", "rose"):
        (root / cls).mkdir(parents=True)
        for f in flower_files(3, cls):
            shutil.copy(f, root / cls / f.name)
    good = flower_files(4)[3].read_bytes()
    (root / "daisy" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "daisy" / "empty.jpg").write_bytes(b"")
    (root / "daisy" / "notes.jpg").write_text("this is not an image")
    png = cv2.imencode(".png", cv2.imread(str(flower_files(5)[4])))[1].tobytes()
    (root / "rose" / "really a png.jpg").write_bytes(png)
    (root / "stray.jpg").write_bytes(good)
    return root


def test_class_folders_every_file_listed_with_facts_from_its_bytes(tmp_path, folder_source):
    m = run_ingest(tmp_path, folder_source).set_index("path")
    assert len(m) == 11  # 6 photos + 4 odd files + 1 outside any class folder
    photo = m.loc[f"daisy/{flower_files(1)[0].name}"]
    facts = (photo.format, int(photo.width), int(photo.height), int(photo.channels), int(photo.bit_depth))
    assert facts == ("jpeg", 128, 128, 3, 8)
    assert photo.id == __import__("hashlib").sha1(flower_files(1)[0].read_bytes()).hexdigest()
    assert m.loc["rose/really a png.jpg", "format"] == "png" and m.loc["rose/really a png.jpg", "error"] == ""
    assert m.loc["daisy/empty.jpg", "error"] == "empty file (0 bytes)"
    assert m.loc["daisy/notes.jpg", "error"].startswith("not an image")
    assert m.loc["daisy/truncated.jpg", "error"] == "truncated jpeg (no end-of-image marker)"
    assert m.loc["stray.jpg", "label"] == ""
    assert set(m.label) == {"daisy", "rose", ""}


def test_same_inputs_give_the_same_manifest_bytes(tmp_path, folder_source):
    run_ingest(tmp_path, folder_source)
    first = (tmp_path / "manifest.csv").read_bytes()
    run_ingest(tmp_path, folder_source)
    assert (tmp_path / "manifest.csv").read_bytes() == first


def test_split_folders_are_recorded(tmp_path):
    root = tmp_path / "src"
    for split in ("train", "test"):
        (root / split / "tulip").mkdir(parents=True)
        for f in flower_files(2, "tulip") if split == "train" else flower_files(3, "tulip")[2:]:
            shutil.copy(f, root / split / "tulip" / f.name)
    m = run_ingest(tmp_path, root)
    assert m.source_split.tolist() == ["test", "train", "train"] and set(m.label) == {"tulip"}


def test_symlink_leaving_the_source_is_listed_not_followed(tmp_path):
    root = tmp_path / "src" / "daisy"
    root.mkdir(parents=True)
    (root / "link.jpg").symlink_to(flower_files(1)[0])
    m = run_ingest(tmp_path, root.parent)
    assert m.error[0].startswith("symbolic link to") and "outside the source folder" in m.error[0]


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
    m = run_ingest(tmp_path, root)
    assert len(m) == 50 and m.source_split.value_counts().to_dict() == {"test": 30, "train": 20}
    first = m.iloc[0]
    assert first.path == "t10k-images-idx3-ubyte.gz#0" and first.label == f"digit{labels[0]}"
    assert first.id == __import__("hashlib").sha1(pixels[0].tobytes()).hexdigest()
    assert (first.format, int(first.width), int(first.height), int(first.channels)) == ("idx", 28, 28, 1)


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


@pytest.mark.parametrize("rows, message", [
    ("img/missing.jpg,yes\n", "labels.csv line 2: 'img/missing.jpg' names no file"),
    ("img/{a},yes\nimg/{a},no\n", "labels.csv line 3: 'img/{a}' labelled 'no', but line 2 labels it 'yes'"),
    ("../outside.jpg,yes\n", "labels.csv line 2: '../outside.jpg' points outside the source folder"),
    ("img/{a}\n", "labels.csv line 2: expected `<file or id>,<label>`"),
])
def test_bad_labels_csv_rows_are_named(tmp_path, csv_source, rows, message):
    a = flower_files(1)[0].name
    (csv_source / "labels.csv").write_text("file,label\n" + rows.format(a=a))
    with pytest.raises(StageError, match=message.format(a=a).replace("(", r"\(").replace(")", r"\)")):
        run_ingest(tmp_path, csv_source)


def test_labels_csv_not_utf8(tmp_path, csv_source):
    (csv_source / "labels.csv").write_bytes("file,label\nimg/x.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(StageError, match="labels.csv: not UTF-8 text"):
        run_ingest(tmp_path, csv_source)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match=f"ingest.source {tmp_path / 'nowhere'} does not exist"):
        run_ingest(tmp_path, tmp_path / "nowhere")

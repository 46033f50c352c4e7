"""validate's data-quality page (<paths.data_quality>/index.html) from a real ingest + validate run
on real flower photos, laid out with the source's own train/test split: one file that is not an
image, one too small to train on, one copy, and a near-copy of a train photo in the test split.
"""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from imgpipe.core.errors import StageError
from imgpipe.core.params import params_from_dict
from imgpipe.core.runner import run_stage
from imgpipe.reports import data_quality
from stages import ingest, validate
from tests.data.test_ingest import corpus  # noqa: F401 (the fixture: ingest + validate on odd files)

FLOWERS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "flowers5-128px" / "flowers"
CLASSES = ("daisy", "rose", "tulip")


def photos(label: str) -> list[Path]:
    return sorted((FLOWERS / label).glob("*.jpg"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str]:
    """The data-quality folder and the stage's error: min_images_per_class 7 fails rose and tulip (6 each)."""
    root = tmp_path_factory.mktemp("quality-page")
    source = root / "photos"
    for label in CLASSES:
        for split, chosen in (("train", photos(label)[:5]), ("test", photos(label)[5:6])):
            (source / split / label).mkdir(parents=True)
            for photo in chosen:
                shutil.copy(photo, source / split / label)
    (source / "train" / "rose" / "broken.jpg").write_text("not a JPEG\n")
    cv2.imwrite(str(source / "train" / "daisy" / "tiny.png"), np.full((4, 4, 3), 200, np.uint8))
    shutil.copy(photos("tulip")[0], source / "train" / "tulip" / "copy.jpg")
    # the first daisy, smaller and re-encoded: other bytes, nearly the same picture, in the other split
    daisy = cv2.imread(str(photos("daisy")[0]))
    cv2.imwrite(str(source / "test" / "daisy" / "near.jpg"), cv2.resize(daisy, (100, 100)), [cv2.IMWRITE_JPEG_QUALITY, 70])
    params = run_params(root, "dq")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the stage keeps its GX project in ./gx
        run_stage(ingest, params)
        return root / "dq", validate_error(params)


def run_params(root: Path, dq: str):
    return params_from_dict({
        "ingest": {"source": str(root / "photos")},
        "paths": {"manifest": str(root / "manifest.csv"), "accepted": str(root / "accepted.csv"),
                  "data_quality": str(root / dq)},
        "runtime": {"workers": 0, "ingest_cache_dir": ""},
        "validate": {"min_images_per_class": 7, "max_quarantined_fraction": 0.2},
    })


def validate_error(params) -> str:
    with pytest.raises(StageError) as failed:
        run_stage(validate, params)
    return str(failed.value)


def page(dq: Path) -> str:
    return (dq / data_quality.HTML_PAGE).read_text(encoding="utf-8")


def table(text: str, id_: str) -> list[list[str]]:
    """The rows of the table with that id, each a list of its cells' text (images as their src)."""
    body = re.search(rf'<table id="{id_}">(.*?)</table>', text, re.DOTALL).group(1)
    rows = []
    for tr in re.findall(r"<tr\b[^>]*>(.*?)</tr>", body, re.DOTALL):
        cells = re.findall(r"<t[hd]\b[^>]*>(.*?)</t[hd]>", tr, re.DOTALL)
        rows.append([html.unescape(" ".join(re.findall(r'src="([^"]+)"', c)) or re.sub(r"<[^>]+>", "", c)) for c in cells])
    return rows


def test_the_page_gives_the_counts_and_the_verdict(run):
    text = page(run[0])
    assert '<title>Data quality: FAILED (1 critical check(s))</title>' in text
    assert table(text, "counts") == [["", "files"], ["inputs", "22"], ["accepted", "19"],
                                     ["quarantined (13.6%)", "3"], ["skipped, not inputs", "0"]]
    assert table(text, "classes") == [["class", "accepted"], ["daisy", "7"], ["rose", "6"], ["tulip", "6"]]
    assert '<img id="histogram" src="summary_files/classes.png"' in text


def test_the_page_lists_each_quarantined_file_with_its_reason_and_thumbnail(run):
    dq, _ = run
    rows = table(page(dq), "quarantined")
    thumbs = {row[0]: row[3] for row in rows[1:]}
    assert [row[:3] for row in rows] == [
        ["file", "rule", "reason"],
        ["train/daisy/tiny.png", "too small", "too small: 4x4 pixels, minimum 8x8"],
        ["train/rose/broken.jpg", "unreadable", "not an image (no known image signature in the first bytes)"],
        ["train/tulip/copy.jpg", "duplicate", f"duplicate of train/tulip/{photos('tulip')[0].name}"],
    ]
    # a thumbnail where the file decodes, beside the page
    assert thumbs["train/rose/broken.jpg"] == "no thumbnail"
    for name in ("train/daisy/tiny.png", "train/tulip/copy.jpg"):
        assert re.fullmatch(r"summary_files/[0-9a-f]{40}\.jpg", thumbs[name]), thumbs
        assert cv2.imread(str(dq / thumbs[name])).shape[:2] == (96, 96)  # square photos: 96 on both sides


def test_the_page_gives_the_expectations_and_a_failed_one(run):
    text = page(run[0])
    critical = table(text, "critical")
    assert critical[0] == ["result", "check", "on", "unexpected"]
    assert ["FAILED", "Every class has at least 7 accepted images", "class_counts.accepted", "2 of 3"] in critical
    assert [row[0] for row in critical[1:]].count("pass") == 7
    warnings = table(text, "warning-checks")
    assert ["warning", "Images have no near-duplicate (perceptual hashes within 0 bits)",
            "accepted_images.near_duplicates", "2 of 19"] in warnings
    assert len(critical) - 1 + len(warnings) - 1 == 17  # every expectation, once
    assert '<p id="warnings">None.</p>' in text


def test_the_page_shows_the_group_that_crosses_the_source_splits(run):
    dq, _ = run
    text = page(dq)
    first_daisy = f"train/daisy/{photos('daisy')[0].name}"
    for id_ in ("near-duplicates", "crossing-splits"):
        [_, (group, images, labels, splits, pictures)] = table(text, id_)
        assert (group, images, labels, splits) == ("test/daisy/near.jpg", "2", "1", "2")
        assert len(pictures.split()) == 2 and all((dq / p).is_file() for p in pictures.split())
    assert "<figcaption>daisy (test): test/daisy/near.jpg</figcaption>" in text
    assert f"<figcaption>daisy (train): {first_daisy}</figcaption>" in text


def test_the_page_loads_nothing_remote_and_its_files_are_beside_it(run):
    dq, _ = run
    text = page(dq)
    assert not re.findall(r"""\b(?:src|href)=["']?https?:""", text, re.IGNORECASE)
    assert "<script" not in text  # nothing to run: the page is plain HTML
    for ref in re.findall(r"""\b(?:src|href)=["']([^"'#]+)""", text):
        assert (dq / ref).exists(), ref


def test_thumbnails_and_groups_are_capped_and_the_rest_counted(run, monkeypatch):
    """More quarantined files than PAGE_THUMBNAILS, more groups than PAGE_GROUPS: every file is still
    listed, the first ones with a thumbnail, and the page says how many are left out."""
    dq, _ = run
    monkeypatch.setattr(data_quality, "PAGE_THUMBNAILS", 1)
    monkeypatch.setattr(data_quality, "PAGE_GROUPS", 0)
    monkeypatch.chdir(dq.parent)
    validate_error(run_params(dq.parent, "dq-capped"))
    text = page(dq.parent / "dq-capped")
    rows = table(text, "quarantined")
    assert [row[0] for row in rows[1:]] == ["train/daisy/tiny.png", "train/rose/broken.jpg", "train/tulip/copy.jpg"]
    assert rows[1][3].startswith("summary_files/") and rows[3][3] == "no thumbnail"
    assert "; thumbnails of the first 1, 2 more without." in text
    assert "The 0 most suspicious shown, 1 more not." in text
    assert "The first 0 shown, 1 more not." in text
    assert 'id="near-duplicates"' not in text and 'id="crossing-splits"' not in text
    # the markdown page shows its own GROUPS, whatever index.html's cap
    assert "None found" not in (dq.parent / "dq-capped" / "summary.md").read_text()


def test_the_quarantined_files_listed_are_capped_and_the_page_says_so(run, monkeypatch):
    """Past PAGE_QUARANTINE files the page lists the first ones, in manifest order, and names
    quarantine.csv for the rest: its size stays bounded at millions of images."""
    dq, _ = run
    monkeypatch.setattr(data_quality, "PAGE_QUARANTINE", 2)
    monkeypatch.chdir(dq.parent)
    validate_error(run_params(dq.parent, "dq-listed"))
    text = page(dq.parent / "dq-listed")
    assert [row[0] for row in table(text, "quarantined")[1:]] == ["train/daisy/tiny.png", "train/rose/broken.jpg"]
    assert "<h2>Quarantined (3)</h2>" in text
    assert "The first 2 of 3 quarantined files, in manifest order (also in" in text


def test_every_quarantined_file_of_the_odd_corpus_is_listed_with_its_reason(corpus):  # noqa: F811
    """test_ingest.py's corpus (odd names, broken and hidden files): the page lists what quarantine.csv holds, escaped."""
    dq = corpus[3]
    quarantine = pd.read_csv(dq / "quarantine.csv", dtype=str, keep_default_na=False)
    assert len(quarantine) > 5
    rows = table(page(dq), "quarantined")
    assert [(path, reason) for path, _, reason, _ in rows[1:]] == list(zip(quarantine["path"], quarantine["reason"]))

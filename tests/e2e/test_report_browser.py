"""The evaluation report renders in a real browser with no network: headless Chromium, unable to
reach anything (tests/e2e/helpers.py), opens the report of a real run, and the metrics table, the
confusion-matrix image and the gallery's thumbnails are there and loaded.

Chromium comes from Debian's `chromium` package (/usr/bin/chromium); without it the test is skipped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.e2e.helpers import natural_widths, needs_chromium, rendered_dom
from tests.model import mnist_run

pytestmark = [pytest.mark.slow, needs_chromium]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    params, _ = mnist_run.run(tmp_path_factory.mktemp("browser-run"))
    return params, Path(params.paths.reports)


def test_report_shows_the_metrics_table_and_the_confusion_matrix(evaluated, tmp_path):
    params, reports = evaluated
    metrics = json.loads((reports / "metrics.json").read_text())
    dom, _ = rendered_dom(reports / "evaluation" / "index.html", tmp_path / "profile")
    table = re.search(r'<table id="metrics">(.*?)</table>', dom, re.S).group(1)
    for name, value in (("accuracy", metrics["accuracy"]), ("macro F1", metrics["macro_f1"]), ("loss", metrics["loss"])):
        assert f'<td>{name}</td><td class="num">{value:.4f}</td>' in table
    assert re.search(r'<img id="confusion" src="confusion.png"', dom)
    widths = natural_widths(dom)
    assert widths["confusion.png"] > 200
    assert all(width > 0 for width in widths.values()), widths  # every plot loaded
    assert 'id="verdict"' in dom and "blessed" in dom


def test_gallery_thumbnails_load(evaluated, tmp_path):
    params, reports = evaluated
    dom, _ = rendered_dom(reports / "evaluation" / "gallery.html", tmp_path / "profile")
    widths = natural_widths(dom)
    mistakes = (reports / "misclassified.csv").read_text().splitlines()[1:]
    assert len(widths) == len(mistakes) > 0
    assert set(widths.values()) == {128}  # every thumbnail decoded, at the thumbnail size

"""validate's data-quality page renders in headless Chromium with no network (the browser of
tests/e2e/helpers.py): its tables are in the DOM and every picture, the class histogram and the
thumbnails beside the page, is decoded."""

from __future__ import annotations

import pytest

from imgpipe.reports import data_quality
from tests.data.test_quality_page import run, table  # noqa: F401 (run: the fixture, a real ingest + validate)
from tests.e2e.helpers import natural_widths, needs_chromium, rendered_dom

pytestmark = pytest.mark.slow


@needs_chromium
def test_the_page_renders_its_tables_and_pictures_offline(run, tmp_path):  # noqa: F811
    dq, _ = run
    dom, _ = rendered_dom(dq / data_quality.HTML_PAGE, tmp_path / "profile")  # its copy beside it: the same links
    widths = natural_widths(dom)
    # by src: the histogram, two quarantined files' thumbnails, the near-duplicate group's two images
    assert len(widths) == 5 and widths["summary_files/classes.png"] > 300, widths
    assert all(width > 0 for width in widths.values()), widths
    assert [row[0] for row in table(dom, "quarantined")] == [
        "file", "train/daisy/tiny.png", "train/rose/broken.jpg", "train/tulip/copy.jpg"]
    assert table(dom, "counts")[1] == ["inputs", "22"]
    assert ["FAILED", "Every class has at least 7 accepted images", "class_counts.accepted", "2 of 3"] in table(dom, "critical")

"""validate's data-quality page renders in headless Chromium with no network (the browser of
test_offline_pages.py): its tables are in the DOM and every picture, the class histogram and the
thumbnails beside the page, is decoded."""

from __future__ import annotations

import re

import pytest

from imgpipe.reports import data_quality
from tests.data.test_quality_page import run, table  # noqa: F401 (run: the fixture, a real ingest + validate)
from tests.e2e.test_offline_pages import needs_chromium, rendered_dom

pytestmark = pytest.mark.slow

# Added to a copy of the page, beside it: once loaded, each image's decoded width (0: not loaded)
# in the DOM, where --dump-dom shows it.
IMAGES = """<script>
window.addEventListener("load", () => { for (const img of document.images) img.setAttribute("data-width", img.naturalWidth); });
</script>"""


@needs_chromium
def test_the_page_renders_its_tables_and_pictures_offline(run, tmp_path):  # noqa: F811
    dq, _ = run
    text = (dq / data_quality.HTML_PAGE).read_text(encoding="utf-8")
    copy = dq / "browser-check.html"  # beside the page: its relative links resolve the same
    copy.write_text(text.replace("</body>", IMAGES + "</body>"), encoding="utf-8")
    try:
        dom, _ = rendered_dom(copy, tmp_path / "profile")
    finally:
        copy.unlink()
    widths = {src: int(width) for src, width in re.findall(r'<img [^>]*src="([^"]+)"[^>]*data-width="(\d+)"', dom)}
    # by src: the histogram, two quarantined files' thumbnails, the near-duplicate group's two images
    assert len(widths) == 5 and widths["summary_files/classes.png"] > 300, widths
    assert all(width > 0 for width in widths.values()), widths
    assert [row[0] for row in table(dom, "quarantined")] == [
        "file", "train/daisy/tiny.png", "train/rose/broken.jpg", "train/tulip/copy.jpg"]
    assert table(dom, "counts")[1] == ["inputs", "22"]
    assert ["FAILED", "Every class has at least 7 accepted images", "class_counts.accepted", "2 of 3"] in table(dom, "critical")

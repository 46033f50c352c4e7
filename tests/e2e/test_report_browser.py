"""The evaluation report renders in a real browser: headless Chromium opens the report of a real
run, and the metrics table, the confusion-matrix image and the gallery's thumbnails are there
and loaded.

Chromium comes from Debian's `chromium` package (/usr/bin/chromium); without it the test is skipped.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.model import mnist_run

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium package (/usr/bin/chromium)")]

# Appended to a copy of the page: once everything has loaded, record each image's decoded width in
# the DOM, where --dump-dom shows it (a broken image has naturalWidth 0).
PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) img.setAttribute("data-natural-width", img.naturalWidth);
  document.body.setAttribute("data-probed", "yes");
});
</script>"""


def rendered_dom(page: Path, profile: Path) -> str:
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
         "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert 'data-probed="yes"' in proc.stdout, "the page's load event never fired"
    return proc.stdout


def natural_widths(dom: str) -> dict[str, int]:
    """src -> decoded width of every image in the dumped DOM."""
    widths = {}
    for tag in re.findall(r"<img [^>]*>", dom):
        src = re.search(r'src="([^"]+)"', tag).group(1)
        widths[src] = int(re.search(r'data-natural-width="(\d+)"', tag).group(1))
    return widths


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    params, _ = mnist_run.run(tmp_path_factory.mktemp("browser-run"))
    return params, Path(params.paths.reports)


def test_report_shows_the_metrics_table_and_the_confusion_matrix(evaluated, tmp_path):
    params, reports = evaluated
    metrics = json.loads((reports / "metrics.json").read_text())
    dom = rendered_dom(reports / "evaluation" / "index.html", tmp_path / "profile")
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
    dom = rendered_dom(reports / "evaluation" / "gallery.html", tmp_path / "profile")
    widths = natural_widths(dom)
    mistakes = (reports / "misclassified.csv").read_text().splitlines()[1:]
    assert len(widths) == len(mistakes) > 0
    assert set(widths.values()) == {128}  # every thumbnail decoded, at the thumbnail size

"""The pages the project points people to render with no network: headless Chromium, unable to
reach anything (every host name resolves to nothing and every request goes to a proxy that is not
there), opens the Great Expectations Data Docs of a real validate run on real photos and the
page `dvc plots show` writes with the repository's configuration, and finds the validation tables
filled in by their JS and the six plots drawn.

Chromium comes from Debian's `chromium` package (/usr/bin/chromium); without it the browser tests
are skipped. The JS and CSS come from web/package.json's npm packages, which `make install`
installs (imgpipe/reports/offline.py).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imgpipe.core.params import params_from_dict
from imgpipe.core.runner import run_stage
from imgpipe.reports import offline
from stages import ingest, validate
from tests.e2e.helpers import needs_chromium, rendered_dom

PROJECT = Path(__file__).resolve().parents[2]
FLOWERS = PROJECT.parent / "shared" / "datasets" / "flowers5-128px" / "flowers"
DVC = str(Path(sys.executable).parent / "dvc")
SUITES = {"image_manifest", "accepted_images", "near_duplicate_groups", "class_counts"}
PHOTOS_PER_CLASS = 6

pytestmark = pytest.mark.slow

def loaded_urls(text: str) -> list[str]:
    """The http(s) URLs a page or stylesheet makes the browser fetch (links to other sites are not fetched)."""
    tags = re.findall(r"<(?:script|link|img)\b[^>]*>", text, re.I)
    attributes = [u for tag in tags for u in re.findall(r"""\b(?:src|href)=["'](https?://[^"']+)""", tag, re.I)]
    return attributes + re.findall(r"""url\(\s*["']?(https?://[^"')]+)""", text, re.I)


# --- the Data Docs of a real validate run ----------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """ingest + validate on real photos of three classes, one file broken and one a copy."""
    root = tmp_path_factory.mktemp("data-docs")
    for label in ("daisy", "rose", "tulip"):
        (root / "photos" / label).mkdir(parents=True)
        for photo in sorted((FLOWERS / label).glob("*.jpg"))[:PHOTOS_PER_CLASS]:
            shutil.copy(photo, root / "photos" / label)
    (root / "photos" / "rose" / "broken.jpg").write_text("not a JPEG\n")
    shutil.copy(min((FLOWERS / "tulip").glob("*.jpg")), root / "photos" / "tulip" / "copy.jpg")
    params = params_from_dict({
        "ingest": {"source": str(root / "photos")},
        "paths": {"manifest": str(root / "manifest.csv"), "accepted": str(root / "accepted.csv"),
                  "data_quality": str(root / "dq")},
        "runtime": {"workers": 0, "ingest_cache_dir": ""},
        "validate": {"min_images_per_class": 5, "max_quarantined_fraction": 0.2},
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the stage keeps its GX project in ./gx
        run_stage(ingest, params)
        run_stage(validate, params)
    return root / "dq" / "site"


def result_page(site: Path, suite: str) -> Path:
    [page] = (site / "validations" / suite).rglob("*.html")
    return page


def test_the_site_loads_nothing_from_the_network(site):
    files = [*site.rglob("*.html"), *site.rglob("*.css")]
    assert len(files) > 9
    fetched = {f.relative_to(site).as_posix(): loaded_urls(f.read_text(encoding="utf-8")) for f in files}
    assert {name: urls for name, urls in fetched.items() if urls} == {}
    # every file a page names is in the site
    for page in site.rglob("*.html"):
        for ref in re.findall(r"""<(?:script|link)\b[^>]*\b(?:src|href)=["']([^"'#?]+)""", page.read_text()):
            assert (page.parent / ref).is_file(), f"{page.relative_to(site)}: {ref}"
    assert (site / offline.VENDOR / "jquery" / "dist" / "jquery.min.js").is_file()


@needs_chromium
def test_the_index_lists_every_suite_and_validation_result(site, tmp_path):
    dom, notes = rendered_dom(site / "index.html", tmp_path / "profile")
    assert notes == {"jquery": "function", "bootstrap-table": "function", "vega-embed": "function",
                     "bootstrap-css": "none", "font-awesome": "true", "done": "yes"}
    # the two tables' rows exist only once bootstrap-table built them from the page's data
    results = re.findall(r'<tr class="clickable-row" data-href="validations/([^/]+)/[^"]+\.html" data-index="\d+"', dom)
    suites = re.findall(r'<tr class="clickable-row" data-href="expectations/([^/"]+)\.html" data-index="\d+"', dom)
    assert sorted(results) == sorted(suites) == sorted(SUITES)


@needs_chromium
def test_a_validation_result_page_shows_its_tables(site, tmp_path):
    dom, notes = rendered_dom(result_page(site, "image_manifest"), tmp_path / "profile")
    assert notes["bootstrap-table"] == "function" and notes["bootstrap-css"] == "none"
    body = re.sub(r"<script\b.*?</script>", "", dom[dom.rfind("<body"):], flags=re.S)
    # rows bootstrap-table built (data-index is its attribute), as text
    rows = [re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", row)).strip()
            for row in re.findall(r'<tr\b[^>]*data-index="\d+"[^>]*>(.*?)</tr>', body, re.S)]
    assert rows[:4] == ["Evaluated Expectations 2", "Successful Expectations 2", "Unsuccessful Expectations 0",
                        "Success Percent 100%"]
    assert "Images decode (the unexpected values are the decode errors) Unexpected Value Count" in rows
    assert "At most 20.0% of the images are quarantined Unexpected Value Count" in rows
    # the results tables with their tables of unexpected values: the two quarantined files' rules
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))
    assert ("Status Expectation Observed Value At most 20.0% of the images are quarantined "
            "Unexpected Value Count duplicate 1 unreadable 1 90% null") in text


@needs_chromium
def test_the_browser_really_is_offline(tmp_path):
    """The same check on a page that loads jQuery from its CDN finds no jQuery: the tests above
    pass because the site holds its files, not because the network answered."""
    page = tmp_path / "cdn.html"
    page.write_text('<html><body><script src="https://code.jquery.com/jquery-3.7.1.min.js"></script></body></html>')
    _, notes = rendered_dom(page, tmp_path / "profile")
    assert notes["jquery"] == "undefined"


def test_an_unknown_cdn_file_is_an_error_not_an_empty_page(tmp_path):
    (tmp_path / "index.html").write_text('<html><head><script src="https://cdn.example.org/new.js"></script></head></html>')
    with pytest.raises(RuntimeError, match="cdn.example.org/new.js"):
        offline.offline_site(tmp_path)


def test_the_evaluation_report_loads_nothing_from_the_network():
    """The project's own pages (tests/e2e/test_report_browser.py renders them): their templates
    name no http(s) file, so they need no network either."""
    templates = sorted((PROJECT / "imgpipe" / "reports" / "templates").glob("*.html"))
    assert templates
    assert {t.name: loaded_urls(t.read_text(encoding="utf-8")) for t in templates} == {t.name: [] for t in templates}


# --- dvc plots show --------------------------------------------------------------------------

def write_plot_files(repo: Path) -> None:
    """Small made-up files with the columns train and evaluate write."""
    def write(path: str, header: list[str], rows: list[list]) -> None:
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        with open(repo / path, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)

    write("reports/train_log.csv", ["epoch", "accuracy", "loss", "val_accuracy", "val_loss", "learning_rate", "phase"],
          [[e, 0.5 + 0.1 * e, 1.0 - 0.15 * e, 0.45 + 0.1 * e, 1.1 - 0.15 * e, 0.001, "head"] for e in range(5)])
    classes = ["daisy", "rose", "tulip"]
    write("reports/confusion.csv", ["actual", "predicted"],
          [[classes[i % 3], classes[i % 3] if i % 5 else classes[(i + 1) % 3]] for i in range(30)])
    write("reports/roc.csv", ["fpr", "tpr", "threshold"], [[i / 10, min(1.0, (i / 10) ** 0.5), 1 - i / 10] for i in range(11)])
    write("reports/precision_recall.csv", ["recall", "precision", "threshold"],
          [[i / 10, 1 - 0.3 * (i / 10) ** 2, 1 - i / 10] for i in range(11)])


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory) -> Path:
    """A git + DVC repository with the project's dvc.yaml, params.yaml and .dvc/config, the
    template `make install` builds, and plot files."""
    repo = tmp_path_factory.mktemp("plots")
    template = PROJECT / ".dvc" / "plots" / "offline.html"
    if not template.is_file():
        pytest.fail(f"{template} is missing: `make install` builds it")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=repo, check=True)
    for name in ("dvc.yaml", "params.yaml", ".dvc/config", ".dvc/plots/offline.html"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT / name, repo / name)
    write_plot_files(repo)
    return repo


def dvc_plots_show(repo: Path, *args: str) -> Path:
    out = subprocess.run([DVC, "plots", "show", *args], cwd=repo, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip().splitlines()[-1].removeprefix("file://"))


def test_dvc_plots_show_uses_the_offline_template(plots_repo):
    page = dvc_plots_show(plots_repo)
    html = page.read_text(encoding="utf-8")
    assert loaded_urls(html) == []
    assert html.count("vegaEmbed(") == 6  # each plot once: the six of dvc.yaml's plots: section
    ids = re.findall(r'<div id = "([^"]+)"', html)
    assert ids == ["training_curves", "training_loss", "confusion_matrix",
                   "confusion_matrix__share_of_each_actual_class", "ROC", "precision-recall"]


@needs_chromium
def test_dvc_plots_are_drawn_offline(plots_repo, tmp_path):
    dom, _ = rendered_dom(dvc_plots_show(plots_repo), tmp_path / "profile")
    plots = {id_: json.loads(data.replace("&quot;", '"'))
             for id_, data in re.findall(r'<div id="([^"]+)" class="vega-embed[^"]*" data-probe="([^"]+)"', dom)}
    assert len(plots) == 6, plots
    for name, plot in plots.items():
        width, height = plot["canvas"]
        assert width > 250 and height > 250, (name, plot)
        assert plot["inked"] > 0.05 * width * height, (name, plot)  # axes, marks, legend: not a blank canvas


@needs_chromium
def test_dvc_default_page_draws_nothing_offline(plots_repo, tmp_path):
    """DVC's own page (its CDN scripts) in the same browser: no plot, so the test above can fail."""
    from dvc_render.html import PAGE_HTML

    (tmp_path / "cdn.html").write_text(PAGE_HTML)
    page = dvc_plots_show(plots_repo, "--html-template", str(tmp_path / "cdn.html"), "-o", str(tmp_path / "out"))
    assert "https://cdn" in page.read_text()
    dom, notes = rendered_dom(page, tmp_path / "profile")
    assert notes["vega-embed"] == "undefined"
    assert 'class="vega-embed' not in dom and "<canvas" not in dom

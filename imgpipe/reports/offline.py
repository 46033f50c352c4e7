"""Pages that render with no network: the JS and CSS that third-party pages load from public CDNs,
served from the npm packages that `make install` puts into the virtualenv.

Two pages the project points people to are written by other tools, and both load their
libraries from CDNs, so on a machine without internet they show nothing:

- the Great Expectations Data Docs (jQuery, Bootstrap, bootstrap-table, Font Awesome, Vega...):
  `offline_site` copies the files into the site's `static/vendor/` and points the pages at them;
- the `dvc plots show` page (Vega, Vega-Lite, Vega-Embed): `dvc_plots_template` writes an HTML
  template with the three libraries inlined, which `.dvc/config` (`[plots] html_template`) names,
  so that the page DVC writes is one self-contained file.

Where the files come from: web/package.json pins one npm package per library, at the version the
pages ask for (web/package-lock.json pins the rest); `make install` runs `npm ci` on a copy of
both in `<venv>/share/imgpipe-web/`, so the files are found through the interpreter that runs, like
every other dependency, whatever folder the stage runs in. Nothing from node_modules is committed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from imgpipe.core.errors import StageError

# where `make install` installs web/package.json's packages (see the Makefile)
ASSETS = Path(sys.prefix) / "share" / "imgpipe-web" / "node_modules"
# where offline_site puts them in a Data Docs site
VENDOR = "static/vendor"

# Every CDN URL the Data Docs pages of great_expectations 1.24 load (its templates,
# render/view/templates/*.j2, and its default styles), and the file that replaces it: a path in
# node_modules, or, for GX's logos (its pages fetch them from GX's web assets), a site path. The
# popper.js the pages name (1.12.9) is older than Bootstrap 4.3.1 accepts (^1.14.7): 1.16.1 here.
DATA_DOCS_ASSETS = {
    "cdn.jsdelivr.net/npm/vega@5": "vega/build/vega.min.js",
    "cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite/build/vega-lite.min.js",
    "cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed/build/vega-embed.min.js",
    "cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css":
        "@fortawesome/fontawesome-free/css/all.min.css",
    "code.jquery.com/jquery-3.7.1.min.js": "jquery/dist/jquery.min.js",
    "cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.js/dist/umd/popper.min.js",
    "stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap/dist/js/bootstrap.min.js",
    "maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap/dist/css/bootstrap.min.css",
    "unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table/dist/bootstrap-table.min.js",
    "unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table/dist/bootstrap-table.min.css",
    "unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table/dist/extensions/filter-control/bootstrap-table-filter-control.min.js",
    # the pages ask for the 1.19.0 stylesheet beside the 1.19.1 script: one version here
    "unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table/dist/extensions/filter-control/bootstrap-table-filter-control.css",
    "unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table/dist/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker/dist/js/bootstrap-datepicker.min.js",
    "cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker/dist/css/bootstrap-datepicker.min.css",
    "cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "@forevolve/bootstrap-dark/dist/css/bootstrap-prefers-dark.css",
}
# the logos: GX ships the light one in the site's static/images (the dark one it has not: the
# dark colour scheme shows the light logo)
DATA_DOCS_SITE_FILES = {
    "great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png": "static/images/logo-long.png",
    "great-expectations-web-assets.s3.us-east-2.amazonaws.com/full_logo_dark.png": "static/images/logo-long.png",
}
# files the copied stylesheets load by relative URL: Font Awesome's css/all.min.css loads ../webfonts/
DATA_DOCS_EXTRA = ("@fortawesome/fontawesome-free/webfonts",)

# the libraries the `dvc plots show` page loads (dvc_render's VegaRenderer names vega 5,
# vega-lite 5, vega-embed 6 from a CDN), in load order
VEGA = ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js", "vega-embed/build/vega-embed.min.js")
# DVC fills these in (dvc_render.html.HTML.embed, by plain str.replace). No `{scripts}`: that is
# where DVC would put its CDN <script> tags.
DVC_PLOTS_PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- Vega, Vega-Lite and Vega-Embed inlined (imgpipe/reports/offline.py): drawn with no network -->
%(scripts)s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""

# a URL a page loads: an attribute of the elements that fetch what they name, and CSS url(...)
_LOADED = re.compile(r"""(<(?:script|link|img)\b[^>]*?\b(?:src|href)=["'])(https?://[^"']+)(["'])"""
                     r"""|(url\(\s*["']?)(https?://[^"')]+)(["']?\s*\))""", re.I)
# a site file a page loads by a relative path: (../)*static/...
_SITE_STATIC = re.compile(r"""(<(?:script|link|img)\b[^>]*?\b(?:src|href)=["'])((?:\.\./)*static/[^"'?#]+)(["'])""", re.I)
# attributes of a tag that only make sense for a CDN copy (and break a file:// load)
_CDN_ATTRIBUTES = re.compile(r"""\s+(?:integrity|crossorigin)=["'][^"']*["']""", re.I)


class MissingAssets(StageError):
    """A setup problem (no `make install`), reported by a stage as one line."""


def asset(path: str, root: Path | None = None) -> Path:
    """The installed file `path` of web/package.json's packages; a clear error when it is missing."""
    root = ASSETS if root is None else root
    found = root / path
    if not found.exists():
        raise MissingAssets(f"{found} is missing: the pages' JS and CSS come from web/package.json's npm "
                            f"packages, which `make install` installs into {root.parent}")
    return found


def offline_site(site: Path, root: Path | None = None) -> None:
    """Make the Data Docs site in `site` load nothing from the network: copy the files its pages
    load from CDNs into `site`/static/vendor and rewrite every page (and GX's stylesheet) to them.

    A CDN URL not in DATA_DOCS_ASSETS (a new GX version's) is an error, not a page that renders
    empty without internet. Links (<a href>) are left alone: nothing loads them.
    """
    site = Path(site)
    vendor = site / VENDOR
    for path in sorted({*DATA_DOCS_ASSETS.values(), *DATA_DOCS_EXTRA}):
        source, target = asset(path, root), vendor / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(source, target)
    unknown: set[str] = set()
    for page in sorted([*site.rglob("*.html"), *(site / "static" / "styles").glob("*.css")]):
        text = page.read_text(encoding="utf-8")
        new = _localise(text, site, page.parent, unknown)
        if new != text:
            page.write_text(new, encoding="utf-8")
    if unknown:
        raise RuntimeError(f"the Data Docs load {len(unknown)} file(s) from the network that "
                           f"imgpipe/reports/offline.py has no local copy of: {', '.join(sorted(unknown))}")


def _localise(text: str, site: Path, folder: Path, unknown: set[str]) -> str:
    def local(url: str) -> str | None:
        key = url.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]
        if key in DATA_DOCS_ASSETS:
            target = site / VENDOR / DATA_DOCS_ASSETS[key]
        elif key in DATA_DOCS_SITE_FILES:
            target = site / DATA_DOCS_SITE_FILES[key]
        else:
            unknown.add(url)
            return None
        return Path(os.path.relpath(target, folder)).as_posix()

    def replace(match: re.Match) -> str:
        before, url, after = match.group(1, 2, 3) if match.group(1) else match.group(4, 5, 6)
        path = local(url)
        return match.group(0) if path is None else before + path + after

    def tag(match: re.Match) -> str:
        # a <script>/<link> tag that loaded from a CDN loses its integrity/crossorigin attributes
        element = match.group(0)
        rewritten = _LOADED.sub(replace, element)
        return _CDN_ATTRIBUTES.sub("", rewritten) if rewritten != element else element

    def static(match: re.Match) -> str:
        # GX counts one folder too few on a validation result page (its favicon): the site's own
        # static/ files, named from any folder depth, are pointed at where they are
        before, path, after = match.groups()
        target = site / "static" / path.split("static/", 1)[1]
        if (folder / path).exists() or not target.exists():
            return match.group(0)
        return before + Path(os.path.relpath(target, folder)).as_posix() + after

    text = re.sub(r"<(?:script|link|img)\b[^>]*>", tag, text, flags=re.I)
    text = _SITE_STATIC.sub(static, text)
    return _LOADED.sub(replace, text)  # url(...) in inline styles and stylesheets


def dvc_plots_template(root: Path | None = None) -> str:
    """An HTML template for `dvc plots show` with Vega, Vega-Lite and Vega-Embed inlined."""
    scripts = []
    for path in VEGA:
        code = asset(path, root).read_text(encoding="utf-8")
        # DVC replaces these strings anywhere in the template; inside a <script> a `</script`
        # would end it early
        if re.search(r"\{(?:scripts|plot_divs|refresh_tag)\}|</script", code, re.I):
            raise RuntimeError(f"{path} cannot be inlined as it is: it holds a DVC placeholder or </script")
        scripts.append(f"    <script>/* {path} */\n{code}\n    </script>")
    return DVC_PLOTS_PAGE % {"scripts": "\n".join(scripts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgpipe.reports.offline",
                                     description="Write the offline HTML template of `dvc plots show`.")
    parser.add_argument("output", type=Path, help="the template file (.dvc/config names .dvc/plots/offline.html)")
    args = parser.parse_args(argv)
    try:
        page = dvc_plots_template()
    except MissingAssets as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_name(args.output.name + ".tmp")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

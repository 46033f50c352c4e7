"""summary.md and index.html: the pages a reviewer reads before trusting the data, with their pictures.

index.html is the full page, in the style of the evaluation report (templates/data_quality.html):
the quarantined files with their reasons (the first PAGE_QUARANTINE), the most suspicious
near-duplicate groups, the expectation results; the markdown is the short version, for a code
forge and the Prefect artifact. Both are rendered from the same selections (`select`, SQL on the
validate stage's tables: a capped number of rows at any number of images), so they never disagree.

It links, by relative paths, to the files beside it in `summary_files/`: the class histogram
(`classes.png`) and small thumbnails of the worst offenders (`<image id>.jpg`), so the page
renders wherever the folder goes (a code forge, an editor's preview). Only the images shown (a
capped number) are read again; the facts behind the page come from the manifest.

Everything is sorted with a tie-break on the image id: the same data gives the same page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from imgpipe.core.params import Validate
from imgpipe.data.sources import Source
from imgpipe.reports import thumbnails

PAGE = "summary.md"
HTML_PAGE = "index.html"
FILES = "summary_files"
HISTOGRAM = "classes.png"
WORST = 6  # offenders shown per check
GROUPS = 5  # near-duplicate groups shown
GROUP_THUMBNAILS = 4  # images shown per group
QUARANTINE_ROWS = 20
# index.html: thumbnails are decoded again from the source, so their number is capped
PAGE_THUMBNAILS = 200  # quarantined files shown with a thumbnail
PAGE_QUARANTINE = 5000  # quarantined files listed (all of them are in quarantine.csv)
PAGE_GROUPS = 50  # near-duplicate groups shown (each with GROUP_THUMBNAILS images)
THUMBNAIL_SIDE = 96
# past this many classes the histogram's bars are too thin to name
NAMED_BARS = 40


@dataclass(frozen=True)
class Shown:
    """What the pages show, selected from the validate stage's tables (select): a capped number
    of rows, whatever the number of images."""

    classes: pd.DataFrame  # one row per known class (validation.Verdict's)
    quarantine: pd.DataFrame  # the first PAGE_QUARANTINE quarantined rows, manifest order: path, rule, reason, detail
    worst: pd.DataFrame  # the first PAGE_GROUPS (or GROUPS) groups, the most suspicious first (WORST_FIRST)
    crossing: pd.DataFrame  # the first PAGE_GROUPS groups crossing the source's splits, the same order
    members: dict[str, pd.DataFrame]  # per group shown: its first GROUP_THUMBNAILS images by id
    offenders: list[tuple[str, str, str, int, pd.DataFrame]]  # see _offender_checks


# the groups, the most suspicious first: mixed labels, then leakage, then the largest
WORST_FIRST = 'labels DESC, source_splits DESC, images DESC, "group"'


def select(con, classes: pd.DataFrame, rules: Validate) -> Shown:
    """The selections both pages show, made once, from validation.triage_tables' `decided`,
    `grouped` and `groups`."""
    worst = con.execute(f"SELECT * FROM groups ORDER BY {WORST_FIRST} LIMIT {max(PAGE_GROUPS, GROUPS)}").df()
    crossing = con.execute(f"SELECT * FROM groups WHERE source_splits > 1 ORDER BY {WORST_FIRST} "
                           f"LIMIT {PAGE_GROUPS}").df()
    shown = sorted(set(worst["group"]) | set(crossing["group"]))
    con.execute("CREATE OR REPLACE TEMP TABLE shown_groups (grp VARCHAR)")
    if shown:
        con.executemany("INSERT INTO shown_groups VALUES (?)", [[g] for g in shown])
    members = con.execute(f"""
        SELECT grp, id, path, label, source_split FROM (
          SELECT g.grp, d.id, d.path, d.label, d.source_split, row_number() OVER (PARTITION BY g.grp ORDER BY d.id) AS k
          FROM grouped g JOIN decided d USING (ord) WHERE g.grp IN (SELECT grp FROM shown_groups))
        WHERE k <= {GROUP_THUMBNAILS} ORDER BY grp, id""").df()
    quarantine = con.execute(f"SELECT path, rule, reason, detail FROM decided WHERE rule IS NOT NULL ORDER BY ord "
                             f"LIMIT {PAGE_QUARANTINE}").df()
    return Shown(classes, quarantine, worst, crossing,
                 {group: rows.drop(columns="grp") for group, rows in members.groupby("grp")},
                 _offender_checks(con, rules))


def write(shown: Shown, summary: dict, rules: Validate, source: Source | None, folder: Path,
          links: dict[str, str]) -> tuple[str, str]:
    """Write the histogram and thumbnails into `folder`; return (summary.md's markdown, index.html's HTML).

    `source` reads the images to show (None: no thumbnails); `links`: the other outputs
    index.html links to, name -> path relative to it ("Data Docs" and "quarantine.csv" are
    linked from their sections too).
    """
    thumbs = Thumbnails(source, Path(folder))
    class_histogram(shown.classes, rules.min_images_per_class, Path(folder) / HISTOGRAM)
    parts = [
        _headline(summary),
        _warnings(summary),
        _checks(summary),
        _classes(shown.classes, summary, rules),
        _quarantined(shown.quarantine, summary),
        _near_duplicates(shown, summary, rules, thumbs),
        _offenders(shown.offenders, thumbs),
    ]
    return "\n\n".join(parts) + "\n", _html(shown, summary, rules, thumbs, links)


# --- sections --------------------------------------------------------------------------------

def _verdict(summary: dict) -> str:
    failed = [r for r in summary["expectations"]["results"] if r["critical"] and not r["success"]]
    return "passed" if summary["success"] else f"FAILED ({len(failed)} critical check(s))"


def _status(result: dict) -> str:
    """An expectation result in a word: a failed critical one fails the stage, a failed other one warns."""
    return "pass" if result["success"] else ("FAILED" if result["critical"] else "warning")


def _headline(summary: dict) -> str:
    return (f"# Data quality: {_verdict(summary)}\n\n"
            f"**{summary['inputs']}** inputs: **{summary['ingested']}** accepted, **{summary['quarantined']}** "
            f"quarantined ({summary['quarantined_fraction']:.1%}). Every input is in exactly one of "
            f"`accepted.csv` and `quarantine.csv`; no file is moved or deleted.\n\n"
            f"{_skipped(summary['skipped'])}\n\n"
            f"Full report, with every expectation and its offending rows: [Data Docs](site/index.html).")


# why a file was skipped, in words (imgpipe/data/sources.py, SKIPPED)
SKIPPED_WHY = {"hidden": "hidden (a name starting with a dot: `.DS_Store`, macOS's `._photo.jpg`)",
               "in_hidden_folders": "in hidden folders (`.ipynb_checkpoints/`, `.git/`...)",
               "other_files": "in the IDX folder but neither IDX images, their labels nor `classes.txt`"}


def _skipped(skipped: dict | None) -> str:
    """The line that says which files are not inputs at all."""
    if skipped is None:
        return "Files skipped by ingest: not known (no `<manifest>.skipped.json` beside the manifest)."
    parts = [f"{n} {SKIPPED_WHY.get(why, why)}" for why, n in skipped.items() if n]
    if not parts:
        return "No file was skipped: every file in the source folder is an input."
    return f"Skipped, not inputs: **{sum(skipped.values())}** files: " + "; ".join(parts) + "."


def _warnings(summary: dict) -> str:
    """What may be wrong with the data set as a whole, in words: look-alike class names."""
    lines = []
    for group in summary["classes_named_alike"].values():
        names = ", ".join(f"{_code(label)} ({count})" for label, count in group.items())
        lines.append(f"- Classes named alike, the same but for letter case or surrounding spaces: {names} "
                     f"accepted images. Most likely one class: rename the folders or the labels to one name.")
    return "## Warnings\n\n" + ("\n".join(lines) if lines else "None.")


def _checks(summary: dict) -> str:
    lines = ["## Checks", "", "| result | check | on | unexpected |", "|---|---|---|---|"]
    for r in summary["expectations"]["results"]:
        status = "**FAILED**" if _status(r) == "FAILED" else _status(r)
        lines.append(f"| {status} | {_cell(r['description'])} | `{r['table']}.{r['column']}` | "
                     f"{r['unexpected_count']} of {r['element_count']} |")
    return "\n".join(lines)


def _classes(classes: pd.DataFrame, summary: dict, rules: Validate) -> str:
    ratio = summary["imbalance_ratio"]
    ratio_text = "undefined (a class has no image)" if ratio is None else f"{ratio:g}"
    lines = ["## Classes", "", f"![Accepted images per class]({FILES}/{HISTOGRAM})", "",
             f"{len(classes)} classes. Imbalance (largest class over smallest): {ratio_text}; "
             f"warning above {rules.max_imbalance_ratio:g}. Minimum per class: {rules.min_images_per_class}.",
             "", "| class | accepted |", "|---|---|"]
    lines += [f"| {_cell(label)} | {count} |" for label, count in zip(classes["label"], classes["accepted"])]
    return "\n".join(lines)


def _quarantined(quarantine: pd.DataFrame, summary: dict) -> str:
    if quarantine.empty:
        return "## Quarantined\n\nNothing."
    lines = ["## Quarantined", "", "| reason | files |", "|---|---|"]
    lines += [f"| {rule} | {n} |" for rule, n in summary["quarantine_reasons"].items() if n]
    shown = quarantine.head(QUARANTINE_ROWS)
    lines += ["", f"The first {len(shown)} of {summary['quarantined']}, in manifest order (all of them: `quarantine.csv`):",
              "", "| file | reason |", "|---|---|"]
    lines += [f"| {_cell(path)} | {_cell(reason)} |" for path, reason in zip(shown["path"], shown["reason"])]
    return "\n".join(lines)


def _near_duplicates(shown: Shown, summary: dict, rules: Validate, thumbs: Thumbnails) -> str:
    nd = summary["near_duplicates"]
    head = (f"## Near-duplicates\n\nPerceptual hashes within {rules.near_duplicate_distance} of 64 bits "
            f"(`validate.near_duplicate_distance`).")
    if not nd["groups"]:
        return head + " None found."
    lines = [head + f" Groups: {nd['groups']}, holding {nd['images']} images (the largest: {nd['largest_group']}); "
             f"mixing labels: {nd['groups_mixing_labels']}; crossing the split the source came with: "
             f"{nd['groups_across_source_splits']}. The split stage keeps each group in one split.",
             "", "| group | images | labels | source splits | some of its images |", "|---|---|---|---|---|"]
    for group in shown.worst.head(GROUPS).itertuples(index=False):
        members = shown.members[group.group]
        pictures = " ".join(thumbs.markdown(m, f"{m.label}") for m in members.itertuples(index=False))
        lines.append(f"| {_cell(group.path)} | {group.images} | {group.labels} | {group.source_splits} | {pictures} |")
    return "\n".join(lines)


# per warning threshold: title, column, lowest first, the bound in params.yaml, the rule in words
_CHECKS = (
    ("Blurriest", "sharpness", True, "min_sharpness", "variance of the Laplacian under {:g}"),
    ("Darkest", "brightness", True, "min_brightness", "mean grey level under {:g}"),
    ("Brightest", "brightness", False, "max_brightness", "mean grey level over {:g}"),
    ("Flattest", "contrast", True, "min_contrast", "grey-level standard deviation under {:g}"),
)


def _offender_checks(con, rules: Validate) -> list[tuple[str, str, str, int, pd.DataFrame]]:
    """Per warning threshold: (title, column, the rule in words, accepted images past it, the
    WORST of them: id, path, label and the column)."""
    out = []
    for title, column, lowest_first, name, rule in _CHECKS:
        bound = float(getattr(rules, name))
        where = f"rule IS NULL AND {column} {'<' if lowest_first else '>'} ?"
        hits = con.execute(f"SELECT count(*) FROM decided WHERE {where}", [bound]).fetchone()[0]
        worst = con.execute(f"SELECT id, path, label, {column} FROM decided WHERE {where} "
                            f"ORDER BY {column} {'ASC' if lowest_first else 'DESC'}, id LIMIT {WORST}", [bound]).df()
        out.append((title, column, rule.format(bound), hits, worst))
    return out


def _offenders(offenders: list, thumbs: Thumbnails) -> str:
    lines = ["## Worst offenders", "", "Accepted images past a warning threshold (they are trained on: "
             "look at them).", ""]
    for title, column, rule, hits, worst in offenders:
        if not hits:
            lines += [f"### {title}: none ({rule})", ""]
            continue
        lines += [f"### {title}: {hits} image(s) with {rule}", "",
                  f"| image | file | class | {column} |", "|---|---|---|---|"]
        lines += [f"| {thumbs.markdown(row, row.path)} | {_cell(row.path)} | {_cell(row.label)} | "
                  f"{getattr(row, column):g} |" for row in worst.itertuples(index=False)]
        lines.append("")
    return "\n".join(lines).rstrip()


# --- index.html: the same facts, as HTML (templates/data_quality.html) -------------------------

def _html(shown: Shown, summary: dict, rules: Validate, thumbs: Thumbnails, links: dict[str, str]) -> str:
    # the evaluation report's template environment (autoescaped, strict); imported here, since
    # evaluation.py imports this module for the page's name
    from imgpipe.reports.evaluation import TEMPLATES

    quarantine = shown.quarantine
    # validation.triage_tables writes each quarantined file's image id as detail "id=<id>"
    ids = quarantine["detail"].fillna("").str.removeprefix("id=")
    quarantined = [{"path": path, "rule": rule, "reason": reason,
                    "thumb": thumbs.file(image_id, path) if i < PAGE_THUMBNAILS else None}
                   for i, (path, rule, reason, image_id)
                   in enumerate(zip(quarantine["path"], quarantine["rule"], quarantine["reason"], ids))]

    def shown_groups(groups: pd.DataFrame) -> list[dict]:
        # records, not tuples: Python numbers, which the table macros right-align
        return [{**group, "members": [
            {"path": m.path, "label": m.label, "thumb": thumbs.file(m.id, m.path),
             "split": "" if pd.isna(m.source_split) else m.source_split}  # missing: the source gave none
            for m in shown.members[group["group"]].itertuples(index=False)]}
            for group in groups.to_dict("records")]

    results = summary["expectations"]["results"]
    return TEMPLATES.get_template("data_quality.html").render(
        thumb=THUMBNAIL_SIDE, links=links, summary=summary, rules=rules, verdict=_verdict(summary), status=_status,
        skipped_why=SKIPPED_WHY, histogram=f"{FILES}/{HISTOGRAM}",
        critical=[r for r in results if r["critical"]], warning_checks=[r for r in results if not r["critical"]],
        classes=shown.classes.to_dict("records"), quarantined=quarantined, page_thumbnails=PAGE_THUMBNAILS,
        quarantined_total=summary["quarantined"],
        groups=shown_groups(shown.worst.head(PAGE_GROUPS)), crossing=shown_groups(shown.crossing),
        crossing_total=summary["near_duplicates"]["groups_across_source_splits"], page_groups=PAGE_GROUPS,
        offenders=[{"title": title, "column": column, "rule": rule, "hits": hits,
                    "rows": [{"path": r.path, "label": r.label, "value": getattr(r, column),
                              "thumb": thumbs.file(r.id, r.path)} for r in worst_rows.itertuples(index=False)]}
                   for title, column, rule, hits, worst_rows in shown.offenders],
    )


# --- pictures --------------------------------------------------------------------------------

def class_histogram(classes: pd.DataFrame, minimum: int, path: Path) -> None:
    count = len(classes)
    figure = Figure(figsize=(min(12.0, max(4.0, 2.0 + 0.35 * count)), 3.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    positions = np.arange(count)
    axes.bar(positions, classes["accepted"], color="#4c72b0")
    axes.axhline(minimum, color="#c44e52", linestyle="--", linewidth=1, label=f"minimum ({minimum})")
    if count <= NAMED_BARS:
        axes.set_xticks(positions, [str(label) for label in classes["label"]], rotation=45, ha="right")
    else:
        axes.set_xticks([])
        axes.set_xlabel(f"{count} classes, in name order")
    axes.set_ylabel("accepted images")
    axes.set_title("Accepted images per class")
    axes.legend(loc="upper left", bbox_to_anchor=(1, 1))  # beside the bars, never over one
    figure.savefig(path, format="png")


class Thumbnails:
    """Writes an image's thumbnail once (`<id>.jpg`) and gives the markdown that shows it."""

    def __init__(self, source: Source | None, folder: Path):
        self.source, self.folder = source, folder

    def markdown(self, row, caption: str) -> str:
        """`row` is an accepted-image row (id, path); the caption is the image's alt text."""
        picture = self.file(row.id, row.path)
        return "(no thumbnail)" if picture is None else f"![{_alt(caption)}]({picture})"

    def file(self, image_id: str, path: str) -> str | None:
        """The thumbnail's path relative to the pages (written the first time), None when the image
        does not decode (or there is no source)."""
        name = f"{image_id}.jpg"
        if not image_id or not (self.folder / name).exists() and not self._write(path, self.folder / name):
            return None
        return f"{FILES}/{name}"

    def _write(self, image_path: str, out: Path) -> bool:
        if self.source is None:
            return False
        try:
            decoded = self.source.read_image(image_path)
        except (OSError, ValueError):  # gone or unreadable since ingest: the page says so instead of failing
            return False
        if not decoded.ok:
            return False
        out.write_bytes(thumbnails.encoded(decoded.image, THUMBNAIL_SIDE, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 85)))
        return True


def _cell(text) -> str:
    """Text (a file name, a label) that shows as it is in a markdown table row: it can neither end
    the cell nor become a link, a picture, HTML, code or emphasis."""
    return re.sub(r"([\\`*\[\]<>|])", r"\\\1", str(text)).replace("\n", " ")


def _code(text) -> str:
    """Text as a code span (where a backslash is shown, not an escape): only the row's separators
    and backticks taken out."""
    return "`" + str(text).replace("`", "'").replace("|", "\\|").replace("\n", " ") + "`"


def _alt(text) -> str:
    return str(text).replace("[", "(").replace("]", ")").replace("\\", "/").replace("|", "/").replace("\n", " ")

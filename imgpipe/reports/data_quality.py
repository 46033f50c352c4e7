"""summary.md: the one page a reviewer reads before trusting the data, with its pictures.

It links, by relative paths, to the files beside it in `summary_files/`: the class histogram
(`classes.png`) and small thumbnails of the worst offenders (`<image id>.jpg`), so the page
renders wherever the folder goes (a code forge, an editor's preview). Only the few images shown
are read again; the facts behind the page come from the manifest.

Everything is sorted with a tie-break on the image id: the same data gives the same page.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from imgpipe.core.params import Validate
from imgpipe.data.sources import Source
from imgpipe.reports import thumbnails

PAGE = "summary.md"
FILES = "summary_files"
HISTOGRAM = "classes.png"
WORST = 6  # offenders shown per check
GROUPS = 5  # near-duplicate groups shown
GROUP_THUMBNAILS = 4  # images shown per group
QUARANTINE_ROWS = 20
THUMBNAIL_SIDE = 96
# past this many classes the histogram's bars are too thin to name
NAMED_BARS = 40


def write(result, summary: dict, rules: Validate, source: Source | None, folder: Path) -> str:
    """Write the histogram and thumbnails into `folder`; return the markdown of summary.md.

    `result` is validate's Triage; `source` reads the images to show (None: no thumbnails).
    """
    thumbs = Thumbnails(source, Path(folder))
    class_histogram(result.classes, rules.min_images_per_class, Path(folder) / HISTOGRAM)
    parts = [
        _headline(summary),
        _warnings(summary),
        _checks(summary),
        _classes(result.classes, summary, rules),
        _quarantined(result.quarantine, summary),
        _near_duplicates(result.accepted, result.groups, summary, rules, thumbs),
        _offenders(result.accepted, rules, thumbs),
    ]
    return "\n\n".join(parts) + "\n"


# --- sections --------------------------------------------------------------------------------

def _headline(summary: dict) -> str:
    failed = [r for r in summary["expectations"]["results"] if r["critical"] and not r["success"]]
    verdict = "passed" if summary["success"] else f"FAILED ({len(failed)} critical check(s))"
    return (f"# Data quality: {verdict}\n\n"
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
        names = ", ".join(f"`{_cell(label)}` ({count})" for label, count in group.items())
        lines.append(f"- Classes named alike, the same but for letter case or surrounding spaces: {names} "
                     f"accepted images. Most likely one class: rename the folders or the labels to one name.")
    return "## Warnings\n\n" + ("\n".join(lines) if lines else "None.")


def _checks(summary: dict) -> str:
    lines = ["## Checks", "", "| result | check | on | unexpected |", "|---|---|---|---|"]
    for r in summary["expectations"]["results"]:
        status = "pass" if r["success"] else ("**FAILED**" if r["critical"] else "warning")
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
    lines += ["", f"The first {len(shown)} of {len(quarantine)}, in manifest order (all of them: `quarantine.csv`):",
              "", "| file | reason |", "|---|---|"]
    lines += [f"| {_cell(path)} | {_cell(reason)} |" for path, reason in zip(shown["path"], shown["reason"])]
    return "\n".join(lines)


def _near_duplicates(accepted: pd.DataFrame, groups: pd.DataFrame, summary: dict, rules: Validate,
                     thumbs: Thumbnails) -> str:
    nd = summary["near_duplicates"]
    head = (f"## Near-duplicates\n\nPerceptual hashes within {rules.near_duplicate_distance} of 64 bits "
            f"(`validate.near_duplicate_distance`).")
    if groups.empty:
        return head + " None found."
    lines = [head + f" Groups: {nd['groups']}, holding {nd['images']} images (the largest: {nd['largest_group']}); "
             f"mixing labels: {nd['groups_mixing_labels']}; crossing the split the source came with: "
             f"{nd['groups_across_source_splits']}. The split stage keeps each group in one split.",
             "", "| group | images | labels | source splits | some of its images |", "|---|---|---|---|---|"]
    # the most suspicious first: mixed labels, then leakage, then the largest
    worst = groups.sort_values(["labels", "source_splits", "images", "group"],
                               ascending=[False, False, False, True]).head(GROUPS)
    for group in worst.itertuples(index=False):
        members = accepted[accepted["group"] == group.group].sort_values("id").head(GROUP_THUMBNAILS)
        pictures = " ".join(thumbs.markdown(m, f"{m.label}") for m in members.itertuples(index=False))
        lines.append(f"| {_cell(group.path)} | {group.images} | {group.labels} | {group.source_splits} | {pictures} |")
    return "\n".join(lines)


def _offenders(accepted: pd.DataFrame, rules: Validate, thumbs: Thumbnails) -> str:
    checks = [
        ("Blurriest", "sharpness", True, accepted["sharpness"] < rules.min_sharpness,
         f"variance of the Laplacian under {rules.min_sharpness:g}"),
        ("Darkest", "brightness", True, accepted["brightness"] < rules.min_brightness,
         f"mean grey level under {rules.min_brightness:g}"),
        ("Brightest", "brightness", False, accepted["brightness"] > rules.max_brightness,
         f"mean grey level over {rules.max_brightness:g}"),
        ("Flattest", "contrast", True, accepted["contrast"] < rules.min_contrast,
         f"grey-level standard deviation under {rules.min_contrast:g}"),
    ]
    lines = ["## Worst offenders", "", "Accepted images past a warning threshold (they are trained on: "
             "look at them).", ""]
    for title, column, lowest_first, mask, rule in checks:
        hit = accepted[mask]
        if hit.empty:
            lines += [f"### {title}: none ({rule})", ""]
            continue
        worst = hit.sort_values([column, "id"], ascending=[lowest_first, True]).head(WORST)
        lines += [f"### {title}: {len(hit)} image(s) with {rule}", "",
                  f"| image | file | class | {column} |", "|---|---|---|---|"]
        lines += [f"| {thumbs.markdown(row, row.path)} | {_cell(row.path)} | {_cell(row.label)} | "
                  f"{getattr(row, column):g} |" for row in worst.itertuples(index=False)]
        lines.append("")
    return "\n".join(lines).rstrip()


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
        name = f"{row.id}.jpg"
        if not (self.folder / name).exists() and not self._write(row.path, self.folder / name):
            return "(no thumbnail)"
        return f"![{_alt(caption)}]({FILES}/{name})"

    def _write(self, image_path: str, out: Path) -> bool:
        if self.source is None:
            return False
        try:
            decoded = self.source.read_image(image_path)
        except OSError:  # gone or unreadable since ingest: the page says so instead of failing
            return False
        if not decoded.ok:
            return False
        out.write_bytes(thumbnails.encoded(decoded.image, THUMBNAIL_SIDE, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 85)))
        return True


def _cell(text) -> str:
    """Text that cannot break a markdown table row."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _alt(text) -> str:
    return _cell(text).replace("[", "(").replace("]", ")")

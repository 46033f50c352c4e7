"""The evaluation report: one HTML page a reviewer reads, and a gallery of the worst mistakes.

Written by the evaluate stage into <paths.reports>/evaluation/:

    index.html               the gate's verdict, the metrics table, per-class scores, the most
                             common confusions, the plots, and links to the gallery, the CSV files
                             and the data-quality report
    gallery.html             the worst mistakes (misclassified.csv), grouped as {true}_to_{predicted}
    gallery/{true}_to_{predicted}/{id}.png   their thumbnails, from the original images
    confusion.png, confusion_normalized.png, roc.png, precision_recall.png, training.png
    predictions.csv          every test image: path,id,true,predicted,confidence,p_<class>...

Plain HTML from the Jinja2 templates in templates/ (autoescaped), with relative links and no
external resources: open index.html from disk, or publish the folder next to its siblings in
reports/. Plots are drawn with matplotlib's object API (no pyplot, so no global backend state),
thumbnails with OpenCV (thumbnails.py).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from imgpipe.core.atomic_write import atomic_dir, write_csv, write_text
from imgpipe.core.params import Evaluate, Ingest, Paths
from imgpipe.data.sources import Source, SourceError
from imgpipe.reports import thumbnails
from imgpipe.reports.data_quality import HTML_PAGE as DATA_QUALITY_PAGE

FOLDER = "evaluation"
INDEX = "index.html"
GALLERY = "gallery.html"
PREDICTIONS = "predictions.csv"
THUMB = 128  # longest side of a gallery thumbnail, in pixels
ANNOTATE_UP_TO = 20  # classes; beyond that, numbers in the confusion matrix cells are unreadable
VERDICT_COLOURS = {"blessed": "#1b7f3b", "warned": "#a86400", "failed": "#b3261e"}


# -- the pure core ---------------------------------------------------------------------------


def group_name(true: str, predicted: str) -> str:
    return f"{true}_to_{predicted}"


def safe_name(name: str) -> str:
    """A file or folder name from a class name, which may hold any character (a labels CSV's)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "_"


def groups(mistakes: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Mistakes by {true}_to_{predicted}, the largest group first; rows keep their worst-first order."""
    keyed = mistakes.assign(group=[group_name(t, p) for t, p in zip(mistakes["true"], mistakes["predicted"])])
    sizes = keyed["group"].value_counts()
    order = sorted(sizes.index, key=lambda g: (-sizes[g], g))
    return [(g, keyed[keyed["group"] == g].drop(columns="group")) for g in order]


def top_confusions(matrix: np.ndarray, classes: list[str], limit: int = 10) -> list[tuple[str, str, int, float]]:
    """(true, predicted, count, share of the true class's test images), the most frequent first."""
    support = matrix.sum(axis=1)
    pairs = [(int(matrix[t, p]), classes[t], classes[p], t)
             for t in range(len(classes)) for p in range(len(classes)) if t != p and matrix[t, p] > 0]
    pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
    return [(true, pred, count, count / support[t]) for count, true, pred, t in pairs[:limit]]


# -- the pages: templates/{index,gallery}.html ------------------------------------------------

TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("imgpipe.reports"), autoescape=True,  # class names and paths are text, never HTML
    # a misspelt name in a template fails the stage instead of leaving a blank in the page
    undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
)
TEMPLATES.globals["thumb"] = THUMB


def index_html(metrics: dict, classes: list[str], confusions: list, plots: dict[str, str], links: dict[str, str],
               model: dict, data_quality: dict | None, min_recall: float, ranking: str) -> str:
    """The report page. `confusions`: top_confusions(); `plots`: image id -> file; `links`: name -> relative
    path (URL-quoted by the template); `model`: path, md5, export; `data_quality`: validate's summary.json."""
    return TEMPLATES.get_template("index.html").render(
        metrics=metrics, gate=metrics["gate"], colours=VERDICT_COLOURS, classes=classes, plots=plots, links=links,
        model=model, data_quality=data_quality, min_recall=min_recall, ranking=ranking,
        confusions=[{"true": true, "predicted": pred, "count": count, "share": share, "group": group_name(true, pred)}
                    for true, pred, count, share in confusions],
    )


def gallery_html(grouped: list[tuple[str, pd.DataFrame]], thumbs: dict[str, str], problems: dict[str, str]) -> str:
    """The gallery page: per group, a figure per mistake; `thumbs`: id -> relative file, `problems`: id -> why none."""
    return TEMPLATES.get_template("gallery.html").render(
        total=sum(len(rows) for _, rows in grouped), index=INDEX, thumbs=thumbs, problems=problems,
        groups=[(name, rows.to_dict("records")) for name, rows in grouped],
    )


# -- I/O: plots ------------------------------------------------------------------------------


def plot_confusion(matrix: np.ndarray, classes: list[str], normalized: bool, path: Path) -> None:
    values = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalized else matrix
    side = max(4.0, 0.45 * len(classes) + 2.5)
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalized else None)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("confusion matrix, share of each actual class" if normalized else "confusion matrix (images)")
    if len(classes) <= ANNOTATE_UP_TO:
        top = values.max() or 1
        for (row, col), value in np.ndenumerate(values):
            text = f"{value:.2f}" if normalized else str(int(value))
            ax.text(col, row, text, ha="center", va="center", fontsize=8, color="white" if value > top / 2 else "black")
    fig.savefig(path, dpi=100)


def plot_curve(curve: pd.DataFrame, x: str, y: str, title: str, path: Path, diagonal: bool) -> None:
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot(curve[x], curve[y], drawstyle="steps-post" if not diagonal else "default")
    if diagonal:
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
        ax.legend(loc="lower right")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=x, ylabel=y, title=title)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def plot_training(log: pd.DataFrame, path: Path) -> None:
    fig = Figure(figsize=(9, 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("accuracy", "loss")):
        for column in (metric, f"val_{metric}"):
            if column in log and log[column].notna().any():
                ax.plot(log["epoch"] + 1, log[column], marker="o", label=column)
        ax.set(xlabel="epoch", title=metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def write_plots(out: Path, matrix: np.ndarray, classes: list[str], curves, ranking: str, train_log: Path) -> dict[str, str]:
    """The PNGs of the report: image id -> file name."""
    roc, pr = curves
    plots = {"confusion": "confusion.png", "confusion-normalized": "confusion_normalized.png",
             "roc": "roc.png", "precision-recall": "precision_recall.png"}
    plot_confusion(matrix, classes, False, out / plots["confusion"])
    plot_confusion(matrix, classes, True, out / plots["confusion-normalized"])
    plot_curve(roc, "fpr", "tpr", f"ROC, {ranking}", out / plots["roc"], diagonal=True)
    plot_curve(pr, "recall", "precision", f"precision-recall, {ranking}", out / plots["precision-recall"], diagonal=False)
    if train_log.is_file():
        plot_training(pd.read_csv(train_log), out / "training.png")
        plots["training"] = "training.png"
    return plots


# -- I/O: thumbnails and the pages -------------------------------------------------------------


def write_thumbnails(ingest: Ingest, mistakes: pd.DataFrame, out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Thumbnails of the mistakes' original images: ({id: relative file}, {id: why there is none})."""
    thumbs, problems = {}, {}
    if mistakes.empty:
        return thumbs, problems
    try:
        source = Source.from_params(ingest)
    except SourceError as exc:
        return thumbs, {image_id: f"original not readable: {exc}" for image_id in mistakes["id"]}
    with source:
        for row in mistakes.itertuples(index=False):
            relative = f"gallery/{safe_name(group_name(row.true, row.predicted))}/{row.id}.png"
            try:
                decoded = source.read_image(row.path)
                problem = decoded.error
            except (OSError, ValueError) as exc:  # the source changed since: say so, go on
                problem = str(exc)
            if problem:
                problems[row.id] = f"original not readable: {problem}"
                continue
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            (out / relative).write_bytes(thumbnails.encoded(decoded.image, THUMB, ".png"))
            thumbs[row.id] = relative
    return thumbs, problems


def read_data_quality(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write(paths: Paths, evaluate: Evaluate, ingest: Ingest, metrics: dict, classes: list[str], matrix: np.ndarray, curves, predictions: pd.DataFrame,
          mistakes: pd.DataFrame, model_md5: str, train_log: Path) -> None:
    """Write <paths.reports>/evaluation/ atomically (the report, the gallery, the plots, predictions.csv)."""
    reports = Path(paths.reports)
    folder = reports / FOLDER
    dq = Path(paths.data_quality)

    def link(path: Path) -> str:
        return Path(os.path.relpath(path, folder)).as_posix()

    links = {
        "gallery": GALLERY,
        "predictions": PREDICTIONS,
        "metrics": link(reports / "metrics.json"),
        "misclassified": link(reports / "misclassified.csv"),
        "data_quality_page": link(dq / DATA_QUALITY_PAGE),
        "data_quality_report": link(dq / "site" / "index.html"),
        "data_quality_summary": link(dq / "summary.json"),
    }
    ranking = (f"class {classes[1]} against {classes[0]}" if len(classes) == 2
               else "micro-averaged over classes, one against the rest")
    model = {"path": paths.model, "md5": model_md5, "export": evaluate.export_dir}
    with atomic_dir(folder) as out:
        plots = write_plots(out, matrix, classes, curves, ranking, train_log)
        thumbs, problems = write_thumbnails(ingest, mistakes, out)
        write_csv(out / PREDICTIONS, predictions)
        write_text(out / INDEX, index_html(
            metrics, classes, top_confusions(matrix, classes), plots, links, model,
            read_data_quality(dq / "summary.json"), evaluate.min_class_recall, ranking,
        ))
        write_text(out / GALLERY, gallery_html(groups(mistakes), thumbs, problems))

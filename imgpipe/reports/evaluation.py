"""The evaluation report: one HTML page a reviewer reads, and a gallery of the worst mistakes.

Written by the evaluate stage into <paths.reports>/evaluation/:

    index.html               the gate's verdict, the metrics table, per-class scores, the most
                             common confusions, the plots, and links to the gallery, the CSV files
                             and the data-quality report
    gallery.html             the worst mistakes (misclassified.csv), grouped as {true}_to_{predicted}
    gallery/{true}_to_{predicted}/{id}.png   their thumbnails, from the original images
    confusion.png, confusion_normalized.png, roc.png, precision_recall.png, training.png
    predictions.csv          every test image: path,id,true,predicted,confidence,p_<class>...

Plain HTML and relative links: open index.html from disk, or publish the folder next to its
siblings in reports/. Plots are drawn with matplotlib's object API (no pyplot, so no global
backend state), thumbnails with OpenCV.
"""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from imgpipe.images import formats as imagefile
from imgpipe.core.atomic_write import atomic_dir, write_csv, write_text
from imgpipe.core.params import Evaluate, Ingest, Paths
from imgpipe.images.transforms import to_colour
from imgpipe.data.sources import Source, SourceError

FOLDER = "evaluation"
INDEX = "index.html"
GALLERY = "gallery.html"
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


def thumbnail(image: np.ndarray) -> np.ndarray:
    """RGB uint8 with the longest side THUMB: crisp pixels when enlarging (MNIST digits), area-averaged when shrinking."""
    rgb = to_colour(image, "rgb")
    height, width = rgb.shape[:2]
    scale = THUMB / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_NEAREST if scale > 1 else cv2.INTER_AREA)


def _e(value) -> str:
    return html.escape(str(value))


def _url(path: str) -> str:
    return quote(path.replace(os.sep, "/"))


def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.low td {{ background: #fde8e6; }}
.verdict {{ color: white; padding: 0.6em 1em; border-radius: 4px; }}
.plots img {{ max-width: 32em; margin: 0 1em 1em 0; border: 1px solid #ddd; }}
.group {{ display: flex; flex-wrap: wrap; gap: 0.8em; }}
figure {{ margin: 0; width: {thumb}px; font-size: 0.8em; overflow-wrap: anywhere; }}
figure img, figure .missing {{ width: {thumb}px; height: {thumb}px; object-fit: contain; background: #f4f4f4; }}
figure .missing {{ display: flex; align-items: center; justify-content: center; text-align: center; color: #777; }}
</style></head>
<body>
{body}
</body></html>
"""


def _page(title: str, body: str) -> str:
    return PAGE.format(title=_e(title), body=body, thumb=THUMB)


class Markup(str):
    """HTML to put into a cell as it is (a link)."""


def _cell(value) -> str:
    """A table cell: numbers right-aligned (floats to 4 digits), text escaped, Markup as it is."""
    if isinstance(value, Markup):
        return f"<td>{value}</td>"
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num">{value if isinstance(value, int) else _number(value)}</td>'
    return f"<td>{_e(value)}</td>"


def _table(table_id: str, header: list[str], rows: list[tuple[list, bool]]) -> str:
    """A table; rows are (cells, highlighted), highlighted rows in red."""
    lines = [f'<table id="{table_id}"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    lines += [f'<tr{" class=low" if low else ""}>' + "".join(map(_cell, cells)) + "</tr>" for cells, low in rows]
    return "\n".join(lines) + "</table>"


def index_html(metrics: dict, classes: list[str], confusions: list, plots: dict[str, str], links: dict[str, str],
               model: dict, data_quality: dict | None, min_recall: float, ranking: str) -> str:
    """The report page. `plots`: image id -> file; `links`: name -> relative URL; `model`: path, md5, export."""
    gate = metrics["gate"]
    verdict = gate["verdict"]
    parts = [
        f"<h1>Evaluation of {_e(model['path'])}</h1>",
        f'<p class="verdict" id="verdict" style="background:{VERDICT_COLOURS[verdict]}">'
        f"Model gate: <strong>{_e(verdict)}</strong></p>",
        _table("gate", ["check", "value", "threshold", "passed", "detail"], [
            ([c["name"], c["value"], c["threshold"], "yes" if c["passed"] else "no", c["detail"]], not c["passed"])
            for c in gate["checks"]]),
        "<h2>Metrics</h2>",
        _table("metrics", ["metric", "value"], [([name, value], False) for name, value in (
            ("accuracy", metrics["accuracy"]), ("loss", metrics["loss"]), ("macro F1", metrics["macro_f1"]),
            ("weighted F1", metrics["weighted_f1"]), (f"ROC AUC ({ranking})", metrics.get("roc_auc")),
            (f"average precision ({ranking})", metrics.get("average_precision")), ("test images", metrics["num_test"]))]),
        f"<h2>Per class</h2><p>Rows in red: recall below the gate's minimum ({min_recall:.4f}).</p>",
        _table("per-class", ["class", "precision", "recall", "F1", "support"], [
            ([name, s["precision"], s["recall"], s["f1"], s["support"]], s["support"] > 0 and s["recall"] < min_recall)
            for name, s in ((name, metrics["per_class"][name]) for name in classes)]),
        f'<h2>Most common confusions</h2><p>Look at them in the <a id="gallery-link" href="{links["gallery"]}">'
        f'gallery of the worst mistakes</a> (also <a href="{links["misclassified"]}">misclassified.csv</a>).</p>',
    ]
    if confusions:
        parts.append(_table("confusions", ["true", "predicted as", "images", "share of the class"], [
            ([true, Markup(f'<a href="{links["gallery"]}#{_url(group_name(true, pred))}">{_e(pred)}</a>'), count,
              f"{share:.1%}"], False)
            for true, pred, count, share in confusions]))
    else:
        parts.append("<p>No mistakes on the test split.</p>")

    parts.append('<h2>Plots</h2><div class="plots">')
    parts += [f'<img id="{_e(key)}" src="{_url(name)}" alt="{_e(key)}">' for key, name in plots.items()]
    parts.append("</div><h2>Data quality</h2>")
    if data_quality is None:
        parts.append(f'<p>No data-quality summary at {_e(links["data_quality_summary"])} (run the validate stage).</p>')
    else:
        dq, expectations = data_quality, data_quality.get("expectations", {})
        reasons = ", ".join(f"{k} {v}" for k, v in dq.get("quarantine_reasons", {}).items() if v) or "none"
        parts.append(_table("data-quality", ["validate", "count"], [([name, value], False) for name, value in (
            ("inputs", dq.get("inputs")), ("accepted", dq.get("ingested")), ("quarantined", dq.get("quarantined")),
            ("quarantine reasons", reasons),
            ("expectations passed / failed", f'{expectations.get("passed")} / {expectations.get("failed")}'))]))
    parts.append(f'<p><a id="data-quality-report" href="{links["data_quality_report"]}">Data-quality report (Data Docs)</a>'
                 f' &middot; <a id="data-quality-summary" href="{links["data_quality_summary"]}">summary.json</a></p>')

    parts.append(
        f"<h2>Model</h2><p>{_e(model['path'])}, md5 <code>{_e(model['md5'])}</code> (as in dvc.lock). "
        f"Exported with its preprocessing to <code>{_e(model['export'])}</code>: "
        f"<code>python -m stages.predict --model {_e(model['export'])} IMAGE_OR_FOLDER ...</code></p>"
        f'<p>Files: <a href="{links["metrics"]}">metrics.json</a> &middot; <a href="predictions.csv">predictions.csv</a>'
        f" (every test image, with its class probabilities)</p>"
    )
    return _page(f"Evaluation: {verdict}", "\n".join(parts))


def gallery_html(grouped: list[tuple[str, pd.DataFrame]], thumbs: dict[str, str], problems: dict[str, str]) -> str:
    """The gallery page: per group, a figure per mistake; `thumbs`: id -> relative file, `problems`: id -> why none."""
    total = sum(len(rows) for _, rows in grouped)
    parts = [f'<h1>The {total} worst mistakes</h1><p><a href="{INDEX}">Back to the report</a>. '
             "Most confident first; grouped as true_to_predicted, the largest group first.</p>"]
    for name, rows in grouped:
        parts.append(f'<h2 id="{_e(name)}">{_e(name)} ({len(rows)})</h2><div class="group">')
        for row in rows.itertuples(index=False):
            if row.id in thumbs:
                picture = f'<img src="{_url(thumbs[row.id])}" alt="{_e(row.path)}">'
            else:
                picture = f'<div class="missing">{_e(problems.get(row.id, "no image"))}</div>'
            parts.append(f"<figure>{picture}<figcaption>true <b>{_e(row.true)}</b>, predicted <b>{_e(row.predicted)}</b>"
                         f" ({row.confidence:.3f})<br>{_e(row.path)}</figcaption></figure>")
        parts.append("</div>")
    if not grouped:
        parts.append("<p>No mistakes on the test split.</p>")
    return _page("Worst mistakes", "\n".join(parts))


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


def read_original(source: Source, path: str) -> np.ndarray:
    if source.layout == "idx":
        return source.read_idx_pixels(path)
    decoded = imagefile.decode(source.read_bytes(path))
    if not decoded.ok:
        raise ValueError(decoded.error)
    return decoded.image


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
                image = read_original(source, row.path)
            except (OSError, ValueError, SourceError) as exc:  # the source changed since: say so, go on
                problems[row.id] = f"original not readable: {exc}"
                continue
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / relative), cv2.cvtColor(thumbnail(image), cv2.COLOR_RGB2BGR))
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
        return _url(os.path.relpath(path, folder))

    links = {
        "gallery": GALLERY,
        "metrics": link(reports / "metrics.json"),
        "misclassified": link(reports / "misclassified.csv"),
        "data_quality_report": link(dq / "site" / "index.html"),
        "data_quality_summary": link(dq / "summary.json"),
    }
    ranking = (f"class {classes[1]} against {classes[0]}" if len(classes) == 2
               else "micro-averaged over classes, one against the rest")
    model = {"path": paths.model, "md5": model_md5, "export": evaluate.export_dir}
    with atomic_dir(folder) as out:
        plots = write_plots(out, matrix, classes, curves, ranking, train_log)
        thumbs, problems = write_thumbnails(ingest, mistakes, out)
        write_csv(out / "predictions.csv", predictions)
        write_text(out / INDEX, index_html(
            metrics, classes, top_confusions(matrix, classes), plots, links, model,
            read_data_quality(dq / "summary.json"), evaluate.min_class_recall, ranking,
        ))
        write_text(out / GALLERY, gallery_html(groups(mistakes), thumbs, problems))

"""Prefect artifacts from the pipeline's own reports, for the runs page of the Prefect UI.

After `validate`: a markdown artifact, validate's own summary.md (reports/data_quality.py), with
its pictures inlined and its links made absolute; its description names the full HTML page,
index.html beside it. After `evaluate`: a table artifact of the
per-class test metrics, with the overall figures, the gate's verdict and where the evaluation
report is in its description. Both are keyed, so the UI also shows each one's history.

Pure functions turn what the stages write into what the UI shows; `publish_*` read the files, at
the paths params.yaml names, and create the artifacts.
"""

import base64
import json
import mimetypes
import re
from pathlib import Path
from urllib.parse import urlsplit
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from imgpipe.core.params import PARAMS_FILE, load_params

DATA_QUALITY_KEY = "data-quality"
METRICS_KEY = "metrics"


# a markdown link or picture, [text](target) or ![alt](target), as reports/data_quality.py writes them
_LINK = re.compile(r"(?P<picture>!?)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")


def summary_for_prefect(page: str, folder: Path) -> str:
    """validate's summary.md (`page`, read from `folder`) as the Prefect UI can show it.

    The page links to files beside it, and the UI would resolve those links against its own
    address. So each picture (the class histogram, the offenders' thumbnails, a few KB each) is
    put in the page as a data: URL, which the UI shows and which stays right in the artifact's
    history after the files change; a link to another file (the Data Docs) becomes its absolute
    path, to open from the machine that ran the flow. Absolute links and URLs are kept.
    """

    def resolve(match: re.Match) -> str:
        target = match["target"]
        if urlsplit(target).scheme or target.startswith(("/", "#")):
            return match[0]
        path = (folder / target).resolve()
        if not match["picture"]:
            return f"{match['text']} (`{path}`)"
        if not path.is_file():
            return f"({match['text']}: no picture at `{path}`)"
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return f"![{match['text']}](data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')})"

    return _LINK.sub(resolve, page)


def metrics_rows(metrics: dict) -> list[dict]:
    """The metrics table: one row per class, in metrics.json's order."""
    return [
        {
            "class": name,
            "precision": scores["precision"],
            "recall": scores["recall"],
            "f1": scores["f1"],
            "support": scores["support"],
        }
        for name, scores in metrics["per_class"].items()
    ]


def gate_verdict(gate: dict | None) -> str:
    """metrics.json's `gate` ({verdict, checks: [{name, passed, detail, ...}]}, imgpipe/evaluation/gate.py)
    in words: the verdict, then what each check found."""
    if gate is None:
        return "no gate configured"
    details = "; ".join(check["detail"] for check in gate["checks"])
    return f"{gate['verdict']} ({details})" if details else gate["verdict"]


def metrics_description(metrics: dict, report: str | None) -> str:
    """The overall figures, the gate's verdict and the evaluation report's location (None: there
    is none), shown above the metrics table."""
    text = (
        f"Test set: {metrics['num_test']} images. Accuracy {metrics['accuracy']:.4f}, "
        f"loss {metrics['loss']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
        f"weighted F1 {metrics['weighted_f1']:.4f}. Gate: {gate_verdict(metrics.get('gate'))}."
    )
    return f"{text} Full report: `{report}`" if report else text


def _read(path: Path) -> str | None:
    if not path.is_file():
        get_run_logger().info("no %s: nothing to publish", path)
        return None
    return path.read_text(encoding="utf-8")


def publish_data_quality(repo: str) -> UUID | None:
    """The data-quality artifact of the repository at `repo`: validate's summary.md, if written."""
    # imported here: the report module pulls in OpenCV and matplotlib, for two names
    from imgpipe.reports.data_quality import HTML_PAGE, PAGE

    page = Path(repo) / load_params(Path(repo) / PARAMS_FILE).paths.data_quality / PAGE
    text = _read(page)
    if text is None:
        return None
    return create_markdown_artifact(
        summary_for_prefect(text, page.parent), key=DATA_QUALITY_KEY,
        description=data_quality_description(page.resolve(), (page.parent / HTML_PAGE).resolve()),
    )


def data_quality_description(summary: Path, full_page: Path) -> str:
    """Where the markdown shown comes from, and the full page (the quarantined files, the most
    suspicious groups) to open in a browser from the machine that ran the flow."""
    return f"validate: data-quality summary, from {summary}; the full page: {full_page}"


def publish_metrics(repo: str) -> UUID | None:
    """The metrics artifact of the repository at `repo`, if evaluate has written metrics.json."""
    # imported here: the report module pulls in OpenCV and matplotlib, for two names
    from imgpipe.reports.evaluation import FOLDER, INDEX

    reports = Path(repo) / load_params(Path(repo) / PARAMS_FILE).paths.reports
    text = _read(reports / "metrics.json")
    if text is None:
        return None
    metrics = json.loads(text)
    report = reports / FOLDER / INDEX
    description = metrics_description(metrics, str(report) if report.is_file() else None)
    return create_table_artifact(metrics_rows(metrics), key=METRICS_KEY, description=description)


# What the pipeline flow publishes after each stage, by DVC stage name.
PUBLISHERS = {"validate": publish_data_quality, "evaluate": publish_metrics}

"""Prefect artifacts from the pipeline's own reports, for the runs page of the Prefect UI.

After `validate`: a markdown artifact with the data-quality summary (counts, accepted images per
class, quarantine reasons, expectations) and where the full Data Docs report is. After
`evaluate`: a table artifact of the per-class test metrics, with the overall figures, the gate's
verdict and where the evaluation report is in its description. Both are keyed, so the UI also
shows each one's history.

Pure functions turn the JSON the stages write into markdown and table rows; `publish_*` read the
files, at the paths params.yaml names, and create the artifacts.
"""

import json
from pathlib import Path
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from imgpipe.core.params import load_params

DATA_QUALITY_KEY = "data-quality"
METRICS_KEY = "metrics"


def _cell(value) -> str:
    # a "|" in a class name or a description would end a markdown table cell
    return str(value).replace("|", "\\|")


def data_quality_markdown(summary: dict, report: str, quarantine: str) -> str:
    """The data-quality artifact: validate's summary.json, with the report's location."""
    verdict = "passed" if summary["success"] else "FAILED (a critical expectation failed)"
    expectations = summary["expectations"]
    lines = [
        f"# Data quality: {verdict}",
        "",
        "| images | count |",
        "|---|---:|",
        f"| inputs | {summary['inputs']} |",
        f"| accepted | {summary['ingested']} |",
        f"| quarantined | {summary['quarantined']} ({summary['quarantined_fraction']:.2%}) |",
        "",
        f"Expectations: {expectations['passed']} passed, {expectations['failed']} failed.",
        "",
        f"Full report (Great Expectations Data Docs): `{report}`",
        "",
        f"Quarantined files and their reasons: `{quarantine}`",
        "",
        "## Accepted images per class",
        "",
        "| class | accepted |",
        "|---|---:|",
        *(f"| {_cell(name)} | {count} |" for name, count in summary["classes"].items()),
        "",
        "## Quarantine reasons",
        "",
    ]
    reasons = {reason: n for reason, n in summary["quarantine_reasons"].items() if n}
    if reasons:
        lines += ["| reason | files |", "|---|---:|"]
        lines += [f"| {_cell(reason)} | {n} |" for reason, n in reasons.items()]
    else:
        lines.append("None: every input was accepted.")
    failed = [result for result in expectations["results"] if not result["success"]]
    if failed:
        lines += [
            "",
            "## Failed expectations",
            "",
            "| check | on | unexpected | critical |",
            "|---|---|---:|---|",
        ]
        lines += [
            f"| {_cell(r['description'])} | {_cell(r['table'])}.{_cell(r['column'])} "
            f"| {r['unexpected_count']} of {r['element_count']} "
            f"| {'yes' if r['critical'] else 'no'} |"
            for r in failed
        ]
    return "\n".join(lines) + "\n"


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
    """metrics.json's `gate` ({verdict, checks: [{name, passed, detail, ...}]}, stages/gate.py)
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


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        get_run_logger().info("no %s: nothing to publish", path)
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def publish_data_quality(repo: str) -> UUID | None:
    """The data-quality artifact of the repository at `repo`, if validate wrote its summary."""
    folder = Path(repo) / load_params(Path(repo) / "params.yaml").paths.data_quality
    summary = _read_json(folder / "summary.json")
    if summary is None:
        return None
    markdown = data_quality_markdown(
        summary, str(folder / "site" / "index.html"), str(folder / "quarantine.csv")
    )
    return create_markdown_artifact(
        markdown, key=DATA_QUALITY_KEY, description="validate: data-quality summary"
    )


def publish_metrics(repo: str) -> UUID | None:
    """The metrics artifact of the repository at `repo`, if evaluate has written metrics.json."""
    # imported here: the report module pulls in OpenCV and matplotlib, for two names
    from imgpipe.reports.evaluation import FOLDER, INDEX

    reports = Path(repo) / load_params(Path(repo) / "params.yaml").paths.reports
    metrics = _read_json(reports / "metrics.json")
    if metrics is None:
        return None
    report = reports / FOLDER / INDEX
    description = metrics_description(metrics, str(report) if report.is_file() else None)
    return create_table_artifact(metrics_rows(metrics), key=METRICS_KEY, description=description)


# What the pipeline flow publishes after each stage, by DVC stage name.
PUBLISHERS = {"validate": publish_data_quality, "evaluate": publish_metrics}

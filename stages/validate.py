"""validate: the manifest (`paths.manifest`) triaged (imgpipe/data/validation.py), the result checked
by the Great Expectations suites (imgpipe/data/expectations.py), which gate the pipeline, and reported.

A quarantined file is never moved or deleted. The Data Docs site is the detailed report, and
summary.md and index.html the pages a reviewer reads first.

Outputs (paths from params.yaml):
    paths.accepted                      the accepted list (imgpipe/data/manifest.py), manifest order
    <data_quality>/quarantine.csv       path,reason,detail, manifest order
    <data_quality>/site/index.html      the Data Docs report
    <data_quality>/summary.json         counts (with the files ingest skipped, from `<manifest>.skipped.json`)
                                        and expectation results (a DVC metric)
    <data_quality>/summary.md           the one-page summary; its pictures in summary_files/
    <data_quality>/index.html           the full page a reviewer opens first (self-contained HTML, its
                                        pictures in summary_files/ too)
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

from imgpipe.core import atomic_write
from imgpipe.core.errors import StageError
from imgpipe.core.params import Ingest, Paths, Validate
from imgpipe.core.runner import stage_main
from imgpipe.data import expectations, tables
from imgpipe.data.ingestion import skipped_path
from imgpipe.data.manifest import COLUMNS
from imgpipe.data.sources import Source, SourceError
from imgpipe.data.validation import failure_message, load_manifest, summarise, triage_tables
from imgpipe.reports import data_quality as quality_report

# the params sections `run` takes, in order (imgpipe/core/runner.py)
SECTIONS = ("validate", "paths", "ingest")
# the outputs in <paths.data_quality>/, as the pages link to them
SITE, QUARANTINE, SUMMARY = "site/index.html", "quarantine.csv", "summary.json"
log = logging.getLogger(__name__)


def run(rules: Validate, paths: Paths, ingest: Ingest) -> None:
    dq = Path(paths.data_quality)
    report, quarantine = str(dq / SITE), str(dq / QUARANTINE)
    # the tables in DuckDB, out of core (imgpipe/data/tables.py): flat memory at millions of rows
    with tables.connect() as con:
        load_manifest(con, paths.manifest)
        verdict = tables.guarded(lambda: triage_tables(con, rules), f"{paths.manifest}: not a readable manifest")
        labels = list(verdict.classes["label"])
        log.info("checked %d manifest rows: accepted %d, quarantined %d, %d classes, %d near-duplicate groups",
                 verdict.inputs, verdict.accepted, verdict.quarantined, len(labels), verdict.near_duplicates["groups"])
        con.register("classes", verdict.classes)
        with atomic_write.atomic_dir(dq / Path(SITE).parent) as site:
            outcomes = expectations.check(con, expectations.tables(), expectations.suites(rules, labels), site)
        log.info("great expectations: %d of %d expectations passed; report: %s",
                 sum(o.success for o in outcomes), len(outcomes), report)

        # written before the gate, so that a failed run still leaves the report to read
        columns = ", ".join(f"m.{tables.ident(c)}" for c in COLUMNS)
        tables.write_csv(con, f'SELECT {columns}, g.grp AS "group" FROM manifest_rows m JOIN grouped g ON g.ord = m.rowid '
                         "ORDER BY g.ord", paths.accepted)
        tables.write_csv(con, "SELECT path, reason, detail FROM decided WHERE rule IS NOT NULL ORDER BY ord", quarantine)
        summary = summarise(verdict, outcomes, report, read_skipped(paths.manifest))
        atomic_write.write_json(dq / SUMMARY, summary)
        write_summary_page(rules, ingest, quality_report.select(con, verdict.classes, rules), summary, dq)

    message = failure_message(outcomes, report, quarantine)
    if message:
        raise StageError(message)


def read_skipped(manifest: str) -> dict[str, int] | None:
    """What ingest's listing skipped, by why; None when the manifest has no such file beside it
    (one written by hand, or by an ingest older than the count)."""
    path = skipped_path(manifest)
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except FileNotFoundError:
        log.warning("%s not found: the summary cannot say which files ingest skipped", path)
        return None
    except (ValueError, AttributeError) as exc:
        raise StageError(f"{path}: not what ingest writes ({exc}); run `dvc repro ingest`") from None


def write_summary_page(rules: Validate, ingest: Ingest, shown: quality_report.Shown, summary: dict, dq: Path) -> None:
    """summary.md, index.html and, in summary_files/, the class histogram and the thumbnails."""
    try:
        source = Source.from_params(ingest)
    except SourceError as exc:  # the page is still worth having without thumbnails
        log.warning("summary without thumbnails: %s", exc)
        source = None
    with source or contextlib.nullcontext(), atomic_write.atomic_dir(dq / quality_report.FILES) as files:
        links = {"Data Docs": SITE, QUARANTINE: QUARANTINE, SUMMARY: SUMMARY, quality_report.PAGE: quality_report.PAGE}
        page, html = quality_report.write(shown, summary, rules, source, files, links)
    atomic_write.write_text(dq / quality_report.PAGE, page)
    atomic_write.write_text(dq / quality_report.HTML_PAGE, html)
    log.info("summary: %s; the full page: %s", dq / quality_report.PAGE, dq / quality_report.HTML_PAGE)


def main(argv: list[str] | None = None) -> int:
    return stage_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())

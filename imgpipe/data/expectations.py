"""The Great Expectations suites of the validate stage, and how they run.

Four tables, one suite each, so the Data Docs show a reviewer where a problem sits:

    image_manifest         every input row, with the quarantine rule the stage gave it (or none)
    accepted_images        the rows that pass: cross-checks the stage's own per-row rules, and
                           flags blurry, dark, washed-out and near-duplicate images
    near_duplicate_groups  one row per group of near-duplicate images: mixed labels, leakage
    class_counts           one row per known class with its number of accepted images

Every expectation carries `meta={"critical": ...}`: a failed critical one fails the stage, a
failed warning is only reported. Every threshold comes from `validate:` in params.yaml.

The GX project is file-backed: `gx/` in the folder the stage runs in (the repository root under
DVC). What is committed is its configuration, `gx/great_expectations.yml` (store locations,
analytics and progress bars off, and the SQLite data source with one table asset and batch
definition per table), and `gx/.gitignore`. The suites are this code: each run stores them,
with a validation definition and a checkpoint per table, into `gx/uncommitted/`, next to the
validation results it adds there, so `gx.get_context(mode="file")` finds them after a run.
The tables are written from the stage's DuckDB tables into an SQLite file, row by row in
batches, which GX then queries: GX computes its metrics in the database, so memory stays flat at
millions of rows (GX on pandas holds each table whole; GX's SQL engine does not work with DuckDB's
SQLAlchemy driver, whose results it reads after closing their connection, and SQLite is a
dialect GX supports). The file is a temporary one: the data source's connection string is
`${IMGPIPE_GX_DATABASE}`, set by `check` while GX runs, so great_expectations.yml holds no path.

Nothing under `gx/uncommitted/` is versioned: it is run state (the suites, definitions and
checkpoints are rewritten from this code by every run; the results of the last RESULTS_KEPT
runs are kept, and can be deleted at will).

GX rewrites great_expectations.yml only when it adds to the data source. The committed file
already holds every table's asset, so a run leaves it untouched; a new table adds its asset
on its first run, and the rewritten file is then the one to commit. A folder with no gx/ (a
benchmark's, a test's) gets a copy of the repository's gx/ files on its first run, not GX's
default project (whose stores sit outside uncommitted/, with analytics and progress bars on).

The Data Docs site is `<paths.data_quality>/site`, a DVC output, and not part of the project's
configuration: the path comes from params.yaml, and the site is built from this run's results
only, not from every result the project has stored. It loads nothing from the network: the JS and
CSS GX's pages take from CDNs are copied into it (see _offline_data_docs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

import great_expectations as gx
import great_expectations.expectations as gxe
from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

from imgpipe.core.params import Validate
from imgpipe.data import tables as sql
from imgpipe.reports import offline

SITE = "data_quality"
# the GX project's folder, under the folder the stage runs in
GX_DIR = "gx"
# the repository's committed GX files, copied into a folder that has no GX project yet
TEMPLATE = Path(__file__).resolve().parents[2] / GX_DIR
TEMPLATE_FILES = ("great_expectations.yml", ".gitignore")
# the SQLite data source of great_expectations.yml: one table asset per table
SOURCE = "validate"
# the environment variable its connection string names (great_expectations.yml holds no path)
DATABASE = "IMGPIPE_GX_DATABASE"
# offending rows quoted per failed expectation in the error message
EXAMPLES = 5
# the runs whose results gx/uncommitted/validations keeps, per suite (see _prune_results)
RESULTS_KEPT = 10


@dataclass(frozen=True)
class Table:
    name: str  # the suite's name in the report, and the table's
    query: str  # its rows, from the validate stage's DuckDB tables (imgpipe/data/validation.py)
    key: str  # the column that names a row in examples
    noun: str  # what one row is, for messages ("images", "classes")
    notes: str


@dataclass(frozen=True)
class Outcome:
    """One expectation's result, in plain values."""

    table: str
    noun: str  # what one row of the table is
    expectation: str  # the GX type, e.g. expect_column_values_to_be_unique
    column: str
    description: str
    critical: bool
    success: bool
    element_count: int
    unexpected_count: int
    examples: tuple[str, ...]  # a few offending rows, e.g. "cats/a.jpg (unreadable)"


def tables() -> list[Table]:
    """The four tables, from validation.triage_tables' `decided` and `grouped`, and the stage's
    `groups` and `classes`. The manifest's `quarantine_reason` is the rule that quarantined the
    row, or empty: the rule, not the full reason text ("duplicate of <path>"), so that the
    report's table of unexpected values counts rows per kind of problem."""
    return [
        Table("image_manifest", "SELECT path, error, rule AS quarantine_reason FROM decided ORDER BY ord",
              "path", "images",
              "Every file the ingest stage found, with the reason it was quarantined (if it was)."),
        Table("accepted_images",
              "SELECT d.path, d.id, d.label, d.width, d.height, d.channels, d.sharpness, d.brightness, "
              "d.contrast, g.n - 1 AS near_duplicates FROM decided d JOIN grouped g USING (ord) ORDER BY ord",
              "path", "images",
              "The images that passed the per-image checks: what the next stages train on. "
              "`near_duplicates` counts the other images of the image's near-duplicate group."),
        Table("near_duplicate_groups", 'SELECT * FROM groups ORDER BY "group"', "path", "groups",
              "One row per group of near-duplicate images (perceptual hashes within the distance set "
              "in params.yaml), named by its image with the smallest id. The split stage keeps a group "
              "in one split; a split given by the source is kept as it is."),
        Table("class_counts", "SELECT * FROM classes", "label", "classes",
              "One row per class with its number of accepted images, and the largest class's count "
              "over this one's (`imbalance`)."),
    ]


def suites(rules: Validate, labels: list[str]) -> dict[str, list[gxe.Expectation]]:
    """The expectations of each table, in report order."""
    # "mostly" is the share of rows that must pass: 1 - the share allowed to be quarantined
    mostly = 1.0 - rules.max_quarantined_fraction
    return {
        "image_manifest": [
            gxe.ExpectColumnValuesToBeNull(
                column="quarantine_reason", mostly=mostly, meta={"critical": True},
                description=f"At most {rules.max_quarantined_fraction:.1%} of the images are quarantined"),
            # a warning: it fails only together with the check above, which already gates
            gxe.ExpectColumnValuesToBeNull(
                column="error", mostly=mostly, meta={"critical": False},
                description="Images decode (the unexpected values are the decode errors)"),
        ],
        "accepted_images": [
            gxe.ExpectColumnValuesToBeUnique(
                column="id", meta={"critical": True},
                description="No image is accepted twice (same bytes)"),
            gxe.ExpectColumnValuesToNotBeNull(
                column="label", meta={"critical": True}, description="Every accepted image has a label"),
            gxe.ExpectColumnValuesToBeInSet(
                column="label", value_set=labels, meta={"critical": True},
                description="Labels are among the known classes"),
            gxe.ExpectColumnValuesToBeBetween(
                column="width", min_value=rules.min_width, max_value=rules.max_width, meta={"critical": True},
                description=f"Width is between {rules.min_width} and {rules.max_width} pixels"),
            gxe.ExpectColumnValuesToBeBetween(
                column="height", min_value=rules.min_height, max_value=rules.max_height, meta={"critical": True},
                description=f"Height is between {rules.min_height} and {rules.max_height} pixels"),
            gxe.ExpectColumnValuesToBeInSet(
                column="channels", value_set=list(rules.allowed_channels), meta={"critical": True},
                description=f"Channels are one of {', '.join(map(str, rules.allowed_channels))}"),
            # Quality warnings: a blurry or dark photo can still be a correct example of its class,
            # and only a person can say; the summary shows the worst ones as thumbnails.
            gxe.ExpectColumnValuesToBeBetween(
                column="sharpness", min_value=rules.min_sharpness, meta={"critical": False},
                description=f"Images are sharp: variance of the Laplacian at least {rules.min_sharpness:g}"),
            gxe.ExpectColumnValuesToBeBetween(
                column="brightness", min_value=rules.min_brightness, max_value=rules.max_brightness,
                meta={"critical": False},
                description=f"Images are neither too dark nor too bright: mean grey level between "
                            f"{rules.min_brightness:g} and {rules.max_brightness:g}"),
            gxe.ExpectColumnValuesToBeBetween(
                column="contrast", min_value=rules.min_contrast, meta={"critical": False},
                description=f"Images are not flat: grey-level standard deviation at least {rules.min_contrast:g}"),
            gxe.ExpectColumnValuesToBeBetween(
                column="near_duplicates", max_value=0, meta={"critical": False},
                description=f"Images have no near-duplicate (perceptual hashes within "
                            f"{rules.near_duplicate_distance} bits)"),
        ],
        "near_duplicate_groups": [
            # warnings: a perceptual hash can match two different photos, so a person decides
            gxe.ExpectColumnValuesToBeBetween(
                column="labels", max_value=1, meta={"critical": False},
                description="Near-duplicates share one label"),
            gxe.ExpectColumnValuesToBeBetween(
                column="source_splits", max_value=1, meta={"critical": False},
                description="Near-duplicates do not cross the train/val/test split the source came with "
                            "(leakage that split.method: source keeps)"),
        ],
        "class_counts": [
            gxe.ExpectColumnValuesToBeBetween(
                column="accepted", min_value=rules.min_images_per_class, meta={"critical": True},
                description=f"Every class has at least {rules.min_images_per_class} accepted images"),
            gxe.ExpectColumnValuesToBeBetween(
                column="imbalance", max_value=rules.max_imbalance_ratio, meta={"critical": False},
                description=f"No class is more than {rules.max_imbalance_ratio:g} times smaller than the largest"),
            # a warning: `cat` and `Cat` are most likely one class, but only a person can say
            gxe.ExpectColumnValuesToBeNull(
                column="same_name_as", meta={"critical": False},
                description="No two class names differ only in letter case or surrounding spaces "
                            "(the unexpected values name the look-alike classes and their images)"),
        ],
    }


def check(con, tables: list[Table], suites: dict[str, list[gxe.Expectation]], site_dir: Path,
          root: Path = Path(".")) -> list[Outcome]:
    """Validate each table (its query on the DuckDB connection `con`) against its suite, with the
    GX project in `root`/gx, and write the Data Docs site of this run into `site_dir`."""
    with tempfile.TemporaryDirectory(prefix="imgpipe-gx-") as folder:
        database = Path(folder) / "validate.sqlite"
        for table in tables:
            _to_sqlite(con, table.query, database, table.name)
        previous = os.environ.get(DATABASE)
        os.environ[DATABASE] = f"sqlite:///{database}"
        try:
            return _check(tables, suites, site_dir, root)
        finally:
            if previous is None:
                os.environ.pop(DATABASE, None)
            else:
                os.environ[DATABASE] = previous


def _to_sqlite(con, query: str, database: Path, name: str) -> None:
    """The rows of `query` into the table `name` of the SQLite file, in batches."""
    result = con.execute(query)
    columns = [(column, _SQLITE_TYPES.get(str(kind), "TEXT")) for column, kind, *_ in result.description]
    with contextlib.closing(sqlite3.connect(database)) as lite:
        # a scratch file, written once and removed after: no journal, no waiting for the disk
        lite.execute("PRAGMA journal_mode = OFF")
        lite.execute("PRAGMA synchronous = OFF")
        lite.execute(f"CREATE TABLE {sql.ident(name)} ({', '.join(f'{sql.ident(c)} {t}' for c, t in columns)})")
        insert = f"INSERT INTO {sql.ident(name)} VALUES ({', '.join('?' * len(columns))})"
        while rows := result.fetchmany(sql.FETCH_ROWS):
            lite.executemany(insert, rows)
        lite.commit()


_SQLITE_TYPES = {"BIGINT": "INTEGER", "INTEGER": "INTEGER", "HUGEINT": "INTEGER", "DOUBLE": "REAL", "FLOAT": "REAL"}


def _check(tables: list[Table], suites: dict[str, list[gxe.Expectation]], site_dir: Path,
           root: Path) -> list[Outcome]:
    # GX logs its set-up at INFO, which would bury the stage's own log lines
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = _context(Path(root))
    source = _source(context)
    outcomes: list[Outcome] = []
    pages = []  # what the Data Docs show: this run's suites and results
    for table in tables:
        batch = _whole_table(source, table.name)
        # add_or_update: the stored suite is this code's, whatever an earlier run stored
        suite = context.suites.add_or_update(
            gx.ExpectationSuite(name=table.name, expectations=suites[table.name], notes=table.notes))
        definition = context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=table.name, data=batch, suite=suite))
        checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
            name=table.name,
            validation_definitions=[definition],
            # SUMMARY: counts and the first few offending rows, named by `key`, never full lists
            result_format={"result_format": "SUMMARY", "unexpected_index_column_names": [table.key]},
        ))
        result = checkpoint.run()
        for result_id, suite_result in result.run_results.items():
            outcomes += [_outcome(table, r) for r in suite_result.results]
            pages.append(result_id)
        pages.append(ExpectationSuiteIdentifier(name=table.name))
    # The site is set in memory only, after the last change GX could save to
    # great_expectations.yml: its path comes from params.yaml (here, the temporary folder
    # validate.run renames into place).
    context.variables.data_docs_sites = {SITE: {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(Path(site_dir).resolve())},
    }}
    # One Data Docs build, of this run's pages only (the results store keeps every run's): an
    # UpdateDataDocsAction per checkpoint renders only that checkpoint's page, and re-renders
    # the index each time.
    context.build_data_docs(site_names=[SITE], resource_identifiers=pages)
    _offline_data_docs(site_dir)
    _prune_results(context.validation_results_store, RESULTS_KEPT)
    return outcomes


def _offline_data_docs(site_dir: Path) -> None:
    """Make the site render with no network.

    GX's page templates load jQuery, Bootstrap, bootstrap-table, Font Awesome and Vega from public
    CDNs (and its logo from its own web assets), and GX has no setting for where they come from:
    its templates come first in its Jinja loader, so a custom views folder cannot replace them.
    Without internet the pages show an empty shell, so right after the build the files are copied
    into the site from the npm packages `make install` installs, and the pages point at them.
    """
    offline.offline_site(Path(site_dir))


def _prune_results(store, keep: int) -> None:
    """Delete all but the newest `keep` results of each suite from the results store.

    GX keeps every run's results (about 50 KB a run here), and nothing would ever delete them:
    the stage's Data Docs show this run's only, and the history that matters is DVC's
    (summary.json is a metric, `dvc metrics diff` compares runs).
    """
    by_suite: dict[str, list] = {}
    for key in store.list_keys():
        by_suite.setdefault(key.expectation_suite_identifier.name, []).append(key)
    for keys in by_suite.values():
        keys.sort(key=lambda k: (k.run_id.run_time, k.run_id.run_name or ""), reverse=True)
        for key in keys[keep:]:
            store.remove_key(key)
    # GX means to remove the folders a deleted result leaves empty, but its test for an empty
    # folder never holds (GX 1.24: `not Path(folder).iterdir()`, and a generator is never false)
    base = getattr(store.store_backend, "full_base_directory", None)  # None: not a folder store
    if base:
        for folder in sorted(Path(base).rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _context(root: Path):
    """The file-backed GX project in `root`/gx; a copy of the repository's when there is none."""
    project = root / GX_DIR
    if not (project / TEMPLATE_FILES[0]).is_file():
        if not (TEMPLATE / TEMPLATE_FILES[0]).is_file():
            raise RuntimeError(f"no GX project in {project.resolve()}, and none at {TEMPLATE} to copy")
        project.mkdir(parents=True, exist_ok=True)
        for name in TEMPLATE_FILES:
            shutil.copyfile(TEMPLATE / name, project / name)
    # project_root_dir, not GX's own search ($GX_HOME, then gx/ here or in a parent folder): a
    # folder inside another GX project gets a project of its own
    return gx.get_context(mode="file", project_root_dir=root)


def _source(context):
    """The SQLite data source, added when missing (or when a project made before it holds a
    pandas one of the same name)."""
    if SOURCE in context.data_sources.all():
        source = context.data_sources.get(SOURCE)
        if source.type == "sqlite":
            return source
        context.data_sources.delete(SOURCE)
    return context.data_sources.add_sqlite(SOURCE, connection_string="${" + DATABASE + "}")


def _whole_table(source, name: str):
    """The batch definition `name` of the table asset `name`, added when missing.

    Adding one rewrites great_expectations.yml (with new ids), so the committed file holds
    them all, and a run only reads them.
    """
    asset = (source.get_asset(name) if name in source.get_asset_names()
             else source.add_table_asset(name, table_name=name))
    if name in {b.name for b in asset.batch_definitions}:
        return asset.get_batch_definition(name)
    return asset.add_batch_definition_whole_table(name)


def _outcome(table: Table, result) -> Outcome:
    config = result.expectation_config
    column = config.kwargs["column"]
    error = _error(result.exception_info)
    if error:
        # a suite that cannot run (a missing column, say) is a bug here, not a problem in the data
        raise RuntimeError(f"great expectations could not evaluate {config.type} on {table.name}.{column}: {error}")
    found = result.result
    return Outcome(
        table=table.name,
        noun=table.noun,
        expectation=config.type,
        column=column,
        description=config.description,
        critical=bool(config.meta["critical"]),
        success=bool(result.success),
        element_count=int(found["element_count"]),
        # GX's SQL engine says None for a table with no rows (no near-duplicate group): none unexpected
        unexpected_count=int(found["unexpected_count"] or 0),
        examples=tuple(f"{row[table.key]} ({row[column]})"
                       for row in found.get("partial_unexpected_index_list", [])[:EXAMPLES]),
    )


def _error(info: dict) -> str | None:
    """GX's error message, if any: at the top of `exception_info`, or nested per metric."""
    for entry in [info, *(v for v in info.values() if isinstance(v, dict))]:
        if entry.get("raised_exception") or entry.get("exception_message"):
            return entry.get("exception_message") or "unknown error"
    return None

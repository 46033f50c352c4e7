"""Validate's verdicts: per-image checks and dataset checks over the manifest.

Every input row ends up in exactly one place: the accepted list (what `split` reads) or the
quarantine list, with a reason a user can act on (RULES).

Dataset checks: images per class and the imbalance ratio; exact duplicates and the same bytes
under two labels (both quarantined); near-duplicates, images whose perceptual hashes differ in
at most `validate.near_duplicate_distance` bits, either way round or with one of them mirrored
left to right (imgpipe/data/near_duplicates.py, `phash_mirror`). Near-duplicates are
kept, but grouped: the accepted list's `group` column names each image's group by its smallest
id (an image with no near-duplicate is its own group), and `split` keeps a group in one split,
so a near-copy of a test image never trains the model. Groups that mix labels, or that span the
train/val/test split the source came with (leakage `split` cannot undo), are reported.

The rules run as SQL in DuckDB (imgpipe/data/tables.py), over the manifest's rows out of core:
the stage's memory stays flat at millions of rows. Its tables are plain tables, not TEMP ones, in
the connection's database file, whose blocks can leave memory. `triage` runs the same SQL on a
pandas frame.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from imgpipe.core.errors import StageError
from imgpipe.core.params import Validate
from imgpipe.data import expectations, near_duplicates, tables
from imgpipe.data.manifest import COLUMNS

log = logging.getLogger(__name__)

# quarantine rules, in the order they are tried: a row gets the first that applies
RULES = ("unreadable", "no label", "unknown label", "too small", "too large", "channel count", "label conflict",
         "duplicate")

# rows quoted in an error message about the manifest
EXAMPLES = 5

_NOT_DECODED = "not decoded: the manifest has no size, channel count or image facts for it"


@dataclass(frozen=True)
class Verdict:
    """What triage_tables found: counts, and the table of classes."""

    inputs: int
    accepted: int
    reasons: dict[str, int]  # quarantined rows per rule, for every rule of RULES
    classes: pd.DataFrame  # label, accepted, imbalance, same_name_as: one row per known class
    near_duplicates: dict[str, int]  # summary.json's: groups, images, largest_group, groups_mixing_labels, ...

    @property
    def quarantined(self) -> int:
        return sum(self.reasons.values())


# --- the rules, in SQL over the manifest's rows -----------------------------------------------

def load_manifest(con, path) -> None:
    """The manifest at `path` as the table `manifest_rows` (its text, in file order) and the view
    `manifest` (typed, with `ord`: the row's place in the file). A StageError when a column is
    missing or there is no row (a field that is not what its column holds fails the query that
    reads it: the stage runs the rules under tables.guarded)."""
    columns = tables.read(con, path, "manifest", "ingest", "manifest_text", typed=False)
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise StageError(f"{path}: manifest lacks column(s) {', '.join(missing)}; expected {','.join(COLUMNS)} "
                         "(re-run the ingest stage)")
    what = f"{path}: not a readable manifest"
    tables.guarded(lambda: con.execute("CREATE OR REPLACE TABLE manifest_rows AS SELECT "
                                       + ", ".join(map(tables.ident, COLUMNS)) + " FROM manifest_text"), what)
    _manifest_view(con)
    if not con.execute("SELECT count(*) FROM manifest_rows").fetchone()[0]:
        raise StageError(f"{path}: the manifest has no rows; nothing to validate")


def _manifest_view(con) -> None:
    # rowid: DuckDB keeps a table's insertion order, so it is the row's place in the file
    con.execute(f"CREATE OR REPLACE TEMP VIEW manifest AS SELECT rowid AS ord, {tables.typed_columns(COLUMNS)} "
                "FROM manifest_rows")


def triage_tables(con, rules: Validate) -> Verdict:
    """From the view `manifest`: the tables `decided` (every row, typed, with `rule`, `reason`
    and `detail`; rule NULL = accepted), `grouped` (each accepted row's `ord`, its near-duplicate
    group `grp` and the group's size `n`) and `groups` (GROUPS), and the Verdict."""
    # Python's strip, not SQL's trim: a label of any kind of white space is no label
    found = sorted(label for (label,) in con.execute("SELECT DISTINCT label FROM manifest WHERE label IS NOT NULL")
                   .fetchall() if label.strip())
    labels = sorted(rules.classes) if rules.classes else found
    for name, values in (("found_labels", found), ("known_labels", labels)):
        con.execute(f"CREATE OR REPLACE TABLE {name} (label VARCHAR)")
        if values:
            con.executemany(f"INSERT INTO {name} VALUES (?)", [[v] for v in values])
    _decide(con, rules)
    _group(con, rules.near_duplicate_distance)
    reasons = dict(con.execute("SELECT rule, count(*) FROM decided WHERE rule IS NOT NULL GROUP BY rule").fetchall())
    inputs = con.execute("SELECT count(*) FROM decided").fetchone()[0]
    counts = dict(con.execute("SELECT label, count(*) FROM decided WHERE rule IS NULL GROUP BY label").fetchall())
    con.execute(f"CREATE OR REPLACE TABLE groups AS {GROUPS}")
    stats = con.execute("SELECT count(*), coalesce(sum(images), 0), coalesce(max(images), 0), "
                        "count(*) FILTER (labels > 1), count(*) FILTER (source_splits > 1) FROM groups").fetchall()[0]
    keys = ("groups", "images", "largest_group", "groups_mixing_labels", "groups_across_source_splits")
    return Verdict(inputs=inputs, accepted=inputs - sum(reasons.values()),
                   reasons={rule: int(reasons.get(rule, 0)) for rule in RULES},
                   classes=class_counts(counts, labels), near_duplicates=dict(zip(keys, map(int, stats))))


def _decide(con, rules: Validate) -> None:
    """`decided`: the per-row rules in RULES order, then the same bytes more than once."""
    def size(word: str, width: int, height: int) -> str:
        return f"CAST(width AS VARCHAR) || 'x' || CAST(height AS VARCHAR) || ' pixels, {word} {width}x{height}'"

    allowed = ", ".join(map(str, rules.allowed_channels))
    channels = ", ".join(str(int(c)) for c in rules.allowed_channels) or "NULL"
    undecoded = " OR ".join(f"{c} IS NULL" for c in ("width", "height", "channels", "phash", "phash_mirror"))
    con.execute(f"""
        CREATE OR REPLACE TABLE decided AS
        SELECT *, CASE WHEN rule IS NOT NULL THEN 'id=' || id END AS detail,
            CASE rule WHEN 'unreadable' THEN coalesce(error, {tables.quote(_NOT_DECODED)})
                 WHEN 'no label' THEN 'no label'
                 WHEN 'unknown label' THEN 'unknown label ''' || label || ''' (not in validate.classes)'
                 WHEN 'too small' THEN 'too small: ' || {size("minimum", rules.min_width, rules.min_height)}
                 WHEN 'too large' THEN 'too large: ' || {size("maximum", rules.max_width, rules.max_height)}
                 WHEN 'channel count' THEN 'unsupported channel count ' || CAST(channels AS VARCHAR)
                      || {tables.quote(f" (allowed: {allowed})")} END AS reason
        FROM (SELECT *,
            CASE WHEN error IS NOT NULL OR {undecoded} THEN 'unreadable'
                 WHEN label IS NULL OR label NOT IN (SELECT label FROM found_labels) THEN 'no label'
                 WHEN label NOT IN (SELECT label FROM known_labels) THEN 'unknown label'
                 WHEN width < {int(rules.min_width)} OR height < {int(rules.min_height)} THEN 'too small'
                 WHEN width > {int(rules.max_width)} OR height > {int(rules.max_height)} THEN 'too large'
                 WHEN channels NOT IN ({channels}) THEN 'channel count' END AS rule
          FROM manifest)""")
    # Same bytes more than once: looked for only among the rows that passed the checks above, so
    # that a good copy is not thrown away because of a bad one (a copy with no label, say).
    con.execute("""
        CREATE OR REPLACE TABLE copies AS
        SELECT id, min(label) <> max(label) AS conflict, arg_min(path, ord) AS first_path, min(ord) AS first_ord
        FROM decided WHERE rule IS NULL GROUP BY id HAVING count(*) > 1""")
    con.execute("""
        CREATE OR REPLACE TABLE conflicts AS
        SELECT id, list_sort(list_distinct(list(label))) AS labels FROM decided
        WHERE rule IS NULL AND id IN (SELECT id FROM copies WHERE conflict) GROUP BY id""")
    # "a, b and c": a conflict has two labels or more
    con.execute("""
        UPDATE decided SET rule = 'label conflict', detail = 'id=' || decided.id,
          reason = 'label conflict: same image labelled '
                   || array_to_string(c.labels[1:len(c.labels) - 1], ', ') || ' and ' || c.labels[len(c.labels)]
        FROM conflicts c WHERE decided.id = c.id AND decided.rule IS NULL""")
    # the same image under one label: keep the first copy, in manifest order
    con.execute("""
        UPDATE decided SET rule = 'duplicate', detail = 'id=' || decided.id, reason = 'duplicate of ' || c.first_path
        FROM copies c
        WHERE decided.id = c.id AND decided.rule IS NULL AND NOT c.conflict AND decided.ord <> c.first_ord""")
    con.execute("DROP TABLE copies")
    con.execute("DROP TABLE conflicts")


def _group(con, max_distance: int) -> None:
    """`grouped`: each accepted image's near-duplicate group, named by the group's smallest id (its
    own id when alone).

    A graph of hash values: an image joins its hash to its mirror hash, and two values within
    `max_distance` bits are joined (near_duplicates.close_pairs, on the distinct values only);
    its connected components are the groups, found by passing the smallest value along the edges
    in SQL (out of core). The smallest id, not the first in manifest order, names a group: its
    name (and so its split) then does not depend on file names or on the order of the listing.
    """
    bad = """FROM (SELECT path, 'phash' AS name, phash AS h, ord FROM decided WHERE rule IS NULL UNION ALL
                   SELECT path, 'phash_mirror', phash_mirror, ord FROM decided WHERE rule IS NULL)
             WHERE NOT regexp_full_match(h, '[0-9a-fA-F]{16}')"""
    count = con.execute(f"SELECT count(*) {bad}").fetchall()[0][0]
    if count:
        rows = con.execute(f"SELECT path, name, h {bad} ORDER BY ord LIMIT {EXAMPLES}").fetchall()
        shown = "; ".join(f"{path}: {name} {h!r}" for path, name, h in rows)
        raise StageError(f"{count} manifest field(s) not a {near_duplicates.HASH_BITS}-bit hash in 16 hex digits "
                         f"({shown}{'; ...' if count > EXAMPLES else ''}); re-run the ingest stage")
    con.execute("""CREATE OR REPLACE TABLE hashes AS
                   SELECT ord, id, CAST('0x' || phash AS UBIGINT) AS h, CAST('0x' || phash_mirror AS UBIGINT) AS m
                   FROM decided WHERE rule IS NULL""")
    con.execute("CREATE OR REPLACE TABLE edges AS SELECT h AS a, m AS b FROM hashes WHERE h <> m")
    if max_distance > 0:
        values = con.execute("SELECT DISTINCT v FROM (SELECT h AS v FROM hashes UNION SELECT m FROM hashes) "
                             "ORDER BY v").fetchnumpy()["v"].astype(np.uint64)
        pairs = near_duplicates.close_pairs(values, max_distance)
        con.register("close_pairs", pd.DataFrame({"a": values[pairs[:, 0]], "b": values[pairs[:, 1]]}))
        con.execute("INSERT INTO edges SELECT a, b FROM close_pairs")
        con.unregister("close_pairs")
    con.execute("INSERT INTO edges SELECT b, a FROM edges")  # both ways
    # Each value's component: the smallest value it reaches, found one edge further each round,
    # and then on to that value's own (a long chain takes a few rounds, not one per link). New
    # tables, not UPDATEs: DuckDB runs a join into a table out of core, an UPDATE's join in memory.
    con.execute("CREATE OR REPLACE TABLE comp AS SELECT a AS node, least(a, min(b)) AS c FROM edges GROUP BY a")
    # these tables' row order does not matter (every row carries its node or ord), so DuckDB
    # need not keep it; reset even on an error, for the connection's later tables
    con.execute("SET preserve_insertion_order = false")
    try:
        while True:
            con.execute("""
                CREATE OR REPLACE TABLE step AS
                SELECT n.node, least(n.c, nb.c) AS c FROM comp n JOIN (
                  SELECT e.a AS node, min(n.c) AS c FROM edges e JOIN comp n ON n.node = e.b GROUP BY e.a) nb USING (node)""")
            con.execute("""
                CREATE OR REPLACE TABLE jumped AS
                SELECT x.node, least(x.c, y.c) AS c FROM step x JOIN step y ON y.node = x.c""")
            changed = con.execute("SELECT count(*) FROM jumped j JOIN comp n USING (node) WHERE j.c <> n.c").fetchall()[0][0]
            con.execute("DROP TABLE comp")
            con.execute("ALTER TABLE jumped RENAME TO comp")
            if not changed:
                break
        con.execute("""
            CREATE OR REPLACE TABLE grouped AS
            WITH member AS (SELECT h.ord, h.id, coalesce(n.c, h.h) AS component
                            FROM hashes h LEFT JOIN comp n ON n.node = h.h),
                 named AS (SELECT component, min(id) AS grp, count(*) AS n FROM member GROUP BY component)
            SELECT m.ord, named.grp, named.n FROM member m JOIN named USING (component)""")
    finally:
        con.execute("RESET preserve_insertion_order")
    for name in ("hashes", "edges", "comp", "step"):
        con.execute(f"DROP TABLE {name}")


# One row per group of two or more accepted images: group (its id), path (the image with that id),
# images, labels and source_splits (how many distinct ones the group holds; a missing split is not
# counted), sorted by group.
GROUPS = """
    WITH members AS (SELECT g.grp, g.n, d.id, d.path, d.label, d.source_split
                     FROM grouped g JOIN decided d USING (ord) WHERE g.n > 1),
         labels AS (SELECT grp, count(*) AS labels FROM (SELECT DISTINCT grp, label FROM members) GROUP BY grp),
         splits AS (SELECT grp, count(*) AS source_splits
                    FROM (SELECT DISTINCT grp, source_split FROM members WHERE source_split IS NOT NULL) GROUP BY grp)
    SELECT m.grp AS "group", arg_min(m.path, m.id) AS path, any_value(m.n) AS images,
           any_value(l.labels) AS labels, coalesce(any_value(s.source_splits), 0) AS source_splits
    FROM members m JOIN labels l USING (grp) LEFT JOIN splits s USING (grp)
    GROUP BY m.grp ORDER BY m.grp"""


def class_counts(counts: dict[str, int], labels: list[str]) -> pd.DataFrame:
    """One row per known class: its accepted images (`counts` by label; 0 when all were
    quarantined), `imbalance`, the largest class's count over this one's (missing for an empty
    class), and `same_name_as` (see same_name_as)."""
    counts = np.array([int(counts.get(label, 0)) for label in labels], dtype="int64")
    largest = counts.max() if len(counts) else 0
    imbalance = (largest / pd.Series(counts, dtype="float64")).where(counts > 0).round(3)
    return pd.DataFrame({"label": labels, "accepted": counts, "imbalance": imbalance.to_numpy(),
                         "same_name_as": same_name_as(labels, counts)})


# --- the same on a pandas frame (tests, notebooks) ---------------------------------------------

@dataclass(frozen=True)
class Triage:
    """Where each manifest row went."""

    decisions: pd.DataFrame  # per manifest row: rule, reason, detail (rule NaN = accepted)
    accepted: pd.DataFrame  # the accepted manifest rows + `group`, manifest order
    quarantine: pd.DataFrame  # path, rule, reason, detail of the others, manifest order
    classes: pd.DataFrame  # label, accepted, imbalance, same_name_as: one row per known class
    groups: pd.DataFrame  # one row per near-duplicate group of two or more accepted images


def triage(manifest: pd.DataFrame, rules: Validate) -> Triage:
    """triage_tables on a manifest frame (read_manifest's)."""
    with tables.frames() as con:
        con.register("manifest_frame", manifest.reset_index(drop=True)[COLUMNS])
        con.execute("CREATE OR REPLACE TABLE manifest_rows AS SELECT * FROM manifest_frame")
        _manifest_view(con)
        verdict = triage_tables(con, rules)
        decided = con.execute("SELECT ord, rule, reason, detail FROM decided WHERE rule IS NOT NULL ORDER BY ord").df()
        grouped = con.execute("SELECT grp FROM grouped ORDER BY ord").df()
        groups = con.execute('SELECT * FROM groups ORDER BY "group"').df()
    decisions = pd.DataFrame({"rule": None, "reason": None, "detail": None}, index=manifest.index, dtype=object)
    decisions.iloc[decided["ord"].to_numpy(), :] = decided[["rule", "reason", "detail"]].to_numpy(dtype=object)
    keep = decisions["rule"].isna()
    group = pd.Series(grouped["grp"].to_numpy(dtype=object), index=manifest.index[keep], dtype=manifest["id"].dtype)
    accepted = manifest[keep].assign(group=group)
    quarantine = pd.concat([manifest.loc[~keep, ["path"]], decisions[~keep]], axis=1)
    return Triage(decisions, accepted, quarantine, verdict.classes, groups)




def same_name_as(labels: list[str], counts) -> list[str | None]:
    """Per class, the other classes whose names are the same but for letter case and surrounding
    spaces, with their accepted images ("'Cat' (3 images)"); None (missing) when there is none.

    `cats/` and `Cats/`, or `cat` and `Cat ` in a labels file, are almost always one class typed
    two ways: trained as two, they split its images and confuse the model. Only a person can
    say, so it is a warning, named here.
    """
    by_name: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_name.setdefault(label.strip().casefold(), []).append(i)
    out: list[str | None] = [None] * len(labels)
    for members in by_name.values():
        if len(members) > 1:
            for i in members:
                out[i] = ", ".join(f"'{labels[j]}' ({counts[j]} image{'' if counts[j] == 1 else 's'})"
                                   for j in members if j != i)
    return out


def lookalike_classes(classes: pd.DataFrame) -> dict[str, dict[str, int]]:
    """The groups of classes named alike (see same_name_as), by the name they share (folded to
    lower case, stripped): {class: accepted images}. A dict, not a list: DVC's metrics commands
    show and compare nested numbers, not lists."""
    by_name: dict[str, dict[str, int]] = {}
    for label, count in zip(classes["label"], classes["accepted"]):
        by_name.setdefault(label.strip().casefold(), {})[str(label)] = int(count)
    return {name: group for name, group in sorted(by_name.items()) if len(group) > 1}


def imbalance_ratio(classes: pd.DataFrame) -> float | None:
    """The largest class over the smallest; None when a class is empty (no ratio describes that)."""
    if classes.empty or (classes["accepted"] == 0).any():
        return None
    return round(float(classes["accepted"].max() / classes["accepted"].min()), 3)


def summarise(verdict: Verdict, outcomes: list[expectations.Outcome], report: str,
              skipped: dict[str, int] | None = None) -> dict:
    """summary.json: counts and expectation results, nothing that changes between runs.

    `skipped`: the files ingest's listing left out, by why (not inputs: they have no manifest
    row); None when unknown."""
    inputs, ingested, quarantined = verdict.inputs, verdict.accepted, verdict.quarantined
    # every input is accounted for: accepted or quarantined, never both, never neither
    assert inputs == ingested + quarantined, (inputs, ingested, quarantined)
    failed = [o for o in outcomes if not o.success]
    return {
        "inputs": inputs,
        "ingested": ingested,
        "quarantined": quarantined,
        "quarantined_fraction": round(quarantined / inputs, 6),
        "skipped": skipped,
        "classes": {str(k): int(v) for k, v in zip(verdict.classes["label"], verdict.classes["accepted"])},
        "imbalance_ratio": imbalance_ratio(verdict.classes),
        "classes_named_alike": lookalike_classes(verdict.classes),
        "quarantine_reasons": dict(verdict.reasons),
        "near_duplicates": dict(verdict.near_duplicates),
        "expectations": {
            "passed": len(outcomes) - len(failed),
            "failed": len(failed),
            "results": [
                {"table": o.table, "expectation": o.expectation, "column": o.column,
                 "description": o.description, "critical": o.critical, "success": o.success,
                 "element_count": o.element_count, "unexpected_count": o.unexpected_count}
                for o in outcomes
            ],
        },
        "success": not any(o.critical for o in failed),
        "report": report,
    }


def failure_message(outcomes: list[expectations.Outcome], report: str, quarantine: str) -> str | None:
    """The StageError text when a critical expectation failed, else None."""
    failed = [o for o in outcomes if o.critical and not o.success]
    if not failed:
        return None
    lines = [f"{len(failed)} critical data-quality check(s) failed; report: {report}, "
             f"quarantined files and reasons: {quarantine}"]
    for o in failed:
        line = (f"  - {o.description} [{o.expectation} on {o.table}.{o.column}]: "
                f"{o.unexpected_count} of {o.element_count} {o.noun} unexpected")
        if o.examples:
            line += ", e.g. " + "; ".join(o.examples)
        lines.append(line)
    return "\n".join(lines)


"""validate: per-image checks and a Great Expectations suite over the ingest manifest.

Every input row ends up in exactly one place: the accepted list (what `split` reads) or the
quarantine list, with a reason a user can act on. The GX suites (stages/expectations.py) then
check the result and gate the pipeline; their Data Docs site is the report a reviewer opens.

Outputs (paths from params.yaml):
    paths.accepted                      the accepted manifest rows, same columns, manifest order
    <data_quality>/quarantine.csv       path,reason,detail, manifest order
    <data_quality>/site/index.html      the Data Docs report
    <data_quality>/summary.json         counts and expectation results (a DVC metric)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stages import atomic, expectations
from stages.cli import StageError, stage_main
from stages.params import Params, Validate

log = logging.getLogger(__name__)

COLUMNS = ["id", "label", "path", "source_split", "format", "width", "height", "channels", "bit_depth", "bytes",
           "error"]
# text stays text: a class called "0" is not a number
_DTYPES = {**{c: str for c in ("id", "label", "path", "source_split", "format", "error")},
           **{c: "Int64" for c in ("width", "height", "channels", "bit_depth", "bytes")}}

# quarantine rules, in the order they are tried: a row gets the first that applies
RULES = ("unreadable", "no label", "too small", "too large", "channel count", "label conflict", "duplicate")

_NOT_DECODED = "not decoded: the manifest has no size or channel count for it"


# --- pure core -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Triage:
    """Where each manifest row went."""

    decisions: pd.DataFrame  # per manifest row: rule, reason, detail (rule NaN = accepted)
    accepted: pd.DataFrame  # the accepted manifest rows, manifest order
    quarantine: pd.DataFrame  # path, rule, reason, detail of the others, manifest order
    classes: pd.DataFrame  # label, accepted: one row per known class


def triage(manifest: pd.DataFrame, rules: Validate) -> Triage:
    decisions = decide(manifest, rules)
    keep = decisions["rule"].isna()
    accepted = manifest[keep]
    quarantine = pd.concat([manifest.loc[~keep, ["path"]], decisions[~keep]], axis=1)
    return Triage(decisions, accepted, quarantine, class_counts(accepted, known_labels(manifest)))


def decide(manifest: pd.DataFrame, rules: Validate) -> pd.DataFrame:
    """Quarantine decisions, one row per manifest row (same index).

    Columns: rule (one of RULES, or NaN when the row is accepted), reason (for the user),
    detail (the image's id, to find every copy of it). Vectorised: the manifest can have
    millions of rows, and the text is built only for the rows a rule takes.
    """
    out = pd.DataFrame({"rule": None, "reason": None, "detail": None}, index=manifest.index, dtype=object)
    pending = pd.Series(True, index=manifest.index)

    def quarantine(rule: str, mask: pd.Series, reason) -> None:
        """Give `rule` to the rows in `mask` no earlier rule took; `reason(rows)` gives their text."""
        hit = pending & mask.reindex(manifest.index, fill_value=False).fillna(False).astype(bool)
        if hit.any():
            rows = manifest[hit]
            out.loc[hit, "rule"] = rule
            out.loc[hit, "reason"] = reason(rows)
            out.loc[hit, "detail"] = "id=" + rows["id"].astype(str)
            pending[hit] = False

    def size(rows: pd.DataFrame) -> pd.Series:
        return rows["width"].astype(str) + "x" + rows["height"].astype(str)

    width, height, channels = manifest["width"], manifest["height"], manifest["channels"]
    quarantine("unreadable", manifest["error"].notna() | width.isna() | height.isna() | channels.isna(),
               lambda rows: rows["error"].fillna(_NOT_DECODED))
    quarantine("no label", ~manifest["label"].isin(known_labels(manifest)), lambda rows: "no label")
    quarantine("too small", (width < rules.min_width) | (height < rules.min_height),
               lambda rows: "too small: " + size(rows) + f" pixels, minimum {rules.min_width}x{rules.min_height}")
    quarantine("too large", (width > rules.max_width) | (height > rules.max_height),
               lambda rows: "too large: " + size(rows) + f" pixels, maximum {rules.max_width}x{rules.max_height}")
    allowed = ", ".join(map(str, rules.allowed_channels))
    quarantine("channel count", ~channels.isin(rules.allowed_channels),
               lambda rows: "unsupported channel count " + rows["channels"].astype(str) + f" (allowed: {allowed})")

    # Same bytes more than once: looked for only among the rows that passed the checks above, so
    # that a good copy is not thrown away because of a bad one (a copy with no label, say).
    candidates = manifest.loc[pending, ["id", "label", "path"]]
    copies = candidates[candidates["id"].duplicated(keep=False)]
    by_id = copies.groupby("id")
    conflicting = by_id["label"].transform("nunique") > 1
    conflict_labels = copies[conflicting].groupby("id")["label"].agg(lambda s: _and(sorted(set(s))))
    quarantine("label conflict", conflicting,
               lambda rows: "label conflict: same image labelled " + rows["id"].map(conflict_labels))
    # the same image under one label: keep the first copy, in manifest order
    kept = by_id["path"].transform("first")
    quarantine("duplicate", ~conflicting & copies["id"].duplicated(keep="first"),
               lambda rows: "duplicate of " + kept[rows.index])
    return out


def known_labels(manifest: pd.DataFrame) -> list[str]:
    """The classes: every label in the manifest that is not blank, sorted."""
    # strip the distinct labels only: there are few of them, and millions of rows
    return sorted(label for label in manifest["label"].dropna().unique() if label.strip())


def class_counts(accepted: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """One row per known class with its accepted images (0 when all of them were quarantined)."""
    counts = accepted["label"].value_counts().reindex(labels, fill_value=0)
    return pd.DataFrame({"label": labels, "accepted": counts.to_numpy(dtype="int64")})


def summarise(result: Triage, outcomes: list[expectations.Outcome], report: str) -> dict:
    """summary.json: counts and expectation results, nothing that changes between runs."""
    inputs, ingested, quarantined = len(result.decisions), len(result.accepted), len(result.quarantine)
    # every input is accounted for: accepted or quarantined, never both, never neither
    assert inputs == ingested + quarantined, (inputs, ingested, quarantined)
    reasons = result.quarantine["rule"].value_counts().reindex(list(RULES), fill_value=0)
    failed = [o for o in outcomes if not o.success]
    return {
        "inputs": inputs,
        "ingested": ingested,
        "quarantined": quarantined,
        "quarantined_fraction": round(quarantined / inputs, 6),
        "classes": {str(k): int(v) for k, v in zip(result.classes["label"], result.classes["accepted"])},
        "quarantine_reasons": {str(k): int(v) for k, v in reasons.items()},
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


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# --- I/O boundary ----------------------------------------------------------------------------

def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: manifest not found (run the ingest stage first)")
    try:
        # only empty fields are missing: a class called "NA" or "None" stays a class
        frame = pd.read_csv(path, dtype=_DTYPES, keep_default_na=False, na_values=[""])
    except (ValueError, pd.errors.ParserError) as exc:
        raise StageError(f"{path}: not a readable manifest: {exc}") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise StageError(f"{path}: manifest lacks column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
    if frame.empty:
        raise StageError(f"{path}: the manifest has no rows; nothing to validate")
    return frame[COLUMNS]


def run(params: Params) -> None:
    rules, dq = params.validate, Path(params.paths.data_quality)
    report, quarantine = str(dq / "site" / "index.html"), str(dq / "quarantine.csv")
    manifest = read_manifest(params.paths.manifest)
    log.info("checking %d manifest rows", len(manifest))

    result = triage(manifest, rules)
    labels = list(result.classes["label"])
    log.info("accepted %d, quarantined %d, %d classes", len(result.accepted), len(result.quarantine), len(labels))

    tables = expectations.tables(manifest.assign(quarantine_reason=result.decisions["rule"]),
                                 result.accepted, result.classes)
    with atomic.atomic_dir(dq / "site") as site:
        outcomes = expectations.check(tables, expectations.suites(rules, labels), site)
    log.info("great expectations: %d of %d expectations passed; report: %s",
             sum(o.success for o in outcomes), len(outcomes), report)

    # written before the gate, so that a failed run still leaves the report to read
    atomic.write_csv(params.paths.accepted, result.accepted)
    atomic.write_csv(quarantine, result.quarantine[["path", "reason", "detail"]])
    atomic.write_json(dq / "summary.json", summarise(result, outcomes, report))

    message = failure_message(outcomes, report, quarantine)
    if message:
        raise StageError(message)


def main(argv: list[str] | None = None) -> int:
    return stage_main("validate", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from imgpipe.core.params import Validate
from imgpipe.data import expectations, near_duplicates

log = logging.getLogger(__name__)

# quarantine rules, in the order they are tried: a row gets the first that applies
RULES = ("unreadable", "no label", "unknown label", "too small", "too large", "channel count", "label conflict",
         "duplicate")

_NOT_DECODED = "not decoded: the manifest has no size, channel count or image facts for it"


@dataclass(frozen=True)
class Triage:
    """Where each manifest row went."""

    decisions: pd.DataFrame  # per manifest row: rule, reason, detail (rule NaN = accepted)
    accepted: pd.DataFrame  # the accepted manifest rows + `group`, manifest order
    quarantine: pd.DataFrame  # path, rule, reason, detail of the others, manifest order
    classes: pd.DataFrame  # label, accepted, imbalance, same_name_as: one row per known class
    groups: pd.DataFrame  # one row per near-duplicate group of two or more accepted images


def triage(manifest: pd.DataFrame, rules: Validate) -> Triage:
    labels = known_labels(manifest, rules)
    decisions = decide(manifest, rules, labels)
    keep = decisions["rule"].isna()
    accepted = manifest[keep].assign(group=group_ids(manifest[keep], rules.near_duplicate_distance))
    quarantine = pd.concat([manifest.loc[~keep, ["path"]], decisions[~keep]], axis=1)
    return Triage(decisions, accepted, quarantine, class_counts(accepted, labels), near_duplicate_groups(accepted))


def decide(manifest: pd.DataFrame, rules: Validate, labels: list[str]) -> pd.DataFrame:
    """Quarantine decisions, one row per manifest row (same index).

    Columns: rule (one of RULES, or NaN when the row is accepted), reason (for the user),
    detail (the image's id, to find every copy of it). Vectorised: the manifest can have
    millions of rows, and the text is built only for the rows a rule takes.
    """
    out = pd.DataFrame({"rule": None, "reason": None, "detail": None}, index=manifest.index, dtype=object)
    # numpy, not pandas, for the masks: most rules take no row, and a pandas operation costs a
    # millisecond even then
    pending = np.ones(len(manifest), dtype=bool)

    def quarantine(rule: str, mask: pd.Series, reason) -> None:
        """Give `rule` to the rows in `mask` no earlier rule took; `reason(rows)` gives their text."""
        if not mask.index.equals(manifest.index):  # a mask over some of the rows: False for the others
            mask = mask.reindex(manifest.index, fill_value=False)
        hit = pending & mask.to_numpy(dtype=bool, na_value=False)
        if hit.any():
            rows = manifest[hit]
            out.loc[hit, "rule"] = rule
            out.loc[hit, "reason"] = reason(rows)
            out.loc[hit, "detail"] = "id=" + rows["id"].astype(str)
            pending[hit] = False

    def size(rows: pd.DataFrame) -> pd.Series:
        return rows["width"].astype(str) + "x" + rows["height"].astype(str)

    width, height, channels = manifest["width"], manifest["height"], manifest["channels"]
    undecoded = (width.isna() | height.isna() | channels.isna() | manifest["phash"].isna()
                 | manifest["phash_mirror"].isna())
    quarantine("unreadable", manifest["error"].notna() | undecoded, lambda rows: rows["error"].fillna(_NOT_DECODED))
    quarantine("no label", ~manifest["label"].isin(labels_found(manifest)), lambda rows: "no label")
    quarantine("unknown label", ~manifest["label"].isin(labels),
               lambda rows: "unknown label '" + rows["label"] + "' (not in validate.classes)")
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


def labels_found(manifest: pd.DataFrame) -> list[str]:
    """Every label in the manifest that is not blank, sorted."""
    # strip the distinct labels only: there are few of them, and millions of rows
    return sorted(label for label in manifest["label"].dropna().unique() if label.strip())


def known_labels(manifest: pd.DataFrame, rules: Validate) -> list[str]:
    """The classes: `validate.classes` when given, else the labels found in the manifest; sorted."""
    return sorted(rules.classes) if rules.classes else labels_found(manifest)


def group_ids(accepted: pd.DataFrame, max_distance: int) -> pd.Series:
    """Each image's near-duplicate group, named by the group's smallest id (its own id when alone).

    The smallest id, not the first in manifest order: a group's name (and so its split) then does
    not depend on file names or on the order the source lists its files.
    """
    number = near_duplicates.groups(near_duplicates.parse(accepted["phash"]), max_distance,
                                    mirrors=near_duplicates.parse(accepted["phash_mirror"]))
    # The ids as references to the frame's own strings (no copies): sorted by id, then (stable)
    # by group, the first row of each group holds its smallest id. pandas' groupby min on
    # strings runs a Python loop per group, 20x slower on 43,000 images.
    ids = accepted["id"].to_numpy(dtype=object)
    by_id = np.argsort(ids, kind="stable")
    order = by_id[np.argsort(number[by_id], kind="stable")]
    groups = number[order]
    first = np.ones(len(groups), dtype=bool)
    first[1:] = groups[1:] != groups[:-1]
    smallest = ids[order[first]]
    return pd.Series(smallest[np.searchsorted(groups[first], number)], index=accepted.index, dtype=accepted["id"].dtype)


def near_duplicate_groups(accepted: pd.DataFrame) -> pd.DataFrame:
    """One row per group of two or more accepted images: group (its id), path (the image with that id),
    images, labels and source_splits (how many distinct ones the group holds), sorted by group."""
    members = accepted[accepted["group"].duplicated(keep=False)]
    by_group = members.groupby("group")
    return pd.DataFrame({
        "path": members[members["id"] == members["group"]].set_index("group")["path"],
        "images": by_group.size(),
        "labels": by_group["label"].nunique(),
        "source_splits": by_group["source_split"].nunique(),  # a missing split is not counted
    }).rename_axis("group").reset_index()


def class_counts(accepted: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """One row per known class: its accepted images (0 when all were quarantined), `imbalance`,
    the largest class's count over this one's (missing for an empty class), and `same_name_as`
    (see same_name_as)."""
    counts = accepted["label"].value_counts().reindex(labels, fill_value=0).to_numpy(dtype="int64")
    largest = counts.max() if len(counts) else 0
    imbalance = (largest / pd.Series(counts, dtype="float64")).where(counts > 0).round(3)
    return pd.DataFrame({"label": labels, "accepted": counts, "imbalance": imbalance.to_numpy(),
                         "same_name_as": same_name_as(labels, counts)})


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


def summarise(result: Triage, outcomes: list[expectations.Outcome], report: str,
              skipped: dict[str, int] | None = None) -> dict:
    """summary.json: counts and expectation results, nothing that changes between runs.

    `skipped`: the files ingest's listing left out, by why (not inputs: they have no manifest
    row); None when unknown."""
    inputs, ingested, quarantined = len(result.decisions), len(result.accepted), len(result.quarantine)
    # every input is accounted for: accepted or quarantined, never both, never neither
    assert inputs == ingested + quarantined, (inputs, ingested, quarantined)
    reasons = result.quarantine["rule"].value_counts().reindex(list(RULES), fill_value=0)
    failed = [o for o in outcomes if not o.success]
    groups = result.groups
    return {
        "inputs": inputs,
        "ingested": ingested,
        "quarantined": quarantined,
        "quarantined_fraction": round(quarantined / inputs, 6),
        "skipped": skipped,
        "classes": {str(k): int(v) for k, v in zip(result.classes["label"], result.classes["accepted"])},
        "imbalance_ratio": imbalance_ratio(result.classes),
        "classes_named_alike": lookalike_classes(result.classes),
        "quarantine_reasons": {str(k): int(v) for k, v in reasons.items()},
        "near_duplicates": {
            "groups": len(groups),
            "images": int(groups["images"].sum()),
            "largest_group": int(groups["images"].max()) if len(groups) else 0,
            "groups_mixing_labels": int((groups["labels"] > 1).sum()),
            "groups_across_source_splits": int((groups["source_splits"] > 1).sum()),
        },
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


"""The validate stage: per-image quarantine rules, dataset checks, the Great Expectations gate,
its outputs (summary.json, quarantine.csv, Data Docs, summary.md).

Real pandas, real Great Expectations, tiny manifests written to tmp_path.
"""

from __future__ import annotations

import csv
import json
import os

import pandas as pd
import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from imgpipe.core.runner import run_stage
from stages import validate  # noqa: E402
from imgpipe.data import validation
from imgpipe.data.manifest import COLUMNS, read_manifest
from imgpipe.core.errors import StageError  # noqa: E402
from imgpipe.core.params import ParamsError, params_from_dict  # noqa: E402

SHA_A, SHA_B = "a" * 40, "b" * 40


def phash(n: int) -> str:
    """A distinct 64-bit hash per n (multiplying by an odd number is a bijection mod 2^64)."""
    return f"{(n * 0x9E3779B97F4A7C15) % 2**64:016x}"


def row(n: int, label: str = "cat", **fields) -> dict:
    """A good 28x28 grey PNG row with unremarkable facts; `fields` override any column."""
    return {"id": f"{n:040x}", "label": label, "path": f"{label}/{n}.png", "source_split": "", "format": "png",
            "width": "28", "height": "28", "channels": "1", "bit_depth": "8", "bytes": "300", "error": "",
            "sharpness": "500.0", "brightness": "100.0", "contrast": "50.0", "phash": phash(n),
            "phash_mirror": phash(n + 10**6), **fields}


def good(label: str, count: int, start: int) -> list[dict]:
    return [row(start + i, label) for i in range(count)]


def write_manifest(folder, rows: list[dict]):
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def params(tmp_path, **rules):
    return params_from_dict({
        "paths": {"manifest": str(tmp_path / "manifest.csv"), "accepted": str(tmp_path / "accepted.csv"),
                  "data_quality": str(tmp_path / "dq")},
        "ingest": {"source": str(tmp_path / "no-source")},  # summary.md then has no thumbnails
        "validate": rules,
    })


def triage(tmp_path, rows: list[dict], **rules) -> validation.Triage:
    manifest = read_manifest(write_manifest(tmp_path, rows))
    return validation.triage(manifest, params(tmp_path, **rules).validate)


def reasons(result: validation.Triage) -> dict[str, str]:
    return dict(zip(result.quarantine["path"], result.quarantine["reason"]))


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Run in tmp_path: the stage keeps its GX project in ./gx, which must not be the repository's."""
    monkeypatch.chdir(tmp_path)


# --- per-image rules (pure core) -------------------------------------------------------------

@pytest.mark.parametrize("fields, reason", [
    ({"error": "cannot decode: truncated or corrupt jpeg", "width": "", "height": "", "channels": "",
      "bit_depth": ""}, "cannot decode: truncated or corrupt jpeg"),
    ({"error": "empty file", "format": "unknown", "width": "", "height": "", "channels": "", "bit_depth": "",
      "bytes": "0"}, "empty file"),
    ({"width": "", "height": "", "channels": ""},
     "not decoded: the manifest has no size, channel count or image facts for it"),
    ({"phash": ""}, "not decoded: the manifest has no size, channel count or image facts for it"),
    ({"label": ""}, "no label"),
    ({"label": "   "}, "no label"),
    ({"width": "4"}, "too small: 4x28 pixels, minimum 8x8"),
    ({"height": "7"}, "too small: 28x7 pixels, minimum 8x8"),
    ({"width": "9000", "height": "100"}, "too large: 9000x100 pixels, maximum 8192x8192"),
    ({"channels": "2"}, "unsupported channel count 2 (allowed: 1, 3, 4)"),
])
def test_each_rule_quarantines_with_its_reason(tmp_path, fields, reason):
    bad = row(99, path="bad.png", **fields)
    result = triage(tmp_path, [*good("cat", 3, 0), bad])
    assert reasons(result) == {"bad.png": reason}
    assert list(result.quarantine["detail"]) == [f"id={bad['id']}"]
    assert list(result.accepted["path"]) == ["cat/0.png", "cat/1.png", "cat/2.png"]


def test_first_rule_that_applies_wins(tmp_path):
    result = triage(tmp_path, [row(0, label="", error="not an image", width="", height="", channels="")])
    assert list(result.quarantine["reason"]) == ["not an image"]
    assert list(result.quarantine["rule"]) == ["unreadable"]


def test_hashes_that_are_not_hashes_are_named_all_at_once(tmp_path):
    rows = [*good("cat", 3, 0), row(7, path="cat/bad.png", phash="xyz"), row(8, path="cat/odd.png", phash_mirror="0" * 17)]
    with pytest.raises(StageError) as error:
        triage(tmp_path, rows)
    assert str(error.value) == ("2 manifest field(s) not a 64-bit hash in 16 hex digits (cat/bad.png: phash 'xyz'; "
                                "cat/odd.png: phash_mirror '00000000000000000'); re-run the ingest stage")


def test_bounds_come_from_params(tmp_path):
    rows = [row(0, width="20"), row(1, channels="3"), row(2)]
    result = triage(tmp_path, rows, min_width=24, allowed_channels=[1])
    assert reasons(result) == {"cat/0.png": "too small: 20x28 pixels, minimum 24x8",
                               "cat/1.png": "unsupported channel count 3 (allowed: 1)"}


def test_duplicate_under_same_label_keeps_the_first(tmp_path):
    rows = [row(0, path="x/first.png", id=SHA_A), row(1), row(2, path="x/second.png", id=SHA_A),
            row(3, path="x/third.png", id=SHA_A)]
    result = triage(tmp_path, rows)
    assert list(result.accepted["path"]) == ["x/first.png", "cat/1.png"]
    assert reasons(result) == {"x/second.png": "duplicate of x/first.png", "x/third.png": "duplicate of x/first.png"}
    assert set(result.quarantine["detail"]) == {f"id={SHA_A}"}


def test_a_bad_copy_does_not_push_out_a_good_one(tmp_path):
    # the first copy has no label: the second, labelled copy is the one to keep
    rows = [row(0, label="", path="unlabelled.png", id=SHA_A), row(1, path="labelled.png", id=SHA_A)]
    result = triage(tmp_path, rows)
    assert list(result.accepted["path"]) == ["labelled.png"]
    assert reasons(result) == {"unlabelled.png": "no label"}


def test_label_conflict_quarantines_every_copy(tmp_path):
    rows = [row(0, "dog", path="a.png", id=SHA_B), row(1, "cat", path="b.png", id=SHA_B),
            row(2, "cat", path="c.png", id=SHA_B), row(3, "bird", path="d.png", id=SHA_A),
            row(4, "cat", path="e.png", id=SHA_A), row(5, "dog", path="f.png", id=SHA_A), row(6, "cat")]
    result = triage(tmp_path, rows)
    assert list(result.accepted["path"]) == ["cat/6.png"]
    assert reasons(result) == {
        **{p: "label conflict: same image labelled cat and dog" for p in ("a.png", "b.png", "c.png")},
        **{p: "label conflict: same image labelled bird, cat and dog" for p in ("d.png", "e.png", "f.png")},
    }
    assert list(result.quarantine["detail"]) == [f"id={SHA_B}"] * 3 + [f"id={SHA_A}"] * 3


def test_labels_stay_text(tmp_path):
    # "0", "NA" and "None" are class names, not numbers or missing values
    rows = [row(0, "0"), row(1, "NA"), row(2, "None"), row(3, "10")]
    result = triage(tmp_path, rows)
    assert result.quarantine.empty
    assert list(result.classes["label"]) == ["0", "10", "NA", "None"]
    assert list(result.accepted["label"]) == ["0", "NA", "None", "10"]


def test_class_whose_images_are_all_quarantined_counts_zero(tmp_path):
    rows = [row(0, "cat"), row(1, "dog", width="2")]
    result = triage(tmp_path, rows)
    assert dict(zip(result.classes["label"], result.classes["accepted"])) == {"cat": 1, "dog": 0}


def test_unknown_label_is_quarantined_when_classes_are_listed(tmp_path):
    rows = [row(0, "cat"), row(1, "dgo"), row(2, "dog"), row(3, "", path="none.png")]
    result = triage(tmp_path, rows, classes=["cat", "dog", "bird"])
    assert reasons(result) == {"dgo/1.png": "unknown label 'dgo' (not in validate.classes)", "none.png": "no label"}
    # a listed class with no image is a class with 0 images (and fails min_images_per_class)
    assert dict(zip(result.classes["label"], result.classes["accepted"])) == {"bird": 0, "cat": 1, "dog": 1}
    # without the list, every label found is a class
    assert set(triage(tmp_path, rows).classes["label"]) == {"cat", "dgo", "dog"}


def flip(hex_hash: str, *bits: int) -> str:
    """The hash with the given bits flipped: a near-duplicate at distance len(bits)."""
    value = int(hex_hash, 16)
    for bit in bits:
        value ^= 1 << bit
    return f"{value:016x}"


def test_near_duplicates_are_grouped_under_their_smallest_id(tmp_path):
    base = phash(7)
    rows = [row(9, phash=base), row(5, phash=flip(base, 1, 2)), row(8, phash=flip(base, 1, 2, 3, 4)),
            row(1), row(6, "dog", phash=base)]
    result = triage(tmp_path, rows, near_duplicate_distance=2)
    # 9 ~ 5 (2 bits), 5 ~ 8 (2 bits): one group although 9 and 8 are 4 bits apart; 6 has 9's hash
    assert dict(zip(result.accepted["id"].str[-1], result.accepted["group"].str[-1])) == {
        "9": "5", "5": "5", "8": "5", "1": "1", "6": "5"}
    assert result.groups.to_dict("records") == [
        {"group": f"{5:040x}", "path": "cat/5.png", "images": 4, "labels": 2, "source_splits": 0}]
    # distance 0: only identical hashes
    zero = triage(tmp_path, rows, near_duplicate_distance=0)
    assert zero.groups[["group", "images"]].to_dict("records") == [{"group": f"{6:040x}", "images": 2}]


def test_a_flipped_copy_joins_the_original_s_group(tmp_path):
    # 2 is 1 mirrored (its hash is 1's mirror hash, and the other way round); 3 is a
    # re-encoded copy of 2, one bit off its hash
    rows = [row(1), row(2, phash=phash(10**6 + 1), phash_mirror=phash(1)),
            row(3, phash=flip(phash(10**6 + 1), 5)), row(4)]
    result = triage(tmp_path, rows, near_duplicate_distance=1)
    assert dict(zip(result.accepted["id"].str[-1], result.accepted["group"].str[-1])) == {
        "1": "1", "2": "1", "3": "1", "4": "4"}
    zero = triage(tmp_path, rows, near_duplicate_distance=0)
    assert zero.groups[["group", "images"]].to_dict("records") == [{"group": f"{1:040x}", "images": 2}]


def test_class_imbalance_is_the_largest_class_over_each(tmp_path):
    result = triage(tmp_path, [*good("cat", 6, 0), *good("dog", 2, 100), row(200, "eel", width="1")])
    classes = result.classes.astype(object).where(result.classes.notna(), None)
    assert classes.to_dict("list") == {"label": ["cat", "dog", "eel"], "accepted": [6, 2, 0],
                                       "imbalance": [1.0, 3.0, None], "same_name_as": [None, None, None]}
    assert validation.imbalance_ratio(result.classes) is None  # an empty class: no ratio
    assert validation.imbalance_ratio(result.classes.iloc[:2]) == 3.0


def test_unreadable_manifest_is_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "m.csv").write_text("id,label,path\nabc,cat,a.png\n")
    with pytest.raises(StageError, match="lacks column.*source_split"):
        read_manifest(tmp_path / "m.csv")
    write_manifest(tmp_path, [row(0, width="wide")])
    with pytest.raises(StageError, match="not a readable manifest"):
        read_manifest(tmp_path / "manifest.csv")
    write_manifest(tmp_path, [])
    with pytest.raises(StageError, match="no rows"):
        read_manifest(tmp_path / "manifest.csv")


# --- the stage: GX suite, outputs, gate ------------------------------------------------------

def run_validate(tmp_path, rows: list[dict], **rules) -> str | None:
    """Run the stage; the StageError message when it fails, else None."""
    write_manifest(tmp_path, rows)
    try:
        run_stage(validate, params(tmp_path, **rules))
    except StageError as exc:
        return str(exc)
    return None


def outputs(tmp_path):
    summary = json.loads((tmp_path / "dq" / "summary.json").read_text())
    quarantine = pd.read_csv(tmp_path / "dq" / "quarantine.csv", dtype=str, keep_default_na=False)
    return summary, quarantine


# 10 cats, 10 dogs, one corrupt file: 1 of 21 quarantined (4.8%) is under the 5% default
CLEAN = [*good("cat", 10, 0), *good("dog", 10, 100),
         row(200, "dog", path="dog/broken.jpg", format="jpeg", width="", height="", channels="", bit_depth="",
             error="cannot decode: truncated or corrupt jpeg")]


def test_clean_run_writes_every_output(tmp_path):
    assert run_validate(tmp_path, CLEAN) is None
    summary, quarantine = outputs(tmp_path)

    # the rows this test wrote, and the one it broke (its quarantine list is checked below)
    assert (summary["inputs"], summary["ingested"], summary["quarantined"]) == (len(CLEAN), 20, 1)
    assert summary["classes"] == {"cat": 10, "dog": 10}
    assert summary["imbalance_ratio"] == 1.0
    assert summary["quarantine_reasons"] == {"unreadable": 1, "no label": 0, "unknown label": 0, "too small": 0,
                                             "too large": 0, "channel count": 0, "label conflict": 0, "duplicate": 0}
    assert summary["near_duplicates"] == {"groups": 0, "images": 0, "largest_group": 0, "groups_mixing_labels": 0,
                                          "groups_across_source_splits": 0}
    assert summary["success"] is True
    results = summary["expectations"]["results"]
    assert summary["expectations"] == {"passed": 17, "failed": 0, "results": results}
    assert [(r["table"], r["expectation"], r["column"], r["critical"]) for r in results] == [
        ("image_manifest", "expect_column_values_to_be_null", "quarantine_reason", True),
        ("image_manifest", "expect_column_values_to_be_null", "error", False),
        ("accepted_images", "expect_column_values_to_be_unique", "id", True),
        ("accepted_images", "expect_column_values_to_not_be_null", "label", True),
        ("accepted_images", "expect_column_values_to_be_in_set", "label", True),
        ("accepted_images", "expect_column_values_to_be_between", "width", True),
        ("accepted_images", "expect_column_values_to_be_between", "height", True),
        ("accepted_images", "expect_column_values_to_be_in_set", "channels", True),
        ("accepted_images", "expect_column_values_to_be_between", "sharpness", False),
        ("accepted_images", "expect_column_values_to_be_between", "brightness", False),
        ("accepted_images", "expect_column_values_to_be_between", "contrast", False),
        ("accepted_images", "expect_column_values_to_be_between", "near_duplicates", False),
        ("near_duplicate_groups", "expect_column_values_to_be_between", "labels", False),
        ("near_duplicate_groups", "expect_column_values_to_be_between", "source_splits", False),
        ("class_counts", "expect_column_values_to_be_between", "accepted", True),
        ("class_counts", "expect_column_values_to_be_between", "imbalance", False),
        ("class_counts", "expect_column_values_to_be_null", "same_name_as", False),
    ]
    assert summary["classes_named_alike"] == {}
    assert summary["skipped"] is None  # no ingest ran: no count of skipped files beside the manifest
    assert [(r["element_count"], r["unexpected_count"]) for r in results[:3]] == [(21, 1), (21, 1), (20, 0)]

    assert quarantine.to_dict("records") == [
        {"path": "dog/broken.jpg", "reason": "cannot decode: truncated or corrupt jpeg", "detail": f"id={200:040x}"}]
    accepted = (tmp_path / "accepted.csv").read_text().splitlines()
    manifest = (tmp_path / "manifest.csv").read_text().splitlines()
    # the good rows, same columns and order, plus `group`: each image is its own group here
    assert accepted == [manifest[0] + ",group"] + [line + "," + line[:40] for line in manifest[1:21]]

    index = (tmp_path / "dq" / "site" / "index.html").read_text()
    for suite in ("image_manifest", "accepted_images", "near_duplicate_groups", "class_counts"):
        assert suite in index
    page = (tmp_path / "dq" / "summary.md").read_text()
    assert page.startswith("# Data quality: passed\n\n**21** inputs: **20** accepted, **1** quarantined (4.8%).")
    assert (tmp_path / "dq" / "summary_files" / "classes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in (tmp_path / "dq").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_class_names_alike_are_a_warning_naming_them(tmp_path):
    """`cat`, `Cat` and `cat ` (a folder's trailing space) are three classes to the data: most likely one."""
    rows = [*good("cat", 4, 0), *good("Cat", 2, 100), *good("cat ", 1, 200), *good("dog", 3, 300)]
    assert run_validate(tmp_path, rows, min_images_per_class=1, max_imbalance_ratio=10) is None  # only a warning
    summary, _ = outputs(tmp_path)
    assert summary["success"] is True
    assert summary["classes_named_alike"] == {"cat": {"Cat": 2, "cat": 4, "cat ": 1}}
    [alike] = [r for r in summary["expectations"]["results"] if r["column"] == "same_name_as"]
    assert (alike["table"], alike["critical"], alike["success"], alike["unexpected_count"], alike["element_count"]) \
        == ("class_counts", False, False, 3, 4)
    result = triage(tmp_path, rows)
    assert dict(zip(result.classes["label"], result.classes["same_name_as"].fillna("-"))) == {
        "Cat": "'cat' (4 images), 'cat ' (1 image)", "cat": "'Cat' (2 images), 'cat ' (1 image)",
        "cat ": "'Cat' (2 images), 'cat' (4 images)", "dog": "-"}
    page = (tmp_path / "dq" / "summary.md").read_text()
    assert ("## Warnings\n\n- Classes named alike, the same but for letter case or surrounding spaces: "
            "`Cat` (2), `cat` (4), `cat ` (1) accepted images. Most likely one class: rename the folders or "
            "the labels to one name.\n") in page
    assert "| warning | No two class names differ only in letter case or surrounding spaces" in page
    full = (tmp_path / "dq" / "index.html").read_text()  # the HTML page says the same, escaped
    assert ('<ul id="warnings">\n<li>Classes named alike, the same but for letter case or surrounding spaces: '
            "<code>Cat</code> (2), <code>cat</code> (4), <code>cat </code> (1) accepted images. Most likely one "
            "class: rename the folders or the labels to one name.</li>\n</ul>") in full


def test_the_files_ingest_skipped_are_in_the_summary(tmp_path):
    (tmp_path / "manifest.csv.skipped.json").write_text('{"hidden": 4, "in_hidden_folders": 0, "other_files": 0}')
    assert run_validate(tmp_path, CLEAN) is None
    summary, _ = outputs(tmp_path)
    assert summary["skipped"] == {"hidden": 4, "in_hidden_folders": 0, "other_files": 0}
    assert summary["inputs"] == 21  # skipped files are not inputs
    page = (tmp_path / "dq" / "summary.md").read_text()
    assert ("Skipped, not inputs: **4** files: 4 hidden (a name starting with a dot: `.DS_Store`, macOS's "
            "`._photo.jpg`).\n") in page
    (tmp_path / "manifest.csv.skipped.json").write_text('{"hidden": 0, "in_hidden_folders": 0, "other_files": 0}')
    run_validate(tmp_path, CLEAN)
    assert "No file was skipped: every file in the source folder is an input.\n" in (tmp_path / "dq" / "summary.md").read_text()


def test_same_inputs_give_the_same_bytes(tmp_path):
    files = [tmp_path / "dq" / "summary.json", tmp_path / "dq" / "quarantine.csv", tmp_path / "accepted.csv",
             tmp_path / "dq" / "summary.md", tmp_path / "dq" / "index.html",
             tmp_path / "dq" / "summary_files" / "classes.png"]
    run_validate(tmp_path, CLEAN)
    first = [f.read_bytes() for f in files]
    run_validate(tmp_path, CLEAN)
    assert [f.read_bytes() for f in files] == first


def test_fails_when_a_class_has_too_few_images(tmp_path):
    rows = [*good("cat", 10, 0), *good("dog", 3, 100)]
    message = run_validate(tmp_path, rows)
    dq = tmp_path / "dq"
    assert message.splitlines() == [
        f"1 critical data-quality check(s) failed; report: {dq / 'site' / 'index.html'}, "
        f"quarantined files and reasons: {dq / 'quarantine.csv'}",
        "  - Every class has at least 10 accepted images [expect_column_values_to_be_between on "
        "class_counts.accepted]: 1 of 2 classes unexpected, e.g. dog (3)",
    ]
    summary, quarantine = outputs(tmp_path)  # the report is written before the stage fails
    assert summary["success"] is False
    assert summary["expectations"]["failed"] == 1
    assert (summary["inputs"], summary["ingested"], summary["quarantined"]) == (len(rows), 13, 0)
    assert quarantine.empty and list(quarantine.columns) == ["path", "reason", "detail"]
    assert (tmp_path / "dq" / "site" / "index.html").is_file()


def test_fails_when_too_many_images_are_quarantined(tmp_path):
    rows = [*good("cat", 10, 0), *good("dog", 10, 100), row(300, "dog", path="tiny.png", width="2"),
            row(301, "", path="nolabel.png")]
    message = run_validate(tmp_path, rows)  # 2 of 22 = 9% > 5%
    assert "  - At most 5.0% of the images are quarantined [expect_column_values_to_be_null on " \
           "image_manifest.quarantine_reason]: 2 of 22 images unexpected, e.g. " \
           "tiny.png (too small); nolabel.png (no label)" in message.splitlines()
    # the decode check is a warning: it passes here, and would not be in the message anyway
    assert "error]" not in message
    summary, quarantine = outputs(tmp_path)
    assert (summary["inputs"], summary["ingested"], summary["quarantined"]) == (22, 20, 2)
    assert summary["quarantine_reasons"]["too small"] == summary["quarantine_reasons"]["no label"] == 1
    assert list(quarantine["path"]) == ["tiny.png", "nolabel.png"]

    # the same data passes with a looser threshold
    assert run_validate(tmp_path, rows, max_quarantined_fraction=0.1) is None


def test_everything_quarantined_fails_cleanly(tmp_path):
    rows = [row(i, error="empty file", width="", height="", channels="") for i in range(3)]
    message = run_validate(tmp_path, rows)
    assert "3 of 3 images unexpected, e.g. cat/0.png (unreadable); cat/1.png (unreadable)" in message
    assert "1 of 1 classes unexpected, e.g. cat (0)" in message
    summary, quarantine = outputs(tmp_path)
    assert (summary["inputs"], summary["ingested"], summary["quarantined"]) == (3, 0, 3)
    assert list(quarantine["reason"]) == ["empty file"] * 3
    assert (tmp_path / "accepted.csv").read_text() == ",".join([*COLUMNS, "group"]) + "\n"


def test_listed_class_without_images_fails_the_stage(tmp_path):
    message = run_validate(tmp_path, [*good("cat", 10, 0), *good("dog", 10, 100)], classes=["bird", "cat", "dog"])
    assert "Every class has at least 10 accepted images [expect_column_values_to_be_between on " \
           "class_counts.accepted]: 1 of 3 classes unexpected, e.g. bird (0)" in message
    summary, _ = outputs(tmp_path)
    assert summary["classes"] == {"bird": 0, "cat": 10, "dog": 10} and summary["imbalance_ratio"] is None


def test_warnings_are_reported_and_do_not_fail_the_stage(tmp_path):
    base = phash(500)
    rows = [*good("cat", 30, 0), *good("dog", 10, 100),
            row(300, "cat", path="cat/blurry.png", sharpness="1.5"),
            row(301, "cat", path="cat/dark.png", brightness="3.25"),
            row(302, "dog", path="dog/bright.png", brightness="250.0"),
            row(303, "dog", path="dog/flat.png", contrast="2.0"),
            # a near-copy under two labels, and across the source's train/test split
            row(304, "cat", path="train/cat/x.png", source_split="train", phash=base),
            row(305, "dog", path="test/dog/x.png", source_split="test", phash=base)]
    assert run_validate(tmp_path, rows, max_imbalance_ratio=2.5) is None
    summary, _ = outputs(tmp_path)
    assert summary["success"] is True and summary["imbalance_ratio"] == 2.538  # 33 cats, 13 dogs
    failed = {(r["table"], r["column"]): r["unexpected_count"]
              for r in summary["expectations"]["results"] if not r["success"]}
    assert failed == {("accepted_images", "sharpness"): 1, ("accepted_images", "brightness"): 2,
                      ("accepted_images", "contrast"): 1, ("accepted_images", "near_duplicates"): 2,
                      ("near_duplicate_groups", "labels"): 1, ("near_duplicate_groups", "source_splits"): 1,
                      ("class_counts", "imbalance"): 1}
    assert all(not r["critical"] for r in summary["expectations"]["results"] if not r["success"])
    assert summary["near_duplicates"] == {"groups": 1, "images": 2, "largest_group": 2, "groups_mixing_labels": 1,
                                          "groups_across_source_splits": 1}

    page = (tmp_path / "dq" / "summary.md").read_text()
    assert "| warning | Images are sharp: variance of the Laplacian at least 5 | `accepted_images.sharpness` | " \
           "1 of 46 |" in page
    assert "### Blurriest: 1 image(s) with variance of the Laplacian under 5" in page
    assert "| (no thumbnail) | cat/blurry.png | cat | 1.5 |" in page  # the source folder is gone
    assert "### Darkest: 1 image(s)" in page and "### Brightest: 1 image(s)" in page
    assert "### Flattest: 1 image(s)" in page
    assert "| train/cat/x.png | 2 | 2 | 2 | (no thumbnail) (no thumbnail) |" in page
    assert "Imbalance (largest class over smallest): 2.538; warning above 2.5." in page
    full = (tmp_path / "dq" / "index.html").read_text()
    assert ('<table id="crossing-splits"><tr><th>group</th><th>images</th><th>labels</th><th>source splits</th>'
            '<th>some of its images</th></tr>\n<tr><td>train/cat/x.png</td><td class="num">2</td><td class="num">2</td>'
            '<td class="num">2</td><td><div class="group"><figure><div class="missing">no thumbnail</div><figcaption>'
            'cat (train): train/cat/x.png</figcaption></figure><figure><div class="missing">no thumbnail</div>'
            '<figcaption>dog (test): test/dog/x.png</figcaption></figure></div></td></tr>\n</table>') in full
    assert ('<h3>Blurriest: 1 (variance of the Laplacian under 5)</h3>\n<div class="group"><figure><div class="missing">'
            'no thumbnail</div><figcaption>cat, sharpness 1.5: cat/blurry.png</figcaption></figure></div>') in full


def test_the_page_names_no_split_when_the_source_gave_none(tmp_path):
    rows = [*good("cat", 10, 0), *good("dog", 10, 100), row(300, "cat", path="cat/a.png", phash=phash(500)),
            row(301, "cat", path="cat/b.png", phash=phash(500))]
    assert run_validate(tmp_path, rows) is None
    full = (tmp_path / "dq" / "index.html").read_text()
    assert "<figcaption>cat: cat/a.png</figcaption>" in full and "<figcaption>cat: cat/b.png</figcaption>" in full
    assert '<h3>Groups crossing the source\'s splits (0)</h3>' in full


@pytest.mark.parametrize("rules, message", [
    ({"near_duplicate_distance": 17}, "validate.near_duplicate_distance must be between 0 and 16"),
    ({"min_brightness": 200, "max_brightness": 100}, "validate.min_brightness and validate.max_brightness"),
    ({"max_imbalance_ratio": 0.5}, "validate.max_imbalance_ratio must be >= 1"),
    ({"classes": ["cat", "cat"]}, "validate.classes must be distinct, non-blank class names"),
])
def test_bad_thresholds_are_named(tmp_path, rules, message):
    with pytest.raises(ParamsError, match=message):
        params(tmp_path, **rules)


def test_main_reports_the_failure_without_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_manifest(tmp_path, good("cat", 2, 0))
    (tmp_path / "params.yaml").write_text(
        "paths:\n  manifest: manifest.csv\n  accepted: accepted.csv\n  data_quality: dq\n")
    assert validate.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("validate: error: 1 critical data-quality check(s) failed; report: dq/site/index.html, "
                          "quarantined files and reasons: dq/quarantine.csv\n")
    assert "Traceback" not in err

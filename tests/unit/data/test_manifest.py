"""The manifest and the tables made from it, read the same way by every stage."""

import pandas as pd
import pytest

from imgpipe.core.errors import StageError
from imgpipe.data.manifest import COLUMNS, read_accepted, read_manifest, read_split


def test_text_stays_text_and_sizes_stay_whole_numbers(tmp_path):
    path = tmp_path / "split.csv"
    # a class named NA, and ids and hashes of decimal digits with a leading zero
    path.write_text("id,label,path,source_split,width,sharpness,phash,group,bucket,split\n"
                    "0123,NA,a.png,,28,1.5,0123456789012345,0123,35,train\n")
    frame = read_split(path)
    row = frame.iloc[0]
    assert (row.id, row.label, row.phash, row.group, row.split) == ("0123", "NA", "0123456789012345", "0123", "train")
    assert pd.isna(row.source_split)  # only an empty field is missing
    assert (frame.dtypes["width"], frame.dtypes["bucket"], frame.dtypes["sharpness"]) == ("Int64", "Int64", "float64")
    assert read_split(path, ["id", "split"]).columns.tolist() == ["id", "split"]


def test_a_missing_or_broken_table_names_what_it_is_and_the_stage_that_writes_it(tmp_path):
    with pytest.raises(StageError, match=r"accepted list not found \(run the validate stage first\)"):
        read_accepted(tmp_path / "accepted.csv")
    with pytest.raises(StageError, match=r"split table not found \(run the split stage first\)"):
        read_split(tmp_path / "split.csv")
    (tmp_path / "split.csv").write_text("id,bucket\nabc,high\n")
    with pytest.raises(StageError, match="not a readable split table"):
        read_split(tmp_path / "split.csv")


def test_the_manifest_comes_in_column_order(tmp_path):
    path = tmp_path / "manifest.csv"
    row = {"id": "abc", "label": "cat", "width": "28", "phash": "00ff00ff00ff00ff"}
    path.write_text(",".join(reversed(COLUMNS)) + "\n" + ",".join(row.get(c, "") for c in reversed(COLUMNS)) + "\n")
    manifest = read_manifest(path)
    assert manifest.columns.tolist() == COLUMNS
    assert manifest.iloc[0][list(row)].tolist() == ["abc", "cat", 28, "00ff00ff00ff00ff"]

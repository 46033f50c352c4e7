import hashlib
import logging

import pandas as pd
import pytest

from imgpipe.core.errors import StageError
from imgpipe.core.params import Paths, Split
from imgpipe.data.manifest import read_split
from imgpipe.data.splitting import (
    assign,
    bucket,
    check_splits,
    next_state,
    previous_assignment,
    read_state,
    write_state,
)
from stages import split as split_stage


def frame(n_per_class: dict[str, int], salt: str = "") -> pd.DataFrame:
    rows = []
    for label, n in n_per_class.items():
        for i in range(n):
            image_id = hashlib.sha1(f"{salt}{label}{i}".encode()).hexdigest()
            rows.append({"id": image_id, "label": label, "path": f"{label}/{salt}{i}.png", "source_split": ""})
    return pd.DataFrame(rows)


def by_id(out: pd.DataFrame, column: str = "assigned") -> pd.Series:
    return out.set_index("id")[column]


def test_bucket_is_last_byte():
    assert bucket("ab" * 19 + "ff") == 255 and bucket("00" * 20) == 0


def test_hash_split_follows_bucket_ranges():
    p = Split(method="hash", test_buckets=(0, 63), val_buckets=(64, 127), balance=False, max_train_per_class=0,
              max_val_per_class=0)
    out = assign(frame({"a": 300, "b": 300}), p)
    assert (out.loc[out.bucket <= 63, "split"] == "test").all()
    assert (out.loc[out.bucket.between(64, 127), "split"] == "val").all()
    assert (out.loc[out.bucket >= 128, "split"] == "train").all()
    assert (out["assigned"] == out["split"]).all() and (out["reason"] == "").all()
    # a quarter of the buckets each: roughly a quarter of the images
    assert 0.18 < (out.split == "test").mean() < 0.32


def test_adding_images_never_moves_an_existing_one_with_balancing_and_caps():
    p = Split(method="hash", test_buckets=(0, 50), val_buckets=(51, 101), balance=True, max_train_per_class=80,
              max_val_per_class=20)
    first = assign(frame({"a": 200, "b": 50}), p)
    grown = pd.concat([frame({"a": 200, "b": 50}), frame({"a": 120, "b": 300, "c": 80}, salt="new")])
    after = assign(grown, p, next_state(None, first))
    before, now = by_id(first), by_id(after).loc[first["id"]]
    assert (now == before).all()
    used = by_id(after, "split").loc[first["id"]]
    assert not (used[before != "train"] == "train").any()  # a val/test image is never trained on
    # the cut of balancing and caps did move (b grew): only between a split and unused
    changed = used != by_id(first, "split")
    assert changed.any() and ((used[changed] == "unused") | (by_id(first, "split")[changed] == "unused")).all()


def test_balanced_splits_have_equal_class_counts_and_the_surplus_is_set_aside_not_trained_on():
    args = {"method": "hash", "test_buckets": (0, 50), "val_buckets": (51, 101), "max_train_per_class": 0,
            "max_val_per_class": 0}
    data = frame({"big": 900, "mid": 400, "small": 120})
    out = assign(data, Split(**args, balance=True))
    for name in ("val", "test"):
        counts = out[out.split == name].label.value_counts()
        assert counts.nunique() == 1 and len(counts) == 3, counts
    unbalanced = assign(data, Split(**args, balance=False))
    assert (out["assigned"] == unbalanced["assigned"]).all()  # balancing never changes an assignment
    moved = unbalanced.split != out.split
    assert moved.sum() > 100
    assert set(out.split[moved]) == {"unused"} and set(unbalanced.split[moved]) == {"val", "test"}
    assert set(out.reason[moved]) == {"balance"}
    assert (out.split == "train").sum() == (unbalanced.split == "train").sum()


def test_balancing_with_growth_never_moves_an_image():
    p = Split(method="hash", test_buckets=(0, 50), val_buckets=(51, 101), balance=True, max_train_per_class=0,
              max_val_per_class=0)
    first = assign(frame({"a": 300, "b": 100}), p)
    grown = pd.concat([frame({"a": 300, "b": 100}), frame({"b": 150}, salt="new")])
    after = assign(grown, p, next_state(None, first))
    assert (by_id(after).loc[first["id"]] == by_id(first)).all()
    before_split, after_split = by_id(first, "split"), by_id(after, "split").loc[first["id"]]
    changed = before_split != after_split
    # b grew, so more of a's val/test images are evaluated now: they come from unused, not from train
    assert changed.any()
    assert set(before_split[changed]) == {"unused"} and set(after_split[changed]) <= {"val", "test"}


def test_source_split_is_honoured_and_val_carved_from_train():
    data = frame({"a": 400, "b": 400})
    data["source_split"] = ["test" if i % 5 == 0 else "train" for i in range(len(data))]
    out = assign(data, Split(method="source", val_buckets=(26, 76), test_buckets=(0, 25)))
    assert (out.loc[data.source_split == "test", "split"] == "test").all()
    carved = out[(data.source_split == "train") & (out.split == "val")]
    assert len(carved) > 0 and carved.bucket.between(26, 76).all()
    assert not (out.loc[data.source_split == "train", "split"] == "test").any()


def test_a_source_without_a_test_split_has_test_carved_from_train(caplog):
    """train/ and val/ folders only (the PyTorch transfer-learning tutorial's layout)."""
    data = frame({"a": 400, "b": 400})
    data["source_split"] = ["val" if i % 5 == 0 else "train" for i in range(len(data))]
    p = Split(method="source", test_buckets=(0, 25), val_buckets=(26, 51), balance=False)
    with caplog.at_level(logging.INFO, logger="imgpipe.data.splitting"):
        out = assign(data, p)
    assert "the source has no test split: test carved from its train split by hash" in caplog.text
    from_train = data.source_split == "train"
    assert (out.loc[~from_train, "assigned"] == "val").all()  # the source's val is kept whole
    assert (out.loc[from_train & out.bucket.between(0, 25), "assigned"] == "test").all()
    assert (out.loc[from_train & ~out.bucket.between(0, 25), "assigned"] == "train").all()
    assert (out.assigned == "test").sum() > 50
    check_splits(out)  # train and test both there: the stage goes on


def test_source_split_missing_is_a_clear_error():
    with pytest.raises(StageError, match="split.method source needs the split each image came with"):
        assign(frame({"a": 10}), Split(method="source"))


def test_caps_mark_the_surplus_unused():
    out = assign(frame({"a": 500, "b": 80}), Split(method="hash", balance=False, max_train_per_class=50))
    train = out[out.split == "train"].label.value_counts()
    assert train["a"] == 50 and train["b"] == 50
    assert len(out) == 580  # nothing dropped: the surplus is `unused`
    assert (out.split == "unused").sum() == 580 - 100 - out.split.isin(["val", "test"]).sum()
    assert set(out.reason[out.split == "unused"]) == {"cap"} and set(out.assigned[out.split == "unused"]) == {"train"}


def test_no_training_or_no_test_image_fails_at_once_with_a_clear_message():
    data = frame({"a": 30, "b": 30})
    data["source_split"] = "test"  # a source with a test/ folder only
    with pytest.raises(StageError, match=r"no image is left to train on: of 60 accepted images, train 0, val 0, "
                                         r"test 60, unused 0"):
        check_splits(assign(data, Split(method="source")))
    data = frame({"a": 30, "b": 30})
    empty, other = [b for b in range(256) if b not in set(data["id"].map(bucket))][:2]  # buckets no image falls in
    out = assign(data, Split(method="hash", test_buckets=(empty, empty), val_buckets=(other, other)))
    with pytest.raises(StageError, match="no image is left to test on: of 60 accepted images"):
        check_splits(out)


# --- near-duplicate groups (validate's `group` column) stay in one split ---------------------

def with_groups(data: pd.DataFrame, size: int = 4) -> pd.DataFrame:
    """Every `size` consecutive rows of a class form a group named by its smallest id."""
    data = data.copy()
    data["group"] = data.groupby([data["label"], data.groupby("label").cumcount() // size])["id"].transform("min")
    return data


def test_a_new_group_shares_the_assignment_of_its_name():
    p = Split(method="hash", test_buckets=(0, 63), val_buckets=(64, 127), balance=False)
    out = assign(with_groups(frame({"a": 300, "b": 300})), p)
    assert (out.groupby("group")["assigned"].nunique() == 1).all()
    of_name = out["group"].map(bucket).map(lambda b: "test" if b <= 63 else "val" if b <= 127 else "train")
    assert (out["assigned"] == of_name).all()
    assert (out["bucket"] == out["id"].map(bucket)).all()  # the image's own bucket
    assert set(out["assigned"]) == {"train", "val", "test"}


def test_images_without_near_duplicates_keep_their_split():
    p = Split(method="hash", balance=False)
    data = frame({"a": 200, "b": 200})
    grouped = data.copy()
    grouped["group"] = grouped["id"]
    grouped.loc[:3, "group"] = grouped.loc[:3, "id"].min()  # one group of four; the rest alone
    before, after = assign(data, p).set_index("id"), assign(grouped, p).set_index("id")
    alone = grouped.loc[4:, "id"]
    assert (after.loc[alone, "assigned"] == before.loc[alone, "assigned"]).all()
    assert (after.loc[alone, "bucket"] == before.loc[alone, "bucket"]).all()


def test_balancing_and_caps_only_set_images_aside():
    data = with_groups(frame({"big": 900, "mid": 400, "small": 120}), size=3)
    p = Split(method="hash", test_buckets=(0, 50), val_buckets=(51, 101), balance=True, max_train_per_class=200,
              max_val_per_class=30)
    out = assign(data, p)
    assert (out.groupby("group")["assigned"].nunique() == 1).all()
    assert ((out.split == out.assigned) | (out.split == "unused")).all()
    assert len(out) == len(data)  # nothing dropped
    # setting aside needs no whole groups, so the counts are exact
    assert (out[out.split == "val"].label.value_counts() == 30).all()
    assert out[out.split == "test"].label.value_counts().nunique() == 1
    train = out[out.split == "train"].label.value_counts()
    assert train["big"] == train["mid"] == 200 and train["small"] < 200


def test_source_split_is_kept_and_groups_are_kept_together_within_it():
    data = with_groups(frame({"a": 400, "b": 400}), size=2)
    data["source_split"] = ["test" if i % 2 else "train" for i in range(len(data))]  # every group crosses
    data.loc[data.index % 10 == 0, "source_split"] = "test"  # and some lie within the test split
    out = assign(data, Split(method="source", val_buckets=(26, 76), test_buckets=(0, 25)))
    assert (out["assigned"][data["source_split"] == "test"] == "test").all()  # the source's split is never changed
    assert not (out["assigned"][data["source_split"] == "train"] == "test").any()
    per_source = out.groupby([out["group"], data["source_split"]])["assigned"].nunique()
    assert (per_source == 1).all()


# --- the state: what was assigned before ------------------------------------------------------

HASH = Split(method="hash", test_buckets=(0, 85), val_buckets=(86, 170), balance=False, max_train_per_class=0,
             max_val_per_class=0)


def ids_in(data: pd.DataFrame, want: str, p: Split = HASH) -> list[str]:
    return data.loc[assign(data, p)["assigned"] == want, "id"].tolist()


def test_a_new_near_copy_takes_its_groups_assignment_even_with_a_smaller_id():
    """Before, a group's split was its smallest id's: a new near-copy with a smaller id moved it."""
    data = frame({"a": 60})
    first = assign(data, HASH)
    old = first.loc[first["assigned"] == "test", "id"].iloc[0]
    pool = frame({"a": 400}, salt="new")
    # a new image with a smaller id whose own bucket says train
    newcomer = pool[(pool["id"] < old) & (pool["id"].map(bucket) > 170)].iloc[0]
    grown = pd.concat([data, newcomer.to_frame().T], ignore_index=True)
    grown["group"] = grown["id"]
    grown.loc[grown["id"].isin([old, newcomer["id"]]), "group"] = newcomer["id"]
    after = by_id(assign(grown, HASH, next_state(None, first)))
    assert after[old] == "test" and after[newcomer["id"]] == "test"
    assert assign(grown, HASH).set_index("id").loc[old, "assigned"] == "train"  # with no state the group is train


def test_a_new_image_linking_groups_in_different_splits_is_kept_out_and_reported(caplog):
    data = frame({"a": 60})
    first = assign(data, HASH)
    train_id, test_id = ids_in(data, "train")[0], ids_in(data, "test")[0]
    bridge = frame({"a": 1}, salt="bridge")
    grown = pd.concat([data, bridge], ignore_index=True)
    grown["group"] = grown["id"]
    members = grown["id"].isin([train_id, test_id, bridge["id"].iloc[0]])
    grown.loc[members, "group"] = grown.loc[members, "id"].min()
    with caplog.at_level(logging.INFO, logger="imgpipe.data.splitting"):
        out = assign(grown, HASH, next_state(None, first)).set_index("id")
    new = out.loc[bridge["id"].iloc[0]]
    assert pd.isna(new["assigned"]) or new["assigned"] == ""
    assert (new["split"], new["reason"]) == ("unused", "conflict")
    assert "1 images set aside (split unused, reason conflict)" in caplog.text
    assert "1 near-duplicate groups hold images assigned to different splits" in caplog.text
    # the old ones keep their assignment; the training one is not trained on while it is linked to a test image
    assert (out.loc[train_id, "assigned"], out.loc[test_id, "assigned"]) == ("train", "test")
    assert (out.loc[train_id, "split"], out.loc[train_id, "reason"]) == ("unused", "near_duplicate")
    assert out.loc[test_id, "split"] == "test"
    assert bridge["id"].iloc[0] not in next_state(next_state(None, first), out.reset_index()).index


def test_removed_images_are_remembered_so_a_returning_image_keeps_its_split():
    data = frame({"a": 60})
    first = assign(data, HASH)
    test_id = ids_in(data, "test")[0]
    state = next_state(None, first)
    without = data[data["id"] != test_id]
    state = next_state(state, assign(without, HASH, state))
    assert state.loc[test_id, "assigned"] == "test"
    # it comes back as a near-copy of a training image: it keeps test, and the training image steps aside
    train_id = ids_in(data, "train")[0]
    back = data.assign(group=data["id"])
    back.loc[back["id"].isin([test_id, train_id]), "group"] = min(test_id, train_id)
    out = assign(back, HASH, state).set_index("id")
    assert (out.loc[test_id, "assigned"], out.loc[test_id, "split"]) == ("test", "test")
    assert (out.loc[train_id, "assigned"], out.loc[train_id, "split"]) == ("train", "unused")


def test_a_file_moved_between_source_folders_keeps_its_split_and_is_used_for_neither():
    data = frame({"a": 100, "b": 100})
    data["source_split"] = ["test" if i % 4 == 0 else "val" if i % 4 == 1 else "train" for i in range(len(data))]
    p = Split(method="source", balance=False, max_train_per_class=0, max_val_per_class=0)
    first = assign(data, p)
    moved = data.copy()
    moved.loc[0, "source_split"], moved.loc[2, "source_split"] = "train", "test"  # test -> train, train -> test
    out = assign(moved, p, next_state(None, first))
    assert out.loc[[0, 2], "assigned"].tolist() == ["test", "train"]
    assert out.loc[[0, 2], "split"].tolist() == ["unused", "unused"]
    assert set(out.loc[[0, 2], "reason"]) == {"source_split"}
    assert (out.loc[3:, "split"] == first.loc[3:, "split"]).all()


def test_the_state_round_trips_and_a_broken_one_is_a_clear_error(tmp_path):
    path = tmp_path / "state.csv"
    assert read_state(path) is None
    state = next_state(None, assign(frame({"a": 50, "b": 50}), HASH))
    write_state(path, state, HASH)
    assert path.read_text().startswith('# imgpipe split state, made with {"method": "hash", "test_buckets": [0, 85]')
    made_with, back = read_state(path)
    assert made_with == {"method": "hash", "test_buckets": [0, 85], "val_buckets": [86, 170]}
    assert back.to_dict() == state.to_dict() and back.index.is_monotonic_increasing
    for text, message in [("id,assigned\nabc,train\n", "not a split state"),
                          (path.read_text().replace("id,assigned", "id,split"), "a split state has columns id,assigned"),
                          (path.read_text() + "abc,holdout,100\n", "rows are not one image id with train, val or test"),
                          (path.read_text() + "abc,train,-1\n", "and its own arrival number"),
                          (path.read_text() + "abc,train,0\n", "and its own arrival number")]:
        path.write_text(text)
        with pytest.raises(StageError, match=f"{message}.*delete it and run `dvc repro split`"):
            read_state(path)


def test_a_state_made_before_arrivals_were_kept_numbers_each_split_in_id_order(tmp_path):
    path = tmp_path / "state.csv"
    path.write_text('# imgpipe split state, made with {"method": "hash", "test_buckets": [0, 85], "val_buckets": [86, 170]}\n'
                    "id,assigned\nc,train\na,train\nb,test\nd,val\n")
    _, state = read_state(path)
    assert state.sort_index().to_dict("index") == {
        "a": {"assigned": "train", "arrival": 0}, "b": {"assigned": "test", "arrival": 0},
        "c": {"assigned": "train", "arrival": 1}, "d": {"assigned": "val", "arrival": 0}}
    grown = pd.DataFrame({"id": ["a", "b", "c", "d", "e"], "label": "x", "path": list("abcde")})
    out = assign(grown, HASH, state).set_index("id")
    assert out.loc[["a", "b", "c", "d"], "arrival"].tolist() == [0, 0, 1, 0]
    assert out.loc["e", "arrival"] == (2 if out.loc["e", "assigned"] == "train" else 1)


def test_a_change_of_the_splits_definition_starts_afresh(tmp_path, caplog):
    path = tmp_path / "state.csv"
    data = frame({"a": 80, "b": 80})
    write_state(path, next_state(None, assign(data, HASH)), HASH)
    assert previous_assignment(path, HASH) is not None
    # balancing and caps only set images aside: they are not part of the definition
    assert previous_assignment(path, Split(**{**HASH.__dict__, "balance": True, "max_val_per_class": 3})) is not None
    wider = Split(**{**HASH.__dict__, "test_buckets": (0, 120), "val_buckets": (121, 170)})
    with caplog.at_level(logging.INFO, logger="imgpipe.data.splitting"):
        assert previous_assignment(path, wider) is None
    assert "the state no longer applies, every image is assigned afresh" in caplog.text
    assert '"test_buckets": [0, 120]' in caplog.text and '"test_buckets": [0, 85]' in caplog.text


def test_the_stage_keeps_assignments_across_runs_and_starts_afresh_when_the_state_is_deleted(tmp_path):
    paths = Paths(accepted=str(tmp_path / "accepted.csv"), split=str(tmp_path / "split.csv"),
                  split_state=str(tmp_path / "state.csv"))
    p = Split(method="hash", test_buckets=(0, 85), val_buckets=(86, 170), balance=True)
    data = with_groups(frame({"a": 80, "b": 40}), size=2)
    data.to_csv(paths.accepted, index=False)
    split_stage.run(p, paths)
    first = read_split(paths.split)
    first_bytes = (tmp_path / "split.csv").read_bytes(), (tmp_path / "state.csv").read_bytes()
    split_stage.run(p, paths)  # the same inputs and state: the same bytes
    assert ((tmp_path / "split.csv").read_bytes(), (tmp_path / "state.csv").read_bytes()) == first_bytes
    # a new near-copy with the smallest id of all joins each of the first 20 groups
    joined = data.drop_duplicates("group").head(20)
    copies = joined.assign(id=["0" * 39 + f"{i:x}" for i in range(20)], path=lambda f: f["path"] + ".copy.png")
    grown = pd.concat([data, copies], ignore_index=True)
    grown["group"] = grown["group"].map(dict(zip(joined["group"], copies["id"]))).fillna(grown["group"])
    grown.to_csv(paths.accepted, index=False)
    split_stage.run(p, paths)
    after = read_split(paths.split).set_index("id")
    assert (after.loc[first["id"], "assigned"] == first.set_index("id")["assigned"]).all()
    assert (after.loc[copies["id"], "assigned"].values == first.set_index("id").loc[joined["id"], "assigned"].values).all()
    (tmp_path / "state.csv").unlink()  # the documented reset
    split_stage.run(p, paths)
    fresh = read_split(paths.split).set_index("id")
    assert (fresh["assigned"] != after["assigned"]).any()  # the groups follow their new names again

"""The split's promise on growing data, checked on random histories (hypothesis): images are
added, removed, brought back, copied (near-duplicates, which merge groups) and, with a source
split, moved between the source's folders; after each change the split runs again on its state.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from imgpipe.core.params import Split
from imgpipe.data.splitting import SPLITS, assign, bucket, next_state, read_state, write_state

CLASSES = ("a", "b", "c")
# hypothesis keeps caches in ./.hypothesis by default: not in the project folder
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / f"imgpipe-tests-hypothesis-{os.getuid()}")


class World:
    """The images present, their labels and source splits, and the near-duplicate links between them."""

    def __init__(self, source_splits: tuple[str, ...]):
        self.source_splits = source_splits
        self.made: dict[str, dict] = {}  # every image ever made, by id
        self.present: list[str] = []
        self.links: list[tuple[str, str]] = []

    def make(self, label: str, source_split: str) -> str:
        image_id = hashlib.sha1(f"img{len(self.made)}".encode()).hexdigest()
        self.made[image_id] = {"label": label, "source_split": source_split}
        self.present.append(image_id)
        return image_id

    def groups(self) -> dict[str, str]:
        """Connected components of the links among present images, named by their smallest id (as validate)."""
        parent = {i: i for i in self.present}

        def root(i):
            while parent[i] != i:
                i = parent[i]
            return i

        for x, y in self.links:
            if x in parent and y in parent:
                parent[root(x)] = root(y)
        members: dict[str, list[str]] = {}
        for i in self.present:
            members.setdefault(root(i), []).append(i)
        return {i: min(group) for group in members.values() for i in group}

    def frame(self) -> pd.DataFrame:
        group = self.groups()
        return pd.DataFrame([{"id": i, "path": f"{i}.png", **self.made[i], "group": group[i]} for i in self.present])

    def apply(self, op: tuple) -> None:
        kind, a, b, label = op
        if kind == "add":
            for _ in range(a % 6 + 1):
                self.make(label, self.source_splits[b % len(self.source_splits)])
        elif kind == "pair":  # a new image and a near-copy of it
            first = self.make(label, self.source_splits[b % len(self.source_splits)])
            self.links.append((first, self.make(label, self.made[first]["source_split"])))
        elif kind == "copy" and self.present:  # a near-copy of one image
            of = self.present[a % len(self.present)]
            self.links.append((of, self.make(self.made[of]["label"], self.made[of]["source_split"])))
        elif kind == "bridge" and len(self.present) > 1:  # a near-copy of two images: their groups merge
            x, y = self.present[a % len(self.present)], self.present[b % len(self.present)]
            new = self.make(self.made[x]["label"], self.made[x]["source_split"])
            self.links += [(x, new), (y, new)]
        elif kind == "remove" and len(self.present) > 1:
            self.present.pop(a % len(self.present))
        elif kind == "restore":  # an image removed before comes back
            gone = [i for i in self.made if i not in self.present]
            if gone:
                self.present.append(gone[a % len(gone)])
        elif kind == "move" and self.present:  # a file moved to another folder of the source
            self.made[self.present[a % len(self.present)]]["source_split"] = self.source_splits[b % len(self.source_splits)]


ops = st.tuples(st.sampled_from(["add", "add", "pair", "copy", "bridge", "remove", "restore", "move"]),
                st.integers(0, 1000), st.integers(0, 1000), st.sampled_from(CLASSES))
params = st.builds(Split, method=st.sampled_from(["hash", "source"]), test_buckets=st.just((0, 70)),
                   val_buckets=st.just((71, 140)), balance=st.booleans(),
                   max_train_per_class=st.sampled_from([0, 4, 12]), max_val_per_class=st.sampled_from([0, 2, 5]))
# with a source split: all three folders, or no val/ or no test/ (those are carved from train)
source_layouts = st.sampled_from([("train", "val", "test"), ("train", "val"), ("train", "test"), ("train",)])


def round_trip(state: pd.Series, p: Split) -> pd.Series:
    """The state as the stage passes it from one run to the next: through its file."""
    with tempfile.TemporaryDirectory() as tmp:
        write_state(Path(tmp) / "state.csv", state, p)
        _, back = read_state(Path(tmp) / "state.csv")
    return back


HISTORIES = {"p": params, "layout": source_layouts,
             "start": st.lists(st.tuples(st.sampled_from(CLASSES), st.integers(0, 3)), min_size=10, max_size=60),
             "history": st.lists(ops, min_size=1, max_size=10)}


def no_image_ever_changes_its_assignment_and_no_val_or_test_image_is_trained_on(p, layout, start, history):
    world = World(layout)
    for label, where in start:
        world.make(label, layout[where % len(layout)])
    ever: dict[str, str] = {}  # the first assignment each image got
    arrived: dict[str, tuple[str, int]] = {}  # and its first (split, arrival number)
    state = None
    for step in range(len(history) + 1):
        if step:
            world.apply(history[step - 1])
        data = world.frame()
        out = assign(data, p, state)
        assert out["id"].tolist() == data["id"].tolist()  # every image accounted for, none dropped

        assigned = out.set_index("id")["assigned"].fillna("")
        keys = out["group"] + ("/" + out["source_split"] if p.method == "source" else "")
        # a new image takes the assignment its near-duplicates already have, none if they disagree
        for key, members in out.groupby(keys):
            before = {ever[i] for i in members["id"] if i in ever}
            new = set(members.loc[~members["id"].isin(list(ever)), "assigned"].fillna(""))
            if len(before) == 1:
                assert new <= before, f"step {step}: new images of {key} got {new}, its others {before}"
            elif before:
                assert new <= {""}, f"step {step}: new images of {key}, linking {before}, got {new}"
            else:
                assert len(new) == 1 and "" not in new, f"step {step}: a new group {key} got {new}"
        for image_id, value in assigned.items():
            if value:
                assert ever.setdefault(image_id, value) == value, f"step {step}: {image_id} moved"
        # an arrival number is given once, never changes, never goes to two images of a split, and a
        # new image's is above every number its split gave before (so it lands in a new shard)
        numbered = out[out["assigned"].fillna("") != ""]
        assert out.loc[out["assigned"].fillna("") == "", "arrival"].isna().all()
        rows = list(zip(numbered["id"], numbered["assigned"], numbered["arrival"].astype(int)))
        for image_id, split, number in rows:
            if image_id not in arrived:
                assert all(number > n for s, n in arrived.values() if s == split), f"step {step}: {image_id} {number}"
        for image_id, split, number in rows:
            assert arrived.setdefault(image_id, (split, number)) == (split, number), f"step {step}: {image_id} {number}"
        assert len(set(arrived.values())) == len(arrived)
        # `split` is the assignment or nothing: an image is never used in another split
        assert ((out["split"] == out["assigned"]) | (out["split"] == "unused")).all()
        assert set(out["split"]) <= {*SPLITS, "unused"}
        assert ((out["split"] == "unused") == (out["reason"] != "")).all()
        assert (out.loc[out["assigned"].fillna("") == "", "reason"] == "conflict").all()
        trained = out.loc[out["split"] == "train", "id"]
        assert not [i for i in trained if ever.get(i) in ("val", "test")]
        if p.method == "source":  # an image in use is where the source puts it, or carved from its train split
            used = out[out["split"] != "unused"]
            carved = [name for name in ("val", "test") if name not in set(out["source_split"])]
            ok = (used["split"] == used["source_split"]) | ((used["source_split"] == "train") & used["split"].isin(carved))
            assert ok.all(), f"step {step}: {used[~ok][['id', 'source_split', 'split']]}"
        # no near-copy of an image in val or test is trained on
        evaluated = set(keys[out["split"].isin(["val", "test"])])
        assert not set(keys[out["split"] == "train"]) & evaluated

        if state is None:  # with no state, an image without near-duplicates gets the hash of its own id
            alone = out["group"] == out["id"]
            if p.method == "hash":  # the buckets' ranges as the docs give them: test wins where they overlap
                buckets = out["id"].map(bucket)
                expected = pd.Series("train", index=out.index).mask(buckets.between(*p.val_buckets), "val")
                expected = expected.mask(buckets.between(*p.test_buckets), "test")
            else:
                expected = out["source_split"].copy()
                for name in ("val", "test"):
                    if name not in set(out["source_split"]):
                        bounds = getattr(p, f"{name}_buckets")
                        expected[(out["source_split"] == "train") & out["bucket"].between(*bounds)] = name
            assert (out.loc[alone, "assigned"] == expected[alone]).all()
        state = round_trip(next_state(state, out), p)
        assert set(ever) == set(state.index)  # every image ever assigned is remembered, removed ones too


def _checked(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])(
        given(**HISTORIES)(no_image_ever_changes_its_assignment_and_no_val_or_test_image_is_trained_on))


# 60 histories take about 45 s (each step runs the split's SQL three times): 15 in the quick
# suite (`make test-fast`), all 60 in the whole one
test_no_image_ever_changes_its_assignment_and_no_val_or_test_image_is_trained_on = _checked(15)
test_no_image_ever_changes_its_assignment_over_more_histories = pytest.mark.slow(_checked(60))

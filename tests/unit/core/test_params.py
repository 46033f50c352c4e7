import dataclasses
import subprocess
import typing
from pathlib import Path

import pytest
import yaml

from imgpipe.core.params import Params, ParamsError, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[3]


def test_project_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.train.backbone == "auto" and p.preprocess.size == (32, 32)


def test_params_yaml_holds_every_knob_at_its_default():
    """The defaults are written once: params.yaml lists every key of the typed classes, with the
    value the class gives it, so a key missing from a user's params.yaml means what it says here."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section in dataclasses.fields(Params):
        listed = set(data.get(section.name) or {})
        known = {f.name for f in dataclasses.fields(section.type if isinstance(section.type, type)
                                                    else typing.get_type_hints(Params)[section.name])}
        assert listed == known, f"params.yaml {section.name}: missing {known - listed}, unknown {listed - known}"
    assert load_params(ROOT / "params.yaml") == Params()


def test_a_literal_choice_is_checked_and_named():
    with pytest.raises(ParamsError, match="train.backbone must be one of mobilenet, mobilenet_v2, .*; got 'resnet'"):
        params_from_dict({"train": {"backbone": "resnet"}})
    assert params_from_dict({"rebalance": {"method": None}}).rebalance.method == "none"


def test_git_holds_no_generated_output():
    """dvc.lock, metrics, plot files and the blessed-model record come from a run: users commit
    theirs, this repository ships none (a fresh clone starts with no blessed model)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    generated = {"dvc.lock", "models/blessed.json", "reports/metrics.json", "reports/data_quality/summary.json"}
    found = [f for f in tracked if f in generated or (f.startswith("reports/") and f.endswith(".csv"))]
    assert not found, f"generated outputs committed: {found}"


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ParamsError, match=r"unknown key 'train.epoch' \(did you mean 'epochs'\?\)"):
        params_from_dict({"train": {"epoch": 3}})


def test_unknown_section_is_named():
    with pytest.raises(ParamsError, match="unknown key 'trian'"):
        params_from_dict({"trian": {}})


@pytest.mark.parametrize("data, message", [
    ({"train": {"epochs": "three"}}, "train.epochs must be a whole number"),
    ({"preprocess": {"size": [32]}}, "preprocess.size must have 2 items"),
    ({"preprocess": {"otsu": True, "colour_mode": "rgb"}}, "otsu needs preprocess.colour_mode: grey"),
    ({"preprocess": {"blur_kernel": 4}}, "blur_kernel must be 0"),
    ({"split": {"test_buckets": [0, 30], "val_buckets": [20, 40]}}, "overlap"),
    ({"rebalance": {"method": "smote"}}, "rebalance.method must be one of"),
])
def test_bad_values_are_named(data, message):
    with pytest.raises(ParamsError, match=message):
        params_from_dict(data)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)

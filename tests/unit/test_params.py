import pytest

from stages.params import ParamsError, load_params, params_from_dict


def test_project_params_load():
    p = load_params("params.yaml")
    assert p.train.backbone == "mobilenet" and p.preprocess.size == (32, 32)


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

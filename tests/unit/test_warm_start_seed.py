"""The nightly flow's warm-start seeding (flows/warm_start.py `seed`): only the last blessed
model is copied, with the shards' classes, and only once."""

import json
import logging

from flows.warm_start import seed
from imgpipe.core.hashing import file_hexdigest
from imgpipe.model.warm_start import MODEL, RECORD, read_record

log = logging.getLogger("test")


def project(root, model_bytes=b"model one", blessed=True):
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.keras").write_bytes(model_bytes)
    (root / "data" / "shards").mkdir(parents=True)
    (root / "data" / "shards" / "meta.json").write_text(json.dumps({"classes": ["daisy", "rose"]}))
    md5 = file_hexdigest(root / "models" / "model.keras", "md5")
    records = [{"md5": "0" * 32, "blessed_at": "2026-11-30T00:00:00+00:00", "metrics": {}}]
    if blessed:
        records.append({"md5": md5, "blessed_at": "2026-12-01T00:00:00+00:00", "metrics": {"accuracy": 0.9}})
    (root / "models" / "blessed.json").write_text(json.dumps({"blessed": records}))
    return md5


def call(root):
    return seed(root, "models/model.keras", "models/blessed.json", "data/shards", "models/warm_start", log)


def test_the_last_blessed_model_is_copied_once_with_its_classes(tmp_path):
    md5 = project(tmp_path)
    record = call(tmp_path)
    folder = tmp_path / "models" / "warm_start"
    assert (folder / MODEL).read_bytes() == b"model one"
    assert record == read_record(folder) == {"classes": ["daisy", "rose"], "md5": md5,
                                             "blessed_at": "2026-12-01T00:00:00+00:00",
                                             "metrics": {"accuracy": 0.9}}
    assert json.loads((folder / RECORD).read_text())["md5"] == md5
    assert call(tmp_path) is None  # already there: nothing written, train's input unchanged


def test_a_model_the_gate_did_not_bless_last_is_not_copied(tmp_path, caplog):
    project(tmp_path, blessed=False)
    with caplog.at_level(logging.INFO):
        assert call(tmp_path) is None
    assert "is not the last blessed model" in caplog.text
    assert not (tmp_path / "models" / "warm_start").exists()


def test_no_blessed_file_no_seed(tmp_path, caplog):
    project(tmp_path)
    (tmp_path / "models" / "blessed.json").unlink()
    with caplog.at_level(logging.INFO):
        assert call(tmp_path) is None
    assert "no blessed model yet" in caplog.text

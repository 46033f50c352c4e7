"""preprocess reads each image of the split table from the source, as validate saw it."""

import shutil

import pytest

from imgpipe.core.errors import StageError
from imgpipe.core.params import params_from_dict
from imgpipe.model import shards
from stages import preprocess
from tests.data.test_ingest import photo


def split_source(tmp_path):
    """A source of two photos and the split table that puts both in train: the stage's params."""
    source = tmp_path / "src"
    (source / "cat").mkdir(parents=True)
    for i in range(2):
        shutil.copy(photo(i), source / "cat" / f"{i}.jpg")
    (tmp_path / "split.csv").write_text("id,label,path,split\n" + "".join(f"{i}a,cat,cat/{i}.jpg,train\n" for i in range(2)))
    return params_from_dict({"ingest": {"source": str(source)}, "preprocess": {"size": [8, 8]},
                             "paths": {"split": str(tmp_path / "split.csv"), "shards": str(tmp_path / "shards")}})


def test_every_image_of_the_split_table_is_read_into_the_shards(tmp_path):
    params = split_source(tmp_path)
    preprocess.run(params.preprocess, params.paths, params.ingest)
    assert shards.read_meta(params.paths.shards)["counts"] == {"train": 2, "val": 0, "test": 0}


def test_a_file_changed_after_validation_is_named(tmp_path):
    params = split_source(tmp_path)
    (tmp_path / "src" / "cat" / "1.jpg").write_bytes(b"not an image any more")
    with pytest.raises(StageError, match=r"cat/1.jpg: not an image .*the file changed after validation"):
        preprocess.run(params.preprocess, params.paths, params.ingest)

"""A source at a URL lists the records a local folder with the same files lists, in the same order,
and reads the same bytes: checked through fsspec's own file:// file system (S3 on loopback, with
the Dask workers reading it: tests/e2e/test_dask_stages.py)."""

import io
import shutil

import pytest

from imgpipe.core.params import Ingest
from imgpipe.data.ingestion import ingest
from imgpipe.data.remote import RemoteSource
from imgpipe.data.sources import Source, SourceError
from tests.data.test_ingest import flower_files


def tree(root, files: dict[str, bytes]):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def both(root, **ingest_params):
    local = Source.from_params(Ingest(source=str(root), **ingest_params))
    remote = Source.from_params(Ingest(source=f"file://{root}", **ingest_params))
    assert isinstance(remote, RemoteSource) and not isinstance(local, RemoteSource)
    return local, remote


def manifest(source) -> str:
    out = io.StringIO()
    ingest(source, out, 10**8, 1)
    return out.getvalue()


@pytest.fixture
def photos():
    return [f.read_bytes() for f in flower_files(6)]


def test_folder_layouts_list_and_read_as_a_local_folder_does(tmp_path, photos):
    # files and folders mixed at each level, hidden names, a stray file, a nested folder, a split layout
    root = tree(tmp_path / "src", {
        "train/daisy/b.jpg": photos[0], "train/daisy/a.jpg": photos[1], "train/daisy/zz/c.jpg": photos[2],
        "train/daisy/.DS_Store": b"x", "train/.cache/d.jpg": photos[3], "train/rose/e.jpg": photos[4],
        "train/loose.jpg": photos[5], "test/rose/f.jpg": photos[0], "val/daisy/g.jpg": photos[1]})
    local, remote = both(root)
    assert list(remote.records()) != [] and [r[:4] for r in remote.records()] == [r[:4] for r in local.records()]
    assert remote.skipped == local.skipped == {"hidden": 1, "in_hidden_folders": 1, "other_files": 0}
    assert manifest(remote) == manifest(local)
    assert remote.read_bytes("train/daisy/zz/c.jpg") == photos[2]
    # class folders without a split layout
    local, remote = both(tree(tmp_path / "flat", {"daisy/a.jpg": photos[0], "rose/b.jpg": photos[1], "c.jpg": photos[2]}))
    assert [r[:4] for r in remote.records()] == [r[:4] for r in local.records()]
    assert all(r.stamp for r in remote.records())


def test_a_labels_csv_at_a_url_resolves_and_refuses_rows_as_locally(tmp_path, photos):
    root = tree(tmp_path / "src", {"img/a.jpg": photos[0], "img/b.jpg": photos[1], "c.jpg": photos[2],
                                   "labels.csv": b"file,label\nimg/a.jpg,daisy\nb,rose\n"})
    local, remote = both(root)
    assert remote.layout == local.layout == "csv"
    assert [r[:4] for r in remote.records()] == [r[:4] for r in local.records()]
    assert manifest(remote) == manifest(local)

    (root / "labels.csv").write_text("file,label\nimg/a.jpg,daisy\n../x.jpg,rose\nIMG/B.jpg,rose\nc.jpg\n")
    with pytest.raises(SourceError) as err:
        list(Source.from_params(Ingest(source=f"file://{root}")).records())
    message = str(err.value)
    assert "3 bad rows" in message
    assert "line 3: '../x.jpg' points outside the source folder" in message
    assert "line 4: 'IMG/B.jpg' names no file" in message and "letter case differs" in message
    assert "line 5: expected `<file or id>,<label>`" in message


def test_a_url_that_lists_nothing_or_holds_idx_files_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="does not exist, is not a folder or holds no files"):
        Source.from_params(Ingest(source=f"file://{tmp_path}/nothing"))
    shutil.copy(__file__, tmp_path / "train-images-idx3-ubyte")  # the name is what decides the layout
    with pytest.raises(SourceError, match="the idx layout is not read from a URL"):
        Source.from_params(Ingest(source=f"file://{tmp_path}"))

"""The facts cache: a re-run of ingest reads only the files that changed, and writes the same manifest."""

import contextlib
import logging
import shutil
import sqlite3

import pytest

from imgpipe.core.runner import run_stage
from imgpipe.data import facts_cache
from imgpipe.data import ingestion
from stages import ingest
from imgpipe.core.params import params_from_dict
from tests.data.test_ingest import FLOWERS


@pytest.fixture
def source(tmp_path):
    """Real photos of two classes, one truncated file and one that is not an image."""
    root = tmp_path / "photos"
    for cls in ("daisy", "rose"):
        (root / cls).mkdir(parents=True)
        for photo in sorted((FLOWERS / cls).glob("*.jpg"))[:12]:
            shutil.copy(photo, root / cls / photo.name)
    whole = (root / "rose" / sorted(p.name for p in (root / "rose").iterdir())[0]).read_bytes()
    (root / "rose" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "daisy" / "notes.jpg").write_text("not an image")
    return root


def run(tmp_path, source, cache_dir, workers=1, max_pixels=100_000_000) -> bytes:
    manifest = tmp_path / "manifest.csv"
    run_stage(ingest, params_from_dict({
        "ingest": {"source": str(source), "max_pixels": max_pixels},
        "runtime": {"workers": workers, "ingest_cache_dir": str(cache_dir) if cache_dir else ""},
        "paths": {"manifest": str(manifest)}}))
    return manifest.read_bytes()


@pytest.fixture
def reads(monkeypatch):
    """The files ingest opens (in this process: workers=1), the real reader doing the reading."""
    opened = []
    real = ingestion.read_file

    def counting(root, path, **limit):
        opened.append(path)
        return real(root, path, **limit)

    monkeypatch.setattr(ingestion, "read_file", counting)
    return opened


def test_a_warm_run_reads_nothing_and_writes_the_same_manifest(tmp_path, source, reads, caplog):
    without = run(tmp_path, source, None)
    assert len(reads) == 26
    cold = run(tmp_path, source, tmp_path / "cache")
    assert cold == without and len(reads) == 52
    with caplog.at_level(logging.INFO, logger="stages.ingest"):
        warm = run(tmp_path, source, tmp_path / "cache")
    assert warm == without and len(reads) == 52  # not one file read again
    assert "26 unchanged files not read again" in caplog.text
    # the truncated file and the text file come back from the cache with their errors
    assert b"truncated jpeg (no end-of-image marker)" in warm and b"not an image" in warm


def test_a_changed_file_is_read_again_and_a_new_one_is_read(tmp_path, source, reads):
    cache = tmp_path / "cache"
    run(tmp_path, source, cache)
    reads.clear()
    daisy = sorted((source / "daisy").glob("*.jpg"))
    daisy[0].write_bytes(daisy[1].read_bytes())  # same path, other bytes (and a new modification time)
    shutil.copy(sorted((FLOWERS / "rose").glob("*.jpg"))[20], source / "rose" / "new.jpg")
    warm = run(tmp_path, source, cache)
    assert sorted(reads) == sorted([f"daisy/{daisy[0].name}", "rose/new.jpg"])
    assert warm == run(tmp_path, source, None)


def test_what_else_decides_a_row_is_part_of_the_key(tmp_path, source, reads):
    cache = tmp_path / "cache"
    run(tmp_path, source, cache)
    reads.clear()
    small = run(tmp_path, source, cache, max_pixels=100)  # every photo is now too large to decode
    assert len(reads) == 26 and b"too large to decode" in small
    path = str(next((source / "daisy").glob("*.jpg")))
    assert facts_cache.file_key(path, 100) != facts_cache.file_key(path, 200)
    assert facts_cache.file_key(str(source / "missing.jpg"), 100) is None


def test_workers_look_up_one_cache_and_it_can_be_deleted(tmp_path, source, caplog):
    cache = tmp_path / "cache"
    cold = run(tmp_path, source, cache, workers=2)
    with caplog.at_level(logging.INFO, logger="stages.ingest"):
        assert run(tmp_path, source, cache, workers=2) == cold
    assert "26 unchanged files not read again" in caplog.text  # each worker found its files
    shutil.rmtree(cache)
    assert run(tmp_path, source, cache, workers=2) == cold


def test_a_change_to_the_describing_code_changes_every_key(tmp_path, monkeypatch):
    photo = str(next(FLOWERS.glob("daisy/*.jpg")))
    assert facts_cache.file_key(photo, 100).startswith(facts_cache.VERSION + "|")
    code = tmp_path / "image_facts.py"
    code.write_text("FACTS_SIDE = 256\n")
    monkeypatch.setattr(facts_cache, "CODE", (str(code),))  # an absolute name: read from there
    before = facts_cache.code_version()
    code.write_text("FACTS_SIDE = 128\n")
    assert facts_cache.code_version() != before


def test_entries_of_other_code_are_deleted_once(tmp_path, source, monkeypatch, caplog):
    run(tmp_path, source, tmp_path / "cache")
    database = tmp_path / "cache" / facts_cache.FILE

    def entries() -> int:
        with contextlib.closing(sqlite3.connect(database)) as db:
            return db.execute("SELECT COUNT(*) FROM facts").fetchone()[0]

    assert entries() == 26
    monkeypatch.setattr(facts_cache, "VERSION", "0123456789ab")  # as after a change to the describing code
    with caplog.at_level(logging.INFO, logger="stages.ingest"):
        run(tmp_path, source, tmp_path / "cache")
    # the old version's 26 rows are gone, the new version's 26 are in: the cache does not grow
    assert entries() == 26 and "26 entries made by an earlier version of the code deleted" in caplog.text
    with facts_cache.FactsCache(tmp_path / "cache") as cache:
        assert cache.dropped == 0  # same version as the last run: nothing to delete, nothing scanned

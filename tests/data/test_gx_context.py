"""The validate stage's file-backed Great Expectations project (gx/): what a run stores there,
that it leaves the committed files as they are, and the Data Docs it builds.

Real Great Expectations, real git; the manifests and helpers of test_validate.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import great_expectations as gx  # noqa: E402

from imgpipe.data import expectations  # noqa: E402
from tests.data.test_validate import CLEAN, params, run_validate  # noqa: E402

SUITES = ["accepted_images", "class_counts", "image_manifest", "near_duplicate_groups"]


def configuration(expectation) -> tuple:
    """What an expectation checks and says, without the id GX gives it when it stores it."""
    config = expectation.configuration
    return config.type, config.kwargs, config.meta, config.description


def project(context) -> dict:
    """The context's suites (their expectations), checkpoints (their suites and result format)
    and validation results (their suite names)."""
    return {
        "suites": {s.name: [configuration(e) for e in s.expectations] for s in context.suites.all()},
        "checkpoints": {c.name: ([v.suite.name for v in c.validation_definitions], c.result_format)
                        for c in context.checkpoints.all()},
        "results": sorted(k.expectation_suite_identifier.name for k in context.validation_results_store.list_keys()),
    }


def test_a_run_in_a_folder_without_gx_stores_the_suites_checkpoints_and_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_validate(tmp_path, CLEAN) is None

    # the folder got the repository's GX files, unchanged: every table's asset is in them already
    for name in expectations.TEMPLATE_FILES:
        assert (tmp_path / "gx" / name).read_bytes() == (expectations.TEMPLATE / name).read_bytes()
    context = gx.get_context(mode="file", project_root_dir=tmp_path)
    stored = project(context)
    code = expectations.suites(params(tmp_path).validate, ["cat", "dog"])
    assert stored["suites"] == {name: [configuration(e) for e in suite] for name, suite in code.items()}
    assert sorted(stored["suites"]) == SUITES
    assert stored["checkpoints"] == {
        name: ([name], {"result_format": "SUMMARY", "unexpected_index_column_names": [key]})
        for name, key in [("image_manifest", "path"), ("accepted_images", "path"),
                          ("near_duplicate_groups", "path"), ("class_counts", "label")]}
    assert stored["results"] == SUITES
    results = [context.validation_results_store.get(k) for k in context.validation_results_store.list_keys()]
    assert all(r.success for r in results) and sum(len(r.results) for r in results) == 17
    # run state only: suites, definitions, checkpoints and results all sit under gx/uncommitted/
    assert sorted(p.name for p in (tmp_path / "gx").iterdir()) == [".gitignore", "great_expectations.yml",
                                                                    "uncommitted"]
    assert sorted(p.name for p in (tmp_path / "gx" / "uncommitted").iterdir()) == [
        "checkpoints", "expectations", "validation_definitions", "validations"]


def test_a_changed_threshold_updates_the_stored_suite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_validate(tmp_path, CLEAN)
    run_validate(tmp_path, CLEAN, min_images_per_class=3)
    suite = gx.get_context(mode="file", project_root_dir=tmp_path).suites.get("class_counts")
    assert suite.expectations[0].min_value == 3
    assert len(suite.expectations) == 3  # replaced, not added to


def test_only_the_latest_runs_results_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(expectations, "RESULTS_KEPT", 2)
    store = lambda: gx.get_context(mode="file", project_root_dir=tmp_path).validation_results_store  # noqa: E731
    runs = []
    for _ in range(3):
        run_validate(tmp_path, CLEAN)
        runs.append({k.to_tuple() for k in store().list_keys()} - set().union(*runs))
    assert [len(run) for run in runs] == [4, 4, 4]  # each run stores one result per suite
    assert {k.to_tuple() for k in store().list_keys()} == runs[1] | runs[2]  # the first run's are gone
    assert project(gx.get_context(mode="file", project_root_dir=tmp_path))["results"] == sorted(SUITES * 2)
    # and with them their folders: no empty folder is left behind
    validations = tmp_path / "gx" / "uncommitted" / "validations"
    assert not [d for d in validations.rglob("*") if d.is_dir() and not any(d.iterdir())]


def git(repo, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def test_two_runs_leave_every_git_tracked_file_as_it_is(tmp_path, monkeypatch):
    if not shutil.which("git"):
        pytest.skip("git is not installed")
    repo, out = tmp_path / "repo", tmp_path / "out"
    (repo / "gx").mkdir(parents=True)
    for name in expectations.TEMPLATE_FILES:  # the committed gx/ files
        shutil.copy(expectations.TEMPLATE / name, repo / "gx" / name)
    out.mkdir()
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "gx")
    assert git(repo, "ls-files").split() == ["gx/.gitignore", "gx/great_expectations.yml"]

    monkeypatch.chdir(repo)
    for _ in range(2):
        assert run_validate(out, CLEAN) is None
    # nothing changed, nothing new that git would see: GX wrote only into the ignored gx/uncommitted/
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "status", "--porcelain", "--ignored").splitlines() == ["!! gx/uncommitted/"]
    assert project(gx.get_context(mode="file", project_root_dir=repo))["results"] == sorted(SUITES * 2)


def test_the_data_docs_show_this_run_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the results store keeps both runs' results
        run_validate(tmp_path, CLEAN)
    site = tmp_path / "dq" / "site"
    index = (site / "index.html").read_text()
    for suite in SUITES:
        assert suite in index
    assert sorted(p.stem for p in (site / "expectations").glob("*.html")) == SUITES
    pages = sorted((site / "validations").rglob("*.html"))
    assert sorted(p.relative_to(site / "validations").parts[0] for p in pages) == SUITES
    assert index.count("validations/") == 4  # one link per table's result
    assert not (tmp_path / "gx" / "uncommitted" / "data_docs").exists()

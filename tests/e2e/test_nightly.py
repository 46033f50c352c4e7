"""Nightly runs on growing data, against a real Prefect server and real git + DVC repositories.

The repository is small and fast: real photos under data/raw (`dvc add`-ed), a stage `list` that
lists them, a stage `count` whose metrics file git keeps, and a stage `greet` that depends on a
param only. What is checked: a run of the deployment versions new images itself (the `.dvc` file
committed), runs only what they made stale and commits dvc.lock; a run with nothing new changes
nothing; uncommitted work is refused; two runs at once take turns; a run waits for a `dvc repro`
started at a desk, up to its bound. Then two pieces alone: the counts read from `dvc diff`, and
a DVC repository in a sub-folder of the git one.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound

from flows import versioning
from flows.dvc_cli import dvc_holders
from flows.pipeline import pipeline
from flows.versioning import FALLBACK_IDENTITY, data_changes, describe_changes, tracked
from tests.e2e.helpers import QUIET_ENV, commit, dvc, eventually, git_dvc_repo, sh
from tests.e2e.test_deployment import serve_deployment
from tests.e2e.test_flow import logs_containing, task_runs

# starts a server or a cluster, or runs the pipeline: `make test-fast` leaves it out
pytestmark = pytest.mark.slow

FLOWERS = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "flowers5-128px" / "flowers"
PHOTOS = {"daisy": 3, "rose": 3}
# a run's own lines, from flows/pipeline.py: "stage 'list' ran in 1.23 s"
STAGE_LINE = re.compile(r"^stage '([^']+)' (ran|skipped) in ")


LIST = "find data/raw -type f | sort > list.txt"
# `list` made slow, counting its runs in a file outside the repository
SLOW_LIST = "sleep {seconds}; echo run >> {tries}; " + LIST


def stages(list_cmd: str = LIST) -> dict:
    return {
        "list": {"cmd": list_cmd, "deps": ["data/raw"], "outs": ["list.txt"]},
        "count": {
            "cmd": """echo "{\\"images\\": $(wc -l < list.txt)}" > metrics.json""",
            "deps": ["list.txt"],
            "metrics": [{"metrics.json": {"cache": False}}],
        },
        "greet": {"cmd": "echo hello ${greeting.name} > hello.txt", "params": ["greeting.name"],
                  "outs": ["hello.txt"]},
    }


def make_repo(path: Path, list_cmd: str = LIST) -> Path:
    """Photos under data/raw, `dvc add`-ed; the stages run once by hand; all of it committed.
    `list_cmd` replaces `list`'s command afterwards (committed too), so that it is stale."""
    git_dvc_repo(path, stages(), {"greeting": {"name": "night"}})
    for label, count in PHOTOS.items():
        (path / "data" / "raw" / label).mkdir(parents=True)
        for photo in sorted((FLOWERS / label).iterdir())[:count]:
            shutil.copy(photo, path / "data" / "raw" / label / photo.name)
    dvc("add", "-q", "data/raw", cwd=path)
    dvc("repro", "-q", cwd=path)
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages(list_cmd)}, sort_keys=False))
    commit(path, "data and a first run")
    return path


def new_photos(repo: Path, count: int = 2) -> list[str]:
    """Copy `count` more daisy photos into data/raw; their paths in the repository."""
    photos = sorted((FLOWERS / "daisy").iterdir())[PHOTOS["daisy"]:PHOTOS["daisy"] + count]
    for photo in photos:
        shutil.copy(photo, repo / "data" / "raw" / "daisy" / photo.name)
    return [f"data/raw/daisy/{photo.name}" for photo in photos]


def git(repo: Path, *args: str) -> str:
    return sh("git", *args, cwd=repo).stdout


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD").strip()


def short_head(repo: Path) -> str:
    return git(repo, "log", "-1", "--format=%h").strip()


def stage_statuses(client, flow_run_id, count: int) -> dict[str, str]:
    """{stage: ran | skipped} from the run's logs on the server, once all `count` are there."""

    def read() -> dict[str, str]:
        logs = logs_containing(client, flow_run_id, "stage '")
        return dict(m.groups() for line in logs.splitlines() if (m := STAGE_LINE.match(line)))

    return eventually(lambda: len(found := read()) == count and found) or read()


def finished(client, flow_run_id, timeout: float = 180):
    """The flow run once it is in a final state (None if it never got there)."""
    return eventually(lambda: (run := client.read_flow_run(flow_run_id)).state.is_final() and run, timeout)


def deployment_named(client, name: str):
    def read():
        try:
            return client.read_deployment_by_name(f"pipeline/{name}")
        except ObjectNotFound:  # not registered yet
            return None

    found = eventually(read, timeout=60)
    assert found, f"pipeline/{name} was never registered"
    return found


ALL_STAGES = 4  # data/raw.dvc, list, count, greet


def test_nightly_run_versions_new_images_runs_what_changed_and_commits(prefect_api, client, tmp_path):
    repo = make_repo(tmp_path / "repo")
    before = head(repo)
    added = new_photos(repo)
    # a service account with no git identity: the flow commits under its own name
    no_identity = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}

    with serve_deployment(prefect_api, repo, tmp_path / "serve.log", "--name", "nightly-data", env=no_identity):
        deployment = deployment_named(client, "nightly-data")
        assert deployment.parameters["version_data"] is True

        started = time.monotonic()
        run = finished(client, client.create_flow_run_from_deployment(deployment.id).id)
        first_seconds = time.monotonic() - started
        assert run and run.state_type == StateType.COMPLETED, run and run.state

        # two commits: the new images first, then what the run wrote
        log = git(repo, "log", "--format=%s%x00%an <%ae>", f"{before}..HEAD").splitlines()
        subjects = [line.split("\0")[0] for line in log]
        assert len(subjects) == 2, subjects
        assert subjects[1] == "Version raw data: data/raw (+2 added)"
        assert subjects[0] == f"Pipeline run {run.name} of deployment nightly-data: ran list, count"
        assert {line.split("\0")[1] for line in log} == {f"{FALLBACK_IDENTITY[0]} <{FALLBACK_IDENTITY[1]}>"}
        assert git(repo, "show", "--name-only", "--format=", "HEAD~1").split() == ["data/raw.dvc"]
        assert sorted(git(repo, "show", "--name-only", "--format=", "HEAD").split()) == ["dvc.lock", "metrics.json"]
        (out,) = yaml.safe_load(git(repo, "show", "HEAD:data/raw.dvc"))["outs"]
        assert out["nfiles"] == sum(PHOTOS.values()) + 2
        assert json.loads(git(repo, "show", "HEAD:metrics.json")) == {"images": sum(PHOTOS.values()) + 2}
        assert set(added) <= set((repo / "list.txt").read_text().split())
        assert git(repo, "status", "--porcelain") == ""
        # DVC agrees that the committed state is the workspace's: nothing is stale
        assert "Data and pipelines are up to date" in dvc("status", cwd=repo).stdout

        # the data source was versioned before the stages, so its own stage found nothing new
        statuses = stage_statuses(client, run.id, ALL_STAGES)
        assert statuses == {"data/raw.dvc": "skipped", "list": "ran", "count": "ran", "greet": "skipped"}
        tasks = task_runs(client, run.id)
        assert {"check git work tree", "version raw data", "commit run"} <= set(tasks)
        assert all(t.state_type == StateType.COMPLETED for t in tasks.values())

        # nothing new: a second run runs nothing and commits nothing
        second = finished(client, client.create_flow_run_from_deployment(deployment.id).id)
        assert second and second.state_type == StateType.COMPLETED, second and second.state
        assert stage_statuses(client, second.id, ALL_STAGES) == dict.fromkeys(statuses, "skipped")
        assert len(git(repo, "log", "--format=%H", f"{before}..HEAD").split()) == 2
        # wait for both whole lines: the first alone also holds "nothing to commit", and the server
        # may get the second one's batch of logs later
        unchanged = "raw data unchanged: nothing to commit"
        no_change = "the run changed no record git keeps: nothing to commit"
        logs = logs_containing(client, second.id, unchanged, no_change)
        assert unchanged in logs and no_change in logs
        assert git(repo, "status", "--porcelain") == ""
    print(f"first nightly run: {first_seconds:.1f} s")


def test_uncommitted_work_is_refused_and_dvcs_own_records_are_not(prefect_api, client, tmp_path):
    repo = make_repo(tmp_path / "repo")
    before = head(repo)
    new_photos(repo, count=1)
    params = repo / "params.yaml"
    committed_params = params.read_text()
    params.write_text(yaml.safe_dump({"greeting": {"name": "work in progress"}}))

    state = pipeline(repo=str(repo), version_data=True, return_state=True)

    assert state.is_failed()
    message = client.read_flow_run(state.state_details.flow_run_id).state.message
    assert "refusing to version data and commit" in message and "params.yaml" in message
    # nothing was versioned, run or committed
    assert head(repo) == before
    assert git(repo, "status", "--porcelain", "--untracked-files=no").split() == ["M", "params.yaml"]
    assert len((repo / "list.txt").read_text().splitlines()) == sum(PHOTOS.values())
    assert set(task_runs(client, state.state_details.flow_run_id)) == {"check git work tree"}

    # What DVC writes is not someone's work: a `dvc repro` at a desk left data/raw.dvc and
    # dvc.lock changed, uncommitted. The run commits them.
    params.write_text(committed_params)
    dvc("repro", "-q", cwd=repo)
    assert sorted(git(repo, "status", "--porcelain").split()) == ["M", "M", "M", "data/raw.dvc", "dvc.lock", "metrics.json"]

    state = pipeline(repo=str(repo), version_data=True, return_state=True)

    assert state.is_completed(), state.message
    subjects = git(repo, "log", "--format=%s", f"{before}..HEAD").splitlines()
    assert len(subjects) == 2, subjects
    assert subjects[1] == "Version raw data: data/raw (+1 added)"
    assert subjects[0].startswith("Pipeline run ") and subjects[0].endswith(": no stage ran")
    assert sorted(git(repo, "show", "--name-only", "--format=", "HEAD").split()) == ["dvc.lock", "metrics.json"]
    assert git(repo, "status", "--porcelain") == ""


def test_two_runs_at_once_take_turns(prefect_api, client, tmp_path):
    """The deployment's concurrency limit: the second run waits in the server's queue, then
    finds that the first did everything."""
    tries = tmp_path / "list-runs"
    repo = make_repo(tmp_path / "repo", SLOW_LIST.format(seconds=4, tries=tries))
    before = head(repo)
    new_photos(repo)

    with serve_deployment(prefect_api, repo, tmp_path / "serve.log", "--name", "nightly-turns"):
        deployment = deployment_named(client, "nightly-turns")
        started = time.monotonic()
        ids = [client.create_flow_run_from_deployment(deployment.id).id for _ in range(2)]
        # the late run is re-offered a slot every 30 s (the server's default)
        runs = [finished(client, run_id, timeout=240) for run_id in ids]
        seconds = time.monotonic() - started

    assert all(run and run.state_type == StateType.COMPLETED for run in runs), [r and r.state for r in runs]
    waited = [run for run in runs if "AwaitingConcurrencySlot" in {s.name for s in client.read_flow_run_states(run.id)}]
    assert len(waited) == 1, "exactly one run should have waited for the other"
    (late,) = waited
    (early,) = [run for run in runs if run.id != late.id]
    assert late.start_time >= early.end_time
    assert tries.read_text() == "run\n"
    assert stage_statuses(client, late.id, ALL_STAGES) == {
        "data/raw.dvc": "skipped", "list": "skipped", "count": "skipped", "greet": "skipped"
    }
    assert stage_statuses(client, early.id, ALL_STAGES)["list"] == "ran"
    # the early run's two commits, none from the late one
    assert len(git(repo, "log", "--format=%H", f"{before}..HEAD").split()) == 2
    print(f"two runs at once: {seconds:.1f} s")


def start_dvc_repro(repo: Path, log: Path) -> subprocess.Popen:
    """`dvc repro` as at a desk, in its own process group; returns once DVC holds its locks."""
    env = {**os.environ, **QUIET_ENV}
    with open(log, "w") as out:  # the child keeps its own copy of the file
        process = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    assert eventually(lambda: dvc_holders(str(repo)) or process.poll() is not None, timeout=30)
    assert process.poll() is None, log.read_text()
    return process


def repo_with_a_repro_going(tmp_path: Path, seconds: int) -> tuple[Path, Path, subprocess.Popen]:
    """New photos versioned and a `dvc repro` at a desk holding DVC's lock, its `list` taking
    `seconds`; (the repository, the file counting `list`'s runs, the repro's process)."""
    tries = tmp_path / "list-runs"
    repo = make_repo(tmp_path / "repo", SLOW_LIST.format(seconds=seconds, tries=tries))
    new_photos(repo)
    dvc("add", "-q", "data/raw", cwd=repo)
    return repo, tries, start_dvc_repro(repo, tmp_path / "repro.log")


def test_a_run_waits_for_a_dvc_repro_at_a_desk(prefect_api, client, tmp_path):
    # long enough that the flow, starting on a busy machine, still finds it going
    repo, tries, manual = repo_with_a_repro_going(tmp_path, seconds=15)

    started = time.monotonic()
    state = pipeline(repo=str(repo), return_state=True)
    seconds = time.monotonic() - started

    assert manual.wait(timeout=60) == 0, (tmp_path / "repro.log").read_text()
    assert state.is_completed(), state.message
    # it waited for the manual run, then found its work done: `list` ran once, in the manual run
    assert {stage: r["status"] for stage, r in state.result().items()} == dict.fromkeys(
        ["data/raw.dvc", "list", "count", "greet"], "skipped"
    )
    assert tries.read_text() == "run\n"
    logs = logs_containing(client, state.state_details.flow_run_id, "DVC is busy in", "DVC is free after")
    assert f"PID {manual.pid} (" in logs
    # the first DVC command waited, for as long as the manual run took
    assert re.search(r"Waiting for it to finish before `dvc repro --single-item \S+` \(up to 3600 s\)", logs)
    waited = float(re.search(r"DVC is free after ([\d.]+) s of waiting", logs).group(1))
    assert 3 < waited < seconds
    print(f"run that waited for a dvc repro: {seconds:.1f} s")


def test_a_run_that_waited_long_enough_stops_before_doing_anything(prefect_api, client, tmp_path):
    repo, tries, manual = repo_with_a_repro_going(tmp_path, seconds=60)
    try:
        started = time.monotonic()
        state = pipeline(repo=str(repo), return_state=True, lock_timeout_seconds=3, retries=1, retry_delay_seconds=0)
        seconds = time.monotonic() - started
        assert manual.poll() is None, "the manual run should still be going"
    finally:
        os.killpg(manual.pid, signal.SIGKILL)
        manual.wait()

    assert state.is_failed()
    message = client.read_flow_run(state.state_details.flow_run_id).state.message
    assert "DVC was still busy in" in message and f"PID {manual.pid} (" in message
    # the first stage never started, and the wait was the bound, not the bound once per retry
    (first,) = task_runs(client, state.state_details.flow_run_id).values()
    assert f"`dvc repro --single-item {first.name}` was not run" in message
    assert first.state_type == StateType.FAILED and first.run_count == 1
    assert 3 <= seconds < 30


def test_data_changes_count_files_per_target_from_dvc_diff():
    # as `dvc diff --json` prints it (dvc/repo/diff.py): a directory's own entry ends in "/"
    diff = {
        "added": [{"path": "data/raw/daisy/a.jpg"}, {"path": "data/raw/daisy/b.jpg"}, {"path": "data/raw2/c.jpg"}],
        "deleted": [{"path": "data/raw/rose/d.jpg"}],
        "modified": [{"path": "data/raw/"}, {"path": "labels.csv"}],
        "renamed": [{"path": {"old": "data/raw/rose/e.jpg", "new": "data/raw/tulip/e.jpg"}}],
        "not in cache": [],
    }
    counts = data_changes(diff, ["data/raw", "labels.csv", "other"])
    assert counts == {
        "data/raw": {"added": 2, "deleted": 1, "renamed": 1},
        "labels.csv": {"modified": 1},
        "other": {},
    }
    assert describe_changes(counts) == "data/raw (+2 added, 1 deleted, 1 renamed), labels.csv (1 modified), other"


def test_a_dvc_repository_in_a_sub_folder_of_the_git_one(tmp_path):
    """`dvc init --subdir`: DVC's paths are relative to sub/, git's to the work tree."""
    sh("git", "init", "-q", cwd=tmp_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "params.yaml").write_text("greeting: {name: night}\n")
    stage = {"cmd": "echo ${greeting.name} > hello.txt", "params": ["greeting.name"], "outs": ["hello.txt"]}
    (sub / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"greet": stage}}))
    dvc("init", "-q", "--subdir", cwd=sub)
    dvc("repro", "-q", cwd=sub)
    commit(tmp_path, "init")
    # a change of DVC's and one of someone's
    (sub / "params.yaml").write_text("greeting: {name: day}\n")
    dvc("repro", "-q", cwd=sub)
    (tmp_path / "notes.txt").write_text("mine\n")  # untracked: never anyone's business
    found = tracked(str(sub))
    assert found.records == {"dvc.lock"} and found.gitignores == {".gitignore"}
    assert versioning.uncommitted_foreign_changes(str(sub), found.owned) == ["sub/params.yaml"]

    assert versioning.commit(str(sub), set(found.owned), "records") is not None
    assert git(tmp_path, "show", "--name-only", "--format=", "HEAD").split() == ["sub/dvc.lock"]
    assert git(tmp_path, "status", "--porcelain").split() == ["M", "sub/params.yaml", "??", "notes.txt"]
    assert versioning.commit(str(sub), set(found.owned), "again") is None  # nothing left of DVC's


def test_data_changed_since_the_last_recorded_run_whoever_committed_it(tmp_path):
    """What the warm start asks before it seeds: which `.dvc` files changed in git since the last
    commit of dvc.lock, so that data committed at a desk counts as the flow's own versioning does."""
    fresh = tmp_path / "fresh"
    git_dvc_repo(fresh, {}, {})
    (fresh / "data").mkdir()
    (fresh / "data" / "a.txt").write_text("a\n")
    dvc("add", "-q", "data", cwd=fresh)
    commit(fresh, "data, no run yet")
    assert versioning.data_changed_since_last_run(str(fresh), tracked(str(fresh))) == (["data.dvc"], None)

    repo = make_repo(tmp_path / "repo")  # data and a run of the stages in one commit
    assert versioning.data_changed_since_last_run(str(repo), tracked(str(repo))) == ([], short_head(repo))
    new_photos(repo)
    dvc("add", "-q", "data/raw", cwd=repo)
    commit(repo, "photos, by hand")
    (repo / "models").mkdir()
    (repo / "models" / "start.txt").write_text("weights\n")
    dvc("add", "-q", "models/start.txt", cwd=repo)
    commit(repo, "another data source")
    last_run = git(repo, "log", "-1", "--format=%h", "--", "dvc.lock").strip()
    changed = versioning.data_changed_since_last_run(str(repo), tracked(str(repo)))
    assert changed == (["data/raw.dvc", "models/start.txt.dvc"], last_run)
    assert versioning.data_changed_since_last_run(str(repo), tracked(str(repo)), frozenset({"models/start.txt.dvc"})) == (
        ["data/raw.dvc"], last_run)
    dvc("repro", "-q", cwd=repo)
    commit(repo, "the stages on the new photos")
    assert versioning.data_changed_since_last_run(str(repo), tracked(str(repo))) == ([], short_head(repo))


def test_the_deployment_on_the_real_pipeline_picks_up_new_photos_and_moves_no_image(prefect_api, client, tmp_path):
    """The seven real stages on real photos, run by the served deployment: new photos dropped into
    the raw folder are versioned, ingested and assigned by the next run; nothing assigned before
    changes split, and the shard files the new photos do not go to are left as they were."""
    from tests.e2e.test_pipeline import CLASSES as SMALL, FLOWERS as ALL_FLOWERS, clone_with_small_data, make_origin, stage_env

    env = stage_env(tmp_path / "keras")
    repo = clone_with_small_data(make_origin(tmp_path, env), tmp_path / "repo", env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "small data", cwd=repo, env=env)
    stage_names = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    raw = repo / "data" / "raw" / "flowers-small"

    def split_table():
        import pandas as pd

        return pd.read_csv(repo / "data" / "interim" / "split.csv", dtype=str, keep_default_na=False).set_index("id")

    def shard_files():
        folder = repo / "data" / "shards"
        return {e.name: (e.stat().st_ino, e.stat().st_mtime_ns) for e in folder.iterdir() if e.name != "meta.json"}

    serve_env = {k: env[k] for k in ("PATH", "KERAS_HOME")}
    with serve_deployment(prefect_api, repo, tmp_path / "serve.log", "--name", "nightly-real", env=serve_env):
        deployment = deployment_named(client, "nightly-real")
        first = finished(client, client.create_flow_run_from_deployment(deployment.id).id, timeout=900)
        assert first and first.state_type == StateType.COMPLETED, first and first.state
        before, files_before = split_table(), shard_files()

        added = []
        for cls, n in SMALL.items():  # two more photos a class, as a camera would drop them
            for photo in sorted((ALL_FLOWERS / cls).glob("*.jpg"))[n + 20:n + 22]:
                shutil.copy(photo, raw / cls / photo.name)
                added.append(f"{cls}/{photo.name}")
        second = finished(client, client.create_flow_run_from_deployment(deployment.id).id, timeout=900)
        assert second and second.state_type == StateType.COMPLETED, second and second.state

        # the warm start's model, seeded in this run before the stage list is read, is one of
        # its data sources already
        statuses = stage_statuses(client, second.id, len(stage_names) + 2)
        assert statuses == {"data/raw/flowers-small.dvc": "skipped", "models/warm_start/model.keras.dvc": "skipped",
                            **dict.fromkeys(stage_names, "ran")}, statuses
        subjects = git(repo, "log", "--format=%s", "-4").splitlines()
        assert subjects[2] == f"Version raw data: data/raw/flowers-small (+{len(added)} added)", subjects
        # the first run's model, blessed (a fresh project's first model has nothing to fall short
        # of), is the second training's starting point, committed with its record
        blessed = json.loads((repo / "models" / "blessed.json").read_text())["blessed"]
        assert subjects[1].startswith(f"Warm start: the model blessed {blessed[0]['blessed_at']} (md5 {blessed[0]['md5']}")
        assert sorted(git(repo, "show", "--name-only", "--format=", "HEAD~1").split()) == [
            "models/warm_start/.gitignore", "models/warm_start/model.keras.dvc", "models/warm_start/warm_start.json"]
        epochs = yaml.safe_load((repo / "params.yaml").read_text())["train"]["warm_start_epochs"]
        started_from = f"warm start from models/warm_start (md5 {blessed[0]['md5']}"
        assert started_from in logs_containing(client, second.id, started_from)
        assert len((repo / "reports" / "train_log.csv").read_text().splitlines()) == 1 + epochs  # header + epochs
        after = split_table()
        assert set(added) <= set(after["path"])  # in the manifest, accepted and assigned
        assert (after.loc[before.index, "assigned"] == before["assigned"]).all()  # no image moved
        files_after = shard_files()
        assert [n for n in files_before if files_after.get(n) == files_before[n]], (files_before, files_after)
        assert git(repo, "status", "--porcelain") == ""

        # photos versioned and committed at a desk, not by the flow: the next run finds nothing to
        # version, and still seeds the warm start, since the last recorded run did not see them
        second_run_commit = short_head(repo)
        second_model = hashlib.md5((repo / "models" / "model.keras").read_bytes()).hexdigest()
        second_blessed = json.loads((repo / "models" / "blessed.json").read_text())["blessed"][-1]["md5"] == second_model
        for cls, n in SMALL.items():
            for photo in sorted((ALL_FLOWERS / cls).glob("*.jpg"))[n + 22:n + 23]:
                shutil.copy(photo, raw / cls / photo.name)
        dvc("add", "-q", "data/raw/flowers-small", cwd=repo, env=env)
        commit(repo, "two photos, by hand")
        third = finished(client, client.create_flow_run_from_deployment(deployment.id).id, timeout=900)
        assert third and third.state_type == StateType.COMPLETED, third and third.state
        assert "raw data unchanged: nothing to commit" in logs_containing(client, third.id, "raw data unchanged")
        changed = f"warm start: raw data changed since the last recorded run (commit {second_run_commit}): data/raw/flowers-small.dvc"
        assert changed in logs_containing(client, third.id, changed)
        assert stage_statuses(client, third.id, len(stage_names) + 2)["train"] == "ran"
        if second_blessed:  # (the gate may hold back a model of this tiny test set)
            record = json.loads((repo / "models" / "warm_start" / "warm_start.json").read_text())
            assert record["md5"] == second_model
            assert git(repo, "log", "--format=%s", "-2").splitlines()[1].startswith(f"Warm start: the model blessed {record['blessed_at']}")
        else:
            assert "is not the last blessed model" in logs_containing(client, third.id, "is not the last blessed model")

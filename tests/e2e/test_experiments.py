"""The experiments flow against a real Prefect server, on a real temporary git + DVC repository.

The repository's one stage scores its params (score = lr * epochs, written to metrics.json) and
refuses a learning rate <= 0, so each experiment's figures are known in advance.
"""

import json
from pathlib import Path

import pytest
from prefect.client.schemas.objects import StateType

from flows.experiments import ExperimentFailed, comparison_rows, experiments
from tests.e2e.helpers import artifacts, commit, dvc, git_dvc_repo

# starts a Prefect server: `make test-fast` leaves it out
pytestmark = pytest.mark.slow

SCORE = """\
import json, yaml
p = yaml.safe_load(open("params.yaml"))["train"]
print(f"scoring lr={p['lr']} epochs={p['epochs']}")
if p["lr"] <= 0:
    raise SystemExit(f"lr must be > 0, got {p['lr']}")
metrics = {"score": round(p["lr"] * p["epochs"], 6), "epochs_run": p["epochs"]}
json.dump(metrics, open("metrics.json", "w"))
"""
STAGES = {
    "train": {
        "cmd": "python score.py",
        "deps": ["score.py"],
        "params": ["train.lr", "train.epochs"],
        "metrics": [{"metrics.json": {"cache": False}}],
    }
}
PARAMS = {"train": {"lr": 0.1, "epochs": 2, "seed": 7}}


def make_repo(path: Path) -> Path:
    """The repository, with the baseline's metrics committed (score 0.2)."""
    path.mkdir()
    (path / "score.py").write_text(SCORE)
    repo = git_dvc_repo(path, STAGES, PARAMS)
    dvc("repro", cwd=repo)
    commit(repo, "baseline")
    return repo


def test_runs_queued_experiments_and_publishes_the_comparison(prefect_api, client, tmp_path):
    repo = make_repo(tmp_path / "repo")
    overrides = [["train.lr=0.5"], ["train.lr=0.25", "train.epochs=3"], ["train.lr=-1"]]

    state = experiments(repo=str(repo), overrides=overrides, jobs=2, return_state=True)

    # one experiment failed: the run fails, after publishing the table
    assert state.is_failed()
    flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert flow_run.state_type == StateType.FAILED
    (table,) = artifacts(client, flow_run.id)["experiments"]
    rows = table.data
    names = [row["experiment"] for row in rows]
    assert names[0] == "master (baseline)"
    assert len(set(names)) == 4
    # the seed is the same everywhere, so it is no column; lr and epochs differ, so they are
    assert [{k: v for k, v in row.items() if k != "experiment"} for row in rows] == [
        {"state": "baseline", "train.epochs": 2, "train.lr": 0.1, "epochs_run": 2, "score": 0.2},
        {"state": "success", "train.epochs": 2, "train.lr": 0.5, "epochs_run": 2, "score": 1.0},
        {"state": "success", "train.epochs": 3, "train.lr": 0.25, "epochs_run": 3, "score": 0.75},
        {"state": "failed", "train.epochs": 2, "train.lr": -1, "epochs_run": None, "score": None},
    ]
    assert names[3] in flow_run.state.message
    # the experiments ran in temporary copies: the workspace keeps the baseline
    assert json.loads((repo / "metrics.json").read_text())["score"] == 0.2
    # and DVC knows them too: `dvc exp show` lists the three
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo).stdout)
    assert {exp["name"] for exp in shown[1]["experiments"]} == set(names[1:])


def test_on_a_dask_cluster_each_experiment_runs_as_a_task_on_a_worker(prefect_api, client, tmp_path):
    repo = make_repo(tmp_path / "repo")
    # an uncommitted change: experiments start from the workspace, as DVC's own do
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("epochs: 2", "epochs: 4"))
    overrides = [["train.lr=0.5"], ["train.lr=0.25", "train.epochs=3"], ["train.lr=-1"]]

    state = experiments(repo=str(repo), overrides=overrides, dask_workers=2, return_state=True)

    assert state.is_failed()
    flow_run = client.read_flow_run(state.state_details.flow_run_id)
    (table,) = artifacts(client, flow_run.id)["experiments"]
    rows = table.data
    names = [row["experiment"] for row in rows]
    assert [(row["state"], row["train.lr"], row["score"]) for row in rows] == [
        ("baseline", 0.1, 0.2), ("success", 0.5, 2.0), ("success", 0.25, 0.75),
        # DVC keeps no trace of a failed experiment outside its queue: the row names its overrides
        ("failed", None, None)]
    assert names[3] == "exp run -S train.lr=-1" and names[3] in flow_run.state.message
    # three tasks sent at once to two idle single-thread workers: both ran some
    workers = [row["worker"] for row in rows[1:]]
    assert all(w and w.startswith("tcp://127.0.0.1:") for w in workers), workers
    assert len(set(workers)) == 2, workers
    assert rows[0]["worker"] is None
    assert json.loads((repo / "metrics.json").read_text())["score"] == 0.2
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo).stdout)
    assert {exp["name"] for exp in shown[1]["experiments"]} == set(names[1:3])


def test_a_bad_override_fails_at_queueing_with_dvcs_message(prefect_api, tmp_path):
    repo = make_repo(tmp_path / "repo")

    state = experiments(repo=str(repo), overrides=[["train.lrr=0.5"]], return_state=True)

    assert state.is_failed()
    try:
        state.result()
    except ExperimentFailed as exc:
        message = str(exc)
    assert "could not queue an experiment with ['train.lrr=0.5']" in message
    assert "train.lrr" in message.split("\n", 1)[1]


def show_entry(rev, name, params, metrics, state) -> dict:
    """One experiment (or baseline) as `dvc exp show --json` describes it."""
    data = {
        "rev": rev,
        "params": {file: {"data": values} for file, values in params.items()},
        "metrics": {file: {"data": values} for file, values in metrics.items()},
    }
    revs = [{"rev": rev, "name": name, "data": data}]
    return {"revs": revs, "name": name, "executor": {"state": state}}


def test_comparison_rows_keep_differing_params_and_name_shared_metrics_by_file():
    params = {"params.yaml": {"train": {"lr": 0.1, "size": [32, 32]}}, "extra.yaml": {"k": 1}}
    metrics = {"reports/metrics.json": {"accuracy": 0.5, "per_class": {"a": 1}, "n": 10},
               "reports/quality.json": {"n": 12}}
    changed = {"params.yaml": {"train": {"lr": 0.1, "size": [48, 48]}}, "extra.yaml": {"k": 2}}
    better = {**metrics, "reports/metrics.json": {"accuracy": 0.75, "n": 10}}
    show = [
        {"rev": "workspace", "name": None, "data": {}, "experiments": None},
        {
            "rev": "abcdef0123",
            "name": None,
            "data": show_entry("abcdef0123", None, params, metrics, None)["revs"][0]["data"],
            "experiments": [
                show_entry("1111", "exp-a", changed, better, "success"),
                # failed: its commit still holds the baseline's metrics, which are not its own
                show_entry("2222", "exp-b", params, metrics, "failed"),
                show_entry("3333", "someone-elses", params, metrics, "success"),
            ],
        },
    ]

    rows = comparison_rows(show, ["exp-b", "exp-a", "exp-missing"])

    assert rows == [
        {"experiment": "abcdef0 (baseline)", "state": "baseline", "extra.yaml:k": 1,
         "train.size": "[32, 32]", "accuracy": 0.5, "reports/metrics.json:n": 10,
         "reports/quality.json:n": 12},
        {"experiment": "exp-b", "state": "failed", "extra.yaml:k": 1, "train.size": "[32, 32]",
         "accuracy": None, "reports/metrics.json:n": None, "reports/quality.json:n": None},
        {"experiment": "exp-a", "state": "success", "extra.yaml:k": 2, "train.size": "[48, 48]",
         "accuracy": 0.75, "reports/metrics.json:n": 10, "reports/quality.json:n": 12},
        {"experiment": "exp-missing", "state": "not found", "extra.yaml:k": None,
         "train.size": None, "accuracy": None, "reports/metrics.json:n": None,
         "reports/quality.json:n": None},
    ]

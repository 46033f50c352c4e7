"""Parameter sweeps as DVC experiments, run from a Prefect flow and compared in a table artifact.

Each set of overrides becomes one `dvc exp run --queue -S ...`; `dvc exp run --run-all --jobs N`
then runs the queue, N experiments at a time, each in its own temporary copy of the repository,
so the workspace is left alone. The comparison comes from `dvc exp show --json`: one row per
experiment (and the baseline commit), with the params that differ between the rows and the
top-level figures of every metrics file.

    imgpipe flow experiments [--repo PATH] [--jobs N | --dask-workers N | --address tcp://HOST:8786] \
        -e "train.learning_rate=0.01" -e "train.learning_rate=0.001 train.epochs=5"

On a Dask cluster (`address`, or `dask_workers` for a local one) each experiment is instead one
Prefect task run by prefect-dask's DaskTaskRunner on a worker: `dvc exp run` there, in a clone
of the repository of its own, so the cluster's machines run experiments side by side. Their
workers need this project installed and the repository at the same path (a shared file system);
the experiments' results land in the repository as DVC experiments, as the queue's do.
"""

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.dvc_cli import dvc_env, run_dvc
from flows.scaleout import task_runner, worker_address
from imgpipe.core.params import PARAMS_FILE

ARTIFACT_KEY = "experiments"
# what `dvc exp run --queue` prints once the experiment is in the queue
QUEUED = re.compile(r"Queued experiment '([^']+)' for future execution")
# what `dvc exp run` prints once an experiment ran and was saved
RAN = re.compile(r"Ran experiment\(s\): (\S+)")


class ExperimentFailed(RuntimeError):
    """An experiment could not be queued, or ran and failed."""


@task(cache_policy=NO_CACHE)
def queue_experiment(repo: str, overrides: list[str]) -> str:
    """Queue one experiment with these `-S` overrides; return the name DVC gave it."""
    returncode, tail = run_dvc(repo, ["exp", "run", "--queue", *_set_params(overrides)], get_run_logger().info)
    names = [match.group(1) for line in tail if (match := QUEUED.search(line))]
    if returncode != 0 or not names:
        output = "\n".join(tail)
        raise ExperimentFailed(f"could not queue an experiment with {overrides}:\n{output}")
    return names[0]


def _set_params(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("-S", override)]


@task(cache_policy=NO_CACHE)
def run_experiment(repo: str, overrides: list[str]) -> dict:
    """Run one experiment here and now (on a Dask worker: the repository at the same path) in a
    clone of its own: {"name": DVC's name for it, None if it failed, "worker": the Dask worker's
    address}. A failure is logged with the experiment's last output lines.

    Not `dvc exp run --temp` in the repository itself: each such run queues its experiment in
    the repository's one temporary-run queue and then runs every entry it finds there, so two
    started together can run each other's experiment (seen: one process ran both, the other
    reported a run of neither). A clone has a queue of its own; what DVC's temporary copy gets,
    it gets too: the last commit plus the workspace's uncommitted changes to tracked files, the
    repository's local DVC config, and its cache (shared, so outputs that exist are reused and
    the experiment's land where the repository finds them). The experiment goes back to the
    repository with `dvc exp push`.
    """
    logger = get_run_logger()
    worker = worker_address()
    with tempfile.TemporaryDirectory(prefix="imgpipe-experiment-") as tmp:
        clone = str(Path(tmp) / "repo")
        try:
            _clone(repo, clone)
        except ExperimentFailed as exc:
            logger.error("experiment %s could not start: %s", " ".join(overrides), exc)
            return {"name": None, "worker": worker}
        returncode, tail = run_dvc(clone, ["exp", "run", *_set_params(overrides)], logger.info)
        names = [match.group(1) for line in tail if (match := RAN.search(line))]
        if returncode != 0 or not names:
            output = "\n".join(tail)
            logger.error("experiment %s failed (exit code %d):\n%s", " ".join(overrides), returncode, output)
            return {"name": None, "worker": worker}
        # the cache is the repository's: only the experiment's git ref has to go back
        returncode, tail = run_dvc(clone, ["exp", "push", "--no-cache", "origin", names[0]], logger.info)
        if returncode != 0:
            output = "\n".join(tail)
            logger.error("experiment %s ran but could not be pushed back (exit code %d):\n%s",
                         names[0], returncode, output)
            return {"name": None, "worker": worker}
    return {"name": names[0], "worker": worker}


def _clone(repo: str, clone: str) -> None:
    """A clone of `repo` at `clone` as DVC's temporary copy would be (see run_experiment)."""
    def run(command: list[str], cwd: str, what: str, stdin: str | None = None) -> str:
        done = subprocess.run(command, cwd=cwd, env=dvc_env(), input=stdin, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise ExperimentFailed(f"{what} failed (exit code {done.returncode}):\n{done.stderr.strip()}")
        return done.stdout

    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "clone", "--quiet", repo, clone], str(Path(clone).parent), f"git clone {repo}")
    changes = run(["git", "diff", "HEAD", "--binary"], repo, "git diff HEAD")
    if changes:
        run(["git", "apply", "--binary", "-"], clone, "applying the workspace's changes", changes)
    local_config = Path(repo, ".dvc", "config.local")
    if local_config.exists():
        shutil.copyfile(local_config, Path(clone, ".dvc", "config.local"))
    cache = run([*dvc, "cache", "dir"], repo, "dvc cache dir").strip()
    run([*dvc, "cache", "dir", "--local", cache], clone, "dvc cache dir --local")
    # the data the stages read, from the cache; outputs not in it are made by the run
    run([*dvc, "checkout", "--force", "--allow-missing", "--quiet"], clone, "dvc checkout")


@task(cache_policy=NO_CACHE)
def run_queue(repo: str, jobs: int) -> None:
    """Run every queued experiment, `jobs` at a time, and wait for them; their logs go to ours."""
    # `--run-all` exits 0 even when an experiment failed: the caller reads each one's state.
    returncode, tail = run_dvc(
        repo, ["exp", "run", "--run-all", "--jobs", str(jobs)], get_run_logger().info
    )
    if returncode != 0:
        output = "\n".join(tail)
        raise ExperimentFailed(f"dvc exp run --run-all failed (exit code {returncode}):\n{output}")


@task(cache_policy=NO_CACHE)
def show_experiments(repo: str) -> list[dict]:
    """`dvc exp show --json`: the baseline commit and its experiments, with params and metrics."""
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    done = subprocess.run(command, cwd=repo, env=dvc_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise ExperimentFailed(f"dvc exp show failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout)


def _flatten(data: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}; lists stay values."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _params(data: dict) -> dict:
    # params.yaml keys as `dvc exp run -S` takes them; another file's keys prefixed with its name
    flat = {}
    for file, content in (data.get("params") or {}).items():
        prefix = "" if file == PARAMS_FILE else f"{file}:"
        flat.update({f"{prefix}{key}": v for key, v in _flatten(content.get("data", {})).items()})
    return flat


def _metrics(data: dict) -> dict[tuple[str, str], object]:
    # each metrics file's top-level values (nested ones, such as per-class figures, would make
    # the table unreadable)
    return {
        (file, key): value
        for file, content in (data.get("metrics") or {}).items()
        for key, value in content.get("data", {}).items()
        if isinstance(value, (int, float, str, bool))
    }


def _cell(value):
    # a table cell holds a scalar; a list param such as preprocess.size shows as its JSON
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _entries(show: list[dict], names: list[str], failed=frozenset()) -> list[tuple[str, str, dict]]:
    """(experiment, state, params and metrics) of the baseline commit, then of each of `names`
    (those in `failed`, which DVC did not keep, are "failed")."""
    baseline = next(entry for entry in show if entry["rev"] != "workspace")
    found = {
        exp["name"]: exp for exp in baseline.get("experiments") or [] if exp.get("name") in names
    }
    label = baseline.get("name") or baseline["rev"][:7]
    entries = [(f"{label} (baseline)", "baseline", baseline.get("data") or {})]
    for name in names:
        exp = found.get(name)
        if exp is None:
            entries.append((name, "failed" if name in failed else "not found", {}))
            continue
        state = (exp.get("executor") or {}).get("state", "success")
        data = exp["revs"][0].get("data") or {}
        if state != "success":
            # its commit still holds the metrics files it was started from: they are not its own
            data = {**data, "metrics": {}}
        entries.append((name, state, data))
    return entries


def comparison_rows(show: list[dict], names: list[str], failed=frozenset()) -> list[dict]:
    """The comparison table from `dvc exp show --json`: the baseline commit, then the experiments
    `names` in that order.

    Columns: experiment, state (baseline, success, failed, queued, running, ... or "not found"),
    every param whose value differs between the rows, then the top-level metrics (named
    `file:metric` when two metrics files share a name). A missing value is None.
    """
    rows = _entries(show, names, failed)
    params = [_params(data) for *_, data in rows]
    keys = sorted({key for row in params for key in row})
    # a row without params (an experiment not found) has nothing to compare
    known = [row for row in params if row]
    differing = [key for key in keys if len({json.dumps(row.get(key)) for row in known}) > 1]
    metrics = [_metrics(data) for *_, data in rows]
    metric_keys = sorted({key for row in metrics for key in row})
    files_per_metric = Counter(metric for _, metric in metric_keys)
    columns = {
        (file, metric): metric if files_per_metric[metric] == 1 else f"{file}:{metric}"
        for file, metric in metric_keys
    }
    return [
        {
            "experiment": experiment,
            "state": state,
            **{key: _cell(row_params.get(key)) for key in differing},
            **{column: _cell(row_metrics.get(key)) for key, column in columns.items()},
        }
        for (experiment, state, _), row_params, row_metrics in zip(rows, params, metrics)
    ]


@flow(name="experiments-on-dask")
def run_on_cluster(repo: str, overrides: list[list[str]]) -> list[dict]:
    """Each experiment as a task run on the flow's task runner (a DaskTaskRunner), all at once;
    what run_experiment says of each, in the order of `overrides`."""
    futures = [
        run_experiment.with_options(task_run_name=f"run {' '.join(o)}").submit(repo, o)
        for o in overrides
    ]
    return [future.result() for future in futures]


@flow(name="experiments")
def experiments(
    repo: str = ".",
    overrides: list[list[str]] | None = None,
    jobs: int = 1,
    dask_workers: int = 0,
    address: str = "",
) -> list[dict]:
    """Run one DVC experiment per set of `-S` overrides and publish the comparison table
    (artifact `experiments`).

    Locally, the experiments are queued and DVC runs the queue `jobs` at a time. With `address`
    (an existing Dask cluster's scheduler, tcp://HOST:8786) or `dask_workers` (a local cluster of
    that many processes), each runs as a task on the cluster's workers (`dvc exp run` in a clone),
    and the table gains a `worker` column: the worker that ran it.

    Returns the table's rows. Fails, after publishing the table, if any experiment failed.
    """
    if not overrides:
        raise ValueError("no experiments: give one or more sets of overrides: [['train.epochs=5']]")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if address and dask_workers:
        raise ValueError("give dask_workers (a local cluster) or address (an existing one), not both")
    repo = str(Path(repo).resolve())
    failed, workers = set(), {}
    if address or dask_workers:
        runner = task_runner(dask_workers, address) if dask_workers else task_runner(address=address)
        names = []
        for o, result in zip(overrides, run_on_cluster.with_options(task_runner=runner)(repo, overrides)):
            name = result["name"] or f"exp run -S {' -S '.join(o)}"
            names.append(name)
            workers[name] = result["worker"]
            if result["name"] is None:
                failed.add(name)
    else:
        names = [
            queue_experiment.with_options(task_run_name=f"queue {' '.join(o)}")(repo, o)
            for o in overrides
        ]
        run_queue(repo, jobs)
    rows = comparison_rows(show_experiments(repo), names, failed)
    if workers:
        rows = [{**row, "worker": workers.get(row["experiment"])} for row in rows]
    create_table_artifact(
        rows,
        key=ARTIFACT_KEY,
        description=f"{len(names)} DVC experiment(s) against {rows[0]['experiment']}: the params "
        "that differ and the top-level metrics (`dvc exp show` has them all).",
    )
    failed = [row["experiment"] for row in rows[1:] if row["state"] != "success"]
    if failed:
        raise ExperimentFailed(
            f"experiment(s) {', '.join(failed)} did not succeed; the run's logs have their output"
            + ("" if workers else " (also: dvc queue logs <name>)")
        )
    return rows

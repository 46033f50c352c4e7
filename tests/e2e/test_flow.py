"""The Prefect flow against a real `prefect server start`, on real temporary git + DVC repositories.

Most repositories have three shell stages on a real file (the MNIST test set's SHA256SUMS):
a counts its lines (with a label from params.yaml), b upper-cases a's output, c repeats b's output
`c.repeat` times. The artifacts' repository runs the project's own ingest and validate on real
photos. What each test checks is read back from the server: run states, task runs, logs,
artifacts.
"""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType, TaskRun

from flows.artifacts import (
    gate_verdict,
    metrics_description,
    metrics_rows,
    summary_for_prefect,
)
from flows.dag import stage_order
from flows.pipeline import pipeline
from imgpipe.reports import evaluation as report
from tests.e2e.helpers import QUIET_ENV, artifacts, eventually, git_dvc_repo, sh

# starts a server or a cluster, or runs the pipeline: `make test-fast` leaves it out
pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
INPUT = PROJECT.parent / "shared" / "datasets" / "mnist-t10k" / "SHA256SUMS"
INPUT_LINES = len(INPUT.read_text().splitlines())
FLOWERS = PROJECT.parent / "shared" / "datasets" / "flowers5-128px" / "flowers"

# Declared downstream first: the flow must order stages by the graph, not by the file.
STAGES = {
    "c": {
        "cmd": 'echo "c repeats ${c.repeat} times"; '
        "for i in $(seq ${c.repeat}); do cat b.txt; done > c.txt",
        "deps": ["b.txt"],
        "params": ["c.repeat"],
        "outs": ["c.txt"],
    },
    "b": {"cmd": "tr a-z A-Z < a.txt > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
    "a": {
        "cmd": 'echo "${a.label}: $(wc -l < input.txt)" > a.txt',
        "deps": ["input.txt"],
        "params": ["a.label"],
        "outs": ["a.txt"],
    },
}
PARAMS = {"a": {"label": "lines"}, "c": {"repeat": 2}}
FAILING_CMD = """python -c "raise SystemExit('boom: bad input')\""""


def make_repo(path: Path, stages: dict = STAGES) -> Path:
    """A committed git + DVC repository at `path` with the given dvc.yaml stages."""
    path.mkdir()
    shutil.copy(INPUT, path / "input.txt")
    return git_dvc_repo(path, stages, PARAMS)


def with_stage(name: str, **changes) -> dict:
    return {**STAGES, name: {**STAGES[name], **changes}}


def task_runs(client: SyncPrefectClient, flow_run_id: UUID) -> dict[str, TaskRun]:
    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    return {run.name: run for run in client.read_task_runs(flow_run_filter=flow_run)}


def task_run_states(client, flow_run_id, expected: dict[str, StateType]) -> dict[str, StateType]:
    """The flow run's task run states by name, once the server shows `expected` (or time is up)."""

    def read() -> dict[str, StateType]:
        return {name: run.state_type for name, run in task_runs(client, flow_run_id).items()}

    eventually(lambda: read() == expected)
    return read()


def logs_containing(client: SyncPrefectClient, flow_run_id: UUID, *texts: str) -> str:
    """The flow run's logs on the server, once they contain every one of `texts`."""

    def read() -> str:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return "\n".join(log.message for log in logs)

    eventually(lambda: all(text in read() for text in texts))
    return read()


def run_flow(repo: Path, **params):
    """Run the flow in this process; return its final state and the flow run's id."""
    state = pipeline(repo=str(repo), return_state=True, **params)
    return state, state.state_details.flow_run_id


def statuses(results: dict) -> dict[str, str]:
    return {stage: result["status"] for stage, result in results.items()}


def test_runs_stale_stages_and_skips_the_rest(prefect_api, client, tmp_path):
    repo = make_repo(tmp_path / "repo")

    started = time.monotonic()
    state, flow_run_id = run_flow(repo)
    wall = time.monotonic() - started
    results = state.result()
    assert list(results) == ["a", "b", "c"]
    assert statuses(results) == {"a": "ran", "b": "ran", "c": "ran"}
    # each stage's own time: a `dvc repro` (a process start, at least), one after the other within the flow's
    seconds = [result["seconds"] for result in results.values()]
    assert min(seconds) > 0.05 and sum(seconds) < wall, (seconds, wall)
    assert (repo / "a.txt").read_text() == f"lines: {INPUT_LINES}\n"
    assert (repo / "c.txt").read_text() == f"LINES: {INPUT_LINES}\n" * 2
    assert client.read_flow_run(flow_run_id).state_type == StateType.COMPLETED
    completed = dict.fromkeys(["a", "b", "c"], StateType.COMPLETED)
    assert task_run_states(client, flow_run_id, completed) == completed
    # the stage's own stdout, streamed into the run's logs on the server
    assert "c repeats 2 times" in logs_containing(client, flow_run_id, "c repeats 2 times")

    state, _ = run_flow(repo)
    assert statuses(state.result()) == {"a": "skipped", "b": "skipped", "c": "skipped"}

    (repo / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "c": {"repeat": 3}}))
    state, _ = run_flow(repo)
    assert statuses(state.result()) == {"a": "skipped", "b": "skipped", "c": "ran"}
    assert (repo / "c.txt").read_text() == f"LINES: {INPUT_LINES}\n" * 3


def test_failing_stage_fails_the_run_and_stops_downstream(prefect_api, client, tmp_path):
    repo = make_repo(tmp_path / "repo", with_stage("b", cmd=FAILING_CMD))

    state, flow_run_id = run_flow(repo)

    assert state.is_failed()
    flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state_type == StateType.FAILED
    assert "boom: bad input" in flow_run.state.message
    # c, downstream of b, never started: no task run, no output
    expected = {"a": StateType.COMPLETED, "b": StateType.FAILED}
    assert task_run_states(client, flow_run_id, expected) == expected
    assert not (repo / "c.txt").exists()
    assert "boom: bad input" in logs_containing(client, flow_run_id, "boom: bad input")


def test_retries_rerun_a_failed_stage_after_doubling_delays(prefect_api, client, tmp_path):
    # b fails on its first two tries: the count lives outside the repository, so DVC ignores it
    tries = tmp_path / "b-tries"
    flaky = (
        f"echo try >> {tries}; "
        f"test $(wc -l < {tries}) -gt 2 || {{ echo 'flaky: try failed' >&2; exit 1; }}; "
    )
    repo = make_repo(tmp_path / "repo", with_stage("b", cmd=flaky + STAGES["b"]["cmd"]))

    state, flow_run_id = run_flow(repo, retries=2, retry_delay_seconds=0.5)

    assert statuses(state.result()) == {"a": "ran", "b": "ran", "c": "ran"}
    completed = dict.fromkeys(["a", "b", "c"], StateType.COMPLETED)
    assert task_run_states(client, flow_run_id, completed) == completed
    b = task_runs(client, flow_run_id)["b"]
    assert b.run_count == 3
    # each retry waited twice as long as the one before: 0.5 s, then 1 s
    waits = [
        (s.state_details.scheduled_time - s.timestamp).total_seconds()
        for s in client.read_task_run_states(b.id)
        if s.name == "AwaitingRetry"
    ]
    assert waits == [pytest.approx(0.5, abs=0.05), pytest.approx(1.0, abs=0.05)]
    assert "flaky: try failed" in logs_containing(client, flow_run_id, "flaky: try failed")


def test_command_line_prints_the_summary_or_the_error(prefect_api, tmp_path):
    env = {**os.environ, **QUIET_ENV, "PREFECT_API_URL": prefect_api}

    def cli(repo: Path) -> subprocess.CompletedProcess:
        imgpipe = Path(sys.executable).with_name("imgpipe")  # the installed command
        command = [imgpipe, "flow", "run", "--repo", str(repo)]
        return subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True)

    repo = make_repo(tmp_path / "good")
    started = time.monotonic()
    done = cli(repo)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    summary = [line.split() for line in done.stdout.splitlines()]
    assert [row[:2] for row in summary] == [["a", "ran"], ["b", "ran"], ["c", "ran"]]
    assert {unit for *_, unit in summary} == {"s"}
    seconds = [float(seconds) for *_, seconds, _ in summary]  # each a `dvc repro`, within the command's run
    assert min(seconds) > 0.05 and sum(seconds) < wall, (seconds, wall)

    failed = cli(make_repo(tmp_path / "bad", with_stage("b", cmd=FAILING_CMD)))
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert "pipeline failed: stage 'b' failed" in failed.stderr
    assert "boom: bad input" in failed.stderr.split("pipeline failed:")[-1]


def test_stage_order_names_stages_as_dvc_repro_takes_them(tmp_path):
    repo = make_repo(tmp_path / "repo")
    # a nested dvc.yaml downstream of c, and a `dvc add`-ed data source, as in the real project
    (repo / "report").mkdir()
    summary = {"cmd": "wc -l < ../c.txt > n.txt", "deps": ["../c.txt"], "outs": ["n.txt"]}
    nested = {"stages": {"summary": summary}}
    (repo / "report" / "dvc.yaml").write_text(yaml.safe_dump(nested))
    (repo / "extra.txt").write_text("more\n")
    sh(sys.executable, "-m", "dvc", "add", "-q", "extra.txt", cwd=repo)

    assert stage_order(repo) == ["extra.txt.dvc", "a", "b", "c", "report/dvc.yaml:summary"]


# --- artifacts: the data-quality summary after validate, the metrics after evaluate ----------

PHOTOS_PER_CLASS = 15
EVALUATION_REPORT = f"{report.FOLDER}/{report.INDEX}"
# A stand-in for evaluate's output (training a model here would take minutes): the figures are
# made up, the format is evaluate's.
METRICS = {
    "accuracy": 0.8125,
    "loss": 0.4321,
    "macro_f1": 0.8011,
    "weighted_f1": 0.8103,
    "num_test": 16,
    "per_class": {
        "daisy": {"precision": 0.9, "recall": 0.75, "f1": 0.8182, "support": 8},
        "rose": {"precision": 0.5, "recall": 1.0, "f1": 0.6667, "support": 2},
        "tulip": {"precision": 0.8333, "recall": 0.8333, "f1": 0.8333, "support": 6},
    },
}


# evaluate's gate, in its format (imgpipe/evaluation/gate.py)
GATE = {
    "verdict": "warned",
    "checks": [
        {"name": "min_accuracy", "value": 0.8125, "threshold": 0.9, "passed": False,
         "detail": "accuracy 0.8125 is 0.0875 below the minimum 0.9000 (evaluate.min_accuracy)"},
        {"name": "min_class_recall", "value": 0.75, "class": "daisy", "threshold": 0.5,
         "passed": True, "detail": "lowest class recall 0.7500 (daisy) >= 0.5000"},
    ],
}
WARNED = (
    "warned (accuracy 0.8125 is 0.0875 below the minimum 0.9000 (evaluate.min_accuracy); "
    "lowest class recall 0.7500 (daisy) >= 0.5000)"
)


def make_pipeline_repo(path: Path) -> Path:
    """The project's own ingest and validate stages (its code and dvc.yaml entries) on real
    photos, two of them bad, and a stand-in evaluate that copies `metrics-in.json` to
    metrics.json. The report paths are moved from their defaults: the artifacts must find them
    through params.yaml."""
    path.mkdir()
    no_cache = shutil.ignore_patterns("__pycache__")
    for package in ("stages", "imgpipe"):
        shutil.copytree(PROJECT / package, path / package, ignore=no_cache)
    (path / "gx").mkdir()  # the validate stage's GX project (a dependency in dvc.yaml)
    for name in ("great_expectations.yml", ".gitignore"):
        shutil.copy(PROJECT / "gx" / name, path / "gx" / name)
    (path / "web").mkdir()  # the pinned Data Docs assets (a dependency of validate in dvc.yaml)
    for name in ("package.json", "package-lock.json"):
        shutil.copy(PROJECT / "web" / name, path / "web" / name)
    for label in ("daisy", "rose", "tulip"):
        (path / "photos" / label).mkdir(parents=True)
        for photo in sorted((FLOWERS / label).iterdir())[:PHOTOS_PER_CLASS]:
            shutil.copy(photo, path / "photos" / label)
    (path / "photos" / "rose" / "broken.jpg").write_text("not a JPEG\n")
    # the same bytes twice: the second copy is quarantined as a duplicate
    shutil.copy(sorted((FLOWERS / "tulip").iterdir())[0], path / "photos" / "tulip" / "copy.jpg")
    (path / "metrics-in.json").write_text(json.dumps(METRICS))

    project = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    stages = {name: project["stages"][name] for name in ("ingest", "validate")}
    report_path = "${paths.reports}/" + EVALUATION_REPORT
    stages["evaluate"] = {
        "cmd": f"mkdir -p $(dirname {report_path}) && echo '<html></html>' > {report_path} && "
        "cp metrics-in.json ${paths.reports}/metrics.json",
        "deps": ["metrics-in.json", "${paths.accepted}"],
        "metrics": [{"${paths.reports}/metrics.json": {"cache": False}}],
    }
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["paths"].update(reports="out/reports", data_quality="out/quality")
    params["ingest"]["source"] = "photos"
    params["validate"]["min_images_per_class"] = 5
    return git_dvc_repo(path, stages, params, extra={"vars": ["params.yaml"]})


def test_publishes_the_data_quality_summary_and_the_metrics(prefect_api, client, tmp_path):
    repo = make_pipeline_repo(tmp_path / "repo")

    state, flow_run_id = run_flow(repo)

    assert statuses(state.result()) == {"ingest": "ran", "validate": "ran", "evaluate": "ran"}
    published = artifacts(client, flow_run_id)
    assert sorted(published) == ["data-quality", "metrics"]
    (quality,) = published["data-quality"]
    assert quality.type == "markdown"
    # validate's own summary.md, found through params.yaml: its lines as they are, but for links
    folder = repo / "out" / "quality"
    page = (folder / "summary.md").read_text()
    assert quality.description == (f"validate: data-quality summary, from {(folder / 'summary.md').resolve()}; "
                                   f"the full page: {(folder / 'index.html').resolve()}")
    assert (folder / "index.html").read_text().startswith("<!doctype html>")
    shown = quality.data.splitlines()
    assert len(shown) == len(page.splitlines())
    assert all(line == mine for line, mine in zip(shown, page.splitlines()) if "](" not in mine)
    assert shown[0] == "# Data quality: passed"
    assert shown[2].startswith("**47** inputs: **45** accepted, **2** quarantined (4.3%).")
    for line in ["| daisy | 15 |", "| rose | 15 |", "| tulip | 15 |", "| unreadable | 1 |", "| duplicate | 1 |"]:
        assert line in shown
    # the Data Docs by their absolute path; each picture inlined, with the bytes of its file
    report = folder / "site" / "index.html"
    assert report.is_file() and "[Data Docs](site/index.html)" in page
    assert f"Data Docs (`{report.resolve()}`)" in quality.data
    linked = re.findall(r"!\[[^\]]*\]\((summary_files/[^)]+)\)", page)
    inlined = re.findall(r"!\[[^\]]*\]\(data:image/(?:png|jpeg);base64,([^)]+)\)", quality.data)
    assert "summary_files/classes.png" in linked and "](summary_files/" not in quality.data
    assert [base64.b64decode(data) for data in inlined] == [(folder / link).read_bytes() for link in linked]
    (metrics,) = published["metrics"]
    assert metrics.type == "table"
    assert metrics.data == [
        {"class": "daisy", "precision": 0.9, "recall": 0.75, "f1": 0.8182, "support": 8},
        {"class": "rose", "precision": 0.5, "recall": 1.0, "f1": 0.6667, "support": 2},
        {"class": "tulip", "precision": 0.8333, "recall": 0.8333, "f1": 0.8333, "support": 6},
    ]
    assert metrics.description == (
        "Test set: 16 images. Accuracy 0.8125, loss 0.4321, macro F1 0.8011, "
        "weighted F1 0.8103. Gate: no gate configured. "
        f"Full report: `{repo / 'out' / 'reports' / EVALUATION_REPORT}`"
    )

    # evaluate's input changes, now with a gate verdict: only evaluate re-runs, and the skipped
    # validate's summary is published again with the new run
    (repo / "metrics-in.json").write_text(json.dumps({**METRICS, "gate": GATE}))
    state, flow_run_id = run_flow(repo)

    assert statuses(state.result()) == {
        "ingest": "skipped", "validate": "skipped", "evaluate": "ran"
    }
    published = artifacts(client, flow_run_id)
    assert published["data-quality"][0].data == quality.data
    assert f"Gate: {WARNED}. Full report: " in published["metrics"][0].description


def test_summary_for_prefect_inlines_pictures_and_makes_file_links_absolute(tmp_path):
    (tmp_path / "summary_files").mkdir()
    (tmp_path / "summary_files" / "a.jpg").write_bytes(b"\xff\xd8 a JPEG")
    page = (
        "# Data quality\n\nSee [Data Docs](site/index.html), [the docs](https://example.org/x), [top](#top).\n\n"
        "| ![cat\\|dog](summary_files/a.jpg) | ![gone](summary_files/gone.jpg) | ![root](/x.png) |\n"
    )

    shown = summary_for_prefect(page, tmp_path)

    jpeg = base64.b64encode(b"\xff\xd8 a JPEG").decode()
    assert shown == (
        f"# Data quality\n\nSee Data Docs (`{tmp_path.resolve() / 'site' / 'index.html'}`), "
        "[the docs](https://example.org/x), [top](#top).\n\n"
        f"| ![cat\\|dog](data:image/jpeg;base64,{jpeg}) "
        f"| (gone: no picture at `{tmp_path.resolve() / 'summary_files' / 'gone.jpg'}`) | ![root](/x.png) |\n"
    )


def test_metrics_rows_and_description():
    assert metrics_rows(METRICS)[1] == {
        "class": "rose", "precision": 0.5, "recall": 1.0, "f1": 0.6667, "support": 2
    }
    assert metrics_description({**METRICS, "gate": GATE}, None) == (
        "Test set: 16 images. Accuracy 0.8125, loss 0.4321, macro F1 0.8011, "
        f"weighted F1 0.8103. Gate: {WARNED}."
    )


def test_gate_verdict_gives_the_verdict_and_each_checks_finding():
    assert gate_verdict(GATE) == WARNED
    assert gate_verdict({"verdict": "blessed", "checks": []}) == "blessed"
    # metrics.json written before the gate existed
    assert gate_verdict(None) == "no gate configured"

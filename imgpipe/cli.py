"""The `imgpipe` command: fetch a dataset, predict with the exported model, drive the Prefect flows.

Why typer: the type-hinted signatures below are the options, and --help documents each with its default.

The stages run through DVC (`dvc repro`), not through this command. TensorFlow, Prefect and DVC
are imported inside the commands that use them, so that `imgpipe --help` starts in a blink.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Literal, NoReturn

import typer

from imgpipe.data import datasets  # light: the standard library and hashlib

app = typer.Typer(
    help=__doc__.splitlines()[0],
    # markdown: a docstring's paragraphs are re-flowed to the terminal's width
    rich_markup_mode="markdown",
    no_args_is_help=True,
    add_completion=False,
    # a bug shows a plain Python traceback: no rich box, no local variables
    pretty_exceptions_enable=False,
)
flow_app = typer.Typer(
    help="Prefect flows, on the server PREFECT_API_URL names (without it, a temporary local one).",
    rich_markup_mode="markdown",
    no_args_is_help=True,
)
app.add_typer(flow_app, name="flow")


def _fail(message: str) -> NoReturn:
    """One line on stderr and exit status 1: the command ran and failed, with a known cause."""
    typer.echo(message, err=True)
    raise typer.Exit(1)


def _dvc_repo(repo: Path) -> Path:
    if not (repo / "dvc.yaml").is_file():
        raise typer.BadParameter(f"{repo}: no dvc.yaml here; --repo must be the pipeline's repository")
    return repo


DvcRepo = Annotated[
    Path, typer.Option(help="root of the DVC repository", callback=_dvc_repo, file_okay=False)
]
RetryDelay = Annotated[
    float, typer.Option("--retry-delay", min=0, help="seconds before the first retry, doubled for each next one")
]
LockTimeout = Annotated[
    float,
    typer.Option("--lock-timeout", min=0, help="seconds each DVC command waits while another process works "
                 "in the repository (a `dvc repro`) before the run fails, naming it"),
]
_VERSION_DATA_HELP = ("first `dvc add` the data `.dvc` files track and commit what changed; after the "
                      "stages, commit dvc.lock and the metrics and plots files; refuses to run while other "
                      "tracked files have uncommitted changes")


# -- data and model --------------------------------------------------------------------------


@app.command()
def fetch(
    dataset: Annotated[
        Literal[tuple(sorted(datasets.DATASETS))], typer.Argument(metavar="DATASET", help="the dataset")
    ],
    folder: Annotated[
        Path, typer.Argument(metavar="FOLDER", help="where its files go (created if missing)", file_okay=False)
    ],
) -> None:
    """Fetch a known public dataset into FOLDER, verified by sha256, ready for `dvc add`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        origin = datasets.fetch(dataset, folder)
    except datasets.FetchError as exc:
        _fail(f"fetch: error: {exc}")
    print(f"{dataset}: {folder} ({origin}; sha256 verified)")


@app.command()
def predict(
    inputs: Annotated[
        list[Path],
        typer.Argument(metavar="IMAGE_OR_FOLDER", help="image files, and folders whose non-hidden files "
                       "(recursively) are predicted", show_default=False),
    ],
    model: Annotated[
        Path | None,
        typer.Option(help="export folder", show_default="evaluate.export_dir of ./params.yaml"),
    ] = None,
    fmt: Annotated[
        Literal["table", "csv", "json"] | None,
        typer.Option("--format", help="output format", show_default="table, or the --output file's suffix"),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="write here instead of stdout", dir_okay=False, show_default="stdout")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per model call")] = 64,
    trust_model: Annotated[
        bool,
        typer.Option("--trust-model", help="load a model with a TF Hub backbone, which runs its SavedModel's "
                     "graph (Keras' safe_mode=False); any other model loads in safe mode regardless"),
    ] = False,
) -> None:
    """Predict the labels of image files with the exported model, preprocessed as the preprocess
    stage does.

    Exit status: 0 when every file got a prediction; 1 when some did not (each has a message on
    stderr and a row with its error); 2 when nothing could run (no model, bad arguments).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import
    from imgpipe.model import predict as p

    fmt = fmt or {".csv": "csv", ".json": "json"}.get(output.suffix if output else "", "table")
    try:
        files = p.list_inputs(map(str, inputs))
        if not files:
            raise p.PredictError(f"no files in {', '.join(map(str, inputs))}")
        loaded, spec = p.load_export(model or p.default_model_dir(), trust_model)
        results = list(p.predict(loaded, spec, files, batch_size))
    except p.PredictError as exc:
        typer.echo(f"predict: error: {exc}", err=True)
        raise typer.Exit(2) from None
    if output:
        with open(output, "w", encoding="utf-8", newline="") as out:
            p.write_results(results, spec["classes"], fmt, out)
    else:
        p.write_results(results, spec["classes"], fmt, sys.stdout)
    failed = sum(1 for r in results if r["error"])
    if failed:
        typer.echo(f"predict: {failed} of {len(results)} file(s) got no prediction (see the messages above)",
                   err=True)
        raise typer.Exit(1)


# -- flows -----------------------------------------------------------------------------------


@flow_app.command("run")
def flow_run(
    repo: DvcRepo = Path("."),
    retries: Annotated[int, typer.Option(min=0, help="retries per stage")] = 0,
    retry_delay: RetryDelay = 10.0,
    version_data: Annotated[bool, typer.Option("--version-data", help=_VERSION_DATA_HELP)] = False,
    lock_timeout: LockTimeout = 3600.0,
) -> None:
    """Run the DVC pipeline as a Prefect flow: one task run per stage, in dependency order.

    Prints one line per stage: its name, ran or skipped, and its seconds.
    """
    from flows.dvc_cli import RepositoryBusy
    from flows.pipeline import StageFailed, pipeline
    from flows.versioning import VersioningError

    try:
        results = pipeline(repo=str(repo), retries=retries, retry_delay_seconds=retry_delay,
                           version_data=version_data, lock_timeout_seconds=lock_timeout)
    except (StageFailed, RepositoryBusy, VersioningError) as exc:
        _fail(f"pipeline failed: {exc}")
    width = max(map(len, results), default=0)
    for stage, result in results.items():
        print(f"{stage:<{width}}  {result['status']:<7}  {result['seconds']:7.2f} s")


@flow_app.command("deploy")
def flow_deploy(
    repo: DvcRepo = Path("."),
    name: Annotated[str, typer.Option(help="deployment name: pipeline/NAME")] = "nightly",
    cron: Annotated[str, typer.Option(help="cron schedule")] = "0 2 * * *",
    timezone: Annotated[str, typer.Option(help="the schedule's time zone")] = "UTC",
    retries: Annotated[int, typer.Option(min=0, help="retries per stage")] = 2,
    retry_delay: RetryDelay = 60.0,
    version_data: Annotated[
        bool, typer.Option("--version-data/--no-version-data", help=f"each run: {_VERSION_DATA_HELP}")
    ] = True,
    lock_timeout: LockTimeout = 3600.0,
) -> None:
    """Register the scheduled pipeline deployment and serve its runs until stopped.

    One run at a time: a run due while another is going waits for it. Stopping it (Ctrl-C or
    SIGTERM) pauses the schedule, so that no runs pile up for a server that nobody serves.
    """
    from flows.deploy import serve

    serve(str(repo), name, cron, timezone, retries, retry_delay, version_data, lock_timeout)


@flow_app.command("experiments")
def flow_experiments(
    experiment: Annotated[
        list[str],
        typer.Option("-e", "--experiment", metavar="OVERRIDES", show_default=False,
                     help="one experiment: its `dvc exp run -S` overrides, space-separated "
                     "(repeat for more experiments)"),
    ],
    repo: DvcRepo = Path("."),
    jobs: Annotated[int, typer.Option("-j", "--jobs", min=1, help="experiments run at a time (DVC's queue)")] = 1,
    dask_workers: Annotated[
        int, typer.Option(min=0, help="run each experiment as a task on a local Dask cluster of this many "
                          "processes (0 = DVC's queue)")] = 0,
    address: Annotated[
        str, typer.Option(help="run each experiment as a task on the Dask cluster of this scheduler, e.g. "
                          "tcp://HOST:8786 (the repository at the same path on its workers)", show_default=False),
    ] = "",
) -> None:
    """Run DVC experiments from Prefect and publish a comparison table (artifact `experiments`).

    Prints one line per experiment, the baseline first: its params that differ and its metrics.
    """
    from flows.experiments import ExperimentFailed, experiments

    if address and dask_workers:
        raise typer.BadParameter("give --dask-workers (a local cluster) or --address (an existing one), not both",
                                 param_hint="'--address'")
    try:
        rows = experiments(repo=str(repo), overrides=[shlex.split(e) for e in experiment], jobs=jobs,
                           dask_workers=dask_workers, address=address)
    except ExperimentFailed as exc:
        _fail(f"experiments failed: {exc}")
    for row in rows:
        print("  ".join(f"{key}={value}" for key, value in row.items()))


@flow_app.command("shard-stats")
def flow_shard_stats(
    ctx: typer.Context,
    repo: Annotated[Path, typer.Option(help="the repository whose params.yaml names the shards")] = Path("."),
    workers: Annotated[int, typer.Option(min=1, help="worker processes of a local Dask cluster")] = 2,
    address: Annotated[
        str | None,
        typer.Option(help="the scheduler of an existing Dask cluster, e.g. tcp://HOST:8786 "
                     "(instead of a local one)", show_default=False),
    ] = None,
) -> None:
    """Per-split statistics of the training shards, one Dask task per shard, checked against
    their meta.json; printed as JSON."""
    from imgpipe.core.errors import StageError
    from imgpipe.core.params import PARAMS_FILE, ParamsError, load_params

    if address and ctx.get_parameter_source("workers").name != "DEFAULT":
        raise typer.BadParameter("give --workers (a local cluster) or --address (an existing one), not both",
                                 param_hint="'--address'")
    try:
        folder = repo / load_params(repo / PARAMS_FILE).paths.shards
    except ParamsError as exc:
        _fail(f"shard statistics failed: {exc}")
    from flows.scaleout import shard_stats, task_runner
    from imgpipe.model.shard_stats import ShardsMismatch

    try:
        summary = shard_stats.with_options(task_runner=task_runner(workers, address))(str(folder))
    except (ShardsMismatch, StageError) as exc:
        _fail(f"shard statistics failed: {exc}")
    print(json.dumps(summary, indent=2))

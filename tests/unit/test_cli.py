"""The installed `imgpipe` command, run as a user runs it: help, usage errors, light start-up."""

import inspect
import os
import signal
import subprocess
import sys
from itertools import takewhile
from pathlib import Path

import pytest

IMGPIPE = Path(sys.executable).with_name("imgpipe")
# wide enough that rich does not wrap a default such as [default: 0 2 * * *]
ENV = {**os.environ, "COLUMNS": "200", "TERMINAL_WIDTH": "200"}


def imgpipe(*args) -> subprocess.CompletedProcess:
    command = [IMGPIPE, *map(str, args)]
    # its own process group, and a timeout: a usage error gone unnoticed would start a flow (and
    # a temporary Prefect server), or serve one for good; all of it is stopped then
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                          start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def plain(text: str) -> str:
    """Rich's boxes and line wrapping out: the words, single-spaced."""
    return " ".join(text.translate(str.maketrans("│╭╮╰╯─", "      ")).split())


def test_help_lists_the_commands():
    done = imgpipe("--help")
    assert done.returncode == 0, done.stderr
    out = plain(done.stdout)
    assert "Usage: imgpipe [OPTIONS] COMMAND" in out
    for command in ("fetch", "predict", "flow"):
        assert f" {command} " in out
    flow = plain(imgpipe("flow", "--help").stdout)
    for command in ("run", "deploy", "experiments", "shard-stats"):
        assert f" {command} " in flow


def test_no_command_shows_the_help():
    done = imgpipe()
    assert "Usage: imgpipe [OPTIONS] COMMAND" in plain(done.stdout + done.stderr)


def _library_defaults() -> dict[tuple[str, ...], dict[str, str]]:
    """Per command, each option's default as the library defines it: the help must show these."""
    from flows import deploy, experiments, pipeline, scaleout
    from imgpipe.model import predict

    flow_run = inspect.signature(pipeline.pipeline.fn).parameters
    jobs = inspect.signature(experiments.experiments.fn).parameters["jobs"].default
    return {
        ("fetch",): {"DATASET": "fashion-mnist", "FOLDER": "[required]"},
        ("predict",): {
            "IMAGE_OR_FOLDER": "[required]",
            "--model": "[default: (evaluate.export_dir of ./params.yaml)]",
            "--format": "table|csv|json",
            "--output": "[default: (stdout)]",
            "--batch-size": f"[default: {predict.BATCH_SIZE}]",
            "--trust-model": "safe_mode=False",
        },
        ("flow", "run"): {
            "--repo": "[default: .]",
            "--retries": f"[default: {flow_run['retries'].default}]",
            "--retry-delay": f"[default: {flow_run['retry_delay_seconds'].default}]",
            # off unless given: a flag shows no default
            "--version-data": "commit dvc.lock",
            "--lock-timeout": f"[default: {flow_run['lock_timeout_seconds'].default}]",
        },
        ("flow", "deploy"): {
            "--repo": "[default: .]",
            "--name": f"[default: {deploy.NAME}]",
            "--cron": f"[default: {deploy.CRON}]",
            "--timezone": f"[default: {deploy.TIMEZONE}]",
            "--retries": f"[default: {deploy.RETRIES}]",
            "--retry-delay": f"[default: {deploy.RETRY_DELAY_SECONDS}]",
            "--version-data": f"[default: {'version-data' if deploy.VERSION_DATA else 'no-version-data'}]",
            "--no-version-data": "each run: first dvc add",
            "--lock-timeout": f"[default: {pipeline.LOCK_TIMEOUT_SECONDS}]",
        },
        ("flow", "experiments"): {
            "--experiment": "[required]",
            "-e": "OVERRIDES",
            "--repo": "[default: .]",
            "--jobs": f"[default: {jobs}]",
            "--dask-workers": "[default: 0]",
            # no default shown: none means DVC's queue
            "--address": "the Dask cluster of this scheduler",
            "-j": "experiments run at a time",
        },
        ("flow", "shard-stats"): {
            "--repo": "[default: .]",
            "--workers": f"[default: {scaleout.LOCAL_CLUSTER['n_workers']}]",
            "--address": "tcp://HOST:8786",
        },
    }


def help_rows(help_text: str) -> dict[str, str]:
    """Each argument or option row of a --help: {name: the row's text, wrapped lines joined}.

    A row starts with its name near the box's left edge; its wrapped lines start further in.
    """
    rows, current = {}, []
    for line in help_text.splitlines():
        if not line.startswith("│"):
            continue
        if line[1:7].strip():
            current = []
            first, *rest = line.strip("│ ").removeprefix("* ").split()
            # the name, then its other spellings (-j for --jobs) up to the metavar or type
            for name in [first, *takewhile(lambda t: t.startswith("-"), rest)]:
                rows[name] = current
        current.append(line.strip("│ "))
    return {name: " ".join(" ".join(lines).split()) for name, lines in rows.items()}


def test_each_commands_help_names_each_option_with_the_librarys_default():
    for command, options in _library_defaults().items():
        done = imgpipe(*command, "--help")
        assert done.returncode == 0, done.stderr
        rows = help_rows(done.stdout)
        assert set(rows) == {*options, "--help"}, f"imgpipe {' '.join(command)} --help:\n{done.stdout}"
        for option, detail in options.items():
            assert detail in rows[option], f"imgpipe {' '.join(command)} --help: {option}: {rows[option]}"


@pytest.fixture
def dvc_repo(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    return tmp_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope"], "No such command 'nope'"),
        (["flow", "nope"], "No such command 'nope'"),
        (["fetch", "mnist", "{tmp}/x"], "'mnist' is not one of 'fashion-mnist'"),
        (["fetch", "fashion-mnist"], "Missing argument 'FOLDER'"),
        (["predict"], "Missing argument 'IMAGE_OR_FOLDER'"),
        (["predict", "x.png", "--format", "xml"], "'xml' is not one of 'table', 'csv', 'json'"),
        (["predict", "x.png", "--batch-size", "0"], "Invalid value for '--batch-size': Input should be greater than or equal to 1"),
        (["predict", "x.png", "--batch-size", "many"], "Invalid value for '--batch-size': Input should be a valid integer"),
        (["flow", "run", "--repo", "{tmp}/nowhere"], "Invalid value for '--repo': {tmp}/nowhere: no dvc.yaml here"),
        (["flow", "run", "--repo", "{repo}", "--retries", "-1"], "Invalid value for '--retries'"),
        (["flow", "run", "--repo", "{repo}", "--lock-timeout", "-1"], "Invalid value for '--lock-timeout'"),
        (["flow", "run", "--repo", "{repo}", "--no-version-data"], "No such option: --no-version-data"),
        (["flow", "deploy", "--repo", "{tmp}"], "Invalid value for '--repo': {tmp}: no dvc.yaml here"),
        (["flow", "deploy", "--repo", "{repo}", "--retry-delay", "-5"], "Invalid value for '--retry-delay'"),
        (["flow", "experiments", "--repo", "{repo}"], "Missing option '-e' / '--experiment'"),
        (["flow", "experiments", "--repo", "{repo}", "-e", "train.epochs=1", "-j", "0"], "Invalid value for '-j' / '--jobs'"),
        (["flow", "shard-stats", "--workers", "3", "--address", "tcp://h:8786"], "--workers (a local cluster) or --address"),
        (["flow", "experiments", "--repo", "{repo}", "-e", "train.epochs=1", "--dask-workers", "2", "--address",
          "tcp://h:8786"], "--dask-workers (a local cluster) or --address"),
        (["flow", "shard-stats", "--bogus"], "No such option: --bogus"),
    ],
)
def test_a_usage_error_names_what_is_wrong_and_exits_2(args, message, tmp_path, dvc_repo):
    fill = {"tmp": tmp_path / "t", "repo": dvc_repo}
    (tmp_path / "t").mkdir()
    done = imgpipe(*(a.format(**fill) for a in args))
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert message.format(**fill) in plain(done.stderr)


def test_shard_stats_without_params_says_so_and_exits_1(tmp_path):
    done = imgpipe("flow", "shard-stats", "--repo", tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip() == f"shard statistics failed: {tmp_path / 'params.yaml'}: params file not found (run from the project root)"


def test_the_command_starts_without_tensorflow_prefect_or_dvc():
    # what `imgpipe --help` imports: the command module alone
    code = "import sys, imgpipe.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'prefect', 'dvc', 'cv2', 'pandas'}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"

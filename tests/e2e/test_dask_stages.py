"""The per-image work of ingest and preprocess on a Dask cluster: the same manifest and shard bytes
as the local pool, with the images read and decoded on the cluster's workers; on a LocalCluster
of two worker processes, and on `dask scheduler` + `dask worker` processes started on loopback as
a user starts them on several machines, one of which is killed half-way."""

import hashlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pandas as pd
import pytest
from distributed import Client, LocalCluster

from imgpipe.core.errors import StageError
from imgpipe.core.params import Split, params_from_dict
from imgpipe.data import ingestion
from imgpipe.data.parallel import Batches
from imgpipe.data.splitting import assign
from stages import ingest, preprocess, rebalance, train
from tests.conftest import SHARED_WEIGHTS
from tests.data.test_ingest import flower_files
from tests.e2e.helpers import S3_ENV, eventually, s3_server

# starts a cluster: `make test-fast` leaves it out
pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
CLASSES = ("daisy", "rose", "tulip")
BUCKET = "imgpipe-photos"
PER_CLASS = 150


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Real photos and their split table (the split's own rules, no state)."""
    tmp = tmp_path_factory.mktemp("dask")
    rows = []
    for c in CLASSES:
        (tmp / "src" / c).mkdir(parents=True)
        for f in flower_files(PER_CLASS, c):
            shutil.copy(f, tmp / "src" / c / f.name)
            rows.append({"id": hashlib.sha1(f.read_bytes()).hexdigest(), "label": c, "path": f"{c}/{f.name}"})
    assign(pd.DataFrame(rows), Split(method="hash", balance=False)).to_csv(tmp / "split.csv", index=False)
    return tmp


def params(world, out, source=None, **runtime):
    # a large blur at a large size makes each image cost ~10 ms, so that a run lasts long enough to kill a worker in
    return params_from_dict({
        "ingest": {"source": source or str(world / "src")},
        "preprocess": {"size": [320, 320], "colour_mode": "rgb", "blur_kernel": 31, "images_per_shard": 64},
        "paths": {"split": str(world / "split.csv"), "shards": str(world / out)},
        "runtime": runtime})


def run(p, caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        preprocess.run(p.preprocess, p.paths, p.ingest, p.runtime)
    return caplog.text


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {e.name: e.read_bytes() for e in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def local(world):
    p = params(world, "local", workers=2)
    preprocess.run(p.preprocess, p.paths, p.ingest, p.runtime)
    return folder_bytes(world / "local")


@pytest.fixture(autouse=True)
def several_ingest_jobs(monkeypatch):
    # 450 files would be one job of DASK_CHUNKSIZE: 128 a job, so that both workers get some
    monkeypatch.setattr(ingestion, "DASK_CHUNKSIZE", 128)


@pytest.fixture(scope="module")
def s3_source(world):
    """The photos in a bucket of an S3 server on loopback, and the environment that reaches it
    (set before the cluster starts: its workers read the photos there); the source's URL."""
    with s3_server(BUCKET) as endpoint, pytest.MonkeyPatch.context() as env:
        for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            env.setenv(name, value)
        client = boto3.client("s3")
        for f in sorted((world / "src").rglob("*.jpg")):
            client.upload_file(str(f), BUCKET, f"photos/{f.relative_to(world / 'src').as_posix()}")
        yield f"s3://{BUCKET}/photos"


@pytest.fixture(scope="module")
def cluster(s3_source):
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster


def test_a_local_cluster_writes_the_local_pools_bytes_on_its_workers(world, local, cluster, caplog):
    workers = set(cluster.scheduler_info["workers"])
    log = run(params(world, "on-cluster", executor="dask", scheduler=cluster.scheduler_address), caplog)
    assert folder_bytes(world / "on-cluster") == local
    assert "decoded on 2 Dask workers" in log, log
    for address in workers:
        assert address in log
    assert f"{3 * PER_CLASS} images decoded" in log
    # this LocalCluster's workers have Dask's default, which costs CPU per file: the stage says so
    assert "the Dask workers run with MALLOC_TRIM_THRESHOLD_=65536" in log, log

    # nothing left to decode: no cluster is started (scheduler "" would start a LocalCluster)
    log = run(params(world, "on-cluster", executor="dask"), caplog)
    assert "shards up to date" in log and "Dask cluster" not in log, log


def test_the_stages_own_local_cluster_leaves_mallocs_trim_threshold_alone(caplog, monkeypatch):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536, which fixes glibc's mmap threshold too: ingest's
    per-file CPU was 1.2-1.45x (bench/RESULTS.md). The LocalCluster a stage starts goes without it."""
    # an in-process nanny (the `cluster` fixture's) leaves the variable in os.environ, where a
    # nanny takes it as the user's own choice; a stage's process starts without it
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with caplog.at_level(logging.WARNING), Batches("dask", 2) as runner:
        assert list(runner.map(os.getenv, [("MALLOC_TRIM_THRESHOLD_",), ("OMP_NUM_THREADS",)])) == [None, "1"]
        # every worker, and the nanny's other settings kept
        assert list(runner._client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values()) == [None, None]
        assert list(runner._client.run(os.getenv, "OMP_NUM_THREADS").values()) == ["1", "1"]
    assert "MALLOC_TRIM_THRESHOLD_" not in caplog.text


def train_params(world, name: str, **runtime):
    """Phase 1 only, on the embedding cache: the head on MobileNet's features of the local shards."""
    return params_from_dict({
        "train": {"backbone": "mobilenet", "weights": str(SHARED_WEIGHTS), "backbone_size": 96, "epochs": 2,
                  "augment_flip": "none", "embedding_cache": True},
        "paths": {"shards": str(world / "local"), "rebalance": str(world / "rebalance"), "split": str(world / "split.csv"),
                  "model": str(world / name / "model.keras"), "train_log": str(world / name / "train_log.csv")},
        "runtime": {"train_cache_dir": str(world / name / "cache"), **runtime}})


def train_run(p) -> str:
    """Train's log, at INFO (a module's fixture has no caplog)."""
    stream, root = io.StringIO(), logging.getLogger()
    handler, level = logging.StreamHandler(stream), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        train.run(p.train, p.paths, p.base, p.runtime)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return stream.getvalue()


def trained(world, name: str) -> tuple[Path, str]:
    """The one embedding cache file of run `name`, and its training log."""
    (cached,) = (world / name / "cache" / "embeddings").glob("*.npy")
    return cached, (world / name / "train_log.csv").read_text()


@pytest.fixture(scope="module")
def trained_here(world, local):
    here = train_params(world, "train-here")
    rebalance.run(here.rebalance, here.paths)
    assert "Dask" not in train_run(here)
    return trained(world, "train-here")


def test_the_embedding_cache_is_computed_on_the_cluster_with_the_same_bytes(world, trained_here, cluster):
    log = train_run(train_params(world, "train-dask", executor="dask", scheduler=cluster.scheduler_address))
    assert "shard files computed on the Dask cluster" in log, log
    assert "do not see the shard files" not in log  # the same machine: the workers read the files
    # the train and val shard files (64 images each), spread over both workers
    assert len(set(cluster.scheduler_info["workers"]) & set(log.split("'"))) == 2, log
    (cached_here, log_here), (cached_dask, log_dask) = trained_here, trained(world, "train-dask")
    assert cached_here.name == cached_dask.name
    assert cached_here.read_bytes() == cached_dask.read_bytes()
    # the same features, so the same head: its training log, epoch by epoch
    assert log_here == log_dask


def ingest_params(world, manifest: str, **runtime):
    return params_from_dict({"ingest": {"source": str(world / "src")},
                             "paths": {"manifest": str(world / manifest)},
                             "runtime": {"ingest_cache_dir": "", **runtime}})


def run_ingest(p, caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ingest.run(p.ingest, p.paths, p.runtime)
    return caplog.text


def test_ingest_on_a_local_cluster_writes_the_local_pools_manifest(world, cluster, caplog, tmp_path):
    run_ingest(ingest_params(world, "local.csv", workers=2), caplog)
    expected = (world / "local.csv").read_bytes()
    assert expected.count(b"\n") == 3 * PER_CLASS + 1

    log = run_ingest(ingest_params(world, "dask.csv", executor="dask", scheduler=cluster.scheduler_address), caplog)
    assert (world / "dask.csv").read_bytes() == expected
    # 450 files in jobs of 128: both workers got some
    assert "described on 2 Dask workers" in log, log

    # with the facts cache: this process looks the files up and stores what the workers found
    cached = ingest_params(world, "cached.csv", executor="dask", scheduler=cluster.scheduler_address,
                           ingest_cache_dir=str(tmp_path / "facts"))
    run_ingest(cached, caplog)
    log = run_ingest(cached, caplog)
    assert (world / "cached.csv").read_bytes() == expected
    assert f"{3 * PER_CLASS} unchanged files not read again" in log, log
    assert "described on" not in log  # nothing was sent to the cluster


def test_the_workers_read_the_raw_images_from_s3(world, local, cluster, s3_source, caplog, tmp_path):
    """A source at an s3:// URL: listed by ingest, read by the Dask workers themselves (no shared
    file system), the same manifest and shards as from the local folder."""
    run_ingest(ingest_params(world, "local.csv", workers=1), caplog)
    on_cluster = {"executor": "dask", "scheduler": cluster.scheduler_address}
    p = params_from_dict({"ingest": {"source": s3_source}, "paths": {"manifest": str(world / "s3.csv")},
                          "runtime": {**on_cluster, "ingest_cache_dir": str(tmp_path / "facts")}})
    log = run_ingest(p, caplog)
    assert (world / "s3.csv").read_bytes() == (world / "local.csv").read_bytes()
    assert "described on 2 Dask workers" in log, log

    # the listing's ETags say nothing changed: no object read again, nothing sent to the cluster
    log = run_ingest(p, caplog)
    assert f"{3 * PER_CLASS} unchanged files not read again" in log, log
    assert "described on" not in log
    # one object replaced by other bytes of the same size (one byte changed): that one is read again
    replaced = sorted((world / "src" / "rose").glob("*.jpg"))[0]
    key = f"photos/rose/{replaced.name}"
    edited = bytearray(replaced.read_bytes())
    edited[len(edited) // 2] ^= 0xFF
    boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=bytes(edited))
    log = run_ingest(p, caplog)
    assert f"{3 * PER_CLASS - 1} unchanged files not read again" in log, log
    changed = pd.read_csv(world / "s3.csv").set_index("path")
    assert changed.loc[f"rose/{replaced.name}", "id"] != hashlib.sha1(replaced.read_bytes()).hexdigest()
    boto3.client("s3").upload_file(str(replaced), BUCKET, key)  # as it was, for the shards below

    log = run(params(world, "from-s3", source=s3_source, **on_cluster), caplog)
    assert folder_bytes(world / "from-s3") == local
    assert f"{3 * PER_CLASS} images decoded" in log and "decoded on 2 Dask workers" in log, log


# how docs/orchestration.md starts workers: without the nanny's MALLOC_TRIM_THRESHOLD_
WORKER_ENV = {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": '{"MALLOC_TRIM_THRESHOLD_": None}'}


def start(*args: str, log: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    # not what an in-process nanny (the `cluster` fixture's) left in os.environ: a user's shell
    inherited = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    env = {**inherited, "PYTHONPATH": str(PROJECT), "DASK_DISTRIBUTED__WORKER__DAEMON": "False", **WORKER_ENV}
    return subprocess.Popen([*prefix, str(Path(sys.executable).with_name("dask")), *args], cwd=PROJECT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_scheduler_and_worker_processes_on_loopback_survive_a_killed_worker(world, local, caplog, tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    procs = [start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                   "--scheduler-file", str(scheduler_file), log=tmp_path / "scheduler.log")]
    try:
        assert eventually(scheduler_file.exists, timeout=60), (tmp_path / "scheduler.log").read_text()
        for i in range(2):
            procs.append(start("worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                               "--no-dashboard", "--host", "127.0.0.1", log=tmp_path / f"worker{i}.log"))
        with Client(scheduler_file=str(scheduler_file)) as client:
            assert eventually(lambda: len(client.scheduler_info()["workers"]) == 2, timeout=60)
            address = client.scheduler.address

            # a third worker joins, and is killed (SIGKILL) once it holds jobs: Dask runs them again elsewhere
            before = set(client.scheduler_info()["workers"])
            procs.append(start("worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                               "--no-dashboard", "--host", "127.0.0.1", log=tmp_path / "victim.log"))
            assert eventually(lambda: len(client.scheduler_info()["workers"]) == 3, timeout=60)
            (victim_address,) = set(client.scheduler_info()["workers"]) - before
            victim = procs[-1]
            killed = threading.Event()

            def kill_when_busy():
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and not client.processing().get(victim_address):
                    time.sleep(0.01)
                held = client.processing().get(victim_address)
                os.killpg(victim.pid, signal.SIGKILL)
                if held:
                    killed.set()

            killer = threading.Thread(target=kill_when_busy, daemon=True)
            killer.start()
            log = run(params(world, "on-loopback", executor="dask", scheduler=address), caplog)
            killer.join(timeout=5)
            run_ingest(ingest_params(world, "loopback-local.csv", workers=1), caplog)
            ingest_log = run_ingest(ingest_params(world, "loopback.csv", executor="dask", scheduler=address), caplog)
        assert killed.is_set() and victim.poll() is not None
        assert folder_bytes(world / "on-loopback") == local
        assert f"{3 * PER_CLASS} images decoded" in log, log
        assert "on the Dask cluster at tcp://127.0.0.1:" in log
        assert "MALLOC_TRIM_THRESHOLD_" not in log + ingest_log  # started as the docs say: no warning
        assert (world / "loopback.csv").read_bytes() == (world / "loopback-local.csv").read_bytes()
        assert "described on 2 Dask workers" in ingest_log, ingest_log
    finally:
        stop_all(procs)


def own_mounts_allowed() -> bool:
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.fixture
def elsewhere(world, s3_source, tmp_path):
    """A scheduler and two workers on loopback, one of them as on another machine without the test's
    files: in its own mount namespace, the test's folder is an empty tmpfs. It reaches the S3 server
    (the environment `s3_source` set). Yields the scheduler's address and that worker's."""
    if not own_mounts_allowed():
        pytest.skip("unshare --mount is not permitted here (it needs CAP_SYS_ADMIN)")
    scheduler_file = tmp_path / "scheduler.json"
    procs = [start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                   "--scheduler-file", str(scheduler_file), log=tmp_path / "scheduler.log")]
    try:
        assert eventually(scheduler_file.exists, timeout=60), (tmp_path / "scheduler.log").read_text()
        worker = ("worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--no-dashboard",
                  "--host", "127.0.0.1")
        hide = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs imgpipe-elsewhere "$0" && exec "$@"', str(world))
        procs.append(start(*worker, "--name", "elsewhere", log=tmp_path / "elsewhere.log", prefix=hide))
        procs.append(start(*worker, "--name", "here", log=tmp_path / "here.log"))
        with Client(scheduler_file=str(scheduler_file)) as client:
            assert eventually(lambda: len(client.scheduler_info()["workers"]) == 2, timeout=60), \
                (tmp_path / "elsewhere.log").read_text()
            (hidden,) = [a for a, w in client.scheduler_info()["workers"].items() if w["name"] == "elsewhere"]
            yield client.scheduler.address, hidden
    finally:
        stop_all(procs)


def test_a_worker_that_does_not_see_the_files(world, local, trained_here, elsewhere, s3_source, caplog):
    """A worker on a machine without the local folders: a local source is one clear error before any job;
    the photos at an S3 URL give the same shards; the shard files go with the embedding jobs."""
    address, hidden = elsewhere
    on_cluster = {"executor": "dask", "scheduler": address}
    unseen = (rf"Dask worker {hidden} does not see {world}/src/\S+ as this machine does: "
              "ingest.source must be on a file system the workers share, at the same path, or a URL")
    with pytest.raises(StageError, match=unseen):
        run_ingest(ingest_params(world, "elsewhere.csv", **on_cluster), caplog)
    assert not (world / "elsewhere.csv").exists()
    with pytest.raises(StageError, match=unseen):
        run(params(world, "elsewhere-shards", **on_cluster), caplog)

    log = run(params(world, "elsewhere-s3", source=s3_source, **on_cluster), caplog)
    assert folder_bytes(world / "elsewhere-s3") == local
    assert "decoded on 2 Dask workers" in log, log

    log = train_run(train_params(world, "train-elsewhere", **on_cluster))
    assert f"Dask workers {hidden} do not see the shard files as this machine does" in log, log
    assert hidden in log.split("files per worker: ")[1], log  # that worker computed some of them
    (cached_here, log_here), (cached, train_log) = trained_here, trained(world, "train-elsewhere")
    assert cached.read_bytes() == cached_here.read_bytes()
    assert train_log == log_here

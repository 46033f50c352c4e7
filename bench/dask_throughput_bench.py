"""Ingest and preprocess on a Dask cluster against the local process pool: the same images, the
same run, side by side (issue 14's throughput benchmark), and what a batch costs on Dask.

Data: `--dataset fashion100k` writes Fashion-MNIST as 100,000 PNG files (the 70,000 images, and
30,000 training images again mirrored, so that no two files are the same), class folders under
train/ and test/; `--dataset flowers5x` the 4,317 flower photos at five JPEG qualities (21,585
files of 128 px: photo-sized decoding). Prepared once in the benchmark folder (bench/workspace.py).

Each round runs each stage (`python -m stages.<stage> --params ...`, as `dvc repro` runs it,
without DVC) four ways, interleaved, from nothing every time (no facts cache, no shards):

- local: `runtime.executor: local`, a pool of 2 worker processes (the default);
- cluster: `runtime.executor: dask` on a running cluster (`dask scheduler` and two `dask worker
  --nthreads 1` processes on loopback, started once by this script, as docs/orchestration.md
  says: without the nanny's MALLOC_TRIM_THRESHOLD_);
- cluster-trimmed: the same on a second such cluster whose workers keep Dask's default
  MALLOC_TRIM_THRESHOLD_=65536 (both clusters idle while the other works);
- local-cluster: `runtime.executor: dask` with `scheduler: ""`, a LocalCluster of 2 processes the
  stage starts and stops itself (its start-up included).

Per run: wall seconds of the whole process (imports included), the stage's own `run()` ("done in
N s" in its log), the CPU seconds of the stage's process and its children (`/usr/bin/time`: with
`cluster`, the Dask workers are not its children, so that is the stage's own process alone: the
part that does not spread over machines), and whether the output is byte for byte the local one.
Then a micro-benchmark: one job per batch of 256 paths, doing nothing but count them, on the
local pool and on the cluster, so the per-batch cost of each is seen alone.

On paper (`paper` in the report): on the running cluster, the CPU the workers (nanny and worker
processes, psutil) and the scheduler spend per image and per job, and the CPU of the stage's own
process in its run() (its log line; TensorFlow's import, measured alone, taken out of
preprocess's), give the expected wall time of ingest + preprocess for 10 million images on 1, 4
and 16 machines of this machine's cores: the workers' and the stage's process's CPU spread over
every core, but never less than the stage's own process (one process, whatever the cluster) or
the scheduler; a lower bound, set against the measured run() on one machine.

    .venv/bin/python bench/dask_throughput_bench.py --dataset fashion100k --rounds 2
"""

from __future__ import annotations

import argparse
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

import cv2
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.workspace import ROOT, SHARED, environment, fashion_splits, run_stage, write_params  # noqa: E402

FLOWERS = SHARED / "datasets" / "flowers5-128px" / "flowers"
WORKER_ENV = {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": '{"MALLOC_TRIM_THRESHOLD_": None}'}
VARIANTS = ("local", "cluster", "cluster-trimmed", "local-cluster")
DATASETS = {
    "fashion100k": {"split.method": "source", "split.max_train_per_class": 0, "split.max_val_per_class": 0},
    "flowers5x": {"split.method": "hash", "split.max_train_per_class": 0, "split.max_val_per_class": 0,
                  "preprocess.colour_mode": "rgb", "preprocess.size": [96, 96]},
}


def write_fashion(raw: Path) -> None:
    """Fashion-MNIST as PNG files, plus the first 30,000 training images mirrored: 100,000 files."""
    for split, images, labels in fashion_splits():
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = raw / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{i:05d}.png"), image)
            if split == "train" and i < 30_000:
                cv2.imwrite(str(folder / f"{i:05d}m.png"), cv2.flip(image, 1))


def write_flowers(raw: Path) -> None:
    for i, src in enumerate(sorted(FLOWERS.glob("*/*.jpg"))):
        image = cv2.imread(str(src), cv2.IMREAD_COLOR)
        (raw / src.parent.name).mkdir(parents=True, exist_ok=True)
        for k, quality in enumerate((95, 85, 75, 65, 55)):
            out = cv2.flip(image, 1) if (i + k) % 2 else image
            cv2.imwrite(str(raw / src.parent.name / f"{src.stem}_q{quality}.jpg"), out,
                        [cv2.IMWRITE_JPEG_QUALITY, quality])


def prepare(name: str) -> Path:
    """The workspace: raw files, then ingest, validate and split run once (the preprocess runs' input)."""
    folder = ROOT / "throughput" / name
    raw = folder / "raw"
    if not (folder / ".prepared").exists():
        shutil.rmtree(folder, ignore_errors=True)
        raw.mkdir(parents=True)
        print(f"writing {name} into {raw} ...", flush=True)
        write_fashion(raw) if name == "fashion100k" else write_flowers(raw)
        write_params(folder, {**DATASETS[name], "ingest.source": str(raw), "runtime.ingest_cache_dir": "",
                              "runtime.workers": 2})
        for stage in ("ingest", "validate", "split"):
            run_stage(folder, stage)
        (folder / ".prepared").touch()
    return folder


def start_cluster(folder: Path, trimmed: bool = False) -> tuple[str, list[subprocess.Popen]]:
    """`dask scheduler` and two single-thread `dask worker` processes on loopback; the scheduler's address.
    `trimmed`: the workers keep the nanny's MALLOC_TRIM_THRESHOLD_=65536 (Dask's default)."""
    dask = str(Path(sys.executable).with_name("dask"))
    scheduler_file = folder / f"scheduler{'-trimmed' if trimmed else ''}.json"
    scheduler_file.unlink(missing_ok=True)
    # the workers as docs/orchestration.md starts them: without the nanny's MALLOC_TRIM_THRESHOLD_
    env = {**environment(), "DASK_DISTRIBUTED__WORKER__DAEMON": "False", **({} if trimmed else WORKER_ENV)}
    log = (folder / f"cluster{'-trimmed' if trimmed else ''}.log").open("w")
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(scheduler_file)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)]
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    for _ in range(2):
        procs.append(subprocess.Popen([dask, "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                                       "--no-dashboard", "--host", "127.0.0.1"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    from distributed import Client

    with Client(scheduler_file=str(scheduler_file)) as client:
        client.wait_for_workers(2, timeout=60)
        return client.scheduler.address, procs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=30)


def runtime_overrides(variant: str, addresses: dict[str, str]) -> dict:
    common = {"runtime.workers": 2, "runtime.ingest_cache_dir": ""}
    if variant == "local":
        return {**common, "runtime.executor": "local"}
    return {**common, "runtime.executor": "dask", "runtime.scheduler": addresses.get(variant, "")}


def output_digest(path: Path) -> str:
    """A digest of a file's bytes, or of a folder's files (names within it and bytes)."""
    if path.is_file():
        return hashlib.sha1(path.read_bytes()).hexdigest()
    digest = hashlib.sha1()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return digest.hexdigest()


def timed_stage(folder: Path, stage: str, params: Path) -> dict:
    """Run one stage in a child process; wall, its run(), CPU and peak RSS of the process tree it waits for."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "TIME %U %S %M", sys.executable, "-m", f"stages.{stage}",
                           "--params", str(params)], cwd=folder, env=environment(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} failed:\n{proc.stderr[-3000:]}")
    user, system, rss = re.findall(r"^TIME ([0-9.]+) ([0-9.]+) (\d+)$", proc.stderr, re.M)[-1]
    work = re.search(rf"{stage}: done in ([0-9.]+) s .*; CPU of this process in it ([0-9.]+) s", proc.stderr)
    return {"wall": round(wall, 2), "run": float(work.group(1)), "own_cpu": float(work.group(2)),
            "cpu": round(float(user) + float(system), 2), "peak_mb": round(int(rss) / 1024)}


def cpu_seconds(procs: list[subprocess.Popen]) -> float:
    """User + system CPU so far of these processes and every process under them (a nanny's worker)."""
    total = 0.0
    for proc in procs:
        try:
            parent = psutil.Process(proc.pid)
            for p in [parent, *parent.children(recursive=True)]:
                times = p.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def tensorflow_import_cpu() -> float:
    """CPU seconds of `import tensorflow` alone: part of preprocess's run(), paid once per run."""
    code = "import time; t = time.process_time(); import tensorflow; print(time.process_time() - t)"
    return float(subprocess.run([sys.executable, "-c", code], env=environment(), capture_output=True, text=True,
                                check=True).stdout.split()[-1])


def per_batch_cost(address: str, batches: int = 400, size: int = 256) -> dict:
    """Seconds per job of a batch of `size` paths that only counts them: local pool vs the cluster."""
    from imgpipe.data.parallel import Batches

    paths = [f"train/class{i % 10}/{i:05d}.png" for i in range(size)]
    jobs = [(paths,)] * batches
    out = {}
    for name, executor, scheduler in (("local", "local", ""), ("cluster", "dask", address)):
        with Batches(executor, 2, scheduler) as runner:
            list(runner.map(len, jobs[:20]))  # start-up and first contact left out
            start = time.perf_counter()
            assert sum(runner.map(len, jobs)) == batches * size
            out[name] = (time.perf_counter() - start) / batches
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="fashion100k")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only print the report of the last run's results.json")
    args = parser.parse_args()

    if args.report:
        return report(json.loads((ROOT / "throughput" / args.dataset / "results.json").read_text()))
    folder = prepare(args.dataset)
    files = sum(1 for _ in open(folder / "data/interim/manifest.csv")) - 1
    print(f"{args.dataset}: {files} files; load average {os.getloadavg()[0]:.1f}", flush=True)
    address, procs = start_cluster(folder)
    trimmed_address, trimmed_procs = start_cluster(folder, trimmed=True)
    addresses = {"cluster": address, "cluster-trimmed": trimmed_address}
    results = {"dataset": args.dataset, "files": files, "runs": [], "load": [os.getloadavg()[0]]}
    try:
        params = {}
        for variant in VARIANTS:
            params[variant] = write_params(folder, {**DATASETS[args.dataset], "ingest.source": str(folder / "raw"),
                                                    "paths.manifest": f"data/interim/manifest-{variant}.csv",
                                                    "paths.shards": f"data/shards-{variant}",
                                                    **runtime_overrides(variant, addresses)},
                                           name=f"params-{variant}.yaml")
        for round_ in range(args.rounds):
            for stage in ("ingest", "preprocess"):
                for variant in VARIANTS:
                    shutil.rmtree(folder / f"data/shards-{variant}", ignore_errors=True)
                    watched = {"cluster": procs, "cluster-trimmed": trimmed_procs}.get(variant, [])
                    before = (cpu_seconds(watched[1:]), cpu_seconds(watched[:1]))
                    row = {"round": round_, "stage": stage, "variant": variant,
                           **timed_stage(folder, stage, params[variant])}
                    if watched:  # the running cluster's workers and scheduler, during this run
                        row["workers_cpu"] = round(cpu_seconds(watched[1:]) - before[0], 2)
                        row["scheduler_cpu"] = round(cpu_seconds(watched[:1]) - before[1], 2)
                    out = folder / (f"data/interim/manifest-{variant}.csv" if stage == "ingest"
                                    else f"data/shards-{variant}")
                    row["digest"] = output_digest(out)
                    results["runs"].append(row)
                    print(f"  round {round_} {stage:10s} {variant:13s} wall {row['wall']:6.1f} s, run() "
                          f"{row['run']:6.1f} s, cpu {row['cpu']:6.1f} s, peak {row['peak_mb']} MB", flush=True)
        results["per_batch"] = per_batch_cost(address)
        results["tf_import_cpu"] = tensorflow_import_cpu()
        results["jobs"] = jobs(folder, args.dataset)
        results["images"] = sum(json.loads((folder / "data/shards-cluster/meta.json").read_text())["counts"].values())
        results["load"].append(os.getloadavg()[0])
    finally:
        stop(procs + trimmed_procs)
    (folder / "results.json").write_text(json.dumps(results, indent=1))  # first: the report can be made again
    report(results)


def jobs(folder: Path, dataset: str) -> dict[str, int]:
    """The jobs each stage sends to Dask: ingest's batches of files, preprocess's per shard file."""
    from imgpipe.core.params import Preprocess
    from imgpipe.data.ingestion import DASK_CHUNKSIZE
    from imgpipe.model.encoding import job_size

    files = sum(1 for _ in open(folder / "data/interim/manifest-cluster.csv")) - 1
    size = job_size(True, Preprocess(size=DATASETS[dataset].get("preprocess.size", [32, 32])))
    meta = json.loads((folder / "data/shards-cluster/meta.json").read_text())
    return {"ingest": -(-files // DASK_CHUNKSIZE),
            "preprocess": sum(-(-entry["count"] // size) for entry in meta["shards"].values())}


def paper(r: dict, images: int = 10_000_000, machines=(1, 4, 16)) -> None:
    """Expected wall time for `images` on machines of this one's cores, from the `cluster` runs' figures.

    The model: the workers' CPU and the stage's own process's CPU spread over every core of the
    machines, but never less than the stage's own process alone (one process on one core,
    whatever the cluster) nor the scheduler's CPU for every job. It assumes the two overlap
    perfectly, so it is a lower bound; on one machine it is set against the measured run() scaled.
    """
    cores = len(os.sched_getaffinity(0))
    counts = {"ingest": r["files"], "preprocess": r["images"]}
    print(f"\non paper: {images:,} images like these, machines of {cores} cores (medians of the `cluster` runs)\n")
    print("| stage | workers' CPU ms/image | stage's process CPU ms/image | scheduler CPU ms/job (jobs) | "
          "1 machine, measured (run() scaled): local pool / cluster | "
          + " | ".join(f"{m} machine{'s' if m > 1 else ''}, model" for m in machines)
          + " | measured / model on 1 machine | stage's process the bound from |")
    print("|---|---|---|---|---|" + "---|" * len(machines) + "---|---|")
    totals, measured_totals = [0.0] * len(machines), [0.0, 0.0]
    for stage in ("ingest", "preprocess"):
        rows = [x for x in r["runs"] if x["stage"] == stage and x["variant"] == "cluster"]
        n = counts[stage]
        worker = float(np.median([x["workers_cpu"] for x in rows])) / n
        own_fixed = r["tf_import_cpu"] if stage == "preprocess" else 0.0
        own = max(float(np.median([x["own_cpu"] for x in rows])) - own_fixed, 0.0) / n
        scheduler = float(np.median([x["scheduler_cpu"] for x in rows])) / r["jobs"][stage]
        per_job = n / r["jobs"][stage]
        measured = [float(np.median([x["run"] for x in r["runs"] if x["stage"] == stage and x["variant"] == v]))
                    * images / n for v in ("local", "cluster")]
        measured_totals = [a + b for a, b in zip(measured_totals, measured)]
        cells = [" / ".join(f"{m / 60:,.0f} min" for m in measured)]
        model = []
        for i, m in enumerate(machines):
            seconds = max((worker + own) * images / (m * cores), own * images, scheduler * images / per_job)
            totals[i] += seconds
            model.append(seconds)
            cells.append(f"{seconds / 60:,.0f} min")
        # the cores of workers from which the stage's own process is the bound
        bound = worker / own if own else float("inf")
        print(f"| {stage} | {worker * 1e3:.3f} | {own * 1e3:.3f} | {scheduler * 1e3:.2f} ({r['jobs'][stage]}) | "
              + " | ".join(cells) + f" | {measured[1] / model[0]:.2f} | {bound:.1f} cores |")
    print("| both | | | | " + " / ".join(f"{m / 60:,.0f} min" for m in measured_totals) + " | "
          + " | ".join(f"{t / 60:,.0f} min" for t in totals) + f" | {measured_totals[1] / totals[0]:.2f} | |")
    print(f"(TensorFlow's import, {r['tf_import_cpu']:.1f} CPU s, is taken out of preprocess's own process)")


def report(r: dict) -> None:
    print(f"\n{r['dataset']}: {r['files']} files, load average {r['load'][0]:.1f} -> {r['load'][1]:.1f}\n")
    print("| stage | variant | wall s (median) | run() s | images/s (run) | x local (run) | CPU s of the stage's "
          "process tree | peak MB | same bytes as local |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stage in ("ingest", "preprocess"):
        rows = {v: [x for x in r["runs"] if x["stage"] == stage and x["variant"] == v] for v in VARIANTS}
        local_run = float(np.median([x["run"] for x in rows["local"]]))
        local_digest = rows["local"][0]["digest"]
        for v in VARIANTS:
            run = float(np.median([x["run"] for x in rows[v]]))
            print(f"| {stage} | {v} | {np.median([x['wall'] for x in rows[v]]):.1f} | {run:.1f} | "
                  f"{r['files'] / run:,.0f} | {local_run / run:.2f} | {np.median([x['cpu'] for x in rows[v]]):.1f} | "
                  f"{max(x['peak_mb'] for x in rows[v])} | "
                  f"{'yes' if all(x['digest'] == local_digest for x in rows[v]) else 'NO'} |")
    pb = r["per_batch"]
    print(f"\nper batch of 256 paths doing nothing: local pool {pb['local'] * 1e3:.2f} ms, "
          f"cluster {pb['cluster'] * 1e3:.2f} ms")
    paper(r)


if __name__ == "__main__":
    main()

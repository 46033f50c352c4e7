"""Training benchmarks: each figure a ratio of two ways of doing the same work, measured side by side.

    python bench/train_bench.py streaming   # shards through tf.data vs the same images in memory
    python bench/train_bench.py seed        # one CSV per image read with np.loadtxt (a seed article) vs shards
    python bench/train_bench.py memory      # peak RSS of a training epoch at 1x and 10x the data
    python bench/train_bench.py cache       # a head-only experiment with and without the embedding cache
    python bench/train_bench.py recipe      # CPU seconds per epoch of each training-recipe element vs none

Data: the workspaces of bench/workspace.py (the project's real stages on Fashion-MNIST and the
flowers photos, prepared on first use). Results go to stdout as one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import workspace  # noqa: E402

# before Keras is imported: it reads KERAS_HOME (the offline ImageNet weights) once
os.environ.update({k: workspace.environment()[k] for k in ("KERAS_HOME", "TF_CPP_MIN_LOG_LEVEL")})

import keras  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from imgpipe.model import shards  # noqa: E402
from imgpipe.model import training  # noqa: E402
from imgpipe.model.builder import build, compile_for_training  # noqa: E402
from imgpipe.core.params import Params, params_from_dict  # noqa: E402


def params_for(folder: Path, **train_params) -> Params:
    """The workspace's params with absolute paths and `train_params` applied."""
    data = yaml.safe_load((folder / "params.yaml").read_text())
    data["paths"] = {k: str(folder / v) for k, v in data["paths"].items()}
    data["train"].update(train_params)
    data["runtime"] = {**data.get("runtime", {}), "train_cache_dir": str(folder / ".cache" / "train")}
    return params_from_dict(data)


class EpochTimes(keras.callbacks.Callback):
    """Wall-clock and CPU seconds (all threads of this process) of each epoch.

    The machine is shared: wall time includes waiting for other processes' load, CPU time
    (the work done) much less so.
    """

    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, epoch, logs=None):
        self.times.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))


def fresh_model(params: Params, meta: dict, recipe: bool = False, steps: int = 1, epochs: int = 1) -> keras.Model:
    """A new training model, compiled plain (Adam, constant rate) or, with `recipe`, with params.train's recipe."""
    keras.utils.set_random_seed(params.base.seed)
    clf = build(len(meta["classes"]), (meta["height"], meta["width"], meta["channels"]), params.train,
                meta["preprocess"]["normalization"], params.base.seed)
    if recipe:
        compile_for_training(clf.training, params.train.learning_rate, params.train, steps, epochs)
    else:
        compile_for_training(clf.training, params.train.learning_rate)
    return clf.training


def fit_epochs(params: Params, meta: dict, data, epochs: int, recipe: bool = False, **fit) -> list[tuple[float, float]]:
    """(wall, CPU) seconds per epoch of a fresh model fitted on `data`, the first epoch (tracing, warm-up) left out."""
    steps = len(data) if recipe else 1  # recipe: a tf.data stream of known length (its batches)
    model, timer = fresh_model(params, meta, recipe, steps, epochs), EpochTimes()
    fit.setdefault("shuffle", False)  # a stream shuffles itself
    model.fit(data, epochs=epochs, callbacks=[*fit.pop("callbacks", []), timer], verbose=0, **fit)
    return timer.times[1:]


def in_memory(folder: Path, meta: dict, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    ds = shards.records(folder, split, meta).batch(1024).map(shards.parse_batch(meta, ("image", "label")))
    batches = list(ds.as_numpy_iterator())
    return np.concatenate([b["image"] for b in batches]), np.concatenate([b["label"] for b in batches])


def medians(times: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    """{variant: {"wall": median wall seconds, "cpu": median CPU seconds}} per epoch."""
    return {k: {clock: round(float(np.median([t[i] for t in v])), 3) for i, clock in enumerate(("wall", "cpu"))}
            for k, v in times.items()}


def ratios(median: dict, numerator: str, denominator: str) -> dict[str, float]:
    return {clock: round(median[numerator][clock] / median[denominator][clock], 3) for clock in ("wall", "cpu")}


def report(**figures) -> None:
    print(json.dumps(figures), flush=True)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# -- streaming vs in memory -----------------------------------------------------------------


def streaming(args) -> None:
    folder = workspace.prepare(args.data)
    models = {"mobilenet-frozen": {"backbone_size": 96},
              "lenet": {"backbone": "lenet", "weights": "none", "backbone_size": 32}}
    for name, settings in models.items():
        params = params_for(folder, embedding_cache=False, **settings)
        shard_folder = Path(params.paths.shards)
        meta = shards.read_meta(shard_folder)
        _, copies = training.read_rebalance(Path(params.paths.rebalance), meta["counts"]["train"])
        x, y = in_memory(shard_folder, meta)
        times = {"memory": [], "stream": [], "stream-nondeterministic": []}
        for _ in range(args.rounds):  # interleaved, so that a burst of load elsewhere hits all alike
            times["memory"] += fit_epochs(params, meta, x, args.epochs, y=y, batch_size=params.train.batch_size,
                                          shuffle=True)
            times["stream"] += fit_epochs(params, meta, training.training_dataset(shard_folder, meta, copies, params.train,
                                                                               params.base.seed), args.epochs)
            fast = params_for(folder, embedding_cache=False, deterministic=False, **settings)
            times["stream-nondeterministic"] += fit_epochs(
                params, meta, training.training_dataset(shard_folder, meta, copies, fast.train, params.base.seed),
                args.epochs)
        median = medians(times)
        report(benchmark="streaming", data=args.data, model=name, images=len(y), epochs_timed=len(times["memory"]),
               seconds_per_epoch=median, stream_over_memory=ratios(median, "stream", "memory"),
               nondeterministic_over_memory=ratios(median, "stream-nondeterministic", "memory"),
               load_average=load_average())


# -- the seed article's reader: one CSV per image, np.loadtxt for every batch ----------------


class CsvBatches(keras.utils.PyDataset):
    """The seed approach: the images as CSV text files, read with np.loadtxt as each batch is needed."""

    def __init__(self, files: list[Path], labels: np.ndarray, batch_size: int, shape: tuple[int, int, int]):
        super().__init__()
        self.files, self.labels, self.batch_size, self.shape = files, labels, batch_size, shape
        self.order = np.arange(len(files))

    def __len__(self):
        return -(-len(self.files) // self.batch_size)

    def __getitem__(self, i):
        chosen = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        images = [np.loadtxt(self.files[j], delimiter=",", dtype=np.float32).reshape(self.shape) for j in chosen]
        return np.stack(images), self.labels[chosen]

    def on_epoch_end(self):
        np.random.shuffle(self.order)


SEED_MODELS = {"fashion": ("lenet", {"backbone": "lenet", "weights": "none", "backbone_size": 32}),
               "flowers96": ("mobilenet-frozen", {"backbone_size": 96})}


def seed(args) -> None:
    folder = workspace.prepare(args.data)
    model_name, settings = SEED_MODELS[args.data]
    params = params_for(folder, embedding_cache=False, **settings)
    shard_folder = Path(params.paths.shards)
    meta = shards.read_meta(shard_folder)
    _, copies = training.read_rebalance(Path(params.paths.rebalance), meta["counts"]["train"])
    x, y = in_memory(shard_folder, meta)
    csv_folder = folder / "csv"
    if not (csv_folder / ".done").exists():
        csv_folder.mkdir(exist_ok=True)
        for i, image in enumerate(x):
            np.savetxt(csv_folder / f"{i}.csv", image.reshape(image.shape[0], -1), delimiter=",", fmt="%.6g")
        (csv_folder / ".done").touch()
    files = [csv_folder / f"{i}.csv" for i in range(len(x))]
    shape = (meta["height"], meta["width"], meta["channels"])

    def csv_batches():
        return CsvBatches(files, y, params.train.batch_size, shape)

    def stream():
        return training.training_dataset(shard_folder, meta, copies, params.train, params.base.seed)

    def read_all(batches) -> float:
        start = time.perf_counter()
        for _ in batches:
            pass
        return time.perf_counter() - start

    reader = {"csv": read_all(csv_batches()[i] for i in range(len(csv_batches()))), "shards": read_all(stream())}
    times = {"csv": [], "shards": []}
    for _ in range(args.rounds):
        times["csv"] += fit_epochs(params, meta, csv_batches(), args.epochs)
        times["shards"] += fit_epochs(params, meta, stream(), args.epochs)
    median = medians(times)
    report(benchmark="seed", data=args.data, model=model_name, images=len(y),
           reader_seconds={k: round(v, 3) for k, v in reader.items()},
           reader_speedup=round(reader["csv"] / reader["shards"], 1), seconds_per_epoch=median,
           epoch_speedup=ratios(median, "csv", "shards"), load_average=load_average())


# -- peak memory at 1x and 10x ----------------------------------------------------------------


def scaled_copy(folder: Path, scale: int) -> Path:
    """A copy of the workspace whose train split holds each image `scale` times (with distinct ids)."""
    out = folder.parent / f"{folder.name}-x{scale}"
    if (out / ".done").exists():
        return out
    shard_out, rebalance_out = out / "data" / "shards", out / "data" / "rebalance"
    shutil.rmtree(out, ignore_errors=True)
    shard_out.mkdir(parents=True)
    rebalance_out.mkdir(parents=True)
    meta = shards.read_meta(folder / "data" / "shards")
    rows = []
    with shards.ShardWriter(shard_out, "train", 2048) as writer:
        for copy in range(scale):
            for image, label, image_id, path in shards.iter_records(folder / "data" / "shards", "train"):
                new_id = image_id if copy == 0 else f"{image_id[:-4]}{copy:04d}"
                writer.write(image, label, new_id, path)
                rows.append((new_id, meta["classes"][label]))
    for split in ("val", "test"):
        for name in meta["files"][split]:
            shutil.copy(folder / "data" / "shards" / name, shard_out / name)
    meta = {**meta, "files": {**meta["files"], "train": writer.files}, "counts": {**meta["counts"], "train": writer.count}}
    (shard_out / "meta.json").write_text(json.dumps(meta))
    (rebalance_out / "copies.csv").write_text("id,label,copies\n" + "".join(f"{i},{lab},1\n" for i, lab in rows))
    (rebalance_out / "plan.json").write_text(json.dumps({"method": "none", "class_weight": None}))
    shutil.copy(folder / "params.yaml", out / "params.yaml")
    (out / ".done").touch()
    return out


def memory(args) -> None:
    folder = workspace.prepare(args.data)
    for scale in (1, 10):
        copy = scaled_copy(folder, scale)
        for how in args.variants.split(","):
            proc = subprocess.run([sys.executable, __file__, "memory-child", str(copy), how, str(args.shuffle_buffer)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(workspace.PROJECT)})
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            print(proc.stdout.strip().splitlines()[-1], flush=True)


def memory_child(args) -> None:
    """One training epoch (frozen MobileNet, no cache: every image goes through the input pipeline)."""
    params = params_for(Path(args.folder), embedding_cache=False, shuffle_buffer=args.shuffle_buffer)
    shard_folder = Path(params.paths.shards)
    meta = shards.read_meta(shard_folder)
    _, copies = training.read_rebalance(Path(params.paths.rebalance), meta["counts"]["train"])
    start = time.perf_counter()
    if args.how == "stream":
        fit_epochs(params, meta, training.training_dataset(shard_folder, meta, copies, params.train, 0), 1)
    else:
        x, y = in_memory(shard_folder, meta)
        fit_epochs(params, meta, x, 1, y=y, batch_size=params.train.batch_size, shuffle=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report(benchmark="memory", how=args.how, images=sum(copies.values()), shuffle_buffer=args.shuffle_buffer,
           peak_rss_mib=round(peak_mib),
           epoch_seconds=round(time.perf_counter() - start, 1), load_average=load_average())


# -- the embedding cache ----------------------------------------------------------------------


def cache(args) -> None:
    """Whole `python -m stages.train` runs of a head-only experiment, as `dvc exp run` makes them."""
    folder = workspace.prepare(args.data)
    shutil.rmtree(folder / ".cache", ignore_errors=True)
    runs = {}
    for name, settings in [("cold cache", {}), ("warm cache", {"learning_rate": 0.002}),
                           ("no cache", {"learning_rate": 0.002, "embedding_cache": False})]:
        params_file = folder / "bench-params.yaml"
        data = yaml.safe_load((folder / "params.yaml").read_text())
        data["train"].update({"epochs": args.epochs, **settings})
        params_file.write_text(yaml.safe_dump(data))
        start = time.perf_counter()
        proc = workspace.run_stage(folder, "train", params_file)
        seconds = time.perf_counter() - start
        # the epoch lines of the log end with "(12.3 s)"
        epoch_seconds = [float(line.rsplit("(", 1)[1].split(" s)")[0]) for line in proc.stderr.splitlines()
                         if " (head): " in line]
        runs[name] = {"stage_seconds": round(seconds, 1), "median_epoch_seconds": float(np.median(epoch_seconds))}
    report(benchmark="cache", data=args.data, epochs=args.epochs, runs=runs,
           stage_speedup=round(runs["no cache"]["stage_seconds"] / runs["warm cache"]["stage_seconds"], 1),
           epoch_speedup=round(runs["no cache"]["median_epoch_seconds"] / runs["warm cache"]["median_epoch_seconds"], 1),
           load_average=load_average())


# -- the training recipe, element by element --------------------------------------------------

# name -> train params over the base set-up; each measured alone against "none"
RECIPE = {
    "none": {},
    "flip": {"augment_flip": "horizontal"},
    "erasing": {"erasing_probability": 0.5},
    "randaugment": {"randaugment_ops": 2, "randaugment_magnitude": 0.3},
    "mixup": {"mixup_alpha": 0.2},
    "cutmix": {"cutmix_alpha": 1.0},
    "label_smoothing": {"label_smoothing": 0.1},
    "adamw": {"optimizer": "adamw", "weight_decay": 0.05},
    "cosine": {"lr_schedule": "cosine", "warmup_epochs": 1.0},
    "ema": {"ema_momentum": 0.999},
    "xla": {"jit_compile": True, "deterministic": False},
}


def recipe(args) -> None:
    """Seconds per epoch of the training model (`--backbone`, on images) with each recipe element
    alone, against none, interleaved round by round so that load elsewhere hits all alike."""
    folder = workspace.prepare(args.data)
    # none: every element off, the defaults' included (flip, label smoothing, cosine)
    base = {"backbone": args.backbone, "weights": "none" if args.backbone in ("auto", "cnn", "lenet") else "imagenet",
            "embedding_cache": False, "epochs": max(args.epochs, 2), "augment_flip": "none", "label_smoothing": 0.0,
            "lr_schedule": "constant", "warmup_epochs": 0.0}
    times = {name: [] for name in RECIPE}
    for _ in range(args.rounds):
        for name, settings in RECIPE.items():
            params = params_for(folder, **{**base, **settings})
            shard_folder = Path(params.paths.shards)
            meta = shards.read_meta(shard_folder)
            _, copies = training.read_rebalance(Path(params.paths.rebalance), meta["counts"]["train"])
            data = training.training_dataset(shard_folder, meta, copies, params.train, params.base.seed,
                                             mix=params.train.mixes)
            data = training.with_targets(data, params.train, len(meta["classes"]))
            if params.train.ema_momentum:  # as train does: the average swapped in at each epoch's end
                fit = {"callbacks": [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)]}
            else:
                fit = {}
            times[name] += fit_epochs(params, meta, data, args.epochs, recipe=True, **fit)
    median = medians(times)
    report(benchmark="recipe", data=args.data, backbone=args.backbone, images=sum(copies.values()),
           epochs_timed=len(times["none"]), seconds_per_epoch=median,
           over_none={name: ratios(median, name, "none") for name in RECIPE if name != "none"},
           load_average=load_average())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, data, epochs in [("streaming", "fashion", 3), ("seed", "fashion", 3), ("memory", "flowers96", 1),
                               ("cache", "fashion", 20), ("recipe", "fashion", 2)]:
        p = sub.add_parser(name)
        p.add_argument("--data", default=data, choices=sorted(workspace.DATASETS))
        p.add_argument("--epochs", type=int, default=epochs)
        p.add_argument("--rounds", type=int, default=2)
        if name == "memory":
            p.add_argument("--shuffle-buffer", type=int, default=4096, help="train.shuffle_buffer (records)")
            p.add_argument("--variants", default="stream,memory", help="stream, memory or both")
        if name == "recipe":
            p.add_argument("--backbone", default="auto", help="train.backbone of the model timed")
    child = sub.add_parser("memory-child")
    child.add_argument("folder")
    child.add_argument("how", choices=("stream", "memory"))
    child.add_argument("shuffle_buffer", type=int)
    args = parser.parse_args()
    {"streaming": streaming, "seed": seed, "memory": memory, "memory-child": memory_child, "cache": cache,
     "recipe": recipe}[
        args.benchmark](args)


if __name__ == "__main__":
    main()

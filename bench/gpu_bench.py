"""Training images per second on a GPU: float32 vs mixed precision vs XLA, and the input pipeline's own rate.

    python bench/gpu_bench.py                       # flowers photos at 96 px, frozen MobileNet fine-tuned
    python bench/gpu_bench.py --data fashion-full --backbone auto

On a machine without a GPU it says so and exits 0 (there is nothing to measure: float16 is
slower than float32 on a CPU, and train falls back to float32 there).

Each variant trains a fresh model of the same set-up on the shards, streamed as `train` streams
them (bench/workspace.py prepares the data with the real stages); the first epoch (tracing,
XLA compilation, cuDNN autotuning) is left out. The input pipeline is timed alone: the same
stream iterated with no model. When its images/s is below a variant's, that variant is starved
by the input (raise the CPU cores, or cache decoded images), not limited by the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import train_bench  # noqa: E402  (sets KERAS_HOME before Keras is imported)
from bench import workspace  # noqa: E402

import tensorflow as tf  # noqa: E402

from imgpipe.model import shards  # noqa: E402
from imgpipe.model import training  # noqa: E402

VARIANTS = {
    "float32": {},
    "mixed_float16": {"mixed_precision": True},
    "xla": {"jit_compile": True, "deterministic": False},
    "mixed_float16+xla": {"mixed_precision": True, "jit_compile": True, "deterministic": False},
}


def input_images_per_second(data, images: int) -> float:
    start = time.perf_counter()
    for _ in data:
        pass
    return images / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="flowers96", choices=sorted(workspace.DATASETS))
    parser.add_argument("--backbone", default="mobilenet", help="train.backbone")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="per variant, the first left out")
    args = parser.parse_args()
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        print(json.dumps({"benchmark": "gpu", "gpus": 0,
                          "message": "no GPU visible to TensorFlow: nothing to measure (see README, Running on a GPU)"}))
        return 0
    folder = workspace.prepare(args.data)
    # the whole backbone learns (or lenet/cnn from scratch): the device does real work every step
    base = {"backbone": args.backbone, "batch_size": args.batch_size, "embedding_cache": False,
            "epochs": args.epochs}
    if args.backbone in ("auto", "cnn", "lenet"):
        base["weights"] = "none"
    results = {}
    for name, settings in VARIANTS.items():
        params = train_bench.params_for(folder, **base, **settings)
        shard_folder = Path(params.paths.shards)
        meta = shards.read_meta(shard_folder)
        _, copies = training.read_rebalance(Path(params.paths.rebalance), meta["counts"]["train"])
        images = sum(copies.values())
        data = training.training_dataset(shard_folder, meta, copies, params.train, params.base.seed)
        with training.precision(params.train.mixed_precision):
            times = train_bench.fit_epochs(params, meta, data, args.epochs, recipe=True)
        wall = sorted(t[0] for t in times)[len(times) // 2]
        results[name] = round(images / wall)
    stream = training.training_dataset(shard_folder, meta, copies, params.train, params.base.seed)
    input_rate = round(input_images_per_second(stream, images))
    print(json.dumps({"benchmark": "gpu", "gpus": len(gpus), "gpu": tf.config.experimental.get_device_details(gpus[0]),
                      "data": args.data, "backbone": args.backbone, "batch_size": args.batch_size, "images": images,
                      "training_images_per_second": results, "input_images_per_second": input_rate,
                      "input_starves": sorted(k for k, v in results.items() if v > input_rate)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

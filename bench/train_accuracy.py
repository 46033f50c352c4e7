"""Test accuracy of named training set-ups, with their exact params and run time.

    python bench/train_accuracy.py flowers-head flowers-finetune-augment fashion-lenet ...
    python bench/train_accuracy.py --list

Each run is the real train stage (`python -m stages.train`) in a workspace of bench/workspace.py;
the test accuracy is the saved model's on the test split, computed here (argmax of its
probabilities), so that it depends on train and the shards only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import workspace  # noqa: E402

os.environ.update({k: workspace.environment()[k] for k in ("KERAS_HOME", "TF_CPP_MIN_LOG_LEVEL")})

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from imgpipe.model import loading  # noqa: E402
from imgpipe.model import shards  # noqa: E402

WEIGHTS = str(workspace.WEIGHTS)  # the offline MobileNet 0.25 file, for sizes Keras has no other file for
HEAD = {"backbone_size": 160, "weights": WEIGHTS, "epochs": 40, "learning_rate": 0.003, "dropout": 0.5}
FINE_TUNE = {"fine_tune_layers": 100, "fine_tune_epochs": 20, "fine_tune_learning_rate": 2e-4}
AUGMENT = {"augment_flip": "horizontal", "augment_rotation": 20.0, "augment_zoom": 0.15, "augment_shift": 0.1,
           "augment_brightness": 0.1, "augment_contrast": 0.1, "augment_in_phase1": False}
ERASING = {"erasing_probability": 0.5}

# name -> (workspace, train params over the project's params.yaml)
SETUPS = {
    "flowers-head": ("flowers128", HEAD),
    "flowers-finetune": ("flowers128", {**HEAD, **FINE_TUNE}),
    "flowers-finetune-augment": ("flowers128", {**HEAD, **FINE_TUNE, **AUGMENT}),
    "flowers-finetune-augment-erasing": ("flowers128", {**HEAD, **FINE_TUNE, **AUGMENT, **ERASING}),
    "fashion-default": ("fashion", {}),
    "fashion-head": ("fashion", {"epochs": 40, "learning_rate": 0.003}),
    "fashion-lenet": ("fashion", {"backbone": "lenet", "weights": "none", "backbone_size": 32, "epochs": 15}),
    "fashion-full-lenet": ("fashion-full", {"backbone": "lenet", "weights": "none", "backbone_size": 32, "epochs": 8,
                                            "batch_size": 128}),
    # the defaults (issue 16): backbone auto (the small cnn here) and its recipe, all 54,000 training images
    "fashion-full-default": ("fashion-full", {}),
}

# Flowers: the recipe (issue 16 item 3, bench/flowers_results.md). Phase 1 as HEAD on cached
# features (augment_in_phase1: false; the default true, with the default flip, would train the
# head on images), then all layers fine-tuned with cosine + warm-up (the defaults).
# A key with a dot is a whole params key (base.seed); the others are train's.
NO_PHASE1_AUGMENT = {"augment_in_phase1": False}
EXPLORE = {
    "flowers-x-lr1e3": {**HEAD, **NO_PHASE1_AUGMENT, **FINE_TUNE, "fine_tune_learning_rate": 1e-3},
    "flowers-x-128-lr1e3-e30": {**HEAD, **NO_PHASE1_AUGMENT, **FINE_TUNE, "backbone_size": 128,
                                "fine_tune_learning_rate": 1e-3, "fine_tune_epochs": 30},
    "flowers-x-128-lr1e3-e30-b32": {**HEAD, **NO_PHASE1_AUGMENT, **FINE_TUNE, "backbone_size": 128,
                                    "fine_tune_learning_rate": 1e-3, "fine_tune_epochs": 30, "batch_size": 32},
    "flowers-x-lr1e3-b32": {**HEAD, **NO_PHASE1_AUGMENT, **FINE_TUNE, "fine_tune_learning_rate": 1e-3, "batch_size": 32},
    "flowers-x-lr1e3-drop02": {**HEAD, **NO_PHASE1_AUGMENT, **FINE_TUNE, "fine_tune_learning_rate": 1e-3, "dropout": 0.2},
}
SETUPS.update({name: ("flowers128", settings) for name, settings in EXPLORE.items()})
# The final recipe: HEAD, then all layers fine-tuned 20 epochs at 1e-3 (cosine from a 1-epoch
# warm-up, both phases), label smoothing 0.1, horizontal flip in phase 2 only, Adam, batch 128,
# head dropout 0.2.
RECIPE = {**HEAD, **NO_PHASE1_AUGMENT, **FINE_TUNE, "dropout": 0.2, "fine_tune_learning_rate": 1e-3,
          "lr_schedule": "cosine",
          "warmup_epochs": 1.0, "label_smoothing": 0.1, "augment_flip": "horizontal", "optimizer": "adam",
          "batch_size": 128}
FLOWERS = {
    "flowers-recipe": RECIPE,  # base.seed 42, the params.yaml default
    "flowers-recipe-seed43": {**RECIPE, "base.seed": 43},
    "flowers-recipe-seed44": {**RECIPE, "base.seed": 44},
    # the ablation: the recipe without one of its parts
    "flowers-ablate-lr2e-4": {**RECIPE, "fine_tune_learning_rate": 2e-4},
    "flowers-ablate-constant-lr": {**RECIPE, "lr_schedule": "constant", "warmup_epochs": 0.0},  # both phases
    "flowers-ablate-no-smoothing": {**RECIPE, "label_smoothing": 0.0},
    "flowers-ablate-no-flip": {**RECIPE, "augment_flip": "none"},
    # no phase 2: no flip either (it was phase 2's only; train refuses an augmentation never used)
    "flowers-ablate-no-finetune": {**RECIPE, "fine_tune_epochs": 0, "augment_flip": "none"},
    "flowers-ablate-dropout05": {**RECIPE, "dropout": 0.5},  # = flowers-x-lr1e3
    # the recipe was under-fitted at its last epoch: longer fine-tuning
    "flowers-x-ft30": {**RECIPE, "fine_tune_epochs": 30},
    # the backbone at the size its ImageNet weights were trained at (2x the compute of 160 px), with
    # fewer fine-tuning epochs to stay near 10 minutes
    "flowers-x-224-ft12": {**RECIPE, "backbone_size": 224, "fine_tune_epochs": 12},
    # under-fitted at 1e-3 (training accuracy 0.81-0.86 at the last epoch): twice the fine-tuning rate
    "flowers-x-ftlr2e3": {**RECIPE, "fine_tune_learning_rate": 2e-3},
    # an exponential moving average of the weights (what is validated and saved): 0.99 averages
    # over about the last 100 of phase 2's 560 steps
    "flowers-x-ema099": {**RECIPE, "ema_momentum": 0.99},
    # its other two seeds: does averaging the weights narrow the recipe's spread over seeds (81.4-75.4%)?
    "flowers-x-ema099-seed43": {**RECIPE, "ema_momentum": 0.99, "base.seed": 43},
    "flowers-x-ema099-seed44": {**RECIPE, "ema_momentum": 0.99, "base.seed": 44},
    # 224 px with the recipe's 20 fine-tuning epochs (the 12-epoch run was still improving at its end)
    "flowers-x-224": {**RECIPE, "backbone_size": 224},
}
SETUPS.update({name: ("flowers128", settings) for name, settings in FLOWERS.items()})


def test_accuracy(folder: Path, params: dict) -> float:
    model = loading.load(folder / params["paths"]["model"], trust=True)  # this run's own model
    meta = shards.read_meta(folder / params["paths"]["shards"])
    ds = shards.records(folder / params["paths"]["shards"], "test", meta).batch(256)
    ds = ds.map(shards.parse_batch(meta, ("image", "label")))
    right = total = 0
    for batch in ds.as_numpy_iterator():
        right += int((model.predict_on_batch(batch["image"]).argmax(axis=1) == batch["label"]).sum())
        total += len(batch["label"])
    return right / total


def run(name: str) -> dict:
    data, settings = SETUPS[name]
    folder = workspace.prepare(data)
    # the project's current params, the data set's, then the set-up's
    overrides = {**workspace.DATASETS[data], **{k if "." in k else f"train.{k}": v for k, v in settings.items()}}
    params_file = workspace.write_params(folder, overrides, f"params-{name}.yaml")
    params = yaml.safe_load(params_file.read_text())
    load_start = round(os.getloadavg()[0], 2)
    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    workspace.run_stage(folder, "train", params_file)
    seconds = time.perf_counter() - start
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = cpu.ru_utime + cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime
    log = pd.read_csv(folder / params["paths"]["reports"] / "train_log.csv")
    best = log.loc[log["val_loss"].idxmin()]
    return {"setup": name, "data": data, "train": settings, "train_seconds": round(seconds),
            "train_cpu_seconds": round(cpu_seconds),
            "test_accuracy": round(test_accuracy(folder, params), 4), "best_epoch": int(best["epoch"]) + 1,
            "best_val_accuracy": round(float(best["val_accuracy"]), 4), "epochs_run": len(log),
            "seed": params["base"]["seed"], "load_average_start": load_start,
            "load_average": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setups", nargs="*", help="names of set-ups (--list shows them)")
    parser.add_argument("--list", action="store_true", help="print the set-ups and their params")
    args = parser.parse_args()
    unknown = sorted(set(args.setups) - set(SETUPS))
    if unknown:
        parser.error(f"unknown set-up(s) {', '.join(unknown)}; known: {', '.join(SETUPS)}")
    if args.list:
        for name, (data, settings) in SETUPS.items():
            print(f"{name}: {data} {json.dumps(settings)}")
    for name in args.setups:
        print(json.dumps(run(name)), flush=True)


if __name__ == "__main__":
    main()

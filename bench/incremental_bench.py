"""Growing data: a full `dvc repro`, then +1% images, then -1%, each timed stage by stage.

The data: the 4,317 flowers photos made 5x larger (each re-encoded at five JPEG qualities, every
other one mirrored: 21,585 files), `split.method: hash`, RGB 96 px, no per-class caps, default
training (frozen MobileNet 0.25, head on cached features). +1%: 216 new files (one more JPEG
quality, 45, of 216 photos spread over the classes: near-copies of images already there, so
they join their groups' splits). -1%: 216 files of the original set deleted.

Each step runs the seven stages one by one, `dvc repro --single-item <stage>` in a real git +
DVC repository (a clone of the project's files, as tests/e2e does), and times each. Right after,
the same command again, with nothing left to do, gives DVC's own fixed cost for that stage
(reading dvc.yaml/params, checking the deps' and outs' hashes from its state database, the lock).
Before +1% and before -1%, the model the gate blessed last seeds the warm start, as the
nightly flow does when new raw data arrives (flows/warm_start.py), so train runs only
train.warm_start_epochs epochs from it; at the end, train and evaluate run once more on the -1%
data from nothing (train.warm_start: false), for the time and test accuracy the warm start saves
and costs (`--cold`: no warm start at all).
After the last step, the data stages are run from nothing (no outputs, the same split state, a
copy of the same raw folder) and their outputs compared byte for byte with the incremental ones.

`--dataset fashion`: Fashion-MNIST written out as PNG files, train/<class>/ and test/<class>/
(70,000 files; `split.method: source`, the default preprocess, no caps), of which every 100th is
held back and is the +1%; -1% deletes 1% of the others. Only the five data stages run, unless
`--train`: then all seven, with the default training (the cnn on all 53,000 training images).

Usage: .venv/bin/python bench/incremental_bench.py [--dataset flowers5x|fashion] [--train] [--cold]
       [--warm-epochs N] [--out FILE]
(flowers5x 10-20 min on 2 cores, fashion ~10 min, with --train about 25). Prints a markdown table; bench/RESULTS.md has
the figures.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


import cv2
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.workspace import ROOT, SHARED, environment, fashion_splits  # noqa: E402
from flows.warm_start import seed  # noqa: E402
from imgpipe.model.warm_start import MODEL  # noqa: E402
from tests.e2e.test_pipeline import make_origin, set_params  # noqa: E402

FLOWERS = SHARED / "datasets" / "flowers5-128px" / "flowers"
QUALITIES = (95, 85, 75, 65, 55)
NEW_QUALITY = 45
STAGES = ("ingest", "validate", "split", "preprocess", "rebalance", "train", "evaluate")
DATA_STAGES = STAGES[:5]
PARAMS = {"split.method": "hash", "split.max_train_per_class": 0, "split.max_val_per_class": 0,
          "preprocess.colour_mode": "rgb", "preprocess.size": [96, 96]}
# the log lines that say how much per-image work a stage did
WORK_LINES = r"inputs listed|shard files kept|nothing to write|embedding cache|predictions:|accepted \d+|set aside|warm start"
# what the from-nothing run is compared on (the data stages' outputs)
COMPARED = ("data/interim/manifest.csv", "data/interim/accepted.csv", "data/interim/split.csv",
            "data/interim/split_state.csv", "data/shards", "data/rebalance")


def reencode(job: tuple[Path, Path, int, bool]) -> None:
    src, dst, quality, mirror = job
    image = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if mirror:
        image = cv2.flip(image, 1)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst), image, [cv2.IMWRITE_JPEG_QUALITY, quality])


FASHION_PARAMS = {"split.method": "source", "split.max_train_per_class": 0, "split.max_val_per_class": 0}


def write_fashion(folder: Path, extra: Path) -> None:
    """Fashion-MNIST as PNG files by split and class; every 100th image into `extra` instead."""
    for split, images, labels in fashion_splits():
        for i, (image, label) in enumerate(zip(images, labels)):
            out = (extra if i % 100 == 0 else folder) / split / f"class{label}" / f"{i:05d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out), image)


def photos() -> list[Path]:
    return sorted(FLOWERS.glob("*/*.jpg"))


def build(raw: Path, qualities, select=lambda i: True) -> None:
    jobs = [(f, raw / f.parent.name / f"{f.stem}_q{q}.jpg", q, (i + k) % 2 == 1)
            for i, f in enumerate(photos()) if select(i) for k, q in enumerate(qualities)]
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(reencode, jobs, chunksize=64))


def dvc_step(repo: Path, env: dict, stage: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=repo, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"dvc repro {stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def shard_files(repo: Path) -> dict[str, tuple[int, int]]:
    folder = repo / "data" / "shards"
    return {e.name: (e.stat().st_ino, e.stat().st_mtime_ns) for e in folder.iterdir()} if folder.is_dir() else {}


def step(name: str, repo: Path, env: dict, stages=STAGES) -> dict:
    before_shards = shard_files(repo)
    before_state = pd.read_csv(repo / "data/interim/split.csv", usecols=["id", "assigned"]) \
        if (repo / "data/interim/split.csv").exists() else None
    row = {"step": name, "stages": {}, "dvc_fixed": {}}
    for stage in stages:
        seconds, out = dvc_step(repo, env, stage)
        ran = f"Running stage '{stage}'" in out
        fixed, again = dvc_step(repo, env, stage)
        assert "Running stage" not in again, f"{stage} ran twice:\n{again}"
        work = re.search(rf"^{stage}: done in ([0-9.]+) s \(process ([0-9.]+) s\)", out, re.M)
        row["stages"][stage] = {"seconds": round(seconds, 2), "ran": ran, "work": float(work.group(1)) if work else 0.0,
                                "process": float(work.group(2)) if work else 0.0,
                                "log": [line for line in out.splitlines() if re.search(WORK_LINES, line)]}
        row["dvc_fixed"][stage] = round(fixed, 2)
        print(f"  {name} {stage}: {seconds:.1f} s (ran: {ran}, its process {row['stages'][stage]['process']:.2f} s, "
              f"its run() {row['stages'][stage]['work']:.2f} s); "
              f"nothing to do: {fixed:.1f} s", flush=True)
        for line in row["stages"][stage]["log"]:
            print("    " + line, flush=True)
    after_shards = shard_files(repo)
    row["shard_files"] = len(after_shards) - 1
    row["shard_files_untouched"] = sum(1 for n, v in after_shards.items() if n != "meta.json" and before_shards.get(n) == v)
    split = pd.read_csv(repo / "data/interim/split.csv", usecols=["id", "assigned", "split"])
    row["images"] = {"accepted": len(split), **split["split"].value_counts().to_dict()}
    metrics = repo / "reports" / "metrics.json"
    if "evaluate" in stages and metrics.is_file():
        row["accuracy"] = json.loads(metrics.read_text())["accuracy"]
    if before_state is not None:
        both = before_state.merge(split, on="id", suffixes=("_before", ""))
        row["moved"] = int((both["assigned_before"].fillna("") != both["assigned"].fillna("")).sum())
    return row


def seed_warm_start(repo: Path, env: dict) -> None:
    """What the nightly flow does when new raw data arrives (flows/warm_start.py): the last blessed
    model into paths.warm_start, `dvc add`-ed (the flow also commits it; the bench commits nothing)."""
    record = seed(repo, "models/model.keras", "models/blessed.json", "data/shards", "models/warm_start",
                  logging.getLogger("bench"))
    print(f"  warm start seeded: {record and record['md5']}", flush=True)
    if record:
        subprocess.run([sys.executable, "-m", "dvc", "add", "-q", f"models/warm_start/{MODEL}"], cwd=repo, env=env,
                       check=True, capture_output=True)


def same_tree(a: Path, b: Path) -> list[str]:
    """Paths under `a` and `b` that differ (missing on one side, or other bytes)."""
    if a.is_file():
        return [] if filecmp.cmp(a, b, shallow=False) else [str(a)]
    names = sorted({p.relative_to(a) for p in a.rglob("*") if p.is_file()} | {p.relative_to(b) for p in b.rglob("*") if p.is_file()})
    return [str(n) for n in names if not ((a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["flowers5x", "fashion"], default="flowers5x")
    parser.add_argument("--cold", action="store_true",
                        help="no warm start (by default the model blessed after each step seeds the next training, "
                             "as the nightly flow does, and -1% is trained once more from nothing to compare)")
    parser.add_argument("--train", action="store_true",
                        help="fashion: all seven stages, default training included (flowers5x always runs them)")
    parser.add_argument("--warm-epochs", type=int, default=None,
                        help="train.warm_start_epochs for this run (default: params.yaml's)")
    parser.add_argument("--out", default=None, help="the figures as JSON (default: incremental-<dataset>.json in the benchmark folder)")
    args = parser.parse_args()

    base = ROOT / "incremental"
    big, extra = base / args.dataset, base / f"{args.dataset}-extra"
    if not (big / ".done").exists() or not (extra / ".done").exists():
        shutil.rmtree(big, ignore_errors=True)
        shutil.rmtree(extra, ignore_errors=True)
        if args.dataset == "fashion":
            write_fashion(big, extra)
        else:
            build(big, QUALITIES)
            build(extra, (NEW_QUALITY,), select=lambda i: i % 20 == 0)
        (big / ".done").touch()
        (extra / ".done").touch()
    files = sorted(p for p in big.rglob("*") if p.is_file() and p.name != ".done")
    new_files = sorted(p for p in extra.rglob("*") if p.is_file() and p.name != ".done")
    params = PARAMS if args.dataset == "flowers5x" else FASHION_PARAMS
    stages = STAGES if args.dataset == "flowers5x" or args.train else DATA_STAGES
    print(f"{len(files)} files, +{len(new_files)} new", flush=True)

    env = {**environment(), "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b", "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    env.pop("PYTHONPATH", None)  # the repository's own copy of the code, as a user runs it
    work = base / f"run-{args.dataset}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    origin = make_origin(work, env)
    repo = work / "repo"
    subprocess.run(["git", "clone", "-q", str(origin), str(repo)], check=True, env=env, capture_output=True)
    raw = repo / "data" / "raw" / args.dataset
    shutil.copytree(big, raw, ignore=shutil.ignore_patterns(".done"), copy_function=os.link)
    set_params(repo, {"ingest.source": f"data/raw/{args.dataset}", **params})
    if args.warm_epochs:
        set_params(repo, {"train.warm_start_epochs": args.warm_epochs})
    # the benchmark's own ingest facts cache and train cache, empty at the start
    set_params(repo, {"runtime.ingest_cache_dir": str(work / "cache" / "ingest"),
                      "runtime.train_cache_dir": str(work / "cache" / "train")})

    warm = "train" in stages and not args.cold
    rows = [step("full", repo, env, stages)]
    for f in new_files:
        dst = raw / f.relative_to(extra)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, dst)
    if warm:
        seed_warm_start(repo, env)
    rows.append(step("+1%", repo, env, stages))
    removed = [raw / f.relative_to(big) for f in files[7::100]][:len(new_files)]
    for f in removed:
        f.unlink()
    if warm:
        seed_warm_start(repo, env)
    rows.append(step("-1%", repo, env, stages))
    cold = None
    if warm:
        # the same data as -1%, trained from nothing: what the warm start saves, and what it costs in accuracy
        set_params(repo, {"train.warm_start": False})
        cold = step("-1% from nothing", repo, env, ("train", "evaluate"))
        set_params(repo, {"train.warm_start": True})

    # from nothing on the same inputs: the same raw files and split state, no other output, no cache
    scratch = work / "scratch"
    subprocess.run(["git", "clone", "-q", str(origin), str(scratch)], check=True, env=env, capture_output=True)
    shutil.copytree(raw, scratch / "data" / "raw" / args.dataset, copy_function=os.link)
    (scratch / "data" / "interim").mkdir(parents=True, exist_ok=True)
    shutil.copy(repo / "data/interim/split_state.csv", scratch / "data/interim/split_state.csv")
    set_params(scratch, {"ingest.source": f"data/raw/{args.dataset}", **params})
    scratch_row = {"step": "from nothing", "stages": {}}
    for stage in DATA_STAGES:
        seconds, _ = dvc_step(scratch, env, stage)
        scratch_row["stages"][stage] = {"seconds": round(seconds, 2), "ran": True}
    differ = [d for name in COMPARED for d in same_tree(repo / name, scratch / name)]
    result = {"dataset": args.dataset, "files": len(files), "new": len(new_files), "removed": len(removed),
              "params": params, "stages": list(stages), "steps": rows, "scratch": scratch_row,
              "differ_from_scratch": differ, "load": os.getloadavg(), "cold": cold}
    out = Path(args.out or ROOT / f"incremental-{args.dataset}.json")
    out.write_text(json.dumps(result, indent=1))
    report(result)


def report(r: dict) -> None:
    full = r["steps"][0]
    print(f"\n{r['dataset']}: {r['files']} files; +{r['new']}, then -{r['removed']}; load average {r['load']}")
    print("`dvc repro --single-item <stage>` wall time, and in brackets the stage's own work (its run(): no "
          "process start-up, imports, or DVC)")
    print("| stage | full run (s) | +1% (s) | ratio | -1% (s) | ratio | DVC's fixed cost (s, nothing to do) |")
    print("|---|---|---|---|---|---|---|")
    for stage in r["stages"]:
        f, fw = full["stages"][stage]["seconds"], full["stages"][stage]["work"]
        cells = []
        for row in r["steps"][1:]:
            s = row["stages"][stage]
            cells += [f"{s['seconds']:.1f} ({s['work']:.2f})" + ("" if s["ran"] else " skipped"),
                      f"{s['seconds'] / f:.2f} ({s['work'] / fw if fw else 0:.3f})"]
        print(f"| {stage} | {f:.1f} ({fw:.2f}) | {' | '.join(cells)} | {full['dvc_fixed'][stage]:.1f} |")
    for group, names in (("data stages", DATA_STAGES), ("all stages", r["stages"])):
        f = sum(full["stages"][s]["seconds"] for s in names)
        parts = [sum(row["stages"][s]["seconds"] for s in names) for row in r["steps"][1:]]
        fixed = sum(full["dvc_fixed"][s] for s in names)
        fw = sum(full["stages"][s]["work"] for s in names)
        works = [sum(row["stages"][s]["work"] for s in names) for row in r["steps"][1:]]
        print(f"| **{group}** | {f:.1f} ({fw:.2f}) | " + " | ".join(
            f"{p:.1f} ({w:.2f}) | {p / f:.2f} ({w / fw:.3f})" for p, w in zip(parts, works)) + f" | {fixed:.1f} |")
        print(f"  {group} without DVC's fixed cost: " + ", ".join(
            f"{(p - fixed) / (f - fixed):.3f}" for p in parts))
    print("\nThe same runs split three ways: DVC's own time (wall less the stage's process), the stage's "
          "process (start-up, imports, its run()), its run(); ratios to the full run's")
    print("| stage | full: DVC / process / run() (s) | " + " | ".join(
        f"{row['step']}: DVC / process / run() (s) | ratio: process (run())" for row in r["steps"][1:]) + " |")
    print("|---|---|" + "---|---|" * (len(r["steps"]) - 1))

    def split3(step: dict, names) -> tuple[float, float, float]:
        wall = sum(step["stages"][s]["seconds"] for s in names)
        process = sum(step["stages"][s]["process"] for s in names)
        return wall - process, process, sum(step["stages"][s]["work"] for s in names)

    for label, names in [(s, [s]) for s in r["stages"]] + [("**data stages**", DATA_STAGES)]:
        fd, fp, fw = split3(full, names)
        cells = [f"{fd:.1f} / {fp:.2f} / {fw:.2f}"]
        for row in r["steps"][1:]:
            d, p, w = split3(row, names)
            cells += [f"{d:.1f} / {p:.2f} / {w:.2f}", f"{p / fp if fp else 0:.3f} ({w / fw if fw else 0:.3f})"]
        print(f"| {label} | {' | '.join(cells)} |")
    for row in r["steps"]:
        print(f"{row['step']}: images {row['images']}; moved {row.get('moved', '-')}; shard files "
              f"{row['shard_files']}, untouched {row['shard_files_untouched']}")
    print(f"differ from a run from nothing: {r['differ_from_scratch'] or 'none'}")
    accuracies = [f"{row['step']} {row['accuracy']:.4f}" for row in r["steps"] if "accuracy" in row]
    if accuracies:
        print("test accuracy: " + ", ".join(accuracies))
    cold = r.get("cold")
    if cold:
        t = cold["stages"]["train"]
        print(f"-1% trained from nothing: train {t['seconds']:.1f} s (process {t['process']:.2f}, run() {t['work']:.2f}), "
              f"test accuracy {cold.get('accuracy', float('nan')):.4f}")


if __name__ == "__main__":
    main()

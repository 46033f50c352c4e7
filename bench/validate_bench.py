"""Validation benchmark: the per-image work of ingest + validate against a bare decode loop.

    python bench/validate_bench.py [--repeats 3] [--sets 1x 10x 512]

Data: the flowers photos (4,317 JPEGs, 128 px) and a set 10x larger made from them in a
temporary folder: each photo, plus 8 copies re-encoded at JPEG quality 97 to 58 and one flipped,
all distinct from each other (checked by sha1; the few photos the set holds twice, under one
label or two, are then ten times there too, as their copies are). A third set, the photos
enlarged to 512 px, shows how the ratio moves with the image size. For each, in the same run and alternating:

- bare: read each file and `cv2.imdecode` it (IMREAD_UNCHANGED: the pixels as stored), in a
  pool of as many processes as ingest uses (forked, OpenCV single-threaded, the same chunks):
  the practical limit of any stage that must decode every image;
- bare same decode: the same loop decoding each file exactly as ingest does (the OpenCV flags
  formats.look picks for it, recorded before the clock starts: for an 8-bit JPEG, straight to
  grey, at 1/2, 1/4 or 1/8 scale when the image is large enough, EXIF orientation ignored): the
  strictest yardstick, the decode alone of what ingest decodes;
- the stages' per-image work, each in its own process: ingest's `run` (listing, sha1, format,
  header, decode, facts, CSV) and validate's per-image part (read the manifest, triage,
  near-duplicate groups), timed after their imports;
- the whole stages as `dvc repro` runs them: `python -m stages.ingest` and `python -m
  stages.validate` in the workspace, from process start to exit (Python and its imports, Great
  Expectations on its four tables, the Data Docs with their offline assets, summary.md and the
  data-quality page with its thumbnails). DVC's own work (hashing deps and outs, dvc.lock) is
  not in it.

Every other repeat runs the stages before the bare loops, so neither side always finds the
files freshly read (this machine's kernel reclaims idle page cache within minutes).
The machine is shared, so besides wall time each measurement records CPU time (its process and
its workers, user + system): the CPU ratio is the cost per image, which other load does not
change. Peak RSS is each process's own (ru_maxrss); for ingest also its largest worker's.
Then ingest re-runs with the facts cache on the 10x set, each after adding 1% new files; last,
the near-duplicate search alone on 10^4 to 10^6 hashes, to show it grows like n, not n^2.
Prints one JSON object per measurement, then the markdown tables of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import workspace  # noqa: E402

FLOWERS = workspace.SHARED / "datasets" / "flowers5-128px" / "flowers"
# odd values: a copy re-encoded at the quality its original was saved with can be the same bytes
QUALITIES = (97, 93, 88, 83, 78, 72, 66, 58)


def make_enlarged(out: Path, side: int = 512) -> int:
    """Each flower photo enlarged to side x side (bicubic) and saved at JPEG quality 90."""
    import cv2

    photos = sorted(FLOWERS.glob("*/*.jpg"))
    for photo in photos:
        image = cv2.resize(cv2.imread(str(photo)), (side, side), interpolation=cv2.INTER_CUBIC)
        (out / photo.parent.name).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / photo.parent.name / photo.name), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return len(photos)


def make_tenfold(out: Path) -> int:
    """Each flower photo and 9 altered copies under `out`; returns the number of files."""
    import cv2

    count = 0
    for photo in sorted(FLOWERS.glob("*/*.jpg")):
        image = cv2.imread(str(photo))
        variants = [photo.read_bytes()]
        variants += [cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes() for q in QUALITIES]
        variants.append(cv2.imencode(".jpg", cv2.flip(image, 1), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
        folder = out / photo.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        assert len({hashlib.sha1(data).digest() for data in variants}) == len(variants), f"{photo}: a copy repeats"
        for i, data in enumerate(variants):
            (folder / f"{photo.stem}-v{i}.jpg").write_bytes(data)
        count += len(variants)
    return count


# --- what runs in a measured child process ---------------------------------------------------

def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have ended (its workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _decode(job: tuple[str, int]) -> int:
    import cv2
    import numpy as np

    path, flags = job
    with open(path, "rb") as fh:
        data = fh.read()
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags).size


def ingest_flags(files: list[str]) -> list[tuple[str, int]]:
    """(file, the OpenCV flags ingest decodes it with): formats.look runs on each file with the
    decode itself replaced by a recorder, so the rule is ingest's own, not a copy of it."""
    from imgpipe.core.params import Ingest
    from imgpipe.images import facts, formats

    jobs, real, max_pixels = [], formats._imdecode, Ingest().max_pixels

    def record(data: bytes, fmt: str, flags: int) -> formats.Decoded:
        jobs.append((path, flags))
        return formats.Decoded(None, "not decoded: only its flags recorded")

    formats._imdecode = record
    try:
        for path in files:
            with open(path, "rb") as fh:
                formats.look(fh.read(), max_pixels, facts.FACTS_SIDE)
    finally:
        formats._imdecode = real
    assert len(jobs) == len(files), "a file ingest would not decode"
    return jobs


def child_bare(source: Path, workers: int, same: bool = False) -> dict:
    """The bare loop: each file decoded unchanged (the pixels as stored), or with `same` as ingest
    decodes it (ingest_flags)."""
    import cv2

    from imgpipe.data import ingestion

    files = [str(p) for p in sorted(source.glob("*/*.jpg"))]
    jobs = ingest_flags(files) if same else [(f, cv2.IMREAD_UNCHANGED) for f in files]
    cv2.setNumThreads(1)  # as ingest does for its workers
    started, cpu = time.perf_counter(), cpu_seconds()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap(_decode, jobs, chunksize=ingestion.CHUNKSIZE):
            pass
    return {"images": len(files), "seconds": time.perf_counter() - started, "cpu": cpu_seconds() - cpu,
            "flags": sorted({flags for _, flags in jobs})}


def child_ingest(folder: Path) -> dict:
    from stages import ingest
    from imgpipe.core.params import load_params

    params = load_params(folder / "params.yaml")
    started, cpu = time.perf_counter(), cpu_seconds()
    ingest.run(params.ingest, params.paths, params.runtime)
    return {"seconds": time.perf_counter() - started, "cpu": cpu_seconds() - cpu,
            "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def child_validate(folder: Path) -> dict:
    from imgpipe.data import validation
    from imgpipe.data.manifest import read_manifest
    from stages import validate
    from imgpipe.core.errors import StageError
    from imgpipe.core.params import load_params

    params = load_params(folder / "params.yaml")
    started, cpu = time.perf_counter(), cpu_seconds()
    result = validation.triage(read_manifest(params.paths.manifest), params.validate)
    per_image, per_image_cpu = time.perf_counter() - started, cpu_seconds() - cpu
    accepted, groups = len(result.accepted), len(result.groups)
    del result  # the stage reads and triages the manifest again: one copy at a time, as under DVC
    started = time.perf_counter()
    try:
        validate.run(params.validate, params.paths, params.ingest)
    except StageError as exc:  # a failed gate is a result, not a benchmark failure
        print(f"validate gate: {str(exc).splitlines()[0]}", file=sys.stderr)
    return {"per_image_seconds": per_image, "per_image_cpu": per_image_cpu,
            "stage_seconds": time.perf_counter() - started,
            "accepted": accepted, "near_duplicate_groups": groups}


def measure_command(stage: str, folder: str) -> dict:
    """`python -m stages.<stage>` in `folder`, as `dvc repro` runs it: wall and CPU time (the
    process and its workers), process start to exit. A failed validate gate is a result."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=folder, env=workspace.environment(),
                          capture_output=True, text=True)
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 and not (stage == "validate" and "data-quality check(s) failed" in proc.stderr):
        raise RuntimeError(f"{stage} failed:\n{proc.stderr[-3000:]}")
    return {"seconds": seconds, "gate_passed": proc.returncode == 0,
            "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}


def measure(kind: str, *args: str) -> dict:
    """Run one measurement in a fresh process; its result plus its peak RSS."""
    if kind.endswith("_command"):
        return measure_command(kind.removesuffix("_command"), *args)
    # in the workspace folder, as DVC runs a stage in its repository (validate keeps its GX project in ./gx)
    cwd = args[0] if kind in ("ingest", "validate") else None
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, *args],
                          env=workspace.environment(), capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(kind: str, args: list[str]) -> None:
    logging_off()
    result = {"bare": lambda: child_bare(Path(args[0]), int(args[1])),
              "bare_same": lambda: child_bare(Path(args[0]), int(args[1]), same=True),
              "ingest": lambda: child_ingest(Path(args[0])),
              "validate": lambda: child_validate(Path(args[0]))}[kind]()
    result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def logging_off() -> None:
    import logging

    logging.disable(logging.WARNING)


# --- the benchmark ---------------------------------------------------------------------------

def bench(name: str, source: Path, folder: Path, repeats: int) -> dict:
    from imgpipe.data.parallel import available_cores

    folder.mkdir(parents=True, exist_ok=True)
    workspace.write_params(folder, {
        "ingest.source": str(source), "paths.manifest": str(folder / "manifest.csv"),
        "paths.accepted": str(folder / "accepted.csv"), "paths.data_quality": str(folder / "data_quality"),
        "runtime.ingest_cache_dir": ""})  # every run a first run: the facts cache is measured apart
    workers = available_cores()
    measure("bare", str(source), str(workers))  # warm-up: the files in the page cache for both
    runs = []
    for i in range(repeats):
        # every other repeat, the stages run first: neither side always gets the warmer page cache
        bare, stages = ["bare", "bare_same"], ["ingest", "validate", "ingest_command", "validate_command"]
        order = bare + stages if i % 2 == 0 else stages + bare
        args = {**dict.fromkeys(bare, (str(source), str(workers))), **dict.fromkeys(stages, (str(folder),))}
        runs.append({kind: measure(kind, *args[kind]) for kind in order})
        print(json.dumps({"data": name, **runs[-1]}), flush=True)
    return summarise(name, runs, workers)


def add_new_photos(source: Path, count: int, quality: int) -> None:
    """`count` new files in `source`: flower photos re-encoded at a quality no other copy has."""
    import cv2

    for photo in sorted(FLOWERS.glob("*/*.jpg"))[:count]:
        data = cv2.imencode(".jpg", cv2.imread(str(photo)), [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
        (source / photo.parent.name / f"{photo.stem}-new{quality}.jpg").write_bytes(data)


def growth(source: Path, folder: Path, repeats: int) -> dict:
    """Ingest re-runs with the facts cache: first runs fill it (each its own empty cache; the
    median is reported), then each repeat adds 1% new files (as a growing data set does between
    two `dvc repro`) and runs ingest again, next to a bare decode of the whole set."""
    from imgpipe.data.parallel import available_cores

    folder.mkdir(parents=True, exist_ok=True)
    workers = available_cores()
    firsts = []
    for i in range(repeats):  # the last one's cache is the one the re-runs use
        workspace.write_params(folder, {"ingest.source": str(source), "paths.manifest": str(folder / "manifest.csv"),
                                        "runtime.ingest_cache_dir": str(folder / f"cache-{i}")})
        firsts.append(measure("ingest", str(folder)))
    first = {"seconds": statistics.median(f["seconds"] for f in firsts)}
    runs = []
    for i in range(repeats):
        images = len(list(source.glob("*/*.jpg")))
        add_new_photos(source, images // 100, quality=51 + 2 * i)  # odd qualities: no copy the set holds
        bare = measure("bare", str(source), str(workers))
        again = measure("ingest", str(folder))
        runs.append({"bare": bare, "ingest": again})
        print(json.dumps({"growth": i, "first": first, **runs[-1]}), flush=True)
    return {"images": runs[-1]["bare"]["images"], "first_s": round(first["seconds"], 2),
            "rerun_s": round(statistics.median(r["ingest"]["seconds"] for r in runs), 2),
            "bare_s": round(statistics.median(r["bare"]["seconds"] for r in runs), 2),
            "first_over_rerun": round(statistics.median(first["seconds"] / r["ingest"]["seconds"] for r in runs), 1),
            "bare_over_rerun": round(statistics.median(r["bare"]["seconds"] / r["ingest"]["seconds"] for r in runs), 1),
            "rerun_cpu_us": round(statistics.median(r["ingest"]["cpu"] / r["bare"]["images"] for r in runs) * 1e6)}


def summarise(name: str, runs: list[dict], workers: int) -> dict:
    """Medians over the runs. A ratio is taken within each run (bare and stages side by side),
    then the median of those: other load on the machine moves both sides of one run alike."""
    images = runs[0]["bare"]["images"]

    def median(values) -> float:
        return statistics.median(values)

    def stage(run, field="seconds"):
        per_image = {"seconds": "per_image_seconds", "cpu": "per_image_cpu"}[field]
        return run["ingest"][field] + run["validate"][per_image]

    def whole(run, field="seconds"):  # the two stage commands, start to exit
        return run["ingest_command"][field] + run["validate_command"][field]

    return {
        "data": name, "images": images, "workers": workers, "repeats": len(runs),
        "bare_images_per_s": round(images / median(r["bare"]["seconds"] for r in runs)),
        "stage_images_per_s": round(images / median(stage(r) for r in runs)),
        "ratios": [round(r["bare"]["seconds"] / stage(r), 2) for r in runs],
        "ratio": round(median(r["bare"]["seconds"] / stage(r) for r in runs), 2),
        # CPU microseconds per image, and their ratio: what the work costs, whatever else runs
        "bare_cpu_us": round(median(r["bare"]["cpu"] for r in runs) / images * 1e6),
        "stage_cpu_us": round(median(stage(r, "cpu") for r in runs) / images * 1e6),
        "cpu_ratio": round(median(r["bare"]["cpu"] / stage(r, "cpu") for r in runs), 2),
        # against the loop decoding as ingest does
        "same_ratios": [round(r["bare_same"]["seconds"] / stage(r), 2) for r in runs],
        "same_ratio": round(median(r["bare_same"]["seconds"] / stage(r) for r in runs), 2),
        "same_cpu_ratio": round(median(r["bare_same"]["cpu"] / stage(r, "cpu") for r in runs), 2),
        "same_flags": runs[0]["bare_same"]["flags"],
        # the whole stages, as `dvc repro` runs them, against the bare loop
        "whole_s": round(median(whole(r) for r in runs), 2),
        "whole_ratios": [round(r["bare"]["seconds"] / whole(r), 2) for r in runs],
        "whole_ratio": round(median(r["bare"]["seconds"] / whole(r) for r in runs), 2),
        "whole_cpu_ratio": round(median(r["bare"]["cpu"] / whole(r, "cpu") for r in runs), 2),
        "ingest_command_s": round(median(r["ingest_command"]["seconds"] for r in runs), 2),
        "validate_command_s": round(median(r["validate_command"]["seconds"] for r in runs), 2),
        "gate_passed": all(r["validate_command"]["gate_passed"] for r in runs),
        "ingest_s": round(median(r["ingest"]["seconds"] for r in runs), 2),
        "validate_per_image_s": round(median(r["validate"]["per_image_seconds"] for r in runs), 2),
        "validate_stage_s": round(median(r["validate"]["stage_seconds"] for r in runs), 2),
        "ingest_rss_mb": round(max(r["ingest"]["rss_mb"] for r in runs)),
        "ingest_worker_rss_mb": round(max(r["ingest"]["worker_rss_mb"] for r in runs)),
        "validate_rss_mb": round(max(r["validate"]["rss_mb"] for r in runs)),
        "accepted": runs[0]["validate"]["accepted"],
        "near_duplicate_groups": runs[0]["validate"]["near_duplicate_groups"],
    }


def near_duplicate_scaling(k: int = 4) -> list[dict]:
    """Seconds to find the close pairs among n random 64-bit hashes plus n/10 copies of them with
    up to k bits flipped."""
    import numpy as np

    from imgpipe.data import near_duplicates

    rows = []
    for n in (10_000, 100_000, 1_000_000):
        rng = np.random.default_rng(n)
        originals = rng.integers(0, 2**63, n, dtype=np.uint64) << np.uint64(1) | rng.integers(0, 2, n, dtype=np.uint64)
        flips = np.zeros(n // 10, dtype=np.uint64)
        for _ in range(k):
            flips |= np.uint64(1) << rng.integers(0, 64, n // 10).astype(np.uint64)
        hashes = np.concatenate([originals, originals[rng.integers(0, n, n // 10)] ^ flips])
        started = time.perf_counter()
        values = np.unique(hashes)
        pairs = near_duplicates.close_pairs(values, k)  # the search; validate then joins the pairs in SQL
        rows.append({"hashes": len(hashes), "distance": k, "seconds": round(time.perf_counter() - started, 2),
                     "close_pairs": len(pairs), "masks": len(near_duplicates.masks(len(hashes), k))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| data | images | bare decode (img/s) | ingest + validate per-image work (img/s) | ratio (runs) | "
             "CPU per image: bare / stages (us) | CPU ratio | vs the bare loop decoding as ingest does: ratio (runs), CPU ratio | "
             "whole stages as `dvc repro` runs them (s): ratio (runs), CPU ratio | "
             "ingest / validate per-image (s); commands: ingest / validate (s) | "
             "peak RSS: ingest, its workers, validate (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['images']:,} | {r['bare_images_per_s']:,} | {r['stage_images_per_s']:,} | "
                     f"**{r['ratio']}** ({', '.join(map(str, r['ratios']))}) | {r['bare_cpu_us']} / "
                     f"{r['stage_cpu_us']} | **{r['cpu_ratio']}** | {r['same_ratio']} ({', '.join(map(str, r['same_ratios']))}), "
                     f"{r['same_cpu_ratio']} | {r['whole_s']}: {r['whole_ratio']} ({', '.join(map(str, r['whole_ratios']))}), "
                     f"{r['whole_cpu_ratio']} | {r['ingest_s']} / {r['validate_per_image_s']}; "
                     f"{r['ingest_command_s']} / {r['validate_command_s']} | {r['ingest_rss_mb']}, "
                     f"{r['ingest_worker_rss_mb']}, {r['validate_rss_mb']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sets", nargs="+", choices=("1x", "10x", "512"), default=["1x", "10x", "512"],
                        help="which data sets to measure (1x and 10x together give the memory ratio)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], args.child[1:])
        return
    with tempfile.TemporaryDirectory(prefix="validate-bench-") as tmp:
        sets = {name: made for key, name, made in (
            ("10x", "flowers altered (10x)", (make_tenfold, Path(tmp) / "flowers-10x")),
            ("512", "flowers enlarged to 512 px", (make_enlarged, Path(tmp) / "flowers-512"))) if key in args.sets}
        for name, (make, folder) in sets.items():
            started = time.perf_counter()
            count = make(folder)
            print(json.dumps({"made": name, "files": count, "seconds": round(time.perf_counter() - started, 1)}),
                  flush=True)
        rows = [bench("flowers (1x)", FLOWERS, Path(tmp) / "1x", args.repeats)] if "1x" in args.sets else []
        rows += [bench(name, folder, Path(tmp) / f"run-{i}", args.repeats)
                 for i, (name, (_, folder)) in enumerate(sets.items())]
        # last: it adds files to the 10x set
        grown = growth(sets["flowers altered (10x)"][1], Path(tmp) / "growth", args.repeats) if "10x" in args.sets else None
    for row in rows:
        print(json.dumps(row))
    print(table(rows))
    if "1x" in args.sets and "10x" in args.sets:
        one, ten = rows[:2]
        for key in ("ingest_rss_mb", "ingest_worker_rss_mb", "validate_rss_mb"):
            print(f"{key}: 10x / 1x = {ten[key] / one[key]:.2f}")
    if grown:
        print(json.dumps(grown))
        print("\n| images after +1% | first ingest (s) | re-run after +1% (s) | bare decode (s) | first / re-run | "
              "bare / re-run | re-run CPU per image (us) |\n|---|---|---|---|---|---|---|")
        print(f"| {grown['images']:,} | {grown['first_s']} | {grown['rerun_s']} | {grown['bare_s']} | "
              f"{grown['first_over_rerun']} | {grown['bare_over_rerun']} | {grown['rerun_cpu_us']} |")
    print("\n| hashes | distance | masks (sorts) | seconds | groups |\n|---|---|---|---|---|")
    for r in near_duplicate_scaling():
        print(f"| {r['hashes']:,} | {r['distance']} | {r['masks']} | {r['seconds']} | {r['groups']:,} |")


if __name__ == "__main__":
    main()

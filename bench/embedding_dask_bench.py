"""Train's embedding cache computed in the stage's process and on a Dask cluster: the same
shards, the same extractor, side by side in one run (issue 14: the embedding computation on Dask).

Data: the `flowers128` workspace (bench/workspace.py: the 4,317 flower photos through ingest ->
rebalance, 128 px RGB shards; train + val: 3,786 images). Extractor: the flowers recipe's, MobileNet
v1 0.25 with the offline ImageNet weights at 160 px (imgpipe.model.builder.build).

Each round fills an empty cache file three ways, interleaved:

- here: `feature_cache.update` in this process (TensorFlow's own threads on every core: the
  default), after one warm-up run;
- cluster: on a running cluster (`dask scheduler` + two `dask worker --nthreads 1` processes on
  loopback, started once by this script and warmed: each worker has imported TensorFlow and
  rebuilt the extractor);
- cluster-cold: on a fresh cluster of the same kind, its start-up and the workers' TensorFlow
  import and extractor rebuild included (what a stage run pays).

Per variant: wall seconds of `update` (reading the shards, computing, writing the cache file),
images per second, and whether the cache file is byte for byte the one computed here.

    .venv/bin/python bench/embedding_dask_bench.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.dask_throughput_bench import start_cluster, stop  # noqa: E402
from bench.workspace import WEIGHTS, prepare  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    folder = prepare("flowers128")

    import numpy as np

    from imgpipe.core.params import Train
    from imgpipe.data.parallel import Batches
    from imgpipe.model import feature_cache, shards
    from imgpipe.model.builder import build

    meta = shards.read_meta(folder / "data" / "shards")
    train = Train(backbone="mobilenet", weights=str(WEIGHTS), backbone_size=160)
    clf = build(len(meta["classes"]), (meta["height"], meta["width"], meta["channels"]), train,
                meta["preprocess"]["normalization"])
    splits = ("train", "val")
    ids = np.concatenate([shards.ids_and_labels(folder / "data" / "shards", s, meta)[0] for s in splits])
    work = Path(tempfile.mkdtemp(prefix="embedding-bench-"))

    def fill(name: str, runner) -> dict:
        path = work / f"{name}.npy"
        path.unlink(missing_ok=True)
        start = time.perf_counter()
        feature_cache.update(path, clf.extractor, folder / "data" / "shards", meta, splits, ids, 128, runner)
        seconds = time.perf_counter() - start
        return {"seconds": round(seconds, 2), "images_per_second": round(len(ids) / seconds, 1), "path": path}

    address, procs = start_cluster(work)
    rows = []
    try:
        with Batches("dask", 2, address) as warm:
            # every worker imports TensorFlow and rebuilds the extractor once; here, Keras traces
            # its predict function once (the first round here was 8.5 s, the next 4.9 s)
            fill("warm-up", warm)
            fill("warm-up-here", None)
            for round_ in range(args.rounds):
                here = fill("here", None)
                on_cluster = fill("cluster", warm)
                (work / f"cold{round_}").mkdir()
                cold_address, cold_procs = start_cluster(work / f"cold{round_}")
                try:
                    with Batches("dask", 2, cold_address) as cold:
                        cold_run = fill("cluster-cold", cold)
                finally:
                    stop(cold_procs)
                for variant, r in (("here", here), ("cluster", on_cluster), ("cluster-cold", cold_run)):
                    same = r["path"].read_bytes() == here["path"].read_bytes()
                    rows.append({"round": round_ + 1, "variant": variant, "seconds": r["seconds"],
                                 "images_per_second": r["images_per_second"], "same_bytes": same,
                                 "ratio_to_here": round(here["seconds"] / r["seconds"], 2)})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(ids)} images (train + val), load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Per-shard work beyond one process: one Prefect task per TFRecord shard, run on a Dask cluster.

The shards that `preprocess` writes are independent files, so work on them maps over them:
`.map()` makes one task run per shard, and prefect-dask's DaskTaskRunner spreads those task runs
over the worker processes of a Dask cluster: a local one by default, or an existing one by its
scheduler's address. Workers on other machines need this project installed and the shard files
at the same path (a shared file system, or a `dvc pull` there first).

The work is imgpipe.model.shard_stats: per split, the records, the records per class and the mean
pixel value, read back from the TFRecords and compared with the counts meta.json claims.

    imgpipe flow shard-stats [--repo PATH] [--workers 2 | --address tcp://HOST:8786]
"""

from pathlib import Path

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect_dask import DaskTaskRunner

from imgpipe.model import shard_stats as stats
from imgpipe.model import shards

# One thread per worker process: TensorFlow decodes in its own threads, and two busy processes
# already fill this project's 2-core machines.
LOCAL_CLUSTER = {"n_workers": 2, "processes": True, "threads_per_worker": 1}


def task_runner(workers: int = LOCAL_CLUSTER["n_workers"], address: str | None = None):
    """A DaskTaskRunner on the existing cluster at `address`, or on a new local one."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={**LOCAL_CLUSTER, "n_workers": workers})


def worker_address() -> str | None:
    """The address of the Dask worker running the caller, or None outside a Dask worker."""
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:
        return None


@task(cache_policy=NO_CACHE)
def shard_statistics(folder: str, split: str, file: str) -> dict:
    """Statistics of one shard file of `split`, and the Dask worker that computed them."""
    return {**stats.shard_statistics(folder, split, file), "worker": worker_address()}


@flow(name="shard-statistics", task_runner=task_runner())
def shard_stats(folder: str) -> dict[str, dict]:
    """Per split of the shard folder: shards, records, records per class, pixel mean and the Dask
    workers that read them, one task run per shard. Raises ShardsMismatch when the shards
    disagree with their meta.json."""
    folder = str(Path(folder).resolve())
    meta = shards.read_meta(folder)
    work = stats.shard_files(meta)
    futures = shard_statistics.map(
        unmapped(folder), [split for split, _ in work], [file for _, file in work]
    )
    return stats.checked_summary(folder, futures.result(), meta)

"""Per-image work in batches, on a local process pool or on a Dask cluster, results in order.

`Batches(executor, workers, scheduler).map(fn, jobs)` calls `fn(*job)` for each job on a worker
and yields the results in the order of `jobs`, with a bounded number of jobs in flight (2 per
worker locally, 8 on Dask, whose round trips are longer; so a stage streams: memory does not grow
with the data); `submit` and `result` do the same one job
at a time, for callers that keep their own window. The same function on the same jobs gives
the same results whichever runs it, so the outputs do not depend on the executor.
`share(obj)` hands every job one large object (a model's weights) without sending it with each
job: `map(fn, jobs, shared)` calls `fn(shared_obj, *job)`; on Dask the object is sent once to
every worker (`Client.scatter(broadcast=True)`).

- local: a `concurrent.futures` process pool; its workers are started by a fork server, so they
  never inherit the caller's threads (TensorFlow's, in preprocess).
- dask: a `distributed.Client` on the scheduler at `scheduler` (`dask scheduler` on one machine,
  `dask worker tcp://host:8786` on each of the others), or on a `LocalCluster` of `workers`
  processes when it is empty; connected (or started) at the first job, so a run with nothing to
  do starts nothing. Dask retries a job whose worker died (distributed.scheduler.
  allowed-failures, 3 by default); `fn` must be importable on the workers (install imgpipe there).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import multiprocessing
import os
import pickle
from typing import Callable, Iterable, Iterator

log = logging.getLogger(__name__)
DASK_JOBS_PER_WORKER = 8
# Dask's nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536 (to hand freed memory back to
# the system). Setting it at all fixes glibc's mmap threshold too, and the per-file work then
# maps and unmaps its buffers: ingest's per-file CPU was 1.2-1.45x that of a plain process here
# (bench/RESULTS.md). The stage's own LocalCluster leaves it unset; other clusters are told.
UNTRIMMED = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
_NOTHING = object()  # no shared object (never sent: a job without one gets no such argument)


def available_cores() -> int:
    """The CPU cores this process may run on (fewer than the machine's in a container or cgroup)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Batches:
    def __init__(self, executor: str = "local", workers: int = 1, scheduler: str = ""):
        self.executor, self.workers, self.scheduler = executor, max(workers, 1), scheduler
        self._pool = self._client = self._cluster = None
        self.where: collections.Counter = collections.Counter()  # jobs done per Dask worker address
        # jobs in flight per worker: a job's round trip through a Dask scheduler costs milliseconds
        # (14 ms at load 9 on 2 cores, bench/RESULTS.md), against 0.2 ms through a local pool's pipe
        self.in_flight = (DASK_JOBS_PER_WORKER if executor == "dask" else 2) * self.workers

    def __enter__(self) -> "Batches":
        return self

    @property
    def on_dask(self) -> bool:
        return self.executor == "dask"

    def _dask(self):
        # connected at the first job, so that a run with nothing to decode starts no cluster
        if self._client is None:
            from distributed import Client, LocalCluster

            if self.scheduler:
                self._client = Client(self.scheduler)
            else:
                import dask

                with dask.config.set(UNTRIMMED):
                    self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                                 dashboard_address=None)
                self._client = Client(self._cluster)
            self.workers = max(len(self._client.scheduler_info()["workers"]), 1)
            self.in_flight = DASK_JOBS_PER_WORKER * self.workers
            log.info("on the Dask cluster at %s: %d workers", self._client.scheduler.address, self.workers)
            # os.getenv goes by reference: the scheduler and workers unpickle it without imgpipe
            trimmed = {v for v in self._client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values() if v is not None}
            if trimmed:
                log.warning("the Dask workers run with MALLOC_TRIM_THRESHOLD_=%s (the nanny's default), which "
                            "makes each file's work 1.2-1.45x the CPU (bench/RESULTS.md); start them with "
                            "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON='{\"MALLOC_TRIM_THRESHOLD_\": None}' "
                            "(docs/orchestration.md)", ",".join(sorted(trimmed)))
        return self._client

    def _local_pool(self):
        # started at the first job, so that a run with nothing to decode starts no process
        if self._pool is None and self.workers > 1:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("forkserver"))
        return self._pool

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()

    def share(self, obj):
        """A handle on `obj` for `map`/`submit`'s `shared`: on Dask, a copy held by every worker."""
        if self.on_dask:
            return self._dask().scatter(obj, broadcast=True, hash=False)
        return obj

    def map(self, fn: Callable, jobs: Iterable[tuple], shared=_NOTHING) -> Iterator:
        """fn(*job) (or fn(shared, *job)) for each job, in order, with at most `in_flight` jobs in flight."""
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(self.submit(fn, job, shared))
            if len(pending) >= self.in_flight:
                yield self.result(pending.popleft())
        while pending:
            yield self.result(pending.popleft())

    def submit(self, fn: Callable, job: tuple, shared=_NOTHING):
        """Start fn(*job), or fn(shared, *job) with a handle from `share` (with one worker: later, in
        this process, when its result is asked for)."""
        if self.on_dask:
            # The job goes pickled, as one bytes argument: Dask's client walks every argument it
            # is given, item by item, looking for futures inside (dask._task_spec.parse_input), and
            # on batches of 1,024 file records that walk took almost half of ingest's process (a
            # cProfile: 800,784 calls, 5.4 s of 12 s). pure=False: two jobs with equal arguments
            # are still two jobs.
            # The shared object's future is the one argument Dask resolves (to the worker's copy).
            extra = () if shared is _NOTHING else (shared,)
            return self._dask().submit(_on_worker, fn, pickle.dumps(job, pickle.HIGHEST_PROTOCOL), *extra, pure=False)
        if shared is not _NOTHING:
            job = (shared, *job)
        if self._local_pool() is not None:
            return self._pool.submit(fn, *job)
        return lambda: fn(*job)

    def result(self, handle):
        """What `submit` started, once done; a job's exception is raised here."""
        if self.on_dask:
            address, result = pickle.loads(handle.result())
            self.where[address] += 1
            return result
        return handle() if callable(handle) else handle.result()


def _on_worker(fn: Callable, job: bytes, *shared):
    """fn(*shared, *job) on a Dask worker, `job` pickled, with the worker's address (which
    `Batches.where` counts), pickled too: one bytes object, which Dask sends as it is. Returned
    as a tuple holding a list of 1,024 pixel strings, Dask serialised the list's items one by
    one, and preprocess's own process spent about 3 s more CPU on 68,759 images on the cluster
    than in the local pool (bench/RESULTS.md)."""
    from distributed import get_worker

    return pickle.dumps((get_worker().address, fn(*shared, *pickle.loads(job))), pickle.HIGHEST_PROTOCOL)

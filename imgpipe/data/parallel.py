"""Per-image work in batches, on a local process pool or on a Dask cluster, results in order.

`Batches(executor, workers, scheduler).map(fn, jobs)` calls `fn(*job)` for each job on a worker
and yields the results in the order of `jobs`, with a bounded number of jobs in flight (2 per
worker locally, 8 on Dask, whose round trips are longer; so a stage streams: memory does not grow
with the data); `submit` and `result` do the same one job
at a time, for callers that keep their own window. The same function on the same jobs gives
the same results whichever runs it, so the outputs do not depend on the executor.
`share(obj)` hands every job one large object (a model's weights) without sending it with each
job: `map(fn, jobs, shared)` calls `fn(shared_obj, *job)`; on Dask the object is sent once to
every worker (`Client.scatter(broadcast=True)`); `map(..., sent=f)` sends each job its own
large object f(job) (a file's bytes) straight to the worker that runs it. `unseen(paths)` says
which Dask workers do not see files as they are here: workers on other machines reach a local
path only through a file system they share at the same path.

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

from imgpipe.core.errors import StageError

log = logging.getLogger(__name__)
DASK_JOBS_PER_WORKER = 8
# Dask's nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536 (to hand freed memory back to
# the system). Setting it at all fixes glibc's mmap threshold too, and the per-file work then
# maps and unmaps its buffers: ingest's per-file CPU was 1.2-1.45x that of a plain process here
# (bench/RESULTS.md). The stage's own LocalCluster leaves it unset; other clusters are told.
UNTRIMMED = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
_NOTHING = object()  # no shared object (a job without one gets no such argument)


def available_cores() -> int:
    """The CPU cores this process may run on (fewer than the machine's in a container or cgroup)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def file_stats(paths: Iterable[str]) -> dict[str, tuple[int, int] | None]:
    """(size, mtime in whole seconds) of each file, None if there is none: what a worker elsewhere must see
    (whole seconds: a shared file system may store times more coarsely than the local disk)."""
    out = {}
    for path in paths:
        try:
            st = os.stat(path)
            out[path] = (st.st_size, int(st.st_mtime))
        except OSError:
            out[path] = None
    return out


def _differing(stats: dict[str, tuple[int, int] | None]) -> list[str]:
    """On a worker: the files of `stats` not as they are on the caller's machine."""
    return [path for path, seen in file_stats(stats).items() if seen != stats[path]]


class Batches:
    def __init__(self, executor: str = "local", workers: int = 1, scheduler: str = ""):
        self.executor, self.workers, self.scheduler = executor, max(workers, 1), scheduler
        self._pool = self._client = self._cluster = None
        self.where: collections.Counter = collections.Counter()  # jobs done per Dask worker address
        self._needed: tuple[list[str], str] | None = None  # files the workers must see (`needs`)
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
            if self._needed:
                self.require_seen(*self._needed)
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

    def unseen(self, paths: Iterable[str]) -> dict[str, list[str]]:
        """The files of `paths` each Dask worker does not see as this process does (missing, or of another
        size or time), by worker address; {} on a local pool (this machine's processes). Workers that
        join later are not asked."""
        if not self.on_dask:
            return {}
        stats = file_stats(paths)
        return {worker: bad for worker, bad in sorted(self._dask().run(_differing, stats).items()) if bad}

    def require_seen(self, paths: Iterable[str], what: str) -> None:
        """A StageError naming the workers that do not see `paths` (`what`: the param that names them, and
        how else to reach them) before any job is sent, instead of a job failing on every file."""
        unseen = self.unseen(paths)
        if unseen:
            raise StageError("; ".join(f"Dask worker {w} does not see {', '.join(bad[:3])} as this machine does"
                                       for w, bad in unseen.items())
                             + f": {what} must be on a file system the workers share, at the same path, or a URL")

    def needs(self, paths: Iterable[str], what: str) -> None:
        """`require_seen(paths, what)` once the cluster is reached (at the first job; now if it is)."""
        self._needed = (list(paths), what)
        if self._client is not None:
            self.require_seen(*self._needed)

    def map(self, fn: Callable, jobs: Iterable[tuple], shared=_NOTHING, window: int | None = None,
            sent: Callable | None = None) -> Iterator:
        """fn(*job) (or fn(shared, *job)) for each job, in order, with at most `window` jobs in flight
        (`in_flight` by default; fewer for jobs that carry megabytes). `sent(job)`: a large object that
        goes with each job, as fn([shared,] sent(job), *job); on Dask straight to a worker
        (`Client.scatter`), which then runs the job, not through the scheduler inside the job."""
        pending: collections.deque = collections.deque()
        for job in jobs:
            handles = [] if shared is _NOTHING else [shared]
            if sent is not None:
                handles.append(self._dask().scatter(sent(job), hash=False) if self.on_dask else sent(job))
            pending.append(self.submit(fn, job, *handles))
            if len(pending) >= (window or self.in_flight):  # in_flight is known once connected
                yield self.result(pending.popleft())
        while pending:
            yield self.result(pending.popleft())

    def submit(self, fn: Callable, job: tuple, *shared):
        """Start fn(*job), or fn(*shared, *job) with handles from `share` (with one worker: later, in
        this process, when its result is asked for)."""
        if self.on_dask:
            # The job goes pickled, as one bytes argument: Dask's client walks every argument it
            # is given, item by item, looking for futures inside (dask._task_spec.parse_input), and
            # on batches of 1,024 file records that walk took almost half of ingest's process (a
            # cProfile: 800,784 calls, 5.4 s of 12 s). pure=False: two jobs with equal arguments
            # are still two jobs.
            # The shared objects' futures are the arguments Dask resolves (to the worker's copies).
            return self._dask().submit(_on_worker, fn, pickle.dumps(job, pickle.HIGHEST_PROTOCOL), *shared, pure=False)
        job = (*shared, *job)
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

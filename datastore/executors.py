"""Executors run one job step over many work items: in local worker processes or on Ray.

Both call the same top-level step function ``fn(ctx, item)`` (``ctx``: a picklable, read-only
description of the job) and hand back ``(item, result)`` pairs as items finish, so an artifact
built under either is the same artifact. Steps write their own outputs atomically; the job
helper (:meth:`retromem.datastore.job.Job.map`) hands them only the items not yet done, so
either executor resumes. :func:`init_ray` is the one place Ray is started or joined.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

from retromem.config import integer
from retromem.errors import ConfigError

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


def _init_worker(threads: int) -> None:
    # one tokenizer thread pool per worker, sized so workers x threads = cores
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"


class LocalExecutor:
    """Worker processes on this machine (``workers=1`` runs in-process)."""

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None  # set inside pooled()

    @property
    def parallelism(self) -> int:
        """How many items run at once: what a step sizes its number of work items by."""
        return self.workers

    @contextmanager
    def pooled(self) -> Iterator["LocalExecutor"]:
        """Keep one pool of ``workers`` processes for every map inside the block: a step made of
        several short maps (the dedup's scatter, partitions, reasons) starts its workers once."""
        if self.workers == 1 or self._pool is not None:
            yield self
            return
        self._pool = self._new_pool(self.workers)
        try:
            yield self
        finally:
            pool, self._pool = self._pool, None
            pool.shutdown(cancel_futures=True)

    @staticmethod
    def _new_pool(n: int) -> ProcessPoolExecutor:
        threads = max(1, (os.cpu_count() or 1) // n)
        spawn = multiprocessing.get_context("spawn")  # no fork: pyarrow and tokenizers hold threads
        return ProcessPoolExecutor(n, mp_context=spawn, initializer=_init_worker, initargs=(threads,))

    def map(self, fn: Callable[[Any, Any], Any], ctx: Any, items: list[Any]) -> Iterator[tuple[Any, Any]]:
        if not items:
            return
        n = min(self.workers, len(items))
        if n == 1 and self._pool is None:
            _init_worker(max(1, (os.cpu_count() or 1)))
            for item in items:
                yield item, fn(ctx, item)
            return
        with nullcontext(self._pool) if self._pool is not None else self._new_pool(n) as pool:
            pending = {pool.submit(fn, ctx, item): item for item in items}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        item = pending.pop(fut)
                        yield item, fut.result()
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise


def init_ray(address: str | None = None, num_cpus: int = 0):
    """The ``ray`` module, initialised: joins the cluster at ``address``, else starts a local Ray
    with ``num_cpus`` CPUs (0: all cores). A no-op when Ray is already initialised."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("`--executor ray` needs Ray: pip install 'retromem[cluster]'") from exc
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
            kwargs["include_dashboard"] = False
        ray.init(**kwargs)
    return ray


class RayExecutor:
    """Ray tasks, one per work item, on a local Ray instance or an existing cluster (``address``).

    ``task_options``: Ray resources of each task (default one CPU; e.g. ``{"num_gpus": 1}``).
    A step that loads a model caches it per process (``functools.lru_cache``): Ray reuses its
    worker processes, so the model loads once per worker, not once per item.
    """

    def __init__(self, address: str | None = None, workers: int = 0, task_options: dict[str, Any] | None = None) -> None:
        self.ray = init_ray(address, workers)
        self.task_options = {"max_retries": 2, **(task_options or {"num_cpus": 1})}

    @property
    def parallelism(self) -> int:
        """How many one-CPU tasks the cluster runs at once (its CPUs now; at least 1)."""
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    @contextmanager
    def pooled(self) -> Iterator["RayExecutor"]:
        """As :meth:`LocalExecutor.pooled`; Ray keeps its worker processes anyway."""
        yield self

    def map(self, fn: Callable[[Any, Any], Any], ctx: Any, items: list[Any]) -> Iterator[tuple[Any, Any]]:
        ray = self.ray
        remote = ray.remote(**self.task_options)(_ray_call)
        refs = {remote.remote(fn, ctx, item): item for item in items}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                item = refs.pop(ref)
                yield item, ray.get(ref)


def _ray_call(fn: Callable[[Any, Any], Any], ctx: Any, item: Any) -> Any:
    _init_worker(1)
    return fn(ctx, item)


def make_executor(kind: str, workers: int = 0, address: str | None = None) -> LocalExecutor | RayExecutor:
    """The executor named by ``--executor``: ``local`` (``workers`` processes) or ``ray``."""
    integer(workers, "workers", ge=0, flag="--workers")  # before a pool or a Ray starts with it
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(address, workers)
    raise ConfigError(f"`--executor` must be one of {', '.join(EXECUTORS)}, got {kind!r}")

"""The Dask cluster that builds shards: a client on an existing scheduler, or a
``LocalCluster`` of worker processes whose start-up and allocator are tuned for it.

Local workers are forked from a server process that imports the pipeline while this
process scans the sources and creates the store (``start_worker_server``): spawned
afresh, the workers took 0.7 s to come up after that, on a 13 s benchmark run; forked,
0.1 s (docs/benchmarks.md). The workers' environment (dask's, plus glibc's allocator
thresholds, see ``worker_environ``) is the server's, since glibc reads it once when a
process starts and a fork inherits what it read. The server idles (160 MB resident)
until this process ends.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import dask

log = logging.getLogger(__name__)

PRE_SPAWN_ENVIRON = "distributed.nanny.pre-spawn-environ"
START_METHOD = "distributed.worker.multiprocessing-method"
REUSE_BUFFERS_FROM = 2 * 2**30  # bytes per worker: room for the allocator to keep freed buffers
# glibc's thresholds (bytes): reuse shard-sized buffers from the heap, or dask's default
# of mapping every buffer over 128 kB afresh and giving freed heap back at once
MALLOC_REUSE = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(128 * 2**20),
                "MALLOC_ARENA_MAX": "2"}
MALLOC_RETURN = {"MALLOC_MMAP_THRESHOLD_": str(128 * 2**10), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**10)}
# imported once in the server that local workers are forked from
WORKER_MODULES = ["distributed", "pipeline.data.build"]

_server_environ: dict[str, Any] | None = None  # the environment the server started with


class LocalSettings(NamedTuple):
    """What a LocalCluster is made with, from the command's ``--workers`` and
    ``--memory-limit``."""
    n_workers: int
    memory_limit: str  # per worker
    environ: dict[str, Any]  # the workers' environment


def local_settings(workers: int | None, memory_limit: str | None) -> LocalSettings:
    n = workers or max(1, min(os.cpu_count() or 1, 4))
    limit = memory_limit or "auto"
    return LocalSettings(n, limit, worker_environ(limit, n))


def start_worker_server(environ: dict[str, Any]) -> bool:
    """Start the server that local workers are forked from, with ``environ`` and the
    pipeline imported; return whether workers with this environment can be forked
    from it (else they are spawned: a server runs once per process, so a second
    cluster that needs another environment spawns its workers as before).

    Returns at once: the server imports while the caller scans sources and creates
    the store.
    """
    global _server_environ
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    if _server_environ is None:
        from multiprocessing import forkserver

        # what a spawned worker would get: this environment, where a variable already
        # set here wins (dask's rule)
        with _environ_restored(list(environ)):
            for name, value in environ.items():
                os.environ.setdefault(name, str(value))
            multiprocessing.get_context("forkserver").set_forkserver_preload(WORKER_MODULES)
            forkserver.ensure_running()
        _server_environ = dict(environ)
    return _server_environ == environ


@contextlib.contextmanager
def dask_client(workers: int | None, scheduler: str | None,
                memory_limit: str | None) -> Iterator[Any]:
    """A Dask client: on an existing scheduler, or on a fresh LocalCluster of processes
    (one thread each: the HDF5 library is not thread-safe)."""
    from distributed import Client, LocalCluster

    # distributed sets its own loggers to INFO on import; keep the CLI output readable.
    logging.getLogger("distributed").setLevel(
        min(logging.WARNING, logging.getLogger().getEffectiveLevel() + 10))
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    local = local_settings(workers, memory_limit)
    method = "forkserver" if start_worker_server(local.environ) else "spawn"
    with _environ_restored(list(local.environ)), \
            dask.config.set({PRE_SPAWN_ENVIRON: local.environ, START_METHOD: method}), \
            LocalCluster(n_workers=local.n_workers, threads_per_worker=1, processes=True,
                         memory_limit=local.memory_limit, dashboard_address=":0",
                         silence_logs=logging.WARNING) as cluster, \
            Client(cluster) as client:
        yield client


@contextlib.contextmanager
def _environ_restored(names: list[str]) -> Iterator[None]:
    """Put these environment variables back as they were: a nanny copies the workers'
    variables into this process's environment, where they would override the next
    cluster's (an exported variable beats dask's config)."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def worker_environ(memory_limit: str, n_workers: int) -> dict[str, Any]:
    """Environment of the local workers: dask's, with glibc's thresholds set for reuse
    when each worker has room.

    Dask sets ``MALLOC_TRIM_THRESHOLD_`` so that freed memory goes back to the system at
    once; that also pins glibc's mmap threshold at 128 kB, so every larger buffer of
    every shard (the read, the channel stack, zarr's chunks and encoded shard) is a
    fresh mapping that the kernel zero-fills page by page: 4.5 million page faults on
    the benchmark (docs/benchmarks.md). Buffers under 64 MB taken from the heap, and up
    to 128 MB of freed heap kept, are reused from shard to shard instead: 20 % faster,
    for 150-200 MB more resident memory per worker that does not grow with the data.
    So this applies only when each worker may use at least ``REUSE_BUFFERS_FROM``;
    ``MALLOC_ARENA_MAX`` bounds what zarr's codec threads keep in arenas of their own.
    Tighter limits get dask's behaviour, spelled out (the nanny copies these variables
    into this process, see ``_environ_restored``). A variable the user exported wins
    (dask's rule).
    """
    from distributed.worker_memory import parse_memory_limit

    environ = dict(dask.config.get(PRE_SPAWN_ENVIRON, default={}) or {})
    per_worker = parse_memory_limit(memory_limit, 1, n_workers, logger=log)
    roomy = per_worker is None or per_worker >= REUSE_BUFFERS_FROM
    return {**environ, **(MALLOC_REUSE if roomy else MALLOC_RETURN)}

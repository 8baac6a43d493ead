"""Writing the store's shards: each shard read, transformed and written by one task on
a Dask cluster, with its partial statistics.

A shard is built from its own time window of the sources (one step before it, for
one-step differences), so parts run in any order, concurrently, or twice, with the
same bytes as a single run; memory per worker is bounded by one shard whatever the
size of the data. A shard whose done flag is set is not built again.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.data import statistics, store
from pipeline.data.build_plan import BuildPlan, make_plan
from pipeline.data.grid import area_weights
from pipeline.data.transforms import transform_window
from pipeline.data.windows import load_window
from pipeline.errors import PipelineError, StoreError, disk_full

log = logging.getLogger(__name__)


def shards_of_part(n_shards: int, part: int, n_parts: int) -> list[int]:
    """Contiguous block of shards for part ``part`` (1-based) of ``n_parts``."""
    if not 1 <= part <= n_parts:
        raise StoreError(f"--part {part}/{n_parts}: part must be between 1 and {n_parts}",
                         "write --part i/N with 1 <= i <= N")
    lo = (part - 1) * n_shards // n_parts
    hi = part * n_shards // n_parts
    return list(range(lo, hi))


def build_shard(plan: BuildPlan, shard: int) -> int:
    """Read, transform and write one shard with its partial statistics."""
    t0, t1 = plan.shard_range(shard)
    w0 = max(t0 - 1, 0)  # one step before the shard, for one-step differences
    window = load_window(plan.scans, plan.times[w0:t1], plan.channels.wanted_by_source())
    values, valid = transform_window(window, plan.data, plan.channels)
    steps = np.arange(w0, t1)
    in_shard = steps >= t0
    in_values = in_shard & plan.train_mask[steps]
    prev_train = np.concatenate([[False], plan.train_mask[steps[:-1]]])
    in_diffs = in_values & prev_train
    partial = statistics.shard_partial(values.values, valid, area_weights(plan.lat), in_values,
                                       in_diffs)
    store.write_shard(plan.store_path, shard, t0, values.values[t0 - w0:], partial)
    return shard


@functools.lru_cache(maxsize=2)
def _worker_plan(config_json: str, sources_key: str) -> BuildPlan:
    """The build plan, recomputed once per worker process from the config (cheap: a
    metadata scan), so that no task depends on data that a restarted worker lost.
    ``sources_key`` (the files' provenance) makes new or changed files a new plan."""
    plan = make_plan(Config.model_validate_json(config_json))
    if _sources_key(plan) != sources_key:
        raise StoreError("source files changed while the store was being built",
                         "rerun the command once the files are complete")
    # The worker's modules and the plan live as long as the worker: out of the cyclic
    # collector's sight, the collections that every shard's xarray objects trigger no
    # longer walk them (4 % of the benchmark's wall time). Refcounting still frees them.
    gc.collect()
    gc.freeze()
    return plan


def _sources_key(plan: BuildPlan) -> str:
    return json.dumps(plan.provenance(), sort_keys=True)


def _shard_task(config_json: str, sources_key: str, shard: int) -> tuple[int, PipelineError | None]:
    """The Dask task: a user error comes back as a value, so that workers do not log it
    as a crash with a traceback; the client raises it."""
    try:
        return build_shard(_worker_plan(config_json, sources_key), shard), None
    except PipelineError as err:
        return shard, err
    except OSError as err:  # a full disk is the user's to fix, too
        full = disk_full(err)
        if full is None:
            raise
        return shard, full


def run_shards(cfg: Config, plan: BuildPlan, shards: list[int], client: Any) -> None:
    """Build the given shards as tasks on a Dask cluster, skipping those already done."""
    group = store.open_group(plan.store_path)
    done = store.done_flags(group)
    todo = [s for s in shards if not done[s]]
    if len(todo) < len(shards):
        log.info("%d of %d shards already written; building %d", len(shards) - len(todo),
                 len(shards), len(todo))
    if not todo:
        return
    from distributed import as_completed

    sources = [src.model_copy(update={"path": os.path.abspath(src.path)}) for src in cfg.data.sources]
    absolute = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"store": plan.store_path, "sources": sources})})  # workers run elsewhere
    config_json = absolute.model_dump_json()
    key = _sources_key(plan)
    futures = client.map(_shard_task, [config_json] * len(todo), [key] * len(todo), todo,
                         pure=False)
    with _progress(len(todo)) as advance:
        for future in as_completed(futures):
            shard, error = future.result()
            if error is not None:
                client.cancel(futures)
                raise error
            advance(shard)


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Any]:
    """A rich progress bar on a terminal, one log line per shard otherwise."""
    if sys.stderr.isatty():
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("writing shards", total=total)
            yield lambda _shard: bar.advance(task)
        return
    count = {"n": 0}
    every = max(1, total // 10)

    def advance(_shard: int) -> None:
        count["n"] += 1
        if count["n"] % every == 0 or count["n"] == total:
            log.info("shards written: %d/%d", count["n"], total)

    yield advance

"""``pipeline preprocess``: build or extend the training store, step by step.

Each step is idempotent and keeps its progress in the store (see ``store``):

- the plan (``build_plan``) scans the sources and validates them against the config;
- init (``build_init``) writes the store's metadata atomically (temporary path, then
  rename), or checks that an existing store matches the config;
- the parts (``build_parts``) build whole shards as tasks on a Dask distributed
  cluster (a ``LocalCluster`` or an existing scheduler), each from its own time window
  of the sources, so parts run in any order, concurrently, or twice, with the same
  bytes as a single run;
- finalise (``build_finalise``) merges the shards' partial statistics, verifies and
  marks the store complete;
- append (``build_append``) extends the time axis with new source data and rebuilds
  from the first shard the new steps touch.

This module chooses the steps a command needs and runs them; it also rebuilds the
shard files a complete store has lost.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import Config
from pipeline.data import store
from pipeline.data.build_append import prepare_append
from pipeline.data.build_finalise import finalise
from pipeline.data.build_init import init, init_lock
from pipeline.data.build_parts import run_shards, shards_of_part
from pipeline.data.build_plan import BuildPlan, make_plan
from pipeline.data.cluster import dask_client, local_settings, start_worker_server
from pipeline.errors import StoreError

log = logging.getLogger(__name__)


def preprocess(cfg: Config, part: tuple[int, int] | None = None, append: bool = False,
               workers: int | None = None, scheduler: str | None = None,
               memory_limit: str | None = None) -> str:
    """Build or extend the store; return a one-line summary of what was done."""
    if scheduler is None:  # local workers: their server imports while the sources are scanned
        start_worker_server(local_settings(workers, memory_limit).environ)
    plan = make_plan(cfg)
    path = Path(plan.store_path)
    if append:
        if not path.exists():
            raise StoreError(f"--append: no store at {path} to append to",
                             "build it first without --append")
        with init_lock(plan.store_path):
            if not prepare_append(cfg, plan):
                return f"{path}: no new time steps in the sources; store unchanged"
    elif not init(cfg, plan) and store.open_group(path).attrs.get("complete"):
        return _repair(cfg, plan, workers, scheduler, memory_limit)
    shards = list(range(plan.n_shards)) if part is None else shards_of_part(plan.n_shards, *part)
    with dask_client(workers, scheduler, memory_limit) as client:
        run_shards(cfg, plan, shards, client)
    if part is not None:
        return f"{path}: part {part[0]}/{part[1]} written ({len(shards)} shards)"
    finalise(cfg, plan)
    version = store.open_group(path).attrs.get("dataset_version")
    return (f"{path}: complete, {len(plan.times)} steps x {len(plan.channels.names)} channels, "
            f"dataset version {version}")


def _repair(cfg: Config, plan: BuildPlan, workers: int | None, scheduler: str | None,
            memory_limit: str | None) -> str:
    """Rebuild the shard files a complete store has lost (a damaged one is deleted by
    the user first, as ``inspect --verify`` says). The sources are those it was built
    from (``init`` checked), so the shards come back bitwise and the statistics, the
    dataset version and the checkpoints trained on it stay valid."""
    path = Path(plan.store_path)
    missing = store.missing_shards(store.data_array(path))
    if not missing:
        return f"{path} is already complete; nothing to do"
    done = store.get_array(store.open_group(path, mode="r+"), "_build/done")
    for shard in missing:
        done[shard] = False
    log.warning("%s has lost %d shard file(s): rebuilding shards %s", path, len(missing),
                ", ".join(map(str, missing)))
    with dask_client(workers, scheduler, memory_limit) as client:
        run_shards(cfg, plan, missing, client)
    return f"{path}: complete, {len(missing)} lost shard(s) rebuilt"

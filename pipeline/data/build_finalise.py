"""The build's last step: verify that every shard was written, merge the shards'
partial statistics, mark the store complete and consolidate its metadata."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.data import statistics, store
from pipeline.data.build_plan import BuildPlan
from pipeline.errors import StoreError

log = logging.getLogger(__name__)


def finalise(cfg: Config, plan: BuildPlan) -> None:
    """Verify every shard, merge statistics, mark the store complete, consolidate.

    Idempotent: a complete store is left as it is. Statistics are recomputed from the
    shards' partials unless an append froze them.
    """
    group = store.open_group(plan.store_path, mode="r+")
    attrs = store.attributes(group)
    if attrs.get("complete"):
        return
    done = store.done_flags(group)
    if not done.all():
        missing = np.flatnonzero(~done)
        raise StoreError(f"cannot finalise {plan.store_path}: {missing.size} shards not written "
                         f"(first: {int(missing[0])})", "run the missing parts, then finalise again")
    if (store.get_array(group, "data").shape[0] != len(plan.times)
            or store.get_array(group, "time").shape[0] != len(plan.times)):
        raise StoreError(f"{plan.store_path}: time axis length does not match the data",
                         "delete the store and rebuild")
    version = int(attrs.get("dataset_version", 0)) + 1
    updates: dict[str, Any] = {"complete": True, "updated": store.now(), "dataset_version": version,
                               "build": {"shards": int(done.size), "done": int(done.sum())},
                               "statistics_frozen": False, "appending": None}
    if not attrs.get("statistics_frozen") or "mean" not in group:
        partials = store.read_array(group, "_build/stats")
        try:
            stats = statistics.finalise(statistics.merge_all(partials))
        except ValueError as err:
            raise StoreError(f"{plan.store_path}: {err}", "check data.splits.train") from None
        store.write_statistics(group, stats, {})
        updates["statistics_version"] = version
        updates["statistics_period"] = list(cfg.data.splits.train)
    store.update_attrs(plan.store_path, **updates)
    store.consolidate(plan.store_path)
    log.info("finalised %s (dataset version %d)", plan.store_path, version)

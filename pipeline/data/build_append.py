"""Appending: extend a complete store's time axis to the sources' new steps.

The store is marked incomplete first, so a crash anywhere leaves a store that readers
refuse and that ``--append`` resumes; the shards from the first one the new steps
touch are then built again and the store finalised as after a first build.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.config import Config, config_hash, resolved_dict
from pipeline.data import statistics, store
from pipeline.data.build_plan import BuildPlan
from pipeline.data.timeaxis import time_label
from pipeline.errors import StoreError

log = logging.getLogger(__name__)


def _stored_times(path: str) -> pd.Index:
    return xr.open_zarr(path, consolidated=False)["time"].to_index()


def prepare_append(cfg: Config, plan: BuildPlan) -> bool:
    """Extend a complete store's time axis to the sources' new steps.

    Returns False (and changes nothing) when the sources hold no new steps. The store
    is marked incomplete first, so a crash anywhere leaves a store that readers refuse
    and that ``--append`` resumes.
    """
    group = store.open_group(plan.store_path, mode="r+")
    attrs = store.attributes(group)
    appending = attrs.get("appending")
    if not attrs.get("complete") and not appending:
        raise StoreError(f"cannot append to {plan.store_path}: its build is not finished",
                         "finish it first with `pipeline preprocess CONFIG` (without --append)")
    stored = store.channel_names(group)
    if stored != plan.channels.names:
        raise StoreError(f"append: the config's channels {plan.channels.names} differ from the "
                         f"store's {stored}", "append with the config the store was built from")
    lat, lon = store.read_array(group, "lat"), store.read_array(group, "lon")
    if lat.shape != plan.lat.shape or lon.shape != plan.lon.shape or not (
            np.allclose(lat, plan.lat) and np.allclose(lon, plan.lon)):
        raise StoreError(f"append: the new data's grid ({plan.lat.size} x {plan.lon.size}) differs "
                         f"from the store's ({lat.size} x {lon.size})",
                         "regrid the new files to the store's grid")
    old = _stored_times(plan.store_path)
    old_length = appending["from_length"] if appending else len(old)
    if len(plan.times) < len(old) or not plan.times[:len(old)].equals(old):
        raise StoreError(f"append: the sources no longer hold the store's {len(old)} steps "
                         f"({old[0]} .. {old[-1]}) unchanged", "keep the old files in the sources")
    if not appending and len(plan.times) == len(old):
        return False
    first_shard = old_length // plan.data.shard_size
    store.update_attrs(
        plan.store_path, complete=False, updated=store.now(),
        appending={"from_length": old_length, "to_length": len(plan.times)},
        statistics_frozen=not cfg.data.statistics.recompute_on_append,
        sources=plan.provenance(), config=resolved_dict(cfg), config_hash=config_hash(cfg),
        time_end=time_label(plan.times[-1]))
    _extend_arrays(group, plan, first_shard, reset=not appending)
    store.consolidate(plan.store_path)
    log.info("appending %d steps to %s from shard %d", len(plan.times) - old_length,
             plan.store_path, first_shard)
    return True


def _extend_arrays(group: Any, plan: BuildPlan, first_shard: int, reset: bool) -> None:
    """Resize data, time and the build arrays; clear the flags of shards to rebuild."""
    n_time = len(plan.times)
    data = group["data"]
    data.resize((n_time, *data.shape[1:]))
    time = group["time"]
    units, calendar = time.attrs["units"], time.attrs.get("calendar", "standard")
    encoded = xr.coders.CFDatetimeCoder().encode(xr.Variable(
        "time", np.asarray(plan.times),
        encoding={"units": units, "calendar": calendar, "dtype": np.int64})).values
    time.resize((n_time,))
    time[:] = encoded
    done, stats = group["_build/done"], group["_build/stats"]
    done.resize((plan.n_shards,))
    stats.resize((plan.n_shards, *stats.shape[1:]))
    if reset:
        done[first_shard:] = False
        stats[first_shard:] = np.broadcast_to(statistics.empty(stats.shape[-1]),
                                              (plan.n_shards - first_shard, *stats.shape[1:]))

"""The build's first step: create the store's metadata, or check an existing store.

Init writes the coordinates, the static fields and their statistics, the empty
``_build`` arrays and the root attributes (:class:`~pipeline.data.attrs.StoreAttrs`)
into a temporary path and renames it into place, so a store either exists whole or not
at all. An existing store must come from the same data config and sources; anything
else at the path is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xarray as xr

from pipeline import __version__, files
from pipeline.config import Config, config_hash, resolved_dict
from pipeline.data import store
from pipeline.data.attrs import StoreAttrs
from pipeline.data.build_plan import BuildPlan
from pipeline.data.grid import area_weights
from pipeline.data.timeaxis import store_frequency, time_label
from pipeline.data.transforms import channel_attributes, transform_static
from pipeline.data.windows import load_static
from pipeline.errors import StoreError

log = logging.getLogger(__name__)


def store_lock_path(store_path: str) -> str:
    """``STORE.lock`` beside the store. A store path that names no folder (``/``) or
    whose parent cannot hold the lock file is a user error, raised before any write."""
    path = os.path.abspath(store_path)
    parent, name = os.path.split(path)
    if not name:
        raise StoreError(f"data.store {store_path!r} is the file-system root",
                         "set data.store to a store folder such as data/store.zarr")
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a folder" if not os.path.isdir(existing) else "not writable"
        raise StoreError(f"data.store {store_path!r} cannot be created: {existing} is {why}",
                         "set data.store to a path in a writable folder")
    return path + ".lock"


@contextlib.contextmanager
def init_lock(store_path: str) -> Iterator[None]:
    """Serialise init (and the start of an append) between concurrent processes (Slurm
    array tasks starting together)."""
    with files.file_lock(store_lock_path(store_path)):
        yield


def new_attrs(cfg: Config, plan: BuildPlan) -> StoreAttrs:
    """The root attributes of a new store (dataset version 0, not complete)."""
    train = cfg.data.splits.train
    return StoreAttrs.model_validate({
        "format_version": store.FORMAT_VERSION,
        "dataset_version": 0,
        "complete": False,
        "name": cfg.name,
        "config": resolved_dict(cfg),
        "config_hash": config_hash(cfg),
        "data_hash": plan.data_hash(),
        "sources": plan.provenance(),
        "splits": {k: list(v) for k, v in resolved_dict(cfg.data.splits).items()},
        "channel_attrs": channel_attributes(cfg.data, plan.channels, plan.scans),
        "frequency": store_frequency(cfg.data.frequency),
        "time_start": time_label(plan.times[0]),
        "time_end": time_label(plan.times[-1]),
        "grid": {"lat_range": [float(plan.lat[0]), float(plan.lat[-1])],
                 "lon_range": [float(plan.lon[0]), float(plan.lon[-1])],
                 "coarsen": cfg.data.coarsen},
        "shard_size": cfg.data.shard_size,
        "statistics_period": list(train),
        "statistics_version": 1,
        "code_version": __version__,
        "created": store.now(),
        "updated": store.now(),
    })


def _template(plan: BuildPlan, static: xr.DataArray) -> xr.Dataset:
    import dask.array as da  # only the template is lazy: nothing is computed from it

    shape = (len(plan.times), len(plan.channels.names), plan.lat.size, plan.lon.size)
    data = da.zeros(shape, chunks=(plan.data.shard_size, *shape[1:]), dtype=np.float32)
    return xr.Dataset(
        {"data": (("time", "channel", "lat", "lon"), data),
         "static": (("static_channel", "lat", "lon"), static.values)},
        coords={
            "time": ("time", plan.times),
            "channel": ("channel", np.array(plan.channels.names, dtype=object)),
            "channel_role": ("channel", np.array(plan.channels.roles, dtype=object)),
            "lat": ("lat", plan.lat, {"units": "degrees_north", "standard_name": "latitude"}),
            "lon": ("lon", plan.lon, {"units": "degrees_east", "standard_name": "longitude"}),
            "area_weight": ("lat", area_weights(plan.lat)),
            "static_channel": ("static_channel", np.array(plan.channels.static, dtype=object)),
        },
    )


def _static_fields(plan: BuildPlan) -> xr.DataArray:
    """The transformed static fields, or an empty (0, lat, lon) array when there are none."""
    if plan.channels.static:
        return transform_static(load_static(plan.scans, list(plan.channels.static)), plan.data,
                                plan.channels)
    return xr.DataArray(np.zeros((0, plan.lat.size, plan.lon.size), np.float32),
                        dims=("static_channel", "lat", "lon"))


def _static_stats(static: xr.DataArray, lat: np.ndarray) -> dict[str, np.ndarray]:
    if static.shape[0] == 0:
        return {"mean": np.zeros(0), "std": np.zeros(0)}
    w = area_weights(lat)[None, :, None] * np.ones(static.shape)
    x = static.values.astype(np.float64)
    mean = (w * x).sum(axis=(1, 2)) / w.sum(axis=(1, 2))
    std = np.sqrt((w * (x - mean[:, None, None]) ** 2).sum(axis=(1, 2)) / w.sum(axis=(1, 2)))
    return {"mean": mean, "std": std}


def init(cfg: Config, plan: BuildPlan) -> bool:
    """Create the store if it does not exist; return True if it was created.

    An existing store must come from the same data config; anything else at the path
    is an error, never overwritten.
    """
    path = Path(plan.store_path)
    with init_lock(plan.store_path):
        if path.exists():
            check_existing(path, plan)
            return False
        tmp = Path(plan.store_path.rstrip("/") + ".init-tmp")
        if tmp.exists():
            shutil.rmtree(tmp)  # an init that was killed: nothing in it is worth keeping
        static = _static_fields(plan)
        codec = store.compressors(plan.data.codec)
        store.create(tmp, _template(plan, static), plan.data.shard_size, codec,
                     new_attrs(cfg, plan).to_json())
        group = store.open_group(tmp, mode="r+")
        store.write_statistics(group, {}, _static_stats(static, plan.lat))
        os.rename(tmp, path)
    log.info("initialised %s: %d steps, %d channels, %d shards", path, len(plan.times),
             len(plan.channels.names), plan.n_shards)
    return True


def check_existing(path: Path, plan: BuildPlan) -> None:
    """Refuse to build into a path that holds something other than this store."""
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not store.is_pipeline_store(path)):
        raise StoreError(f"data.store {path} exists and is not a training store",
                         "choose another data.store path or remove what is there")
    if path.is_dir() and not any(path.iterdir()):
        raise StoreError(f"data.store {path} is an empty directory",
                         "remove it or choose another data.store path")
    group = store.open_group(path)
    attrs = store.attributes(group)
    if attrs.get("data_hash") != plan.data_hash():
        raise StoreError(f"data.store {path} was built from a different data config "
                         f"(hash {attrs.get('data_hash')}, this config {plan.data_hash()})",
                         "use a new data.store path, or delete the old store to rebuild")
    recorded = {(s["path"], s["size"], s["mtime"]) for s in attrs.get("sources", [])}
    current = {(s["path"], s["size"], s["mtime"]) for s in plan.provenance()}
    if recorded != current:
        changed = sorted({p for p, _, _ in recorded ^ current})
        raise StoreError(f"source files changed since {path} was initialised: "
                         f"{', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}",
                         "use --append to add new data, or delete the store to rebuild")

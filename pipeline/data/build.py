"""Building the training store: init, parts, finalise, append.

Each step is idempotent and keeps its progress in the store (see ``store``):

- init scans the sources, validates them and writes the store's metadata atomically
  (temporary path, then rename), or checks that an existing store matches the config;
- a part builds whole shards, each from its own time window of the sources, so parts
  run in any order, concurrently, or twice, with the same bytes as a single run;
- finalise merges the shards' partial statistics, verifies and marks the store complete;
- append extends the time axis with new source data and rebuilds from the first
  shard the new steps touch.

Shards run as tasks on a Dask distributed cluster (a ``LocalCluster`` or an existing
scheduler); each task reads, transforms and writes one shard, so memory per worker is
bounded by one shard whatever the size of the data.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from pipeline import __version__, files
from pipeline.config import Config, Data, config_hash, resolved_dict
from pipeline.data import statistics, store
from pipeline.data.cluster import dask_client, local_settings, start_worker_server
from pipeline.data.grid import area_weights, coarsen_area_weighted
from pipeline.data.sources import (
    SourceScan,
    load_static,
    load_window,
    scan_sources,
    time_axis,
    within,
)
from pipeline.data.timeaxis import store_frequency, time_label
from pipeline.data.transforms import (
    ChannelPlan,
    channel_attributes,
    plan_channels,
    transform_static,
    transform_window,
)
from pipeline.errors import PipelineError, SourceError, StoreError, disk_full

log = logging.getLogger(__name__)


@dataclass
class BuildPlan:
    """Everything a shard task needs, computed from the config and the sources alone."""

    data: Data
    store_path: str
    scans: list[SourceScan]
    times: pd.Index
    channels: ChannelPlan
    lat: np.ndarray  # after coarsening
    lon: np.ndarray
    train_mask: np.ndarray  # (time,) bool

    @property
    def n_shards(self) -> int:
        return -(-len(self.times) // self.data.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        t0 = shard * self.data.shard_size
        return t0, min(t0 + self.data.shard_size, len(self.times))

    def data_hash(self) -> str:
        """Identity of the store's content definition: the data section minus what may
        change between builds of the same store (end, statistics policy)."""
        return config_hash(self.data.model_copy(update={"end": None, "statistics": None}))


def make_plan(cfg: Config) -> BuildPlan:
    """Scan and validate the sources against the config (no data is read)."""
    scans = scan_sources(cfg.data)
    channels = plan_channels(cfg.data, scans)
    times = time_axis(scans, cfg.data)
    lat, lon = _coarse_grid(*scans[0].grid, cfg.data.coarsen)
    train_mask = _split_mask(times, cfg.data)
    return BuildPlan(data=cfg.data, store_path=os.path.abspath(cfg.data.store), scans=scans,
                     times=times, channels=channels, lat=lat, lon=lon, train_mask=train_mask)


def _coarse_grid(lat: np.ndarray, lon: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    grid = xr.Dataset(coords={"lat": lat, "lon": lon})
    grid["x"] = xr.DataArray(np.zeros((lat.size, lon.size)), dims=("lat", "lon"))
    coarse = coarsen_area_weighted(grid, factor)
    return coarse["lat"].values.astype(np.float64), coarse["lon"].values.astype(np.float64)


def _split_mask(times: pd.Index, cfg: Data) -> np.ndarray:
    """Train-split mask, after checking that every split selects some stored steps."""
    masks = {}
    for name in ("train", "val", "test"):
        start, end = getattr(cfg.splits, name)
        masks[name] = within(times, start, end)
        if name != "train" and not masks[name].any():
            # Allowed: a store built before its evaluation period's data has arrived.
            log.warning("data.splits.%s [%s, %s] selects no stored time step yet", name, start, end)
    if masks["train"].sum() < 2:
        raise SourceError("data.splits.train selects fewer than 2 steps",
                          "widen the train split (statistics need at least 2 steps)")
    if (masks["train"] & (masks["val"] | masks["test"])).any():
        raise SourceError("data.splits.train overlaps val or test", "make the splits disjoint")
    return masks["train"]


# --------------------------------------------------------------------------- init


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
def _init_lock(store_path: str) -> Iterator[None]:
    """Serialise init between concurrent processes (Slurm array tasks starting together)."""
    with files.file_lock(store_lock_path(store_path)):
        yield


def _provenance(plan: BuildPlan) -> list[dict[str, Any]]:
    return [f.provenance() for scan in plan.scans for f in scan.files]


def _attrs(cfg: Config, plan: BuildPlan) -> dict[str, Any]:
    train = cfg.data.splits.train
    return {
        "format_version": store.FORMAT_VERSION,
        "dataset_version": 0,
        "complete": False,
        "name": cfg.name,
        "config": resolved_dict(cfg),
        "config_hash": config_hash(cfg),
        "data_hash": plan.data_hash(),
        "sources": _provenance(plan),
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
    }


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
    with _init_lock(plan.store_path):
        if path.exists():
            check_existing(path, plan)
            return False
        tmp = Path(plan.store_path.rstrip("/") + ".init-tmp")
        if tmp.exists():
            shutil.rmtree(tmp)  # an init that was killed: nothing in it is worth keeping
        static = _static_fields(plan)
        codec = store.compressors(plan.data.codec)
        store.create(tmp, _template(plan, static), plan.data.shard_size, codec, _attrs(cfg, plan))
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
    current = {(s["path"], s["size"], s["mtime"]) for s in _provenance(plan)}
    if recorded != current:
        changed = sorted({p for p, _, _ in recorded ^ current})
        raise StoreError(f"source files changed since {path} was initialised: "
                         f"{', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}",
                         "use --append to add new data, or delete the store to rebuild")


# --------------------------------------------------------------------------- parts


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
    return json.dumps(_provenance(plan), sort_keys=True)


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


# --------------------------------------------------------------------------- finalise


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


# --------------------------------------------------------------------------- append


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
        sources=_provenance(plan), config=resolved_dict(cfg), config_hash=config_hash(cfg),
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


# --------------------------------------------------------------------------- the command


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
        with _init_lock(plan.store_path):
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

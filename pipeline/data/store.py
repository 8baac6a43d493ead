"""The training store on disk: a Zarr v3 group (see the README, "The training store").

Layout::

    data        float32 (time, channel, lat, lon), chunk (1, C, Y, X), shard (shard_size, C, Y, X)
    time, channel, channel_role, lat, lon, area_weight     coordinates
    static      float32 (static_channel, lat, lon)
    mean, std, min, max, diff_mean, diff_std               float64 (channel,), after finalise
    static_mean, static_std                                float64 (static_channel,)
    _build/done   bool (shard,)                  one chunk per shard: written by its writer only
    _build/stats  float64 (shard, field, channel) partial statistics, one chunk per shard

Build progress lives in ``_build`` arrays rather than in the group attributes so that
concurrent parts (Slurm array tasks) never rewrite the same file; the group attributes
hold provenance and a summary written by init and finalise only (their typed model:
:class:`~pipeline.data.attrs.StoreAttrs`). :class:`StoreInfo` reads what training and
evaluation need to know of a complete store (no torch); ``pipeline inspect`` is
:mod:`pipeline.data.inspection`.
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr
import zarr
import zarr.codecs
from zarr.storage import LocalStore

from pipeline.data.attrs import StoreAttrs, parse_attrs
from pipeline.data.layout import MISSING_ABOVE, Layout
from pipeline.data.shards import REBUILD, ShardFiles
from pipeline.data.sources import within
from pipeline.errors import StoreError

# 2: each chunk of ``data`` ends with a CRC32C (format 1 stores, without, stay readable)
FORMAT_VERSION = 2
STAT_NAMES = ("mean", "std", "min", "max", "diff_mean", "diff_std")


def now() -> str:
    """UTC timestamp for attributes."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def compressors(codec: Any) -> tuple[Any, ...]:
    """Zarr v3 compressor codecs for the configured ``data.codec`` section."""
    if codec.name == "zstd":
        return (zarr.codecs.ZstdCodec(level=codec.level),)
    if codec.name == "blosc":
        return (zarr.codecs.BloscCodec(cname=codec.cname, clevel=min(codec.level, 9),
                                       shuffle="shuffle" if codec.shuffle else "noshuffle"),)
    return ()


def is_pipeline_store(path: Path) -> bool:
    """True if ``path`` is a Zarr group written by this package."""
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:  # noqa: BLE001 - anything unreadable is "not ours"
        return False
    return "format_version" in group.attrs and "data_hash" in group.attrs


def create(path: Path, template: xr.Dataset, shard_size: int, codec: tuple[Any, ...],
           attrs: dict[str, Any]) -> None:
    """Write the store's metadata, coordinates and static fields (no data values).

    ``template`` holds a lazy (dask) ``data`` variable, the in-memory ``static`` fields
    and all coordinates; ``data`` is not computed, only its metadata is written. The
    caller makes this atomic by writing to a temporary path and renaming.
    """
    _, n_channels, n_lat, n_lon = template["data"].shape
    n_static = template.sizes["static_channel"]
    encoding = {
        "data": {"chunks": (1, n_channels, n_lat, n_lon),
                 "shards": (shard_size, n_channels, n_lat, n_lon),
                 "compressors": (*codec, zarr.codecs.Crc32cCodec()), "fill_value": np.nan},
        "static": {"chunks": (max(n_static, 1), n_lat, n_lon), "compressors": codec},
        "time": {"dtype": "int64"},
    }
    template.assign_attrs(attrs).to_zarr(str(path), mode="w-", zarr_format=3, compute=False,
                                         consolidated=False, encoding=encoding)
    from pipeline.data.statistics import N_FIELDS, empty

    group = zarr.open_group(str(path), mode="r+")
    n_shards = -(-template.sizes["time"] // shard_size)
    build = group.create_group("_build")
    build.create_array("done", shape=(n_shards,), chunks=(1,), dtype="bool", fill_value=False,
                       dimension_names=["shard"])
    stats = build.create_array("stats", shape=(n_shards, N_FIELDS, n_channels),
                               chunks=(1, N_FIELDS, n_channels), dtype="float64",
                               dimension_names=["shard", "field", "channel"], fill_value=0.0)
    stats[:] = np.broadcast_to(empty(n_channels), stats.shape)


def open_group(path: str | Path, mode: Literal["r", "r+"] = "r") -> zarr.Group:
    """Open a pipeline store's group, with a clear error if it is not one."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"training store not found: {path}",
                         "run `pipeline preprocess CONFIG` first, or fix data.store")
    if not is_pipeline_store(path):
        raise StoreError(f"{path} is not a training store written by pipeline",
                         "point data.store at a store built by `pipeline preprocess`")
    return zarr.open_group(str(path), mode=mode)


def open_complete(path: str | Path) -> zarr.Group:
    """Open a store for reading; refuse one whose attributes do not fit
    :class:`StoreAttrs`, whose build has not been finalised, whose ``data`` metadata
    does not parse, or that lost a shard file (it would read as NaN)."""
    group = open_group(path)
    if not store_attrs(group).complete:
        done = done_flags(group)
        raise StoreError(f"training store {path} is incomplete ({int(done.sum())} of {done.size} "
                         "shards written, not finalised)",
                         "finish it with `pipeline preprocess CONFIG`, which resumes where it stopped")
    array = data_array(path)
    missing = missing_shards(array)
    if missing:
        raise StoreError(f"training store {path} has lost {len(missing)} shard file(s): "
                         f"{shard_path(array, missing[0])}{' ...' if len(missing) > 1 else ''}",
                         REBUILD)
    return group


def data_array(path: str | Path) -> zarr.Array:
    """The store's ``data`` array, with a clear error if its metadata is damaged."""
    try:
        return zarr.open_array(str(path), path="data", mode="r")
    except Exception as err:  # noqa: BLE001 - unreadable metadata, whatever the parser says
        raise StoreError(f"training store {path}: data/zarr.json is unreadable "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:120]})",
                         "rebuild the store: delete it and rerun `pipeline preprocess CONFIG`"
                         ) from None


def get_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of a store's group (the layout above), as a typed ``zarr.Array``."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"training store {group.store_path}: {name} is a group, not an array",
                         "rebuild the store: delete it and rerun `pipeline preprocess CONFIG`")
    return node


def attributes(group: zarr.Group) -> dict[str, Any]:
    """The group's attributes: JSON values, each of whatever type the writer gave it
    (what the build reads and updates; readers use :func:`store_attrs`)."""
    return group.attrs.asdict()


def store_attrs(group: zarr.Group) -> StoreAttrs:
    """The group's attributes, validated: a :class:`StoreError` naming the store and the
    first missing or wrongly typed field otherwise."""
    where = group.store
    name = os.path.abspath(where.root) if isinstance(where, LocalStore) else str(group.store_path)
    return parse_attrs(attributes(group), name)


def read_array(group: zarr.Group, name: str) -> np.ndarray:
    """All of the array ``name`` of a store's group."""
    return np.asarray(get_array(group, name)[:])


def shard_steps(array: zarr.Array) -> int:
    """Time steps per shard file of ``array``."""
    return int((array.shards or array.chunks)[0])


def shard_path(array: zarr.Array, shard: int) -> Path:
    """The file of shard ``shard`` of a local ``data`` array (steps along time only)."""
    store = array.store
    if not isinstance(store, LocalStore):
        raise TypeError(f"shard files are local: {array} is in a {type(store).__name__}")
    key = array.metadata.encode_chunk_key((shard, *[0] * (array.ndim - 1)))
    return Path(store.root) / array.path / key


def missing_shards(array: zarr.Array) -> list[int]:
    """The shards of ``array`` whose file is missing."""
    count = -(-array.shape[0] // shard_steps(array))
    return [s for s in range(count) if not shard_path(array, s).is_file()]


def has_checksums(array: zarr.Array) -> bool:
    """Whether each chunk of ``array`` ends with a CRC32C (format 2 stores)."""
    meta: Any = array.metadata  # zarr's v3 metadata class is private
    inner = getattr(meta.codecs[0], "codecs", meta.codecs)
    return any(isinstance(c, zarr.codecs.Crc32cCodec) for c in inner)


class DataReader:
    """Reads of the store's ``data`` through zarr, a damaged chunk raised as a
    :class:`StoreError` naming its time step instead of zarr's ``ValueError``."""

    def __init__(self, path: str | Path):
        self.path = os.path.abspath(path)
        self.array = data_array(path)
        self.shape = self.array.shape

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self.array[key])
        except (ValueError, RuntimeError) as err:
            damaged = self._damaged_step(key)
            if damaged is None:
                raise  # not a damaged chunk: a caller's bad selection
            raise corrupt(self.path, self.array, *damaged) from err

    def _damaged_step(self, key: Any) -> tuple[int, Exception] | None:
        """Re-read the selection's steps one at a time: the first that fails, if one does."""
        first = key[0] if isinstance(key, tuple) else key
        steps = range(self.shape[0])[first] if isinstance(first, slice) else [int(first)]
        for t in steps:
            try:
                self.array[t]
            except (ValueError, RuntimeError) as err:
                return t, err
        return None


def corrupt(path: str | Path, array: zarr.Array, step: int, err: Exception) -> StoreError:
    """The error for a step of ``data`` whose chunk fails its checksum or does not decode."""
    return StoreError(f"training store {path} is corrupt at time step {step} (shard file "
                      f"{shard_path(array, step // shard_steps(array))}: "
                      f"{' '.join(str(err).split())[:70]})", REBUILD)


def done_flags(group: zarr.Group) -> np.ndarray:
    """Which shards have been written (and their statistics recorded)."""
    return np.asarray(read_array(group, "_build/done"), dtype=bool)


def write_shard(path: str | Path, shard: int, t0: int, block: np.ndarray, partial: np.ndarray) -> None:
    """Write one whole shard, then its statistics, then its done flag (in that order,
    so a flag is only ever set over complete data). The shard's file is written by
    ``ShardFiles`` (its steps encoded straight from ``block``), or by zarr for a layout
    it does not handle."""
    # write_empty_chunks: skip zarr's test of every chunk (and of the shard) for all-NaN,
    # the fill value: two passes and masks per chunk, 10 % of the write; a stored step is
    # never all NaN (the NaN policy rejects or fills NaNs)
    with zarr.config.set({"array.write_empty_chunks": True}):
        group = zarr.open_group(str(path), mode="r+")
        data = get_array(group, "data")
    files = ShardFiles.of(data)
    if files is not None:
        files.write(shard, block)
    else:
        data[t0:t0 + block.shape[0]] = block
    get_array(group, "_build/stats")[shard] = partial
    get_array(group, "_build/done")[shard] = True


def write_statistics(group: zarr.Group, stats: dict[str, np.ndarray],
                     static_stats: dict[str, np.ndarray]) -> None:
    """Store the final per-channel statistics as float64 arrays."""
    for name, values in stats.items():
        group.create_array(name, data=np.asarray(values, np.float64), dimension_names=["channel"],
                           overwrite=True)
    for name, values in static_stats.items():
        group.create_array(f"static_{name}", data=np.asarray(values, np.float64),
                           dimension_names=["static_channel"], overwrite=True)


def consolidate(path: str | Path) -> None:
    """Consolidate metadata so that plain ``xarray.open_zarr`` opens the store quickly."""
    with warnings.catch_warnings():
        # Consolidated metadata is not yet in the Zarr v3 spec; zarr-python and xarray
        # both read it, and it saves one request per array on remote file systems.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(path))


def update_attrs(path: str | Path, **values: Any) -> None:
    """Update group attributes (init, finalise and append only: never from parts)."""
    group = zarr.open_group(str(path), mode="r+")
    group.attrs.update(values)


def statistics(group: zarr.Group) -> dict[str, np.ndarray]:
    """The stored statistics by name (float64 arrays over channels)."""
    return {name: np.asarray(read_array(group, name), dtype=np.float64) for name in STAT_NAMES}


def channel_names(group: zarr.Group) -> list[str]:
    return [str(c) for c in read_array(group, "channel")]


class StoreInfo:
    """What training needs to know about a complete store, read once (small arrays)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.path.abspath(path)
        group = open_complete(self.path)
        self.attrs = store_attrs(group)
        channels = channel_names(group)
        derived = self.attrs.config.get("data", {}).get("derived", [])
        roles = [str(r) for r in read_array(group, "channel_role")]
        self.layout = Layout.from_roles(channels, roles,
                                        {d["name"]: list(d["inputs"]) for d in derived})
        self.n_time = int(get_array(group, "data").shape[0])
        self.lat = np.asarray(read_array(group, "lat"), dtype=np.float64)
        self.lon = np.asarray(read_array(group, "lon"), dtype=np.float64)
        self.area_weight = np.asarray(read_array(group, "area_weight"), dtype=np.float64)
        self.stats = statistics(group)
        self.static = np.asarray(read_array(group, "static"), dtype=np.float32)
        self.static_mean = np.asarray(read_array(group, "static_mean"), dtype=np.float64)
        self.static_std = np.asarray(read_array(group, "static_std"), dtype=np.float64)

    @property
    def dataset_version(self) -> int:
        return self.attrs.dataset_version

    @property
    def periodic_lon(self) -> bool:
        """True for global grids: the longitudes cover the whole circle evenly."""
        if self.lon.size < 2:
            return False
        step = np.diff(self.lon)
        return bool(np.allclose(step, step[0]) and abs(step[0] * self.lon.size - 360.0) < 1e-6)

    @cached_property
    def times(self) -> Any:
        return xr.open_zarr(self.path, consolidated=True)["time"].to_index()

    def split_range(self, split: str) -> tuple[int, int]:
        """Inclusive index range of a split (train, val or test) on the time axis."""
        start, end = self.attrs.splits.of(split)
        mask = within(self.times, start, end)
        if not mask.any():
            raise StoreError(f"split '{split}' [{start}, {end}] has no time steps in {self.path}",
                             "check data.splits, or append the data it needs")
        idx = np.flatnonzero(mask)
        return int(idx[0]), int(idx[-1])

    def normalisation(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (mean, std) as float32; constant channels get std 1."""
        std = np.where(self.stats["std"] > 1e-12, self.stats["std"], 1.0)
        return self.stats["mean"].astype(np.float32), std.astype(np.float32)

    def missing_above(self) -> np.ndarray:
        """Per mask channel (``layout.masks``), the normalised value above which a target
        is missing: :data:`MISSING_ABOVE` in model units. A mask of 0 normalises to
        ``-mean / std`` within rounding, far below it."""
        mean, std = self.normalisation()
        masks = list(self.layout.masks)
        return ((MISSING_ABOVE - mean[masks].astype(np.float64)) / std[masks]).astype(np.float32)

    def tendency_scale(self) -> np.ndarray:
        """diff_std / std of the predicted channels: the size of a normalised one-step change."""
        _, std = self.normalisation()
        diff = np.where(self.stats["diff_std"] > 1e-12, self.stats["diff_std"], std)
        return (diff / std)[list(self.layout.outputs)].astype(np.float32)

    def normalised_static(self) -> np.ndarray:
        std = np.where(self.static_std > 1e-12, self.static_std, 1.0)
        return ((self.static - self.static_mean[:, None, None]) / std[:, None, None]).astype(np.float32)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records of the store it was trained on."""
        return {"path": self.path, "data_hash": self.attrs.data_hash,
                "dataset_version": self.dataset_version, "channels": list(self.layout.channels),
                "mean": self.stats["mean"].tolist(), "std": self.stats["std"].tolist()}

"""Raw inputs: find files, open them lazily, validate them, and load time windows.

A *source* is a glob of NetCDF/HDF5 files (or one Zarr store) whose files follow each
other in time. Several sources (one per variable group, say) are merged on the same
grid and time axis. Opening is lazy (xarray's backend arrays, no dask), so scanning a
few hundred files for their metadata is cheap, and :func:`load_window` reads only the
time steps a shard needs.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.config import Data, Source
from pipeline.data.grid import normalise_grid, standardise_grid_names
from pipeline.errors import SourceError

log = logging.getLogger(__name__)

NETCDF_SUFFIXES = {".nc", ".nc4", ".cdf", ".netcdf", ".h5", ".hdf5", ".he5"}


@dataclass
class SourceFile:
    """One file (or Zarr store) of a source, with what provenance records about it."""

    path: str
    size: int
    mtime: float
    times: Any = None  # the decoded time values (an xarray index); None for static files

    def provenance(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mtime": self.mtime}


@dataclass
class SourceScan:
    """What scanning a source found: its files in time order and its grid."""

    source: Source
    files: list[SourceFile] = field(default_factory=list)
    variables: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> dims
    levels: dict[str, np.ndarray] = field(default_factory=dict)  # variable -> its levels
    attributes: dict[str, dict[str, str]] = field(default_factory=dict)  # CF attrs by variable
    lat: np.ndarray | None = None
    lon: np.ndarray | None = None


def expand_paths(source: Source) -> list[str]:
    """The files of a source: a sorted glob, or the Zarr store itself."""
    if source.engine == "zarr" or source.path.rstrip("/").endswith(".zarr"):
        if not os.path.isdir(source.path):
            raise SourceError(f"source Zarr store not found: {source.path}",
                              "check data.sources[].path")
        return [source.path]
    paths = sorted(glob.glob(os.path.expanduser(source.path)))
    if not paths:
        raise SourceError(f"no files match the source path '{source.path}'",
                          "check data.sources[].path (a glob such as data/*.nc); "
                          "`pipeline demo-data DIR` writes demo files")
    return paths


def _engine(path: str, source: Source) -> str:
    if source.engine:
        return source.engine
    if path.rstrip("/").endswith(".zarr"):
        return "zarr"
    return "netcdf4"


def open_file(path: str, source: Source) -> xr.Dataset:
    """Open one file lazily, decode CF conventions, rename, and orient its grid.

    Corrupt or truncated files raise :class:`SourceError` naming the file.
    """
    engine = _engine(path, source)
    decode_times = source.time is None
    kwargs: dict[str, Any] = {"engine": engine, "decode_times": decode_times, "cache": False}
    if engine == "zarr":
        kwargs["consolidated"] = _has_consolidated_metadata(path)
    try:
        ds = xr.open_dataset(path, **kwargs)
    except Exception as err:  # noqa: BLE001 - any backend failure means an unreadable file
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise SourceError(f"cannot read source file {path}: {reason}",
                          "the file is corrupt or truncated; re-download or remove it") from None
    if source.rename:
        present = {k: v for k, v in source.rename.items() if k in ds.variables or k in ds.dims}
        ds = ds.rename(present)
    if source.time is not None:
        ds = _decode_integer_time(ds, source, path)
    ds = standardise_grid_names(ds, path)
    return normalise_grid(ds)


def _has_consolidated_metadata(path: str) -> bool:
    """Whether a Zarr store has consolidated metadata (asking xarray to guess warns)."""
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
    except Exception:  # noqa: BLE001 - open_dataset reports the real problem
        return False
    return getattr(group.metadata, "consolidated_metadata", None) is not None


def _decode_integer_time(ds: xr.Dataset, source: Source, path: str) -> xr.Dataset:
    """Turn integer steps since a reference time (config ``time:``) into CF times."""
    coding = source.time
    assert coding is not None
    if coding.dim not in ds.dims:
        raise SourceError(f"{path}: no dimension '{coding.dim}' for data.sources[].time.dim",
                          f"dimensions are {list(ds.dims)}")
    if coding.dim != "time":
        ds = ds.rename({coding.dim: "time"})
    raw = ds["time"].values if "time" in ds.coords else np.arange(ds.sizes["time"])
    encoded = xr.Dataset(coords={"time": ("time", raw, {"units": coding.units,
                                                        "calendar": coding.calendar})})
    try:
        decoded = xr.decode_cf(encoded)
    except Exception as err:  # noqa: BLE001
        raise SourceError(f"{path}: cannot decode time with units '{coding.units}': {err}",
                          "use CF units such as 'hours since 1996-01-05 00:00'") from None
    return ds.assign_coords(time=decoded["time"])


def _stat(path: str) -> tuple[int, float]:
    if os.path.isdir(path):
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        return size, os.path.getmtime(path)
    st = os.stat(path)
    return st.st_size, st.st_mtime


def scan_source(source: Source, level_dim: str) -> SourceScan:
    """Open every file of a source for its metadata and check they fit together.

    Checks: readable files, the same grid in every file, times strictly increasing
    within and across files (no duplicates, no overlap). Gaps are checked later,
    against the configured frequency, on the merged axis.
    """
    scan = SourceScan(source=source)
    entries: list[tuple[Any, SourceFile, xr.Dataset]] = []
    for path in expand_paths(source):
        ds = open_file(path, source)
        size, mtime = _stat(path)
        entry = SourceFile(path=os.path.abspath(path), size=size, mtime=mtime)
        if source.static:
            if "time" in ds.dims and ds.sizes["time"] > 1:
                raise SourceError(f"static source file {path} has {ds.sizes['time']} time steps",
                                  "static fields must have no time dimension (or one step)")
        else:
            if "time" not in ds.dims:
                raise SourceError(f"{path} has no time dimension",
                                  "mark time-invariant files with 'static: true', or set "
                                  "data.sources[].time for integer time steps")
            entry.times = ds.indexes["time"]
        _check_grid(scan, ds, path)
        for name, var in ds.data_vars.items():
            if {"lat", "lon"} <= set(var.dims):
                scan.variables.setdefault(str(name), tuple(str(d) for d in var.dims))
                scan.attributes.setdefault(str(name), cf_attributes(var.attrs))
                if level_dim in var.dims:
                    scan.levels.setdefault(str(name), np.asarray(ds[level_dim].values))
                    level_units = ds[level_dim].attrs.get("units")
                    if level_units:
                        scan.attributes[str(name)].setdefault("level_units", str(level_units))
        key = entry.times[0] if entry.times is not None and len(entry.times) else 0
        entries.append((key, entry, ds))
        ds.close()
    if not source.static:
        entries.sort(key=lambda e: e[0])
        _check_times_increasing([e[1] for e in entries])
    scan.files = [e[1] for e in entries]
    return scan


def cf_attributes(attrs: dict[str, Any]) -> dict[str, str]:
    """The descriptive CF attributes of a variable (what the store records per channel)."""
    return {k: str(attrs[k]) for k in ("units", "long_name", "standard_name") if k in attrs}


def _check_grid(scan: SourceScan, ds: xr.Dataset, path: str) -> None:
    lat, lon = ds["lat"].values, ds["lon"].values
    if scan.lat is None:
        scan.lat, scan.lon = lat, lon
        return
    if not _same_axis(lat, scan.lat) or not _same_axis(lon, scan.lon):
        raise SourceError(
            f"grid of {path} ({lat.size} x {lon.size}) differs from the first file of its source "
            f"({scan.lat.size} x {scan.lon.size})",
            "all files must share one grid; regrid them first or split them into separate runs")


def _same_axis(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.allclose(a, b, rtol=0, atol=1e-6)


def _check_times_increasing(files: list[SourceFile]) -> None:
    previous: SourceFile | None = None
    for entry in files:
        times = entry.times
        steps = np.asarray(times[1:] > times[:-1]) if len(times) > 1 else np.array([True])
        if not steps.all():
            i = int(np.argmin(steps))
            kind = "duplicate" if times[i + 1] == times[i] else "non-monotonic"
            raise SourceError(f"{entry.path}: {kind} time at index {i + 1} ({times[i + 1]})",
                              "remove the repeated or misordered steps from the file")
        if previous is not None and times[0] <= previous.times[-1]:
            raise SourceError(
                f"times of {entry.path} (from {times[0]}) overlap {previous.path} "
                f"(to {previous.times[-1]})", "remove duplicate files or steps from the sources")
        previous = entry


def scan_sources(cfg: Data) -> list[SourceScan]:
    """Scan every source and check that all of them share one grid."""
    scans = [scan_source(src, cfg.level_dim) for src in cfg.sources]
    first = scans[0]
    for scan in scans[1:]:
        if not (_same_axis(scan.lat, first.lat) and _same_axis(scan.lon, first.lon)):
            raise SourceError(
                f"grid of source '{scan.source.path}' ({scan.lat.size} x {scan.lon.size}) differs "
                f"from source '{first.source.path}' ({first.lat.size} x {first.lon.size})",
                "all sources must share one grid")
    return scans


def time_axis(scans: list[SourceScan], cfg: Data) -> pd.Index:
    """The store's time axis: times every dynamic source has, within start/end, regular.

    Raises on gaps (a missing step at the configured frequency) and on sources that
    cover different periods.
    """
    axes = []
    for scan in scans:
        if scan.source.static:
            continue
        axes.append((scan, concat_times([f.times for f in scan.files])))
    if not axes:
        raise SourceError("no time-dependent source", "add a source without 'static: true'")
    index = axes[0][1]
    index = index[within(index, cfg.start, cfg.end)]
    if len(index) == 0:
        raise SourceError(f"no time steps between data.start={cfg.start} and data.end={cfg.end}",
                          f"the sources cover {axes[0][1][0]} to {axes[0][1][-1]}")
    for scan, other in axes[1:]:
        other = other[within(other, cfg.start, cfg.end)]
        missing = index.difference(other)
        if len(missing):
            raise SourceError(f"source '{scan.source.path}' lacks {len(missing)} time steps that "
                              f"source '{axes[0][0].source.path}' has (first: {missing[0]})",
                              "give every source the same period, or narrow data.start/end")
    check_regular(index, cfg.frequency)
    return index


def concat_times(indexes: list[pd.Index]) -> pd.Index:
    """Join time indexes, keeping a CFTimeIndex (with its calendar) for cftime dates."""
    joined = indexes[0].append(list(indexes[1:])) if len(indexes) > 1 else indexes[0]
    if isinstance(indexes[0], xr.CFTimeIndex) and not isinstance(joined, xr.CFTimeIndex):
        joined = xr.CFTimeIndex(joined)
    return joined


def within(index: pd.Index, start: str | None, end: str | None) -> np.ndarray:
    """Boolean mask of ``index`` within the inclusive, string-given range."""
    positions = np.arange(len(index))
    try:
        selected = xr.DataArray(positions, dims="time", coords={"time": index}).sel(
            time=slice(start, end))
    except (ValueError, TypeError, KeyError) as err:
        calendar = _calendar_of(index) or "standard"
        raise SourceError(f"time range [{start}, {end}] cannot be compared with the data's "
                          f"'{calendar}' calendar: {err}",
                          "give valid dates of that calendar (e.g. no 31st in 360_day)") from None
    mask = np.zeros(len(index), dtype=bool)
    mask[selected.values] = True
    return mask


def time_label(t: Any) -> str:
    """A time as ISO text, for messages and attributes (numpy and cftime alike)."""
    if isinstance(t, (np.datetime64, pd.Timestamp)):
        return pd.Timestamp(t).isoformat()
    return t.isoformat() if hasattr(t, "isoformat") else str(t)


def check_regular(index: pd.Index, frequency: str) -> None:
    """Raise naming the first gap if ``index`` is not every ``frequency`` step."""
    calendar = _calendar_of(index)
    try:
        expected = xr.date_range(start=index[0], periods=len(index), freq=frequency,
                                 calendar=calendar or "standard", use_cftime=calendar is not None)
    except ValueError as err:
        raise SourceError(f"data.frequency '{frequency}' is not a valid frequency: {err}",
                          "use a pandas offset such as 6h, 1D or MS") from None
    if len(index) and not _index_equal(index, expected):
        bad = int(np.argmax(~_elementwise_equal(index, expected)))
        raise SourceError(
            f"time gap: expected {time_label(expected[bad])} after {time_label(index[bad - 1])} "
            f"but the sources have {time_label(index[bad])} (data.frequency={frequency})",
            "fill the missing files or steps, or set data.start/data.end to avoid the gap")


def _calendar_of(index: pd.Index) -> str | None:
    """The cftime calendar of an index, or None for numpy datetimes."""
    return getattr(index, "calendar", None) if isinstance(index, xr.CFTimeIndex) else None


def _elementwise_equal(a: pd.Index, b: pd.Index) -> np.ndarray:
    return np.array([x == y for x, y in zip(a, b, strict=True)], dtype=bool)


def _index_equal(a: pd.Index, b: pd.Index) -> bool:
    return len(a) == len(b) and bool(_elementwise_equal(a, b).all())


@functools.lru_cache(maxsize=4)
def _open_for_reading(path: str, size: int, mtime: float, source_json: str) -> xr.Dataset:
    """``open_file``, kept open for the next windows of the same file: opening decodes
    the file's metadata and coordinates (9 ms for a month of the benchmark's data, a
    fifth of reading a shard's window). Keyed by size and modification time, so a file
    rewritten since is opened again; a handful are kept, as windows move forward."""
    return open_file(path, Source.model_validate_json(source_json))


def load_window(scans: list[SourceScan], times: pd.Index, names: dict[str, set[str]]) -> xr.Dataset:
    """Load the given time steps of the named variables from the dynamic sources.

    ``names`` maps a source path to the variables wanted from it. Only the files that
    hold the requested times are opened, and only those steps are read.
    """
    parts: list[xr.Dataset] = []
    for scan in scans:
        wanted = names.get(scan.source.path)
        if scan.source.static or not wanted:
            continue
        pieces = []
        for entry in scan.files:
            positions = np.flatnonzero(np.asarray(entry.times.isin(times)))
            if positions.size == 0:
                continue
            ds = _open_for_reading(entry.path, entry.size, entry.mtime, scan.source.model_dump_json())
            try:
                pieces.append(ds[sorted(wanted)].isel(time=positions).load())
            except Exception as err:  # noqa: BLE001 - a read error deep in a file
                raise SourceError(f"cannot read {entry.path}: {' '.join(str(err).split())[:200]}",
                                  "the file is corrupt or truncated; re-download or remove it"
                                  ) from None
        parts.append(xr.concat(pieces, dim="time", data_vars="all", coords="minimal",
                               compat="override", join="override") if len(pieces) > 1 else pieces[0])
    merged = xr.merge(parts, join="override", compat="override")
    if merged.sizes.get("time") != len(times):
        raise SourceError(f"sources changed while building: found {merged.sizes.get('time')} of "
                          f"{len(times)} steps from {times[0]}", "rerun the build")
    return merged


def load_static(scans: list[SourceScan], wanted: list[str]) -> xr.Dataset:
    """Load the named static fields (each from the first static source that has it)."""
    found: dict[str, xr.DataArray] = {}
    for scan in scans:
        if not scan.source.static:
            continue
        for entry in scan.files:
            ds = open_file(entry.path, scan.source)
            for name in wanted:
                if name in ds.data_vars and name not in found:
                    var = ds[name]
                    if "time" in var.dims:
                        var = var.isel(time=0, drop=True)
                    found[name] = var.drop_vars([c for c in var.coords if c not in ("lat", "lon")]).load()
            ds.close()
    return xr.Dataset(found)

"""Raw inputs: find files, open them lazily, validate them, and load time windows.

A *source* is a glob of NetCDF/HDF5 files (or one Zarr store) whose files follow each
other in time. Several sources (one per variable group, say) are merged on the same
grid and time axis. Opening is lazy (xarray's backend arrays, no dask), so scanning a
few hundred files for their metadata is cheap; :mod:`pipeline.data.windows` then reads
only the time steps a shard needs.
"""

from __future__ import annotations

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
from pipeline.data import grib
from pipeline.data.axes import LEVEL, TIME, standardise_axes
from pipeline.data.grid import normalise_grid
from pipeline.data.timeaxis import check_regular, period_labels
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
    level_dim: str = LEVEL  # data.level_dim, for opening its files again

    @property
    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(lat, lon) of the source, which its first file sets while it is scanned."""
        if self.lat is None or self.lon is None:
            raise RuntimeError(f"source {self.source.path}: grid read before its first file")
        return self.lat, self.lon

    def time_invariant(self) -> list[str]:
        """Variables without a time dimension: the static fields this source can give."""
        return [name for name, dims in self.variables.items()
                if self.source.static or TIME not in dims]


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
    if Path(path).suffix.lower() in grib.GRIB_SUFFIXES:
        return "cfgrib"
    return "netcdf4"


def open_file(path: str, source: Source, level_dim: str = LEVEL) -> xr.Dataset:
    """Open one file lazily, decode CF conventions, find and name its axes (``time``,
    ``lat``, ``lon``, ``level``: :mod:`pipeline.data.axes`), and orient its grid.

    Corrupt or truncated files raise :class:`SourceError` naming the file.
    """
    engine = _engine(path, source)
    decode_times = source.time is None
    kwargs: dict[str, Any] = {"engine": engine, "decode_times": decode_times, "cache": False}
    if engine == "zarr":
        kwargs["consolidated"] = _has_consolidated_metadata(path)
    elif engine == "cfgrib":
        kwargs["backend_kwargs"] = grib.backend_kwargs(source)
    elif source.filter_by_keys:
        raise SourceError(f"data.sources[].filter_by_keys is for GRIB files, not {path}",
                          "remove it, or set engine: cfgrib for GRIB files without a GRIB suffix")
    try:
        ds = xr.open_dataset(path, **kwargs)
    except Exception as err:  # noqa: BLE001 - any backend failure means an unreadable file
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        if engine == "cfgrib" and grib.is_build_error(err):
            raise grib.mixed_messages(path, err) from None
        raise SourceError(f"cannot read source file {path}: {reason}",
                          "the file is corrupt or truncated; re-download or remove it") from None
    if engine == "cfgrib":
        ds = grib.conform(ds, source, path)
    if source.rename:
        present = {k: v for k, v in source.rename.items() if k in ds.variables or k in ds.dims}
        ds = ds.rename(present)
    ds = standardise_axes(ds, source, level_dim, path)
    if source.time is not None:
        ds = _decode_integer_time(ds, source, path)
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
    if TIME not in ds.dims:
        raise SourceError(f"{path}: no dimension '{coding.dim}' for data.sources[].time.dim",
                          f"dimensions are {list(ds.dims)}")
    if TIME not in ds.variables:
        raise SourceError(f"{path}: the time dimension '{coding.dim}' has no values",
                          "name the variable that holds the steps with data.sources[].axes, "
                          "e.g. axes: {time: NAME}")
    encoded = xr.Dataset(coords={TIME: (TIME, ds[TIME].values, {"units": coding.units,
                                                               "calendar": coding.calendar})})
    try:
        decoded = xr.decode_cf(encoded)
    except Exception as err:  # noqa: BLE001
        raise SourceError(f"{path}: cannot decode time with units '{coding.units}': {err}",
                          "use CF units such as 'hours since 1996-01-05 00:00'") from None
    return ds.assign_coords(time=decoded[TIME])


def _stat(path: str) -> tuple[int, float]:
    if os.path.isdir(path):
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        return size, os.path.getmtime(path)
    st = os.stat(path)
    return st.st_size, st.st_mtime


def scan_source(source: Source, data: Data) -> SourceScan:
    """Open every file of a source for its metadata and check they fit together.

    Checks: readable files, the same grid in every file, times strictly increasing
    within and across files (no duplicates, no overlap). Each file's times are the
    store's labels of its steps (:func:`pipeline.data.timeaxis.period_labels`: a
    calendar period's start for monthly means). Gaps are checked later, against the
    configured frequency, on the merged axis.
    """
    scan = SourceScan(source=source, level_dim=data.level_dim)
    entries: list[tuple[Any, SourceFile, xr.Dataset]] = []
    for path in expand_paths(source):
        ds = open_file(path, source, data.level_dim)
        size, mtime = _stat(path)
        entry = SourceFile(path=os.path.abspath(path), size=size, mtime=mtime)
        if source.static:
            if TIME in ds.dims and ds.sizes[TIME] > 1:
                raise SourceError(f"static source file {path} has {ds.sizes[TIME]} time steps",
                                  "remove 'static: true': a source may hold time steps and "
                                  "time-invariant fields, which data.static can name")
        else:
            if TIME not in ds.dims:
                dims = ", ".join(f"{d} ({n})" for d, n in ds.sizes.items())
                raise SourceError(f"{path} has no time dimension among {dims}",
                                  "mark time-invariant files with 'static: true', name the "
                                  "time variable with data.sources[].axes: {time: NAME}, or set "
                                  "data.sources[].time for integer time steps")
            entry.times = period_labels(ds.indexes[TIME], _time_bounds(ds), data.frequency, path)
        _check_grid(scan, ds, path)
        for name, var in ds.data_vars.items():
            if {"lat", "lon"} <= set(var.dims):
                scan.variables.setdefault(str(name), tuple(str(d) for d in var.dims))
                scan.attributes.setdefault(str(name), cf_attributes(var.attrs))
                if LEVEL in var.dims:
                    scan.levels.setdefault(str(name), np.asarray(ds[LEVEL].values))
                    level_units = ds[LEVEL].attrs.get("units")
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


def _time_bounds(ds: xr.Dataset) -> np.ndarray | None:
    """The file's ``(time, 2)`` time bounds (CF ``bounds`` of the time axis), decoded
    like the times; None where it has none."""
    name = ds[TIME].attrs.get("bounds") or ds[TIME].encoding.get("bounds")
    if not name or name not in ds.variables or ds[name].ndim != 2:
        return None
    bounds = ds[name]
    if bounds.dims[0] != TIME:
        bounds = bounds.transpose(TIME, ...)
    return np.asarray(bounds.values)


def cf_attributes(attrs: dict[str, Any]) -> dict[str, str]:
    """The descriptive CF attributes of a variable (what the store records per channel)."""
    return {k: str(attrs[k]) for k in ("units", "long_name", "standard_name") if k in attrs}


def _check_grid(scan: SourceScan, ds: xr.Dataset, path: str) -> None:
    lat, lon = ds["lat"].values, ds["lon"].values
    if scan.lat is None:
        scan.lat, scan.lon = lat, lon
        return
    first_lat, first_lon = scan.grid
    if not _same_axis(lat, first_lat) or not _same_axis(lon, first_lon):
        raise SourceError(
            f"grid of {path} ({lat.size} x {lon.size}) differs from the first file of its source "
            f"({first_lat.size} x {first_lon.size})",
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
    scans = [scan_source(src, cfg) for src in cfg.sources]
    first = scans[0]
    first_lat, first_lon = first.grid
    for scan in scans[1:]:
        lat, lon = scan.grid
        if not (_same_axis(lat, first_lat) and _same_axis(lon, first_lon)):
            raise SourceError(
                f"grid of source '{scan.source.path}' ({lat.size} x {lon.size}) differs "
                f"from source '{first.source.path}' ({first_lat.size} x {first_lon.size})",
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


def _calendar_of(index: pd.Index) -> str | None:
    """The cftime calendar of an index, or None for numpy datetimes."""
    return getattr(index, "calendar", None) if isinstance(index, xr.CFTimeIndex) else None

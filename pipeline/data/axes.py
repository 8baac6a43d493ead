"""A source's axes, found by CF meaning and given the one set of names the pipeline uses.

Products name their axes in many ways: ``valid_time`` and ``pressure_level`` (ERA5 from
the current CDS), ``plev`` in Pa (CMIP6), ``isobaricInhPa`` (GRIB through cfgrib),
``latitude``; plain HDF5 files written with h5py have no coordinates at all, only
``phony_dim_*`` dimensions beside 1-D datasets that hold the values. This module finds
the time, latitude, longitude and vertical dimensions from CF attributes
(``standard_name``, ``axis``, ``units``, ``positive``, through cf-xarray), then from
common names, and renames them to ``time``, ``lat``, ``lon`` and ``level``. Pressure
levels are converted to hPa, the unit of config levels and channel names (``t850``).

Never silently wrong: a dimension without coordinate values is refused (the pipeline
never makes coordinates from array indices), and so are curvilinear, rotated-pole and
projected grids, whose area weights and solar angles would be wrong on a lat-lon grid.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import cf_xarray  # noqa: F401 - registers the .cf accessor
import numpy as np
import xarray as xr

from pipeline.config import Source
from pipeline.errors import SourceError

TIME, LAT, LON, LEVEL = "time", "lat", "lon", "level"
AXES = (TIME, LAT, LON, LEVEL)

PHONY = "phony_dim_"  # how netCDF-C and h5netcdf name dimensions without scales
LAT_NAMES = ("lat", "latitude")
LON_NAMES = ("lon", "longitude")
LEVEL_NAMES = ("level", "plev", "pressure_level", "isobaricInhPa", "pressure", "lev")

# factors from a pressure unit (lower case) to hPa
PRESSURE_IN_HPA = {"pa": 0.01, "hpa": 1.0, "mbar": 1.0, "millibar": 1.0, "millibars": 1.0,
                   "mb": 1.0, "kpa": 10.0, "bar": 1000.0}


def standardise_axes(ds: xr.Dataset, source: Source, level_dim: str, origin: str) -> xr.Dataset:
    """``ds`` with dimensions ``time`` (unless static), ``lat``, ``lon`` and, where it
    has one, ``level`` (in hPa for pressure levels), each holding the file's values."""
    ds = _promote_axis_variables(ds, source, origin)
    ds = _select(ds, source.select, origin)
    found = {LAT: _horizontal_dim(ds, "latitude", LAT_NAMES, source, origin),
             LON: _horizontal_dim(ds, "longitude", LON_NAMES, source, origin)}
    if not source.static:
        ds = _scalar_time_as_dimension(ds)
    time = _time_dim(ds, source, origin)
    if time is not None:
        found[TIME] = time
    level = _level_dim(ds, source, level_dim, origin)
    if level is not None:
        found[LEVEL] = level
    for axis, dim in found.items():
        if dim not in ds.variables and not (axis == TIME and source.time is not None):
            raise SourceError(
                f"{origin}: dimension '{dim}' ({axis}) has no coordinate values",
                f"name the variable that holds them with data.sources[].axes, e.g. axes: "
                f"{{{axis}: NAME}}; 1-D variables here: {_one_d_variables(ds) or 'none'}")
    ds = _rename(ds, {dim: axis for axis, dim in found.items() if dim != axis})
    if LEVEL in ds.dims:
        ds = _level_in_hpa(ds, source.level_units, origin)
    return ds


def _one_d_variables(ds: xr.Dataset) -> str:
    return ", ".join(f"{name} ({var.dims[0]}, {var.size})" for name, var in ds.variables.items()
                     if var.ndim == 1 and name not in ds.dims)


def _promote(ds: xr.Dataset, name: str, origin: str) -> xr.Dataset:
    """Make the 1-D variable ``name`` the coordinate of the dimension it lies along."""
    if name not in ds.variables:
        raise SourceError(f"{origin}: no variable '{name}' (data.sources[].axes)",
                          f"variables: {', '.join(map(str, ds.variables))}")
    var = ds[name]
    if var.ndim != 1:
        raise SourceError(f"{origin}: axis variable '{name}' has dimensions {list(var.dims)}",
                          "an axis is one 1-D variable")
    dim = str(var.dims[0])
    ds = ds.set_coords(name)
    return ds if dim == name else ds.swap_dims({dim: name})


def _promote_axis_variables(ds: xr.Dataset, source: Source, origin: str) -> xr.Dataset:
    """The source's ``axes`` option first; then, for each dimension without values, the
    one 1-D variable along it, if it is alone (:func:`_match_phony_dims` for HDF5)."""
    if any(str(d).startswith(PHONY) for d in ds.dims):
        ds = _match_phony_dims(ds, list(source.axes.values()), origin)
    for name in source.axes.values():
        ds = _promote(ds, name, origin)
    for dim in list(ds.dims):
        if dim in ds.variables:
            continue
        along = [n for n, v in ds.data_vars.items() if v.dims == (dim,)]
        if len(along) == 1:
            ds = _promote(ds, str(along[0]), origin)
    return ds


def _match_phony_dims(ds: xr.Dataset, named: list[str], origin: str) -> xr.Dataset:
    """A plain HDF5 file (h5py datasets, no dimension scales) read through netCDF-C or
    h5netcdf: every dimension is a ``phony_dim_N``, shared by all datasets' axes of one
    length, so a 1-D ``longitude`` may sit on the phony dimension of a gridded
    variable's time axis. Each gridded axis is matched to the 1-D variable of its
    length (the ``axes`` named, else every 1-D variable); two of one length are refused,
    since which axis is which cannot be told."""
    one_d = named or [str(n) for n, v in ds.data_vars.items()
                      if v.ndim == 1 and str(v.dims[0]).startswith(PHONY)]
    by_length: dict[int, list[str]] = {}
    for name in one_d:
        if name in ds.variables and ds[name].ndim == 1:
            by_length.setdefault(ds[name].size, []).append(name)
    coords = {name: (name, ds[name].values, ds[name].attrs) for names in by_length.values()
              for name in names}
    out = xr.Dataset(coords=coords, attrs=ds.attrs)
    for var_name, var in ds.data_vars.items():
        if var_name in coords:
            continue
        dims: list[Hashable] = []
        for dim, length in zip(var.dims, var.shape, strict=True):
            matches: Sequence[Hashable] = (by_length.get(length, []) if str(dim).startswith(PHONY)
                                       else [dim])
            if len(matches) > 1:
                raise SourceError(
                    f"{origin}: a plain HDF5 file without dimension scales, and "
                    f"{' and '.join(sorted(map(str, matches)))} both have {length} values: "
                    f"which axis of '{var_name}' is which cannot be told",
                    "attach the axes as HDF5 dimension scales (h5py: "
                    "dset.dims[i].attach_scale) or write the file as NetCDF")
            dims.append(matches[0] if matches else dim)
        renamed = var.variable.copy(deep=False)  # lazy: nothing is read here
        renamed.dims = tuple(dims)
        out[var_name] = renamed
    return out


def _select(ds: xr.Dataset, select: dict[str, Any], origin: str) -> xr.Dataset:
    """Pick one value of extra dimensions (an ensemble member, an ERA5 ``expver``)."""
    for dim, value in select.items():
        if dim not in ds.variables:
            raise SourceError(f"{origin}: data.sources[].select names '{dim}', which is not here",
                              f"dimensions: {', '.join(map(str, ds.dims))}")
        try:
            ds = ds.sel({dim: value}) if dim in ds.dims else ds.where(ds[dim] == value, drop=True)
        except KeyError:
            values = ", ".join(map(str, np.unique(ds[dim].values)[:10]))
            raise SourceError(f"{origin}: no {dim} = {value!r} (data.sources[].select)",
                              f"values there: {values}") from None
    return ds


def _dimension_candidates(ds: xr.Dataset, key: str, axis: str) -> list[str]:
    """Dimensions that cf-xarray identifies as ``key`` (a coordinate name such as
    ``latitude``) or as CF axis ``axis`` (``X``, ``Y``, ``Z``, ``T``)."""
    names = set(ds.cf.coordinates.get(key, [])) | set(ds.cf.axes.get(axis, []))
    return sorted(str(n) for n in names if n in ds.dims)


def _horizontal_dim(ds: xr.Dataset, key: str, names: tuple[str, ...], source: Source,
                    origin: str) -> str:
    """The dimension of latitudes (``key`` 'latitude') or longitudes ('longitude')."""
    axis = LAT if key == "latitude" else LON
    if axis in source.axes:
        return source.axes[axis]
    found = [d for d in ds.cf.coordinates.get(key, []) if d in ds.dims]
    found = found or [n for n in names if n in ds.dims]
    if len(found) == 1:
        dim = str(found[0])
        units = str(ds[dim].attrs.get("units", "deg")).lower() if dim in ds.variables else "deg"
        if not units.startswith("deg"):
            raise SourceError(f"{origin}: the {key} axis '{dim}' is in '{units}', not degrees: "
                              "a projected grid", "regrid to a regular latitude-longitude grid "
                              "first (e.g. with xESMF or CDO remapbil)")
        return dim
    _refuse_other_grids(ds, key, origin)
    dims = ", ".join(f"{d} ({n})" for d, n in ds.sizes.items())
    raise SourceError(f"{origin}: {'several' if found else 'no'} {key} dimensions among "
                      f"{dims}" + (f": {', '.join(map(str, found))}" if found else ""),
                      f"say which with data.sources[].axes, e.g. axes: {{{axis}: NAME}}, or "
                      f"rename it: rename: {{NAME: {axis}}}")


def _refuse_other_grids(ds: xr.Dataset, key: str, origin: str) -> None:
    """Curvilinear (2-D latitudes) and rotated-pole grids are not latitude-longitude."""
    two_d = [str(n) for n in ds.cf.coordinates.get(key, []) if ds[n].ndim == 2]
    if two_d:
        raise SourceError(f"{origin}: {key} '{two_d[0]}' is 2-D {list(ds[two_d[0]].dims)}: a "
                          "curvilinear grid", "regrid to a regular latitude-longitude grid "
                          "first (e.g. with xESMF or CDO remapbil)")
    rotated = [str(n) for n in ds.variables
               if ds[n].attrs.get("standard_name") in ("grid_latitude", "grid_longitude")]
    if rotated:
        raise SourceError(f"{origin}: a rotated-pole grid ({', '.join(rotated)})",
                          "regrid to a regular latitude-longitude grid first "
                          "(e.g. with xESMF or CDO remapbil)")


def _scalar_time_as_dimension(ds: xr.Dataset) -> xr.Dataset:
    """A file of one time step whose time is a scalar coordinate (cfgrib, one file per
    step) gets a time dimension of length 1 for its gridded variables."""
    if TIME in ds.dims or _dimension_candidates(ds, "time", "T"):
        return ds
    scalar = [str(n) for n in (TIME, *ds.cf.coordinates.get("time", []))
              if n in ds.coords and ds[n].ndim == 0]
    if not scalar:
        return ds
    gridded = [n for n, v in ds.data_vars.items() if v.ndim >= 2]
    expanded = ds[gridded].expand_dims(scalar[0])
    return expanded.merge(ds.drop_vars([*gridded, scalar[0]]), compat="override")


def _time_dim(ds: xr.Dataset, source: Source, origin: str) -> str | None:
    """The time dimension: the source's ``axes``/``time`` options, ``time``, or the one
    dimension CF attributes call time (``valid_time`` from the CDS); None if there is
    none (a static source, or a mistake that the scan reports with the dimensions)."""
    if TIME in source.axes:
        return source.axes[TIME]
    if source.time is not None:
        return source.time.dim if source.time.dim in ds.dims else None
    if TIME in ds.dims:
        return TIME
    found = _dimension_candidates(ds, "time", "T")
    if len(found) > 1:
        raise SourceError(f"{origin}: several time dimensions: {', '.join(found)}",
                          "say which with data.sources[].axes, e.g. axes: {time: NAME}")
    return found[0] if found else None


def _level_dim(ds: xr.Dataset, source: Source, level_dim: str, origin: str) -> str | None:
    """The vertical dimension: ``axes``/``data.level_dim`` by name, else the one that CF
    attributes (``positive``, ``standard_name: air_pressure``, ``axis: Z``) or a common
    name mark; None when the source has no levels."""
    if LEVEL in source.axes:
        return source.axes[LEVEL]
    if level_dim in ds.dims:
        return level_dim
    found = _dimension_candidates(ds, "vertical", "Z") or [n for n in LEVEL_NAMES if n in ds.dims]
    if len(found) > 1:
        raise SourceError(f"{origin}: several vertical dimensions: {', '.join(found)}",
                          "say which with data.level_dim or data.sources[].axes")
    return found[0] if found else None


def _rename(ds: xr.Dataset, names: dict[str, str]) -> xr.Dataset:
    """Rename dimensions (and their coordinates), dropping a non-dimension coordinate
    that holds the new name already (cfgrib's scalar ``time`` beside ``valid_time``)."""
    clash = [new for old, new in names.items() if new in ds.variables and new not in ds.dims]
    for new in clash:
        if new in ds.data_vars:
            raise SourceError(f"a data variable is called '{new}', the name of an axis",
                              f"rename it: rename: {{{new}: OTHER}}")
    return ds.drop_vars(clash).rename(names)


def _level_in_hpa(ds: xr.Dataset, units: str | None, origin: str) -> xr.Dataset:
    """Pressure levels converted to hPa (config levels and channel names are in hPa);
    other vertical coordinates (heights, model levels) keep their values and units."""
    level = ds[LEVEL]
    given = units or level.attrs.get("units")
    if not given:
        return ds
    factor = PRESSURE_IN_HPA.get(str(given).strip().lower())
    if factor is None:
        return ds
    values = np.round(np.asarray(level.values, dtype=np.float64) * factor, 6)
    attrs = {**level.attrs, "units": "hPa", "source_units": str(given)}
    return ds.assign_coords({LEVEL: (LEVEL, values, attrs)})

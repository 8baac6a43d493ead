"""Latitude-longitude grid helpers: canonical orientation, cell bounds, area weights,
area-weighted coarsening. (Finding and naming the axes is :mod:`pipeline.data.axes`.)

Area weights follow WeatherBench 2: each cell's area on the sphere is proportional to
the difference of the sines of its latitude bounds, which holds for global and regional
grids alike. Weights are normalised to mean 1 over the latitudes of the grid.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from pipeline.errors import SourceError


def canonical_longitudes(lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The columns to keep (indices into ``lon``, in their new order) and their new
    longitudes: one ascending axis whatever the source's convention.

    A global grid (its columns go round the circle at their usual spacing) becomes
    [0, 360). A regional grid stays one contiguous arc: in [0, 360) where that holds
    it whole (storm tracks over North America: 220..307.5), else starting in
    [-180, 180) (a European domain -30..40), so that no domain is split at a seam.
    Columns repeated modulo 360 (a 0 and a 360) are kept once, the first of them.
    """
    wrapped = np.mod(np.asarray(lon, dtype=np.float64), 360.0)
    wrapped = np.where(np.isclose(wrapped, 360.0), 0.0, wrapped)
    order = np.argsort(wrapped, kind="stable")
    _, first = np.unique(np.round(wrapped[order], 9), return_index=True)
    keep, values = order[first], wrapped[order[first]]
    if values.size < 2:
        return keep, values
    gaps = np.diff(np.append(values, values[0] + 360.0))
    widest = int(np.argmax(gaps))
    if gaps[widest] < 1.5 * np.median(gaps) or widest == values.size - 1:
        return keep, values  # global, or a regional arc that [0, 360) holds whole
    start = widest + 1
    keep = np.concatenate([keep[start:], keep[:start]])
    values = np.concatenate([values[start:], values[:start] + 360.0])
    return keep, values - 360.0 if values[0] >= 180.0 else values


def normalise_grid(ds: xr.Dataset) -> xr.Dataset:
    """Latitudes ascending; longitudes ascending and contiguous
    (:func:`canonical_longitudes`), duplicates dropped: files from different producers
    and conventions (-180..180, 0..360, wrapped past 360) line up on one grid."""
    keep, lon = canonical_longitudes(ds["lon"].values)
    ds = ds.isel(lon=keep).assign_coords(lon=("lon", lon, ds["lon"].attrs))
    lat = ds["lat"].values
    if lat.size > 1 and lat[0] > lat[-1]:
        ds = ds.isel(lat=slice(None, None, -1))
    if np.any(np.diff(ds["lat"].values) <= 0):
        raise SourceError("latitudes are not monotonic", "sort or fix the source grid")
    return ds


def lat_bounds(lat: np.ndarray) -> np.ndarray:
    """Cell bounds (n+1 values) of ascending latitude centres: midpoints, clipped at the poles."""
    lat = np.asarray(lat, dtype=np.float64)
    if lat.size == 1:
        return np.array([-90.0, 90.0])
    mid = 0.5 * (lat[1:] + lat[:-1])
    first = lat[0] - (mid[0] - lat[0])
    last = lat[-1] + (lat[-1] - mid[-1])
    return np.clip(np.concatenate([[first], mid, [last]]), -90.0, 90.0)


def area_weights(lat: np.ndarray) -> np.ndarray:
    """Relative cell areas per latitude row, normalised to mean 1 (float64)."""
    bounds = np.deg2rad(lat_bounds(lat))
    w = np.abs(np.sin(bounds[1:]) - np.sin(bounds[:-1]))
    return w / w.mean()


def coarsen_area_weighted(ds: xr.Dataset, factor: int) -> xr.Dataset:
    """Average blocks of ``factor`` x ``factor`` cells, weighting each by its area.

    Trailing rows/columns that do not fill a block are dropped. New latitudes are the
    area-weighted centres' plain mean, new longitudes the block means.
    """
    if factor == 1:
        return ds
    if ds.sizes["lat"] < factor or ds.sizes["lon"] < factor:
        raise SourceError(f"data.coarsen={factor} is larger than the grid "
                          f"({ds.sizes['lat']} x {ds.sizes['lon']})", "use a smaller factor")
    w = xr.DataArray(area_weights(ds["lat"].values), dims="lat", coords={"lat": ds["lat"]})
    blocks = {"lat": factor, "lon": factor}
    num = (ds * w).coarsen(blocks, boundary="trim").sum()
    den = w.coarsen(lat=factor, boundary="trim").sum() * factor
    out = num / den
    out = out.assign_coords(
        lat=ds["lat"].coarsen(lat=factor, boundary="trim").mean().values,
        lon=ds["lon"].coarsen(lon=factor, boundary="trim").mean().values,
    )
    for name, var in ds.data_vars.items():
        out[name].attrs = var.attrs
    return out

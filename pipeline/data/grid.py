"""Latitude-longitude grid helpers: canonical orientation, cell bounds, area weights,
area-weighted coarsening.

Area weights follow WeatherBench 2: each cell's area on the sphere is proportional to
the difference of the sines of its latitude bounds, which holds for global and regional
grids alike. Weights are normalised to mean 1 over the latitudes of the grid.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from pipeline.errors import SourceError

LAT_NAMES = ("lat", "latitude", "nav_lat", "y")
LON_NAMES = ("lon", "longitude", "nav_lon", "x")


def _find_dim(ds: xr.Dataset, names: tuple[str, ...], standard_name: str) -> str | None:
    """The dimension holding latitude (or longitude): by CF standard_name, then by name."""
    for name in ds.dims:
        if name in ds.coords and ds[name].attrs.get("standard_name") == standard_name:
            return str(name)
    for name in names:
        if name in ds.dims:
            return name
    return None


def standardise_grid_names(ds: xr.Dataset, origin: str) -> xr.Dataset:
    """Rename the horizontal dimensions to ``lat`` and ``lon``."""
    lat = _find_dim(ds, LAT_NAMES, "latitude")
    lon = _find_dim(ds, LON_NAMES, "longitude")
    if lat is None or lon is None:
        raise SourceError(f"{origin}: no latitude/longitude dimensions among {list(ds.dims)}",
                          "rename them with the source's 'rename' option, e.g. {y: lat, x: lon}")
    return ds.rename({k: v for k, v in ((lat, "lat"), (lon, "lon")) if k != v})


def normalise_grid(ds: xr.Dataset) -> xr.Dataset:
    """Latitudes ascending; longitudes in [0, 360), ascending, duplicates dropped.

    Sources in -180..180 or wrapped past 360 (a repeated 0/360 column) all become the
    same canonical grid, so that files from different producers line up.
    """
    lon = np.mod(ds["lon"].values.astype(np.float64), 360.0)
    lon = np.where(np.isclose(lon, 360.0), 0.0, lon)
    order = np.argsort(lon, kind="stable")
    _, first = np.unique(np.round(lon[order], 9), return_index=True)
    keep = order[first]
    ds = ds.isel(lon=keep).assign_coords(lon=("lon", lon[keep], ds["lon"].attrs))
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

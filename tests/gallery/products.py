"""Small files in the exact layouts of the products users feed the pipeline.

Each writer puts one product's files into a folder, with the product's names,
dimension order, units, attributes, calendar, orientation and longitude convention,
and values that are a known function of (time, level, latitude, longitude)
(:func:`truth`), so that a test can check the store at known points against it. The
configs that read them are ``configs/examples/<product>.yaml`` (documented in
``docs/data.md``), whose paths start with ``data/<product>/``.
"""

from __future__ import annotations

from pathlib import Path

import cftime
import h5py
import numpy as np
import pandas as pd
import xarray as xr

OFFSETS = {"t": 250.0, "z": 50000.0, "t2m": 280.0, "msl": 101000.0, "tas": 285.0, "ta": 240.0,
           "temperature": 245.0, "geopotential": 40000.0, "2m_temperature": 282.0,
           "tg": 10.0, "sst": 15.0, "ice": 0.5}


def truth(name: str, hours: np.ndarray | float, level: float, lat: np.ndarray | float,
          lon: np.ndarray | float) -> np.ndarray:
    """The value every product stores for ``name`` at a time (hours since 2000-01-01, or
    since the product's own reference), a level (hPa) and a point: it tells north from
    south, each level and each step apart, and is the same at lon -30 and 330."""
    lat_r, lon_r = np.deg2rad(lat), np.deg2rad(lon)
    return (OFFSETS[name] + 0.3 * np.asarray(lat) + 4.0 * np.sin(lon_r) + 2.0 * np.cos(lon_r)
            + 0.01 * level + 0.002 * np.asarray(hours) + 0.5 * np.cos(lat_r) * np.sin(lon_r))


def _grid_values(name: str, hours: np.ndarray, level: float, lat: np.ndarray,
                 lon: np.ndarray) -> np.ndarray:
    return truth(name, hours[:, None, None], level, lat[None, :, None],
                 lon[None, None, :]).astype(np.float32)


# ---------------------------------------------------------------- ERA5 from the CDS


def era5_cds(out: Path) -> Path:
    """ERA5 as the current CDS delivers NetCDF: ``valid_time`` (seconds since 1970),
    ``pressure_level`` (hPa), latitude 90..-90, longitude 0..345, scalar ``number``,
    ``expver`` along time; pressure and single levels in separate files, two files
    each in time, and an invariant file with one step (land-sea mask, orography)."""
    out.mkdir(parents=True, exist_ok=True)
    lat, lon = np.arange(90.0, -90.1, -15.0), np.arange(0.0, 360.0, 15.0)
    levels = np.array([1000.0, 850.0, 500.0])
    times = pd.date_range("2000-01-01", periods=32, freq="6h")
    hours = ((times - pd.Timestamp("2000-01-01")) / pd.Timedelta(hours=1)).to_numpy()
    coords = {"latitude": ("latitude", lat, {"units": "degrees_north", "standard_name": "latitude",
                                             "long_name": "latitude", "stored_direction": "decreasing"}),
              "longitude": ("longitude", lon, {"units": "degrees_east",
                                               "standard_name": "longitude", "long_name": "longitude"}),
              "number": ((), 0, {"long_name": "ensemble member numerical id", "units": "1",
                                 "standard_name": "realization"})}
    for half in (0, 1):
        sel = slice(16 * half, 16 * (half + 1))
        time_coords = {"valid_time": ("valid_time", times[sel], {"standard_name": "time",
                                                                 "long_name": "time"}),
                       "expver": ("valid_time", np.array(["0001"] * 16, dtype=object))}
        pl = xr.Dataset(coords={**coords, **time_coords,
                                "pressure_level": ("pressure_level", levels, {
                                    "units": "hPa", "standard_name": "air_pressure",
                                    "long_name": "pressure", "positive": "down"})})
        for name, long_name, units in (("t", "Temperature", "K"), ("z", "Geopotential", "m**2 s**-2")):
            pl[name] = (("valid_time", "pressure_level", "latitude", "longitude"),
                        np.stack([_grid_values(name, hours[sel], lev, lat, lon) for lev in levels],
                                 axis=1), {"units": units, "long_name": long_name,
                                           "GRIB_paramId": 130 if name == "t" else 129})
        sfc = xr.Dataset(coords={**coords, **time_coords})
        for name, long_name, units in (("t2m", "2 metre temperature", "K"),
                                       ("msl", "Mean sea level pressure", "Pa")):
            sfc[name] = (("valid_time", "latitude", "longitude"),
                         _grid_values(name, hours[sel], 0.0, lat, lon),
                         {"units": units, "long_name": long_name})
        encoding = {"valid_time": {"units": "seconds since 1970-01-01", "dtype": "int64",
                                   "calendar": "proleptic_gregorian"}}
        pl.to_netcdf(out / f"era5_pressure_levels_{half}.nc", encoding=encoding)
        sfc.to_netcdf(out / f"era5_single_levels_{half}.nc", encoding=encoding)
    invariant = xr.Dataset(coords={**coords, "valid_time": ("valid_time", times[:1],
                                                            {"standard_name": "time"})})
    invariant["lsm"] = (("valid_time", "latitude", "longitude"),
                        (np.abs(lat)[None, :, None] < 50) * np.ones((1, 1, lon.size)),
                        {"units": "(0 - 1)", "long_name": "Land-sea mask"})
    invariant["z"] = (("valid_time", "latitude", "longitude"),
                      100.0 * np.cos(np.deg2rad(lat))[None, :, None] * np.ones((1, 1, lon.size)),
                      {"units": "m**2 s**-2", "long_name": "Geopotential"})
    invariant.to_netcdf(out / "era5_invariant.nc", encoding={
        "valid_time": {"units": "seconds since 1970-01-01", "dtype": "int64"}})
    return out


# ---------------------------------------------------------------- WeatherBench 2


def weatherbench2(out: Path) -> Path:
    """A WeatherBench 2 / ARCO-style Zarr (v2, consolidated) store: one array per
    variable, dims ``time, level, longitude, latitude`` (longitude first, as the WB2
    equiangular stores), latitude ascending, levels in hPa without units, and the
    static ``land_sea_mask`` and ``geopotential_at_surface`` in the same store."""
    lat = np.linspace(-84.375, 84.375, 16)
    lon = np.arange(0.0, 360.0, 11.25)
    levels = np.array([500, 850, 1000])
    times = pd.date_range("2020-01-01", periods=48, freq="6h")
    hours = ((times - pd.Timestamp("2020-01-01")) / pd.Timedelta(hours=1)).to_numpy()
    ds = xr.Dataset(coords={"time": times, "level": ("level", levels), "latitude": lat,
                            "longitude": lon})
    for name in ("temperature", "geopotential"):
        ds[name] = (("time", "level", "longitude", "latitude"),
                    np.stack([_grid_values(name, hours, lev, lat, lon) for lev in levels],
                             axis=1).transpose(0, 1, 3, 2))
    ds["2m_temperature"] = (("time", "longitude", "latitude"),
                            _grid_values("2m_temperature", hours, 0.0, lat, lon).transpose(0, 2, 1))
    ds["land_sea_mask"] = (("longitude", "latitude"),
                           (np.abs(lat)[None, :] < 45) * np.ones((lon.size, 1)))
    ds["geopotential_at_surface"] = (("longitude", "latitude"),
                                     50.0 * np.sin(np.deg2rad(lon))[:, None] * np.ones((1, lat.size)))
    path = out / "era5_6h_wb2.zarr"
    out.mkdir(parents=True, exist_ok=True)
    ds.to_zarr(path, zarr_format=2, consolidated=True)
    return path


# ---------------------------------------------------------------- CMIP6 Amon


CMIP6_LEVELS_PA = np.array([100000.0, 85000.0, 50000.0, 25000.0, 1000.0, 500.0])


def cmip6_month_stamps(years: range, calendar: str = "noleap"
                       ) -> tuple[list[cftime.datetime], np.ndarray]:
    """Mid-month stamps and month bounds in a model calendar."""
    stamps, bounds = [], []
    for year in years:
        for month in range(1, 13):
            start = cftime.datetime(year, month, 1, calendar=calendar)
            end = cftime.datetime(year + month // 12, month % 12 + 1, 1, calendar=calendar)
            stamps.append(start + (end - start) / 2)
            bounds.append((start, end))
    return stamps, np.array(bounds)


def cmip6_amon(out: Path, calendar: str = "noleap") -> Path:
    """CMIP6 ``Amon`` output as ESGF serves it: one variable per file, files split in
    time (``_185001-185112``, ``_185201-185212``), a model calendar (``noleap``), means
    stamped mid-month with ``time_bnds``, ``plev`` in Pa (holding 1000 Pa and 500 Pa
    too), ``lat_bnds``/``lon_bnds``, and ``ta`` missing (1e20) below the surface."""
    out.mkdir(parents=True, exist_ok=True)
    lat, lon = np.arange(-85.0, 86.0, 10.0), np.arange(0.0, 360.0, 10.0)
    for years in (range(1850, 1852), range(1852, 1853)):
        stamps, bounds = cmip6_month_stamps(years, calendar)
        hours = np.array([(t - cftime.datetime(1850, 1, 1, calendar=calendar)).total_seconds()
                          / 3600 for t in stamps])
        base = xr.Dataset(coords={
            "time": ("time", stamps, {"bounds": "time_bnds", "axis": "T",
                                      "standard_name": "time"}),
            "lat": ("lat", lat, {"units": "degrees_north", "axis": "Y", "bounds": "lat_bnds",
                                 "standard_name": "latitude"}),
            "lon": ("lon", lon, {"units": "degrees_east", "axis": "X", "bounds": "lon_bnds",
                                 "standard_name": "longitude"})})
        base["time_bnds"] = (("time", "bnds"), bounds)
        base["lat_bnds"] = (("lat", "bnds"), np.stack([lat - 5, lat + 5], axis=1))
        base["lon_bnds"] = (("lon", "bnds"), np.stack([lon - 5, lon + 5], axis=1))
        span = f"{years[0]}01-{years[-1]}12"
        encoding = {"time": {"units": "days since 1850-01-01", "calendar": calendar},
                    "time_bnds": {"units": "days since 1850-01-01", "calendar": calendar}}
        tas = base.copy()
        tas["tas"] = (("time", "lat", "lon"), _grid_values("tas", hours, 0.0, lat, lon),
                      {"standard_name": "air_temperature", "units": "K",
                       "long_name": "Near-Surface Air Temperature"})
        tas.to_netcdf(out / f"tas_Amon_TOY-ESM_historical_r1i1p1f1_gn_{span}.nc",
                      encoding={**encoding, "tas": {"_FillValue": np.float32(1e20)}})
        ta = base.copy()
        values = np.stack([_grid_values("ta", hours, p / 100, lat, lon) for p in CMIP6_LEVELS_PA],
                          axis=1)
        values[:, 0][:, cmip6_below_surface(lat, lon)] = np.nan  # 1000 hPa under the mountains
        ta = ta.assign_coords(plev=("plev", CMIP6_LEVELS_PA, {
            "units": "Pa", "axis": "Z", "positive": "down", "standard_name": "air_pressure"}))
        ta["ta"] = (("time", "plev", "lat", "lon"), values,
                    {"standard_name": "air_temperature", "units": "K", "long_name": "Air Temperature"})
        ta.to_netcdf(out / f"ta_Amon_TOY-ESM_historical_r1i1p1f1_gn_{span}.nc",
                     encoding={**encoding, "ta": {"_FillValue": np.float32(1e20)}})
    return out


def cmip6_below_surface(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Where 1000 hPa lies under the toy model's mountains: a block of the grid."""
    return (np.abs(lat - 40)[:, None] <= 10) & (np.abs(lon - 90)[None, :] <= 20)


# ---------------------------------------------------------------- E-OBS, a regional product


def eobs_regional(out: Path) -> Path:
    """An E-OBS-like regional daily product over Europe: longitudes -30..40 (across
    0 degrees), latitudes 35..70 ascending, days since 1950, and station-based fields
    missing over the sea (a fixed NaN mask)."""
    out.mkdir(parents=True, exist_ok=True)
    lat, lon = np.arange(35.0, 70.1, 2.5), np.arange(-30.0, 40.1, 2.5)
    times = pd.date_range("2010-01-01", periods=60, freq="1D")
    hours = ((times - pd.Timestamp("2010-01-01")) / pd.Timedelta(hours=1)).to_numpy()
    tg = _grid_values("tg", hours, 0.0, lat, lon)
    tg[:, eobs_sea(lat, lon)] = np.nan
    ds = xr.Dataset({"tg": (("time", "latitude", "longitude"), tg,
                            {"units": "Celsius", "long_name": "mean temperature",
                             "standard_name": "air_temperature"})},
                    coords={"time": times,
                            "latitude": ("latitude", lat, {"units": "degrees_north"}),
                            "longitude": ("longitude", lon, {"units": "degrees_east"})})
    ds.to_netcdf(out / "tg_ens_mean_0.25deg_reg_v29.0e.nc",
                 encoding={"time": {"units": "days since 1950-01-01 00:00"},
                           "tg": {"_FillValue": np.float32(-9999.0)}})
    return out


def eobs_sea(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """The toy E-OBS grid's sea (no stations): the west of the domain."""
    return (lon[None, :] < -15) & (lat[:, None] < 60)


# ---------------------------------------------------------------- plain HDF5


def plain_hdf5(out: Path) -> Path:
    """A plain HDF5 file written with h5py: datasets ``time`` (hours, with a units
    attribute), ``latitude`` (north to south), ``longitude`` and the fields, and no
    dimension scales, so readers see only ``phony_dim_*`` dimensions."""
    out.mkdir(parents=True, exist_ok=True)
    lat, lon = np.arange(60.0, -60.1, -10.0), np.arange(0.0, 360.0, 10.0)
    hours = np.arange(40) * 6 + 24 * 59  # from 2001-03-01 00:00
    with h5py.File(out / "model_output.h5", "w") as f:
        f["time"] = hours.astype(np.int64)
        f["time"].attrs["units"] = "hours since 2001-01-01 00:00:00"
        f["latitude"] = lat
        f["latitude"].attrs["units"] = "degrees_north"
        f["longitude"] = lon
        f["longitude"].attrs["units"] = "degrees_east"
        for name in ("t2m", "msl"):
            f[name] = _grid_values(name, hours.astype(float), 0.0, lat, lon)
            f[name].attrs["units"] = "K" if name == "t2m" else "Pa"
    return out


# ---------------------------------------------------------------- OISST: SST and sea ice


def oisst(out: Path) -> Path:
    """NOAA OISST-like daily files: dims ``time, zlev, lat, lon`` (one depth level of
    0 m), ``sst`` missing over land (fixed) and ``ice`` missing where there is no ice
    (its edge moves day by day: a time-varying mask), days since 1978-01-01."""
    out.mkdir(parents=True, exist_ok=True)
    lat, lon = np.arange(-80.0, 81.0, 10.0), np.arange(5.0, 360.0, 10.0)
    times = pd.date_range("2015-01-01", periods=40, freq="1D")
    hours = ((times - pd.Timestamp("2015-01-01")) / pd.Timedelta(hours=1)).to_numpy()
    sst = _grid_values("sst", hours, 0.0, lat, lon)
    sst[:, oisst_land(lat, lon)] = np.nan
    ice = _grid_values("ice", hours, 0.0, lat, lon) * 0 + 0.8
    ice[~oisst_ice(len(times), lat, lon)] = np.nan
    for half in (0, 1):
        sel = slice(20 * half, 20 * (half + 1))
        ds = xr.Dataset(
            {"sst": (("time", "zlev", "lat", "lon"), sst[sel, None],
                     {"units": "Celsius", "long_name": "Daily sea surface temperature"}),
             "ice": (("time", "zlev", "lat", "lon"), ice[sel, None],
                     {"units": "%", "long_name": "Sea ice concentration"})},
            coords={"time": times[sel],
                    "zlev": ("zlev", [0.0], {"units": "meters", "axis": "Z", "positive": "down"}),
                    "lat": ("lat", lat, {"units": "degrees_north"}),
                    "lon": ("lon", lon, {"units": "degrees_east"})})
        ds.to_netcdf(out / f"oisst-avhrr-v02r01.{half}.nc",
                     encoding={"time": {"units": "days since 1978-01-01 12:00:00",
                                         "dtype": "float32"}})
    return out


def oisst_land(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """The toy OISST grid's land: a continent in the tropics."""
    return (np.abs(lat)[:, None] <= 20) & (np.abs(lon - 180)[None, :] <= 40)


def oisst_ice(n_days: int, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """``(time, lat, lon)``: ice poleward of a latitude that moves 1 degree a day."""
    edge = 75.0 - np.arange(n_days) * 1.0
    return np.abs(lat)[None, :, None] >= edge[:, None, None] + 0 * lon[None, None, :]

"""Source conventions the store normalises: calendars, monthly means, longitude
conventions, coarsening, NaN filling, Zarr sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pipeline.config import load_config
from pipeline.data.build import preprocess
from pipeline.demo.simulation import simulate, static_fields
from pipeline.demo.spec import demo_spec
from tests.conftest import base_config, write_config

pytestmark = pytest.mark.integration


def write_raw(out: Path, months: list[xr.Dataset], static: xr.Dataset) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(months):
        ds.to_netcdf(out / f"demo_{i:02d}.nc")
    static.to_netcdf(out / "static.nc")
    return out


def build(tmp_path: Path, raw: Path, scheduler: str, **data) -> xr.Dataset:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = base_config(raw, tmp_path / "store.zarr", **data)
    preprocess(load_config(write_config(tmp_path / "c.yaml", cfg)), scheduler=scheduler)
    return xr.open_zarr(tmp_path / "store.zarr")


@pytest.mark.parametrize("calendar", ["noleap", "360_day"])
def test_model_calendars(calendar: str, tmp_path: Path, dask_scheduler: str) -> None:
    spec = demo_spec("tiny", calendar=calendar)
    raw = write_raw(tmp_path / "raw", list(simulate(spec)), static_fields(spec))
    splits = {"train": ["2000-01-01", "2000-02-15T18:00"], "val": ["2000-02-16", "2000-03-05T18:00"],
              "test": ["2000-03-06", "2000-03-30T18:00"]}  # valid dates in both calendars
    ds = build(tmp_path, raw, dask_scheduler, splits=splits)
    times = ds.indexes["time"]
    assert isinstance(times, xr.CFTimeIndex) and times.calendar == calendar
    days = {"noleap": 31 + 28 + 31, "360_day": 90}[calendar]
    assert ds.sizes["time"] == 4 * days
    # the year fraction follows the model calendar: sin_year is 0 at the start of the year
    assert abs(float(ds["data"].sel(channel="sin_year").isel(time=0).mean())) < 1e-6
    assert ds.attrs["complete"]


def test_monthly_means(tmp_path: Path, dask_scheduler: str) -> None:
    spec = demo_spec("tiny", months=5)
    monthly = [ds.resample(time="MS").mean() for ds in simulate(spec)]
    raw = write_raw(tmp_path / "raw", monthly, static_fields(spec))
    splits = {"train": ["2000-01-01", "2000-03-01"], "val": ["2000-04-01", "2000-04-01"],
              "test": ["2000-05-01", "2000-05-01"]}
    ds = build(tmp_path, raw, dask_scheduler, frequency="MS", splits=splits, shard_size=2,
               forcings=["sin_year"])
    assert [str(t)[:10] for t in ds["time"].values] == [f"2000-0{m}-01" for m in range(1, 6)]
    np.testing.assert_allclose(ds["data"].sel(channel="t2m").values,
                               np.concatenate([m["t2m"].values[:, ::-1] for m in monthly]))


def test_longitude_conventions_give_the_same_store(tiny_raw: Path, tmp_path: Path,
                                                   dask_scheduler: str) -> None:
    reference = build(tmp_path / "ref", tiny_raw, dask_scheduler)

    def to_pm180(ds: xr.Dataset) -> xr.Dataset:
        lon = ((ds["longitude"] + 180) % 360) - 180
        return ds.assign_coords(longitude=lon).sortby("longitude")

    def wrapped(ds: xr.Dataset) -> xr.Dataset:  # a repeated column at 360
        extra = ds.isel(longitude=[0]).assign_coords(longitude=[360.0])
        return xr.concat([ds, extra], dim="longitude")

    for name, change in (("pm180", to_pm180), ("wrapped", wrapped)):
        months = [change(xr.open_dataset(p).load()) for p in sorted(tiny_raw.glob("demo_*.nc"))]
        static = change(xr.open_dataset(tiny_raw / "static.nc").load())
        if name == "pm180":
            assert float(months[0]["longitude"].min()) < 0
        raw = write_raw(tmp_path / name / "raw", months, static)
        got = build(tmp_path / name, raw, dask_scheduler)
        np.testing.assert_array_equal(got["lon"].values, reference["lon"].values)
        np.testing.assert_array_equal(got["data"].values, reference["data"].values)
        np.testing.assert_array_equal(got["static"].values, reference["static"].values)


def test_coarsening_is_area_weighted(tiny_raw: Path, tmp_path: Path, dask_scheduler: str) -> None:
    ds = build(tmp_path, tiny_raw, dask_scheduler, coarsen=2, forcings=[])
    raw = xr.open_dataset(tiny_raw / "demo_2000-01.nc").sortby("latitude")
    lat = raw["latitude"].values  # 17 rows: the coarse grid keeps 16 of them
    edges = np.concatenate([[-90.0], 0.5 * (lat[1:] + lat[:-1]), [90.0]])
    area = np.abs(np.diff(np.sin(np.deg2rad(edges))))
    x = raw["t2m"].values[0].astype(np.float64)[:16]
    w = np.broadcast_to(area[:16, None], x.shape)
    blocks = (x * w).reshape(8, 2, 16, 2).sum(axis=(1, 3)) / w.reshape(8, 2, 16, 2).sum(axis=(1, 3))
    assert ds.sizes["lat"] == 8 and ds.sizes["lon"] == 16
    np.testing.assert_allclose(ds["data"].sel(channel="t2m").values[0], blocks, rtol=1e-6)


def test_nan_fill_policy_stores_a_mask(tiny_raw: Path, tmp_path: Path, dask_scheduler: str) -> None:
    months = [xr.open_dataset(p).load() for p in sorted(tiny_raw.glob("demo_*.nc"))]
    values = months[1]["t2m"].values.copy()
    values[3, 2, 5] = np.nan
    months[1]["t2m"] = months[1]["t2m"].copy(data=values)
    raw = write_raw(tmp_path / "raw", months, xr.open_dataset(tiny_raw / "static.nc").load())
    ds = build(tmp_path, raw, dask_scheduler, nan={"policy": "fill", "fill_value": -1.0,
                                                    "channels": ["t2m"]})
    assert "t2m_mask" in list(ds["channel"].values)
    mask = ds["data"].sel(channel="t2m_mask").values
    step = months[0].sizes["time"] + 3
    assert mask.sum() == 1 and mask[step, 14, 5] == 1  # latitude flipped: row 2 -> 14
    assert ds["data"].sel(channel="t2m").values[step, 14, 5] == -1.0


def test_zarr_source(tiny_raw: Path, tmp_path: Path, dask_scheduler: str) -> None:
    reference = build(tmp_path / "ref", tiny_raw, dask_scheduler)
    merged = xr.open_mfdataset(sorted(tiny_raw.glob("demo_*.nc")), combine="by_coords").load()
    merged.to_zarr(tmp_path / "raw.zarr", zarr_format=3, consolidated=False)
    sources = [{"path": str(tmp_path / "raw.zarr")},
               {"path": str(tiny_raw / "static.nc"), "static": True}]
    got = build(tmp_path / "zarr", tiny_raw, dask_scheduler, sources=sources)
    np.testing.assert_array_equal(got["data"].values, reference["data"].values)


def test_h5netcdf_engine_and_time_range(tiny_raw: Path, tmp_path: Path, dask_scheduler: str) -> None:
    reference = build(tmp_path / "ref", tiny_raw, dask_scheduler)
    sources = [{"path": str(tiny_raw / "demo_*.nc"), "engine": "h5netcdf"},
               {"path": str(tiny_raw / "static.nc"), "static": True, "engine": "h5netcdf"}]
    got = build(tmp_path / "h5", tiny_raw, dask_scheduler, sources=sources,
                start="2000-01-10", end="2000-03-20T18:00")
    window = reference["data"].sel(time=slice("2000-01-10", "2000-03-20T18:00"))
    assert got.sizes["time"] == window.sizes["time"] == 4 * (22 + 29 + 20)
    np.testing.assert_array_equal(got["data"].values, window.values)
    assert got.attrs["time_start"].startswith("2000-01-10")

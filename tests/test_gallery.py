"""The products users have, end to end: each fixture of ``tests/gallery`` through its
example config (``configs/examples``), checked at known points against the values it
was written with, then trained, evaluated and forecast with tiny settings."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cftime
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from pipeline.config import Config, config_from_dict
from pipeline.data.build import preprocess
from pipeline.errors import SourceError
from pipeline.evaluate.evaluate import evaluate
from pipeline.evaluate.forecast import predict
from pipeline.train.loop import train_loop
from pipeline.train.runtime import local_runtime
from tests.conftest import run_cli
from tests.gallery import grib, products
from tests.gallery.products import truth

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
WRITERS: dict[str, Callable[[Path], Path]] = {
    "era5_cds": products.era5_cds, "weatherbench2": products.weatherbench2,
    "cmip6_amon": products.cmip6_amon, "eobs_regional": products.eobs_regional,
    "plain_hdf5": products.plain_hdf5, "oisst": products.oisst, "era5_grib": grib.write_era5_grib,
    "cmip6_amon_360_day": functools.partial(products.cmip6_amon, calendar="360_day")}
CONFIG_OF = {"cmip6_amon_360_day": "cmip6_amon"}  # fixtures read by another's example
TINY = {"model": {"width": 4, "depth": 1},
        "train": {"max_steps": 3, "batch_size": 2, "val_every": 3, "checkpoint_every": 3,
                  "warmup_steps": 0, "workers": 1}}


def _relocate(node: Any, old: str, new: str) -> Any:
    if isinstance(node, dict):
        return {k: _relocate(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_relocate(v, old, new) for v in node]
    return node.replace(old, new) if isinstance(node, str) else node


def example_tree(product: str, files: Path, tmp: Path) -> dict[str, Any]:
    """``configs/examples/<product>.yaml`` reading the fixture's files, writing into tmp."""
    product = CONFIG_OF.get(product, product)
    tree = yaml.safe_load((REPO / "configs" / "examples" / f"{product}.yaml").read_text())
    tree = _relocate(tree, f"data/{product}/", f"{files}/")
    tree["data"]["store"] = str(tmp / "store.zarr")
    tree["runs_dir"] = str(tmp / "runs")
    return {**tree, **TINY}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory,
          dask_scheduler: str) -> Callable[[str], tuple[Config, xr.Dataset]]:
    """Each product's store, built once per module from its example config."""
    cache: dict[str, tuple[Config, xr.Dataset]] = {}

    def build(product: str) -> tuple[Config, xr.Dataset]:
        if product not in cache:
            tmp = tmp_path_factory.mktemp(product)
            files = WRITERS[product](tmp / "files")
            folder = files if files.is_dir() and files.suffix != ".zarr" else files.parent
            cfg = config_from_dict(example_tree(product, folder, tmp))
            preprocess(cfg, scheduler=dask_scheduler)
            cache[product] = (cfg, xr.open_zarr(cfg.data.store))
        return cache[product]

    return build


def at(ds: xr.Dataset, channel: str, time: Any, lat: float, lon: float) -> float:
    return float(ds["data"].sel(channel=channel, time=time, lat=lat, lon=lon).values)


def hours_since(t: str, ref: str) -> float:
    return (pd.Timestamp(t) - pd.Timestamp(ref)) / pd.Timedelta(hours=1)


def test_era5_from_the_cds(built) -> None:
    _, ds = built("era5_cds")
    np.testing.assert_array_equal(ds["lat"].values, np.arange(-90.0, 90.1, 15.0))
    np.testing.assert_array_equal(ds["lon"].values, np.arange(0.0, 360.0, 15.0))
    assert ds.sizes["time"] == 32 and str(ds["time"].values[0]).startswith("2000-01-01T00")
    t = "2000-01-05T06:00"
    h = hours_since(t, "2000-01-01")
    for channel, name, level in (("t850", "t", 850), ("t500", "t", 500), ("z500", "z", 500),
                                 ("t2m", "t2m", 0), ("msl", "msl", 0)):
        for lat, lon in ((60.0, 30.0), (-45.0, 345.0)):
            assert at(ds, channel, t, lat, lon) == pytest.approx(
                truth(name, h, level, lat, lon), rel=1e-6), (channel, lat, lon)
    lsm = ds["static"].sel(static_channel="lsm")
    assert float(lsm.sel(lat=45, lon=0)) == 1.0 and float(lsm.sel(lat=60, lon=0)) == 0.0
    assert ds.attrs["channel_attrs"]["t850"]["long_name"] == "Temperature at 850 hPa"


def test_weatherbench2_store_with_its_own_static_fields(built) -> None:
    _, ds = built("weatherbench2")
    lat, lon = ds["lat"].values, ds["lon"].values
    h = hours_since("2020-01-03T12:00", "2020-01-01")
    for channel, name, level in (("temperature850", "temperature", 850),
                                 ("geopotential500", "geopotential", 500),
                                 ("2m_temperature", "2m_temperature", 0)):
        assert at(ds, channel, "2020-01-03T12:00", lat[3], lon[5]) == pytest.approx(
            truth(name, h, level, lat[3], lon[5]), rel=1e-6), channel
    static = ds["static"]
    assert list(ds["static_channel"].values) == ["land_sea_mask", "geopotential_at_surface"]
    np.testing.assert_allclose(static.sel(static_channel="geopotential_at_surface").values,
                               50.0 * np.sin(np.deg2rad(lon))[None, :] * np.ones((lat.size, 1)),
                               atol=1e-4)
    np.testing.assert_array_equal(static.sel(static_channel="land_sea_mask").values,
                                  (np.abs(lat)[:, None] < 45) * np.ones((1, lon.size)))


def test_cmip6_monthly_means_in_pa_on_the_noleap_calendar(built) -> None:
    _, ds = built("cmip6_amon")
    times = ds.indexes["time"]
    assert isinstance(times, xr.CFTimeIndex) and times.calendar == "noleap"
    assert list(times) == [cftime.datetime(y, m, 1, calendar="noleap")
                           for y in (1850, 1851, 1852) for m in range(1, 13)]
    assert ds.attrs["frequency"] == "MS"
    stamps, _ = products.cmip6_month_stamps(range(1850, 1853))
    i = 25  # February 1852: stamped 1852-02-15 00:00, labelled 1852-02-01
    hours = (stamps[i] - cftime.datetime(1850, 1, 1, calendar="noleap")).total_seconds() / 3600
    for channel, level in (("ta850", 850), ("ta500", 500)):
        assert at(ds, channel, times[i], 25.0, 200.0) == pytest.approx(
            truth("ta", hours, level, 25.0, 200.0), rel=1e-6), channel  # not 8.5 or 5 hPa
    lat, lon = ds["lat"].values, ds["lon"].values
    below = products.cmip6_below_surface(lat, lon)
    mask = ds["data"].sel(channel="ta1000_mask").values
    assert (mask == below[None]).all() and below.any()
    ta1000 = ds["data"].sel(channel="ta1000").isel(time=i).values
    np.testing.assert_allclose(ta1000[~below], truth("ta", hours, 1000, lat[:, None],
                                                     lon[None, :])[~below], rtol=1e-6)


def test_regional_domain_across_zero_degrees_stays_contiguous(built) -> None:
    cfg, ds = built("eobs_regional")
    np.testing.assert_allclose(ds["lon"].values, np.arange(-30.0, 40.1, 2.5))
    assert ds.attrs["grid"]["lon_range"] == [-30.0, 40.0]
    h = hours_since("2010-01-20", "2010-01-01")
    for lon in (-10.0, 0.0, 37.5):
        assert at(ds, "tg", "2010-01-20", 62.5, lon) == pytest.approx(
            truth("tg", h, 0, 62.5, lon), rel=1e-6), lon
    sea = products.eobs_sea(ds["lat"].values, ds["lon"].values)
    assert (ds["data"].sel(channel="tg_mask").values == sea[None]).all()
    result = run_cli("inspect", cfg.data.store)
    assert result.returncode == 0 and "-30" in result.stdout and "357.5" not in result.stdout


def test_regional_coarsening_averages_neighbours(tmp_path: Path, dask_scheduler: str) -> None:
    files = products.eobs_regional(tmp_path / "files")
    tree = example_tree("eobs_regional", files, tmp_path)
    tree["data"]["coarsen"] = 2
    preprocess(config_from_dict(tree), scheduler=dask_scheduler)
    lon = xr.open_zarr(tmp_path / "store.zarr")["lon"].values
    np.testing.assert_allclose(lon, np.arange(-30.0, 37.6, 2.5).reshape(-1, 2).mean(axis=1))


def test_plain_hdf5_reads_its_own_coordinates(built) -> None:
    _, ds = built("plain_hdf5")
    assert str(ds["time"].values[0]).startswith("2001-03-01T00")
    assert ds.sizes["time"] == 40
    np.testing.assert_array_equal(ds["lat"].values, np.arange(-60.0, 60.1, 10.0))
    h = hours_since("2001-03-02T06:00", "2001-01-01")
    for lat in (60.0, -50.0):  # the north row labelled north
        assert at(ds, "t2m", "2001-03-02T06:00", lat, 120.0) == pytest.approx(
            truth("t2m", h, 0, lat, 120.0), rel=1e-6)


def test_plain_hdf5_without_the_axes_option_gives_the_same_store(tmp_path: Path,
                                                                dask_scheduler: str,
                                                                built) -> None:
    _, reference = built("plain_hdf5")
    files = products.plain_hdf5(tmp_path / "files")
    tree = example_tree("plain_hdf5", files, tmp_path)
    del tree["data"]["sources"][0]["axes"]
    preprocess(config_from_dict(tree), scheduler=dask_scheduler)
    ds = xr.open_zarr(tmp_path / "store.zarr")
    xr.testing.assert_identical(ds["data"].load(), reference["data"].load())


def test_oisst_fixed_and_moving_masks(built) -> None:
    _, ds = built("oisst")
    lat, lon = ds["lat"].values, ds["lon"].values
    land = products.oisst_land(lat, lon)
    assert (ds["data"].sel(channel="sst_mask").values == land[None]).all()
    no_ice = ~products.oisst_ice(ds.sizes["time"], lat, lon)
    ice_mask = ds["data"].sel(channel="ice_mask").values
    assert (ice_mask == no_ice).all() and (ice_mask[0] != ice_mask[-1]).any()
    h = hours_since("2015-01-10", "2015-01-01")
    assert at(ds, "sst", "2015-01-10", -40.0, 15.0) == pytest.approx(
        truth("sst", h, 0, -40.0, 15.0), rel=1e-6)


@pytest.mark.parametrize("product", sorted(WRITERS))
def test_train_evaluate_and_forecast(product: str, built, tmp_path: Path) -> None:
    cfg, ds = built(product)
    train_loop(cfg, local_runtime(cfg))
    result = evaluate(cfg, report=False)
    records = result["records"]
    assert records and all(np.isfinite(r["rmse"]) and np.isfinite(r["rmse_persistence"])
                           for r in records), records
    times = ds.indexes["time"]
    init = times[-2]  # the second step lies past the store's end
    out = predict(cfg.run_dir() / "best", init.isoformat(), 2, tmp_path / "forecast.zarr")
    forecast = xr.open_zarr(out)
    valid = list(forecast["valid_time"].values[0])
    assert valid[0] == times[-1], (valid, times[-1])
    if ds.attrs["frequency"] == "MS":  # the month after the store's last, in its calendar
        assert (valid[1].year * 12 + valid[1].month) - (times[-1].year * 12 + times[-1].month) == 1
        assert (valid[1].day, valid[1].hour) == (1, 0) and valid[1].calendar == times.calendar
    else:
        assert valid[1] - valid[0] == times[-1] - times[-2]
    for name, var in forecast.data_vars.items():
        if name.endswith("_mask") or "lat" not in var.dims:
            continue
        values = var.values
        masked = ds["data"].sel(channel=f"{name}_mask", time=init).values.astype(bool) \
            if f"{name}_mask" in ds["channel"].values else np.zeros(values.shape[-2:], bool)
        assert np.isnan(values[..., masked]).all() and np.isfinite(values[..., ~masked]).all(), name


# ---------------------------------------------------------------- mistakes, caught before writing


def _check_refused(tree: dict[str, Any], *fragments: str) -> None:
    with pytest.raises(SourceError) as err:
        preprocess(config_from_dict(tree), workers=1)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    assert not Path(tree["data"]["store"]).exists()


def test_time_invariant_variables_listed_as_variables_are_refused(tmp_path: Path) -> None:
    store = products.weatherbench2(tmp_path / "files")
    tree = example_tree("weatherbench2", store.parent, tmp_path)
    tree["data"]["variables"].append("land_sea_mask")
    _check_refused(tree, "'land_sea_mask' has no time dimension", "data.static")
    tree = example_tree("weatherbench2", store.parent, tmp_path)
    tree["data"]["sources"][0]["static"] = True
    _check_refused(tree, "time steps", "remove 'static: true'")
    tree = example_tree("weatherbench2", store.parent, tmp_path)
    tree["data"]["static"].append("temperature")
    _check_refused(tree, "static field 'temperature'", "list it under data.variables")


def test_levels_without_units_that_could_be_pa_or_hpa_are_refused(tmp_path: Path) -> None:
    files = products.cmip6_amon(tmp_path / "files")
    for path in files.glob("ta_*.nc"):
        ds = xr.load_dataset(path, decode_times=False)
        del ds["plev"].attrs["units"]
        ds.to_netcdf(path)
    tree = example_tree("cmip6_amon", files, tmp_path)
    tree["data"]["variables"] = [{"name": "ta", "levels": [1000, 500]}]
    del tree["data"]["nan"]
    _check_refused(tree, "ambiguous", "level_units")
    tree["data"]["sources"][1]["level_units"] = "Pa"
    tree["data"]["sources"] = tree["data"]["sources"][1:]
    tree["data"]["nan"] = {"policy": "fill"}
    cfg = config_from_dict(tree)
    from pipeline.data.build_plan import make_plan
    assert make_plan(cfg).channels.prognostic == ("ta1000", "ta500")


def test_several_steps_in_one_period_are_refused(tmp_path: Path) -> None:
    files = products.eobs_regional(tmp_path / "files")
    tree = example_tree("eobs_regional", files, tmp_path)
    tree["data"]["frequency"] = "MS"
    _check_refused(tree, "two steps in the period from 2010-01-01", "data.frequency")


def test_hdf5_axes_of_one_length_are_refused(tmp_path: Path) -> None:
    import h5py

    (tmp_path / "files").mkdir()
    with h5py.File(tmp_path / "files" / "model_output.h5", "w") as f:
        f["time"] = np.arange(4)
        f["time"].attrs["units"] = "hours since 2001-03-01"
        f["latitude"] = np.array([10.0, 0.0, -10.0])
        f["longitude"] = np.arange(0.0, 360.0, 90.0)  # 4 values, as many as the times
        f["t2m"] = np.zeros((4, 3, 4))
    tree = example_tree("plain_hdf5", tmp_path / "files", tmp_path)
    tree["data"]["variables"] = ["t2m"]
    _check_refused(tree, "longitude and time both have 4 values", "dimension scales")


def test_rotated_and_curvilinear_grids_are_refused(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    rlat, rlon = np.arange(-5.0, 5.1, 1.0), np.arange(-6.0, 6.1, 1.0)
    ds = xr.Dataset(
        {"tas": (("time", "rlat", "rlon"), np.zeros((8, rlat.size, rlon.size), np.float32))},
        coords={"time": pd.date_range("2000-01-01", periods=8, freq="6h"),
                "rlat": ("rlat", rlat, {"standard_name": "grid_latitude", "units": "degrees"}),
                "rlon": ("rlon", rlon, {"standard_name": "grid_longitude", "units": "degrees"}),
                "lat": (("rlat", "rlon"), np.zeros((rlat.size, rlon.size)),
                        {"standard_name": "latitude", "units": "degrees_north"}),
                "lon": (("rlat", "rlon"), np.zeros((rlat.size, rlon.size)),
                        {"standard_name": "longitude", "units": "degrees_east"})})
    ds.to_netcdf(tmp_path / "files" / "cordex.nc")
    tree = example_tree("eobs_regional", tmp_path / "files", tmp_path)
    tree["data"].update(sources=[{"path": str(tmp_path / "files" / "cordex.nc")}],
                        variables=["tas"], frequency="6h",
                        splits={"train": ["2000-01-01", "2000-01-01T12:00"],
                                "val": ["2000-01-01T18:00", "2000-01-01T18:00"],
                                "test": ["2000-01-02", "2000-01-02T18:00"]})
    _check_refused(tree, "curvilinear grid", "regrid")

"""GRIB sources through cfgrib: ERA5-like files written with ecCodes (tests/gallery/grib.py)
become a store whose values match the function the files were written from, at every
time, level and grid point; filters pick fields; bad filters and forecast files are
one-line errors before anything is written; no ``.idx`` files appear beside the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from pipeline.config import Source, config_from_dict
from pipeline.data.build import preprocess
from pipeline.data.sources import open_file
from pipeline.errors import SourceError
from tests.conftest import base_config, run_cli, write_config
from tests.gallery.grib import (
    LAT,
    LEVELS,
    LON,
    START,
    Field,
    land_sea_mask,
    packing_error,
    surface_geopotential,
    value,
    write_era5_grib,
    write_grib,
)
from tests.test_bad_inputs import assert_user_error

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TIMES = pd.date_range(START, periods=12, freq="6h")  # three days, as write_era5_grib writes
SPLITS = {"train": ["2000-01-01", "2000-01-02T06:00"], "val": ["2000-01-02T12:00", "2000-01-02T18:00"],
          "test": ["2000-01-03", "2000-01-03T18:00"]}


def grib_config(tmp_path: Path, sources: list[dict[str, Any]], variables: list[Any]) -> dict:
    return base_config(tmp_path, tmp_path / "store.zarr", sources=sources, variables=variables,
                       static=[], derived=[], forcings=[], splits=SPLITS, shard_size=4)


def example_config(raw: Path, tmp_path: Path) -> dict:
    """configs/examples/era5_grib.yaml, reading ``raw`` and writing into ``tmp_path``."""
    text = (REPO / "configs" / "examples" / "era5_grib.yaml").read_text()
    tree = yaml.safe_load(text.replace("data/era5_grib/", f"{raw}/"))
    tree["data"]["store"] = str(tmp_path / "store.zarr")
    return tree


def assert_channel(store: xr.Dataset, channel: str, short_name: str, level: float = 0) -> None:
    """The channel at every time and grid point equals what its GRIB messages were
    written with (up to float32 rounding and the packing's precision)."""
    lat, lon = store["lat"].values, store["lon"].values
    want = np.stack([value(short_name, t, level, lat[:, None], lon) for t in store.indexes["time"]])
    np.testing.assert_allclose(store["data"].sel(channel=channel).values, want,
                               rtol=2.0**-24, atol=packing_error(want))


def test_era5_download_becomes_the_store(tmp_path: Path, dask_scheduler: str) -> None:
    raw = write_era5_grib(tmp_path / "raw", days=3)
    preprocess(config_from_dict(example_config(raw, tmp_path)), scheduler=dask_scheduler)
    store = xr.open_zarr(tmp_path / "store.zarr")
    assert list(store.indexes["time"]) == list(TIMES)  # three daily files per source, joined
    np.testing.assert_array_equal(store["lat"].values, LAT[::-1])  # south to north
    np.testing.assert_array_equal(store["lon"].values, LON)
    # known points: the north pole row is labelled 90 and holds the GRIB's first row
    point = store["data"].sel(channel="t850", time="2000-01-02T06:00", lat=90.0, lon=30.0)
    assert float(point) == pytest.approx(value("t", TIMES[5], 850, 90.0, 30.0), abs=1e-4)
    point = store["data"].sel(channel="msl", time="2000-01-03T18:00", lat=-60.0, lon=300.0)
    assert float(point) == pytest.approx(value("msl", TIMES[-1], 0, -60.0, 300.0), abs=1e-2)
    for channel, name, level in (("t850", "t", 850), ("t500", "t", 500), ("z500", "z", 500),
                                 ("t2m", "2t", 0), ("msl", "msl", 0)):
        assert_channel(store, channel, name, level)
    static = store["static"]
    lat = np.broadcast_to(store["lat"].values[:, None], static.shape[1:])
    np.testing.assert_array_equal(static.sel(static_channel="lsm").values, land_sea_mask(lat))
    np.testing.assert_allclose(static.sel(static_channel="z_surface").values,
                               surface_geopotential(lat), atol=1e-4)
    assert not list(raw.glob("*.idx"))


def _mixed_files(raw: Path) -> None:
    """MARS-like retrievals that mix kinds of messages: upper air with a surface field,
    and one surface file per time step that also holds a pressure-level field."""
    write_grib(raw / "upper.grib", [f for t in TIMES for f in (
        *(Field(name, t, level) for name in ("t", "z") for level in LEVELS), Field("2t", t))])
    for t in TIMES:
        write_grib(raw / f"sfc_{t:%Y%m%d%H}.grb",
                   [Field("2t", t), Field("msl", t), Field("t", t, 850)])


def test_filters_pick_fields(tmp_path: Path, dask_scheduler: str) -> None:
    raw = tmp_path / "raw"
    _mixed_files(raw)
    upper = {"path": str(raw / "upper.grib"), "rename": {"isobaricInhPa": "level"},
             "filter_by_keys": {"shortName": "t", "typeOfLevel": "isobaricInhPa"}}
    surface = {"path": str(raw / "sfc_*.grb"), "filter_by_keys": {"typeOfLevel": "surface"}}
    assert list(open_file(str(raw / "upper.grib"), Source(**upper)).data_vars) == ["t"]
    assert sorted(open_file(str(raw / "sfc_2000010100.grb"), Source(**surface)).data_vars) == [
        "msl", "t2m"]
    variables = ["t2m", "msl", {"name": "t", "levels": list(LEVELS)}]
    config = write_config(tmp_path / "c.yaml", grib_config(tmp_path, [upper, surface], variables))
    result = run_cli("preprocess", str(config), "--scheduler", dask_scheduler, timeout=120)
    assert result.returncode == 0, result.stderr
    store = xr.open_zarr(tmp_path / "store.zarr")
    assert list(store.indexes["time"]) == list(TIMES)  # one file per step, joined
    for channel, name, level in (("t850", "t", 850), ("t500", "t", 500), ("t2m", "2t", 0),
                                 ("msl", "msl", 0)):
        assert_channel(store, channel, name, level)
    assert not list(raw.glob("*.idx"))


def test_one_forecast_step_is_read_at_its_valid_time(tmp_path: Path) -> None:
    path = write_grib(tmp_path / "forecast", [Field("msl", START, step=s) for s in (0, 6, 12)])
    ds = open_file(str(path), Source(path=str(path), engine="cfgrib",  # no GRIB suffix
                                     filter_by_keys={"step": 6}))
    valid = START + pd.Timedelta(hours=6)
    assert list(ds.indexes["time"]) == [valid]
    want = value("msl", valid, 0, ds["lat"].values[:, None], ds["lon"].values)
    np.testing.assert_allclose(ds["msl"].values[0], want, rtol=2.0**-24, atol=packing_error(want))
    assert not list(tmp_path.glob("*.idx"))


def test_filter_on_a_netcdf_source_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.nc"
    xr.Dataset({"t2m": (("lat", "lon"), np.zeros((2, 2)))},
               coords={"lat": [0.0, 1.0], "lon": [0.0, 1.0]}).to_netcdf(path)
    with pytest.raises(SourceError, match="filter_by_keys is for GRIB files"):
        open_file(str(path), Source(path=str(path), filter_by_keys={"shortName": "t"}))


def test_one_file_read_as_two_sources_with_two_filters(tmp_path: Path,
                                                       dask_scheduler: str) -> None:
    """What the error below suggests for a file with several types of level: the same
    path as two sources, one filter each. Each variable is read from its own source (the
    variables wanted were keyed by path, so each source was asked for both's)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    path = write_grib(raw / "mixed.grib", [
        field for t in TIMES for field in (Field("t", t, 850), Field("t", t, 500),
                                           Field("2t", t), Field("msl", t))])
    upper = {"path": str(path), "rename": {"isobaricInhPa": "level"},
             "filter_by_keys": {"typeOfLevel": "isobaricInhPa"}}
    surface = {"path": str(path), "filter_by_keys": {"typeOfLevel": "surface"}}
    variables = ["t2m", "msl", {"name": "t", "levels": list(LEVELS)}]
    config = write_config(tmp_path / "c.yaml", grib_config(tmp_path, [upper, surface], variables))
    result = run_cli("preprocess", str(config), "--scheduler", dask_scheduler, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    store = xr.open_zarr(tmp_path / "store.zarr")
    assert list(store.indexes["time"]) == list(TIMES)
    for channel, name, level in (("t850", "t", 850), ("t500", "t", 500), ("t2m", "2t", 0),
                                 ("msl", "msl", 0)):
        assert_channel(store, channel, name, level)


def test_several_types_of_level_suggest_filters(tmp_path: Path) -> None:
    path = write_grib(tmp_path / "t.grib", [Field("t", START, 850), Field("t", START)])
    with pytest.raises(SourceError, match="several values of typeOfLevel.*filter_by_keys: "
                                          "{typeOfLevel: isobaricInhPa} or {typeOfLevel: surface}"):
        open_file(str(path), Source(path=str(path)))


def _forecast(raw: Path) -> dict[str, Any]:
    write_grib(raw / "fc.grib", [Field("msl", t, step=s) for t in TIMES[::2] for s in (0, 6)])
    return {"path": str(raw / "fc.grib")}


def _bad_filter(raw: Path) -> dict[str, Any]:
    write_era5_grib(raw, days=3)
    return {"path": str(raw / "era5_single_levels_*.grib"), "filter_by_keys": {"shortName": "q"}}


def _mixed_unfiltered(raw: Path) -> dict[str, Any]:
    """``t`` on two levels and ``msl`` beside ``z`` on one: not one dataset for cfgrib."""
    write_grib(raw / "levels.grib", [f for t in TIMES for f in (
        Field("t", t, 850), Field("t", t, 500), Field("z", t, 500), Field("msl", t))])
    return {"path": str(raw / "levels.grib")}


@pytest.mark.parametrize(("make", "fragments"), [
    (_forecast, ["fc.grib holds forecasts with 2 steps (0, 6 hours)", "filter_by_keys",
                 "{step: 6}"]),
    (_bad_filter, ["no GRIB messages in", "match filter_by_keys {shortName: q}",
                   "the file has shortName: 2t/msl"]),
    (_mixed_unfiltered, ["as one GRIB dataset", "different levels or times",
                         "read each kind as its own source"]),
], ids=["forecast-steps", "bad-filter", "mixed-messages"])
def test_unreadable_grib_is_a_one_line_error(make: Any, fragments: list[str], tmp_path: Path,
                                             dask_scheduler: str) -> None:
    raw = tmp_path / "raw"
    config = write_config(tmp_path / "c.yaml", grib_config(tmp_path, [make(raw)], ["msl"]))
    result = run_cli("preprocess", str(config), "--scheduler", dask_scheduler, timeout=120)
    assert_user_error(result, *fragments)
    assert not (tmp_path / "store.zarr").exists()
    assert not list(raw.glob("*.idx"))

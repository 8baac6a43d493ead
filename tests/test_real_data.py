"""Real data: the storm fields from Debian's libncarg-data, through configs/storm.yaml.

Integer time steps with a reference time, longitudes in -180..180 on a regional grid,
one variable per file, NaN masks that differ between variables.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pipeline.data.grid import area_weights
from tests.conftest import IN_CI, run_cli
from tests.slurm_cluster import apt_install

pytestmark = pytest.mark.integration

STORM = Path("/usr/share/ncarg/data/cdf")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def storm_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (STORM / "Pstorm.cdf").exists():
        if os.geteuid() == 0 and shutil.which("apt-get"):
            apt_install("libncarg-data")  # as the Slurm fixture installs Slurm
        elif IN_CI:
            pytest.fail("libncarg-data is not installed; .ci/run must install it")
        else:
            pytest.skip("needs Debian's libncarg-data (apt-get install libncarg-data, as root)")
    store = tmp_path_factory.mktemp("storm") / "storm.zarr"
    result = run_cli("preprocess", str(REPO / "configs" / "storm.yaml"),
                     "--set", f"data.store={store}", "--workers", "2")
    assert result.returncode == 0, result.stderr
    return store


def raw(name: str) -> xr.DataArray:
    ds = xr.open_dataset(STORM / f"{name}storm.cdf", decode_times=False)
    return ds[[v for v in ds.data_vars if v != "reftime"][0]].load()


def test_storm_time_grid_and_masks(storm_store: Path) -> None:
    ds = xr.open_zarr(storm_store)
    assert ds.sizes["time"] == 64
    assert str(ds["time"].values[0]).startswith("1996-01-05T00")
    assert str(ds["time"].values[-1]).startswith("1996-01-20T18")
    np.testing.assert_allclose(ds["lon"].values, np.arange(36) * 2.5 + 220.0)
    assert ds["lat"].values[0] == 20.0 and ds["lat"].values[-1] == 60.0
    p = raw("P").values  # (time, lat, lon), lon ascending from -140 already
    missing = np.isnan(p)
    np.testing.assert_array_equal(ds["data"].sel(channel="slp_mask").values, missing.astype(np.float32))
    stored = ds["data"].sel(channel="slp").values
    np.testing.assert_array_equal(stored[~missing], p[~missing])
    assert (stored[missing] == 0.0).all()
    t_missing = np.isnan(raw("T").values)
    assert (t_missing != missing).any()  # masks differ per variable
    np.testing.assert_array_equal(ds["data"].sel(channel="t_mask").values, t_missing)


def test_storm_statistics_skip_filled_points(storm_store: Path) -> None:
    ds = xr.open_zarr(storm_store)
    p = raw("P").values[:40].astype(np.float64)  # the train split: 10 days
    w = np.broadcast_to(area_weights(ds["lat"].values)[None, :, None], p.shape)
    ok = np.isfinite(p)
    mean = np.average(p[ok], weights=w[ok])
    i = list(ds["channel"].values).index("slp")
    np.testing.assert_allclose(ds["mean"].values[i], mean, rtol=1e-6)
    np.testing.assert_allclose(ds["min"].values[i], np.nanmin(p))
    ws = list(ds["channel"].values).index("ws500")
    assert ds["min"].values[ws] > 0  # filled (zero) winds are not counted


def test_storm_inspect(storm_store: Path) -> None:
    result = run_cli("inspect", str(storm_store))
    assert result.returncode == 0 and "slp_mask" in result.stdout and "complete" in result.stdout

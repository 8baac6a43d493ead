"""Preprocessing end to end: real NetCDF files -> Zarr v3 store on a real Dask cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline.config import load_config
from pipeline.data import store
from pipeline.data.build import preprocess
from pipeline.data.grid import area_weights
from pipeline.errors import StoreError
from tests.conftest import run_cli

pytestmark = pytest.mark.integration


def build(config: Path, scheduler: str, **kwargs) -> str:
    return preprocess(load_config(config), scheduler=scheduler, **kwargs)


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a store (build bookkeeping included), for byte comparisons."""
    group = zarr.open_group(str(path), mode="r")
    out = {name: np.asarray(arr[:]) for name, arr in group.arrays()}
    out.update({f"_build/{n}": np.asarray(a[:]) for n, a in group["_build"].arrays()})
    return out


def assert_same_arrays(a: Path, b: Path) -> None:
    left, right = arrays(a), arrays(b)
    assert sorted(left) == sorted(right)
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_raw: Path, dask_scheduler: str) -> Path:
    from tests.conftest import base_config, write_config

    tmp = tmp_path_factory.mktemp("built")
    cfg = write_config(tmp / "c.yaml", base_config(tiny_raw, tmp / "store.zarr"))
    build(cfg, dask_scheduler)
    return tmp / "store.zarr"


def test_store_opens_with_plain_xarray_and_zarr(built: Path) -> None:
    ds = xr.open_zarr(built)
    group = zarr.open_group(str(built), mode="r")
    assert group.metadata.zarr_format == 3
    assert ds["data"].dims == ("time", "channel", "lat", "lon")
    assert ds["data"].dtype == np.float32
    names = [str(c) for c in ds["channel"].values]
    assert names == ["t2m", "msl", "t850", "t500", "u850", "v850", "ws850", "cos_zenith", "sin_year"]
    assert list(ds["channel_role"].values[:7]) == ["prognostic"] * 6 + ["derived"]
    assert np.all(np.diff(ds["lat"].values) > 0)
    assert np.all(np.diff(ds["lon"].values) > 0) and ds["lon"].min() >= 0 and ds["lon"].max() < 360
    data = group["data"]
    assert data.chunks == (1, len(names), 17, 32)
    assert data.shards == (16, len(names), 17, 32)
    assert ds.attrs["complete"] is True and ds.attrs["dataset_version"] == 1
    assert [str(s) for s in ds["static_channel"].values] == ["orog", "lsm"]
    assert ds.attrs["config"]["data"]["shard_size"] == 16
    assert len(ds.attrs["sources"]) == 4 and all("mtime" in s for s in ds.attrs["sources"])


def test_values_equal_independently_transformed_source(built: Path, tiny_raw: Path) -> None:
    raw = xr.open_mfdataset(sorted(tiny_raw.glob("demo_*.nc")), combine="by_coords")
    raw = raw.sortby("latitude")
    ds = xr.open_zarr(built)
    got = ds["data"]
    np.testing.assert_array_equal(got.sel(channel="t850").values,
                                  raw["t"].sel(level=850).values.astype(np.float32))
    np.testing.assert_array_equal(got.sel(channel="msl").values, raw["msl"].values)
    u, v = raw["u"].sel(level=850).values.astype(np.float64), raw["v"].sel(level=850).values
    np.testing.assert_allclose(got.sel(channel="ws850").values, np.hypot(u, v), rtol=1e-6)
    np.testing.assert_array_equal(ds["time"].values, raw["time"].values)
    # forcings: the sun is up at 12 UTC over lon 0 near the equator, down at lon 180
    noon = ds["time"].dt.hour.values == 12
    cz = got.sel(channel="cos_zenith").values[noon]
    eq = np.argmin(np.abs(ds["lat"].values))
    assert (cz[:, eq, 0] > 0.9).all() and (cz[:, eq, 16] == 0).all()
    static = xr.open_dataset(tiny_raw / "static.nc").sortby("latitude")
    np.testing.assert_array_equal(ds["static"].sel(static_channel="orog").values,
                                  static["orog"].values)


def test_statistics_equal_weighted_numpy_over_train_split(built: Path) -> None:
    ds = xr.open_zarr(built)
    train = ds["data"].sel(time=slice("2000-01-01", "2000-02-15T18:00")).values.astype(np.float64)
    w = np.broadcast_to(area_weights(ds["lat"].values)[None, :, None],
                        (train.shape[0], train.shape[2], train.shape[3]))
    for i, name in enumerate(ds["channel"].values):
        x = train[:, i]
        mean = np.average(x, weights=w)
        std = np.sqrt(np.average((x - mean) ** 2, weights=w))
        d = np.diff(x, axis=0)
        dmean = np.average(d, weights=w[1:])
        dstd = np.sqrt(np.average((d - dmean) ** 2, weights=w[1:]))
        np.testing.assert_allclose(ds["mean"].values[i], mean, rtol=1e-6, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(ds["std"].values[i], std, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(ds["diff_mean"].values[i], dmean, rtol=1e-6, atol=1e-7,
                                   err_msg=name)
        np.testing.assert_allclose(ds["diff_std"].values[i], dstd, rtol=1e-6, err_msg=name)
        assert ds["min"].values[i] == x.min() and ds["max"].values[i] == x.max()
    assert ds["mean"].dtype == np.float64
    assert ds.attrs["statistics_period"] == ["2000-01-01", "2000-02-15T18:00"]


def test_inspect_summarises_the_store(built: Path) -> None:
    result = run_cli("inspect", str(built))
    assert result.returncode == 0, result.stderr
    assert "complete: 23/23 shards" in result.stdout
    assert "ws850" in result.stdout and "derived" in result.stdout
    assert "train" in result.stdout and "orog" in result.stdout


def test_inspect_columns_fit_long_channel_names(make_config, tmp_path: Path,
                                               dask_scheduler: str) -> None:
    long = "wind_speed_at_850_hpa_from_u_and_v"
    config = make_config(store=tmp_path / "long.zarr", derived=[
        {"name": long, "function": "wind_speed", "inputs": ["u850", "v850"]}])
    build(config, dask_scheduler)
    result = run_cli("inspect", str(tmp_path / "long.zarr"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("channel"))
    rows = lines[lines.index(header) + 1:lines.index(header) + 10]
    role = header.index("role")
    names = [row[:role].strip() for row in rows]
    assert names == ["t2m", "msl", "t850", "t500", "u850", "v850", long, "cos_zenith", "sin_year"]
    ends = [header.index(key) + len(key) for key in ("mean", "std", "min", "max")]
    for row in rows:  # each column starts (names, roles) or ends (numbers) at the header's
        assert row[role - 1] == " " and row[role:].split()[0] in ("prognostic", "derived",
                                                                  "forcing"), row
        assert len(row) == ends[-1] and all(row[end - 1] != " " for end in ends), row
        assert len(row.split()) == 6, row  # name, role, mean, std, min, max


def test_inspect_into_a_closed_pipe_ends_quietly(built: Path) -> None:
    """``pipeline inspect STORE | head``: the reader goes away before the summary is
    written (here it closes the pipe at once, so that the write surely fails)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "inspect", str(built)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode in (0, 141), err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception" not in err, err


def test_parts_in_reverse_order_and_repeated_equal_one_run(
        built: Path, make_config, tmp_path: Path) -> None:
    config = make_config(store=tmp_path / "parts.zarr")
    for i in (3, 2, 2, 1):  # reverse order, part 2 twice
        result = run_cli("preprocess", str(config), "--part", f"{i}/3", "--workers", "1")
        assert result.returncode == 0, result.stderr
    assert not zarr.open_group(str(tmp_path / "parts.zarr")).attrs["complete"]
    with pytest.raises(StoreError, match="incomplete"):
        store.open_complete(tmp_path / "parts.zarr")
    result = run_cli("preprocess", str(config), "--workers", "1")  # finalise
    assert result.returncode == 0, result.stderr
    assert_same_arrays(built, tmp_path / "parts.zarr")


def test_rerun_of_complete_store_is_a_no_op(built: Path, tmp_path: Path, make_config,
                                            dask_scheduler: str) -> None:
    config = make_config(store=tmp_path / "s.zarr")
    build(config, dask_scheduler)
    before = os.stat(tmp_path / "s.zarr" / "zarr.json").st_mtime_ns
    assert "already complete" in build(config, dask_scheduler)
    assert os.stat(tmp_path / "s.zarr" / "zarr.json").st_mtime_ns == before


def test_append_equals_one_shot_build(built: Path, tiny_raw: Path, tmp_path: Path,
                                      make_config, dask_scheduler: str) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("demo_2000-01.nc", "demo_2000-02.nc", "static.nc"):
        shutil.copy2(tiny_raw / name, raw / name)
    config = make_config(raw=raw, store=tmp_path / "append.zarr")
    build(config, dask_scheduler)
    g = zarr.open_group(str(tmp_path / "append.zarr"))
    assert g.attrs["dataset_version"] == 1
    mean_before = g["mean"][:]
    assert "no new time steps" in build(config, dask_scheduler, append=True)
    shutil.copy2(tiny_raw / "demo_2000-03.nc", raw / "demo_2000-03.nc")
    build(config, dask_scheduler, append=True)
    g = zarr.open_group(str(tmp_path / "append.zarr"))
    assert g.attrs["dataset_version"] == 2 and g.attrs["complete"]
    np.testing.assert_array_equal(g["mean"][:], mean_before)  # statistics stay frozen
    assert g.attrs["statistics_version"] == 1
    one_shot = zarr.open_group(str(built))
    for name in ("data", "time", "lat", "lon", "static"):
        np.testing.assert_array_equal(g[name][:], one_shot[name][:], err_msg=name)
    ds = xr.open_zarr(tmp_path / "append.zarr")
    assert str(ds["time"].values[-1]).startswith("2000-03-31T18")

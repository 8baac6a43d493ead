"""Tests of the synthetic demo data: file contract, calendars, determinism, learnable physics."""

from __future__ import annotations

from pathlib import Path

import netCDF4
import numpy as np
import pytest
import xarray as xr

from pipeline.demo import files as demo_files
from pipeline.demo.files import write_demo_data
from pipeline.demo.simulation import simulate, static_fields
from pipeline.demo.spec import SIZES, DemoSpec, demo_spec

pytestmark = pytest.mark.unit

VARS_2D = ("t2m", "msl")
VARS_3D = ("t", "z", "u", "v")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The tiny demo (3 months) written once for the file-contract tests."""
    return write_demo_data(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="module")
def month() -> xr.Dataset:
    """One simulated tiny month, in memory."""
    return next(simulate(demo_spec("tiny", months=1)))


def _channels(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """Every variable and level as a float64 (time, lat, lon) array."""
    out = {}
    for name, var in ds.data_vars.items():
        if "level" in var.dims:
            for lev in var["level"].values:
                out[f"{name}{int(lev)}"] = var.sel(level=lev).values.astype(np.float64)
        else:
            out[name] = var.values.astype(np.float64)
    return out


def test_sizes_and_spec_validation() -> None:
    assert SIZES == ("tiny", "small", "large")
    tiny, small, large = (demo_spec(s) for s in SIZES)
    assert (tiny.n_lat, tiny.n_lon, tiny.levels, tiny.months) == (17, 32, (850.0, 500.0), 3)
    assert (small.n_lat, small.n_lon, len(small.levels), small.months) == (33, 64, 3, 6)
    assert (large.n_lat, large.n_lon, len(large.levels)) == (121, 240, 13)
    assert large.levels[0] == 1000.0 and large.levels[-1] == 50.0
    spec = demo_spec("tiny", levels=[700, 300], calendar="noleap", seed=3)
    assert spec.levels == (700.0, 300.0) and spec.calendar == "noleap" and spec.seed == 3
    with pytest.raises(ValueError, match="descending"):
        DemoSpec(n_lat=17, n_lon=32, levels=(500.0, 850.0))
    with pytest.raises(ValueError):
        DemoSpec(n_lat=17, n_lon=32, levels=(850.0,), calendar="martian")
    with pytest.raises(ValueError):
        DemoSpec(n_lat=17, n_lon=32, levels=(850.0,), calendar="noleap", start="2001-02-29")


def test_unknown_size_raises() -> None:
    with pytest.raises(ValueError, match="tiny, small, large"):
        demo_spec("huge")
    with pytest.raises(ValueError, match="huge"):
        write_demo_data(Path("unused"), "huge")


def test_deterministic() -> None:
    spec = demo_spec("tiny", months=1)
    a, b = next(simulate(spec)), next(simulate(spec))
    for name in a.data_vars:
        assert a[name].values.tobytes() == b[name].values.tobytes(), name
    assert static_fields(spec).identical(static_fields(spec))
    other = next(simulate(demo_spec("tiny", months=1, seed=1)))
    assert not np.array_equal(a["t2m"].values, other["t2m"].values)


def test_files_follow_the_contract(tiny_files: list[Path]) -> None:
    names = [p.name for p in tiny_files]
    assert names == ["demo_2000-01.nc", "demo_2000-02.nc", "demo_2000-03.nc", "static.nc"]
    assert sorted(p.name for p in tiny_files[0].parent.iterdir()) == sorted(names)  # no temp
    times = []
    for path in tiny_files[:-1]:
        with netCDF4.Dataset(path) as nc:
            assert nc.data_model == "NETCDF4"
            assert nc.variables["time"].units == "hours since 1970-01-01 00:00:00"
            assert nc.variables["time"].calendar == "standard"
        with xr.open_dataset(path, engine="netcdf4") as ds:
            assert ds.attrs["source"] == "pipeline synthetic demo"
            assert ds.attrs["Conventions"] == "CF-1.8" and ds.attrs["title"]
            assert ds.attrs["n_lat"] == 17 and ds.attrs["calendar"] == "standard"
            lat, lon, lev = ds["latitude"].values, ds["longitude"].values, ds["level"].values
            assert lat[0] == 90.0 and lat[-1] == -90.0 and np.all(np.diff(lat) < 0)
            assert lon[0] == 0.0 and np.all(np.diff(lon) > 0) and lon[-1] == 360.0 - 360.0 / 32
            assert list(lev) == [850.0, 500.0]
            assert ds["level"].attrs["units"] == "hPa" and ds["level"].attrs["positive"] == "down"
            assert ds["latitude"].attrs["units"] == "degrees_north"
            assert ds["longitude"].attrs["standard_name"] == "longitude"
            for name in VARS_2D + VARS_3D:
                var = ds[name]
                want = ("time", "level", "latitude", "longitude") if name in VARS_3D else (
                    "time", "latitude", "longitude")
                assert var.dims == want and var.dtype == np.float32, name
                assert {"units", "standard_name", "long_name"} <= set(var.attrs), name
                assert np.isfinite(var.values).all(), name
            times.append(ds["time"].values)
    times = np.concatenate(times)
    assert times[0] == np.datetime64("2000-01-01T00:00")
    assert times[-1] == np.datetime64("2000-03-31T18:00")
    assert np.all(np.diff(times) == np.timedelta64(6, "h"))      # no gap, no duplicate
    with xr.open_dataset(tiny_files[-1], engine="netcdf4") as st:
        assert "time" not in st.dims and st["orog"].dims == ("latitude", "longitude")
        assert set(np.unique(st["lsm"].values)) == {0.0, 1.0}
        assert st["orog"].attrs["units"] == "m" and float(st["orog"].min()) >= 0.0
        assert 0.15 < float(st["lsm"].mean()) < 0.6


@pytest.mark.parametrize(("calendar", "start", "steps"), [
    ("noleap", "2001-02-01", [112, 124]),
    ("360_day", "2000-02-30T12", [2, 120]),
])
def test_other_calendars(tmp_path: Path, calendar: str, start: str, steps: list[int]) -> None:
    spec = demo_spec("tiny", months=2, calendar=calendar, start=start)
    paths = write_demo_data(tmp_path, spec)
    assert [p.name for p in paths][:2] == [f"demo_{start[:7]}.nc",
                                           f"demo_{start[:5]}03.nc"]
    hours = []
    for path, n in zip(paths[:2], steps, strict=True):
        with xr.open_dataset(path, engine="netcdf4") as ds:
            assert ds.sizes["time"] == n
            assert ds["time"].values[0].calendar == calendar
            assert np.isfinite(ds["t2m"].values).all()
        with netCDF4.Dataset(path) as nc:
            assert nc.variables["time"].calendar == calendar
            hours.append(np.asarray(nc.variables["time"][:]))
    assert np.all(np.diff(np.concatenate(hours)) == 6)


def test_fields_are_physical(month: xr.Dataset) -> None:
    assert float(month["t2m"].min()) > 190.0 and float(month["t2m"].max()) < 320.0
    assert float(month["msl"].min()) > 9.4e4 and float(month["msl"].max()) < 1.08e5
    z = month["z"].values
    assert np.all(z[:, 1] > z[:, 0])                           # geopotential grows upward
    t = month["t"].values.astype(np.float64)
    thickness = 287.05 * 0.5 * (t[:, 0] + t[:, 1]) * np.log(850.0 / 500.0)
    np.testing.assert_allclose(z[:, 1] - z[:, 0], thickness, rtol=1e-4)   # hydrostatic
    for name in ("u", "v"):
        assert float(np.abs(month[name]).max()) < 120.0
    for name, a in _channels(month).items():
        assert np.isfinite(a).all(), name
        assert np.ptp(a[:, 0], axis=-1).max() == 0.0, name      # poles are single points
        assert np.ptp(a[:, -1], axis=-1).max() == 0.0, name
        wrap = np.abs(a[..., 0] - a[..., -1]).mean()            # longitude is periodic:
        inner = np.abs(np.diff(a, axis=-1)).mean()              # no seam at 0/360
        assert wrap < 2.0 * inner, name


def test_changes_but_is_predictable(month: xr.Dataset) -> None:
    """Persistence is clearly beatable, and a linear model on local values of the last steps
    (a 3x3 stencil now, the point 1, 3 and 4 steps ago) beats it on held-out time steps."""
    for name, a in _channels(month).items():
        rows = a[:, 1:-1]                                        # poles carry no signal
        n = a.shape[0]
        persistence = np.sqrt(np.mean((rows[5:] - rows[4:-1]) ** 2))
        assert persistence > 0.1 * rows.std(axis=0).mean(), name
        feats = [np.roll(np.roll(a, dj, axis=1), di, axis=2)[4:-1, 1:-1]
                 for dj in (-1, 0, 1) for di in (-1, 0, 1)]
        feats += [rows[3:-2], rows[1:-4], rows[:-5], np.ones_like(rows[4:-1])]
        x = np.stack([f.reshape(n - 5, -1) for f in feats], axis=-1)
        y = rows[5:].reshape(n - 5, -1)
        train, test = slice(0, 2 * n // 3), slice(2 * n // 3, None)
        scale = np.abs(x[train]).reshape(-1, x.shape[-1]).max(axis=0)
        coef = np.linalg.lstsq((x[train] / scale).reshape(-1, x.shape[-1]),
                               y[train].ravel(), rcond=None)[0]
        model = np.sqrt(np.mean(((x[test] / scale) @ coef - y[test]) ** 2))
        base = np.sqrt(np.mean((x[test][..., 4] - y[test]) ** 2))
        assert model < 0.6 * base, (name, model, base)


def test_months_continue_one_run(month: xr.Dataset) -> None:
    """A longer run starts with the same first month (appended data extends the series)."""
    longer = simulate(demo_spec("tiny", months=2))
    first = next(longer)
    assert first["t"].values.tobytes() == month["t"].values.tobytes()
    second = next(longer)
    gap = second["time"].values[0] - first["time"].values[-1]
    assert gap == np.timedelta64(6, "h")


def test_killed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: xr.Dataset, path: Path, **kwargs: object) -> None:
        Path(path).write_bytes(b"CDF truncated")
        raise OSError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", broken)
    with pytest.raises(OSError, match="disk full"):
        write_demo_data(tmp_path, demo_spec("tiny", months=1))
    assert list(tmp_path.iterdir()) == []


def test_only_small_grids_are_compressed() -> None:
    assert demo_files._compress(demo_spec("tiny")) and demo_files._compress(demo_spec("small"))
    assert not demo_files._compress(demo_spec("large"))
    ds = xr.Dataset({"t2m": (("time", "latitude", "longitude"), np.zeros((1, 2, 3), "f4"))})
    assert "zlib" not in demo_files._encoding(ds, compress=False)["t2m"]
    assert demo_files._encoding(ds, compress=True)["t2m"]["chunksizes"] == (1, 2, 3)

"""Unit tests of the pure pieces: config, statistics, grid, forcings, light imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from pipeline.config import apply_overrides, config_from_dict, config_hash, load_config
from pipeline.data import statistics
from pipeline.data.forcings import cos_zenith, forcing_field, toa_insolation
from pipeline.data.grid import area_weights, lat_bounds, normalise_grid
from pipeline.errors import ConfigError, PipelineError, SourceError

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- config


def test_demo_config_loads_and_hash_is_stable() -> None:
    a = load_config(REPO / "configs" / "demo.yaml")
    b = load_config(REPO / "configs" / "demo.yaml")
    assert config_hash(a) == config_hash(b)
    c = load_config(REPO / "configs" / "demo.yaml", ["train.max_steps=7"])
    assert c.train.max_steps == 7 and config_hash(c) != config_hash(a)
    assert a.data.prognostic_channels()[:4] == ["t2m", "msl", "t850", "t500"]


@pytest.mark.parametrize("override, fragments", [
    ("train.batch_sise=4", ["unknown config key 'train.batch_sise'", "did you mean 'batch_size'"]),
    ("train.batch_size=0", ["train.batch_size", "greater than or equal to 1"]),
    ("train.lead=0", ["train.lead"]),
    ("model.arch=transformer", ["model.arch", "'unet' or 'fno'"]),
    ("data.shard_size=[1]", ["data.shard_size", "integer"]),
    ("data.forcings=[sunshine]", ["data.forcings.0", "cos_zenith"]),
    ("data.derived=[{name: w, function: wind_speed, inputs: [nope]}]", ["unknown channels ['nope']"]),
    ("name=bad name", ["name"]),
])
def test_config_errors_name_the_key_and_allowed_values(override: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "demo.yaml", [override])
    message = info.value.one_line()
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_overrides_create_sections_and_parse_yaml() -> None:
    tree = apply_overrides({"a": {"b": 1}}, ["a.c.d=[1, 2]", "a.b=x", "e=true"])
    assert tree == {"a": {"b": "x", "c": {"d": [1, 2]}}, "e": True}
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["nokey"])


def test_unknown_top_level_key_lists_sections() -> None:
    with pytest.raises(ConfigError, match="allowed keys there: data, evaluate, model"):
        config_from_dict({"name": "x", "dat": {}})


def test_errors_pickle_with_their_hint() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(SourceError("bad file", "fix it")))
    assert isinstance(err, SourceError) and isinstance(err, ValueError)
    assert err.one_line() == "bad file (fix it)" and isinstance(err, PipelineError)


HEAVY = ("torch", "ray", "dask", "distributed", "zarr")
LIGHT = ("pipeline.cli", "pipeline.cli_args", "pipeline.config", "pipeline.errors",
         "pipeline.files", "pipeline.slurm", "pipeline.launch", "pipeline.plan",
         "pipeline.workflows", "pipeline.train.rundir", "pipeline.promotion",
         "pipeline.registry_listing", "pipeline.train.meta", "pipeline.train.schedule",
         "pipeline.evaluate.results", "pipeline.data.attrs")
"""The login node's modules, and the typed contracts they read (checkpoint meta,
evaluation metrics, store attributes)."""


def _imported_by(modules: tuple[str, ...], then: str = "") -> list[str]:
    """The HEAVY libraries loaded by a fresh interpreter that imports ``modules`` (and
    runs ``then``)."""
    code = "; ".join([f"import sys, {', '.join(modules)}", *([then] if then else []),
                      f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    return [m for m in out.stdout.strip().split(",") if m]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_do_not_import_heavy_libraries(module: str) -> None:
    """The login-node promise: rendering, planning and submitting jobs loads no torch,
    Ray, Dask or zarr."""
    assert _imported_by((module,)) == []


@pytest.mark.integration
def test_reading_a_stores_facts_loads_no_torch(tiny_store: Path) -> None:
    loaded = _imported_by(("pipeline.data.store",),
                          f"info = pipeline.data.store.StoreInfo({str(tiny_store)!r}); "
                          "assert info.layout.channels and info.n_time > 0")
    assert "torch" not in loaded and "ray" not in loaded, loaded


def test_a_broken_pipe_other_than_stdout_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI ends quietly when its stdout's reader goes away (tests/test_preprocess.py);
    any other broken pipe (a worker's) stays a failure."""
    from pipeline import cli

    def broken(args: object) -> int:
        raise BrokenPipeError("a worker's pipe")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    with pytest.raises(BrokenPipeError, match="worker"):
        cli.main(["inspect", "store.zarr"])


# --------------------------------------------------------------------------- statistics


def _weighted(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    mean = np.average(x, weights=w)
    return mean, np.sqrt(np.average((x - mean) ** 2, weights=w))


def test_partials_merge_to_numpy_in_any_split_and_order() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 3.0, size=(20, 3, 4, 6)).astype(np.float32)
    lat_w = area_weights(np.linspace(-80, 80, 4))
    valid = np.ones_like(x)
    valid[3, 1, 2, 2] = 0.0  # a filled value: must not count
    train = np.arange(20) < 15
    cuts = [0, 4, 9, 15, 20]
    parts = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        w0 = max(lo - 1, 0)
        steps = np.arange(w0, hi)
        in_values = (steps >= lo) & train[steps]
        in_diffs = in_values & np.concatenate([[False], train[steps[:-1]]])
        parts.append(statistics.shard_partial(x[w0:hi], valid[w0:hi], lat_w, in_values, in_diffs))
    forward = statistics.finalise(statistics.merge_all(np.stack(parts)))
    backward = statistics.finalise(statistics.merge_all(np.stack(parts[::-1])))
    xs = x[:15].astype(np.float64)
    w = np.broadcast_to(lat_w[None, :, None], xs[:, 0].shape) * valid[:15, 0]
    for c in range(3):
        wc = np.broadcast_to(lat_w[None, :, None], xs[:, c].shape) * valid[:15, c]
        mean, std = _weighted(xs[:, c], wc)
        d = np.diff(xs[:, c], axis=0)
        dw = np.minimum(wc[1:], wc[:-1])
        dmean, dstd = _weighted(d, dw)
        for result in (forward, backward):
            np.testing.assert_allclose(result["mean"][c], mean, rtol=1e-12)
            np.testing.assert_allclose(result["std"][c], std, rtol=1e-12)
            np.testing.assert_allclose(result["diff_mean"][c], dmean, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(result["diff_std"][c], dstd, rtol=1e-12)
            assert result["min"][c] == xs[:, c][wc > 0].min()
    assert w.shape == xs[:, 0].shape


def test_unmasked_partials_match_numpy_where_shifted_sums_would_cancel() -> None:
    """Without masks the partials come from shifted per-step sums; channels built to
    defeat them (a large offset, a pattern that barely changes in time, a constant)
    must still match numpy, through the exact fallback where needed."""
    rng = np.random.default_rng(2)
    n, ny, nx = 17, 5, 8
    pattern = rng.normal(0.0, 1000.0, size=(ny, nx))
    channels = [
        rng.normal(5.0, 3.0, size=(n, ny, nx)),  # ordinary
        1.0e5 + rng.normal(0.0, 0.01, size=(n, ny, nx)),  # offset 10^7 spreads away from 0
        pattern + 1e-3 * rng.normal(size=(n, ny, nx)).cumsum(axis=0),  # diffs 10^-6 of the spread
        np.full((n, ny, nx), 7.25),  # constant: no spread at all
    ]
    x = np.stack(channels, axis=1).astype(np.float32)
    lat_w = area_weights(np.linspace(-80, 80, ny))
    train = (np.arange(n) < 13) & (np.arange(n) != 6)  # a gap: steps not consecutive
    parts = []
    for lo, hi in [(0, 5), (5, 11), (11, 17)]:
        w0 = max(lo - 1, 0)
        steps = np.arange(w0, hi)
        in_values = (steps >= lo) & train[steps]
        in_diffs = in_values & np.concatenate([[False], train[steps[:-1]]])
        parts.append(statistics.shard_partial(x[w0:hi], None, lat_w, in_values, in_diffs))
    result = statistics.finalise(statistics.merge_all(np.stack(parts)))
    xs = x.astype(np.float64)
    weights = np.broadcast_to(lat_w[None, :, None], (n, ny, nx))
    diff_at = np.flatnonzero(train[1:] & train[:-1]) + 1
    for c in range(len(channels)):
        mean, std = _weighted(xs[train, c], weights[train])
        d = xs[diff_at, c] - xs[diff_at - 1, c]
        dmean, dstd = _weighted(d, weights[diff_at])
        np.testing.assert_allclose(result["mean"][c], mean, rtol=1e-12)
        np.testing.assert_allclose(result["std"][c], std, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(result["diff_mean"][c], dmean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(result["diff_std"][c], dstd, rtol=1e-9, atol=1e-14)
        assert result["min"][c] == xs[train, c].min()
        assert result["max"][c] == xs[train, c].max()


def test_statistics_without_train_values_raise() -> None:
    with pytest.raises(ValueError, match="no train-split values"):
        statistics.finalise(statistics.empty(2))


# --------------------------------------------------------------------------- grid, forcings


def test_area_weights_on_a_grid_with_poles_and_uneven_spacing() -> None:
    lat = np.array([-90.0, -30.0, 0.0, 60.0, 90.0])
    bounds = lat_bounds(lat)
    np.testing.assert_allclose(bounds, [-90, -60, -15, 30, 75, 90])
    area = np.abs(np.diff(np.sin(np.deg2rad(bounds))))
    np.testing.assert_allclose(area_weights(lat), area / area.mean())
    assert area_weights(np.array([10.0, 20.0, 30.0])).mean() == pytest.approx(1.0)


def test_normalise_grid_sorts_wraps_and_drops_duplicates() -> None:
    ds = xr.Dataset({"x": (("lat", "lon"), np.arange(12.0).reshape(2, 6))},
                    coords={"lat": [10.0, -10.0], "lon": [-180.0, -90.0, 0.0, 90.0, 180.0, 360.0]})
    out = normalise_grid(ds)
    np.testing.assert_array_equal(out["lon"].values, [0.0, 90.0, 180.0, 270.0])
    np.testing.assert_array_equal(out["lat"].values, [-10.0, 10.0])
    # lon 0 comes from the first 0-equivalent column (index 2), 180 from -180 (index 0)
    np.testing.assert_array_equal(out["x"].values[1], [2.0, 3.0, 0.0, 1.0])
    bad = ds.assign_coords(lat=[10.0, 10.0])
    with pytest.raises(SourceError, match="monotonic"):
        normalise_grid(bad)


def test_solar_geometry() -> None:
    times = xr.DataArray(xr.date_range("2001-03-20T12:00", periods=1, freq="6h"), dims="time")
    cz = cos_zenith(times, np.array([0.0, 89.0]), np.array([0.0, 180.0]))
    assert cz[0, 0, 0] == pytest.approx(1.0, abs=0.01)  # equinox noon on the equator
    assert cz[0, 0, 1] == 0.0  # midnight on the other side
    assert cz[0, 1, 0] < 0.05  # near the pole
    toa = toa_insolation(times, np.array([0.0]), np.array([0.0]))
    assert 1330 < toa[0, 0, 0] < 1380
    noleap = xr.DataArray(xr.date_range("2001-07-02", periods=2, freq="D", calendar="noleap",
                                        use_cftime=True), dims="time")
    assert forcing_field("cos_year", noleap, np.array([0.0]), np.array([0.0]))[0, 0, 0] < -0.99


@pytest.mark.parametrize("value, rejected", [(3e38, False), (np.inf, True), (np.nan, True)])
def test_nan_policy_checks_each_value_when_the_quick_sum_is_not_finite(value: float,
                                                                       rejected: bool) -> None:
    """A channel whose float32 sum overflows (every value finite) passes; one infinity or
    NaN among finite values is rejected, naming the channel and the time step."""
    from pipeline.data.transforms import apply_nan_policy

    data = np.full((3, 4, 5), value if not rejected else 1.0, dtype=np.float32)
    if rejected:
        data[2, 1, 3] = value
    da = xr.DataArray(data, dims=("time", "lat", "lon"),
                      coords={"time": np.array(["2000-01-01T00", "2000-01-01T06", "2000-01-01T12"],
                                               dtype="datetime64[ns]")})
    cfg = load_config(REPO / "configs" / "demo.yaml").data
    if rejected:
        with pytest.raises(SourceError, match=r"NaN in variable 'x' at 2000-01-01T12.*\(1 points\)"):
            apply_nan_policy({"x": da}, cfg)
    else:
        with np.errstate(over="ignore"):
            assert np.isinf(data.sum())
        assert apply_nan_policy({"x": da}, cfg)["x"] is da

"""Bad inputs: each gives exit code 2, one ``error:`` line naming the problem, and never
a store marked complete."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from tests.conftest import base_config, run_cli, write_config

pytestmark = pytest.mark.integration


def copy_raw(src: Path, dst: Path, months: tuple[str, ...] = ("01", "02", "03")) -> Path:
    dst.mkdir(exist_ok=True)
    for m in months:
        shutil.copy2(src / f"demo_2000-{m}.nc", dst / f"demo_2000-{m}.nc")
    shutil.copy2(src / "static.nc", dst / "static.nc")
    return dst


def rewrite(path: Path, change: Callable[[xr.Dataset], xr.Dataset]) -> None:
    """Load a NetCDF file, change it, write it back in place."""
    ds = xr.open_dataset(path).load()
    ds.close()
    change(ds).to_netcdf(path)


def assert_user_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert "Traceback" not in result.stderr


def assert_not_complete(store: Path) -> None:
    if store.is_dir() and (store / "zarr.json").exists():
        assert not zarr.open_group(str(store), mode="r").attrs.get("complete", False)


def _duplicate_month(raw: Path) -> None:
    shutil.copy2(raw / "demo_2000-02.nc", raw / "demo_2000-02-copy.nc")


def _non_monotonic(raw: Path) -> None:
    rewrite(raw / "demo_2000-02.nc", lambda ds: ds.isel(time=[1, 0, *range(2, ds.sizes["time"])]))


def _other_grid(raw: Path) -> None:
    rewrite(raw / "demo_2000-03.nc", lambda ds: ds.isel(longitude=slice(0, 16)))


def _nan_values(raw: Path) -> None:
    def add_nan(ds: xr.Dataset) -> xr.Dataset:
        values = ds["msl"].values.copy()
        values[5, 3, 4] = np.nan
        ds["msl"] = ds["msl"].copy(data=values)
        return ds
    rewrite(raw / "demo_2000-02.nc", add_nan)


def _truncate(raw: Path) -> None:
    path = raw / "demo_2000-02.nc"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


# (id, change to the raw files, change to the config, expected fragments of the message)
CASES = [
    ("unknown-key", None, lambda c: c["data"].update(sorces=[]), ["unknown config key 'data.sorces'", "sources"]),
    ("wrong-type", None, lambda c: c["data"].update(shard_size="many"), ["data.shard_size", "integer"]),
    ("glob-matches-nothing", None, lambda c: c["data"]["sources"][0].update(path="/nonexistent/*.nc"),
     ["no files match", "/nonexistent/*.nc"]),
    ("missing-file", None, lambda c: c["data"]["sources"][1].update(path="/nonexistent/static.nc"),
     ["no files match", "static.nc"]),
    ("missing-variable", None, lambda c: c["data"]["variables"].append("q"), ["variable 'q'", "t2m"]),
    ("missing-level", None, lambda c: c["data"]["variables"].append({"name": "z", "levels": [925]}),
     ["variable 'z' has no level 925", "available levels"]),
    ("duplicate-times", _duplicate_month, None, ["overlap"]),
    ("non-monotonic-times", _non_monotonic, None, ["non-monotonic time", "demo_2000-02.nc"]),
    ("time-gap", lambda raw: (raw / "demo_2000-02.nc").unlink(), None, ["time gap", "2000-02-01"]),
    ("grids-differ", _other_grid, None, ["grid of", "demo_2000-03.nc", "differs"]),
    ("nan-under-reject", _nan_values, None, ["NaN in variable 'msl'", "2000-02-02T06", "policy"]),
    ("corrupt-netcdf", _truncate, None, ["cannot read source file", "demo_2000-02.nc"]),
    ("bad-split", None, lambda c: c["data"]["splits"].update(train=["1990-01-01", "1990-02-01"]),
     ["data.splits.train"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_exit_2_with_one_line(case, tiny_raw: Path, tmp_path: Path) -> None:
    _, change_raw, change_config, fragments = case
    raw = copy_raw(tiny_raw, tmp_path / "raw")
    if change_raw:
        change_raw(raw)
    cfg = base_config(raw, tmp_path / "store.zarr")
    if change_config:
        change_config(cfg)
    result = run_cli("preprocess", str(write_config(tmp_path / "c.yaml", cfg)), "--workers", "1")
    assert_user_error(result, *fragments)
    assert_not_complete(tmp_path / "store.zarr")


def test_missing_config_file(tmp_path: Path) -> None:
    assert_user_error(run_cli("preprocess", str(tmp_path / "nope.yaml")), "config file not found")


@pytest.mark.parametrize("occupant", ["file", "directory"])
def test_store_path_holding_something_else(occupant: str, make_config, tmp_path: Path) -> None:
    target = tmp_path / "occupied.zarr"
    if occupant == "file":
        target.write_text("precious")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("precious")
    result = run_cli("preprocess", str(make_config(store=target)), "--workers", "1")
    assert_user_error(result, "exists and is not a training store")
    assert (target.read_text() if occupant == "file" else (target / "notes.txt").read_text()) == "precious"


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory, tiny_raw: Path) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("append_base")
    raw = copy_raw(tiny_raw, tmp / "raw", months=("01", "02"))
    cfg = base_config(raw, tmp / "store.zarr")
    result = run_cli("preprocess", str(write_config(tmp / "c.yaml", cfg)), "--workers", "1")
    assert result.returncode == 0, result.stderr
    return tmp, cfg


@pytest.mark.parametrize("mismatch", ["variables", "grid"])
def test_append_that_does_not_match_the_store(mismatch: str, small_store, tiny_raw: Path,
                                              tmp_path: Path) -> None:
    base, cfg = small_store
    store = tmp_path / "store.zarr"
    shutil.copytree(base / "store.zarr", store)
    raw = copy_raw(tiny_raw, tmp_path / "raw")  # the old months plus March
    cfg = {**cfg, "data": {**cfg["data"], "store": str(store)}}
    cfg["data"]["sources"] = [{"path": str(raw / "demo_*.nc")},
                              {"path": str(raw / "static.nc"), "static": True}]
    if mismatch == "variables":
        cfg["data"]["variables"] = ["t2m", "msl"]
        cfg["data"]["derived"] = []
        expected = "channels"
    else:
        cfg["data"]["coarsen"] = 2
        expected = "grid"
    result = run_cli("preprocess", str(write_config(tmp_path / "c.yaml", cfg)), "--append")
    assert_user_error(result, "append", expected)
    group = zarr.open_group(str(store), mode="r")
    assert group.attrs["complete"] and group["data"].shape[0] == 4 * (31 + 29)

"""Dates in the config as YAML writes them unquoted: ``start: 2000-01-03``, splits like
``train: [2000-01-01, 2000-02-15 18:00:00]``, ``--set data.start=...``. YAML reads them
as dates and datetimes; the config holds them as the ISO text that the time selection
uses, in the standard and the cftime calendars alike."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import xarray as xr
import yaml
import zarr

from pipeline.config import config_hash, dump_config, load_config
from pipeline.data.sources import within
from pipeline.errors import ConfigError
from tests.conftest import base_config, run_cli

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
UNQUOTED = """\
  start: 2000-01-03
  end: 2000-06-30 18:00:00
  splits:
    train: [2000-01-03, 2000-04-30 18:00:00]
    val: [2000-05-01, 2000-05-31T18:00:00]
    test: [2000-06-01, 2000-06-30T20:00:00+02:00]
"""
QUOTED = """\
  start: '2000-01-03'
  end: '2000-06-30T18:00:00'
  splits:
    train: ['2000-01-03', '2000-04-30T18:00:00']
    val: ['2000-05-01', '2000-05-31T18:00:00']
    test: ['2000-06-01', '2000-06-30T18:00:00']
"""


def demo_with(tmp_path: Path, name: str, dates: str) -> Path:
    """configs/demo.yaml with its splits replaced by ``dates`` (data.start/end too)."""
    text = DEMO.read_text()
    splits = re.search(r"  splits:\n(    .*\n){3}", text)
    assert splits is not None
    path = tmp_path / name
    path.write_text(text[:splits.start()] + dates + text[splits.end():])
    return path


def test_unquoted_dates_load_as_iso_text_with_the_quoted_hash(tmp_path: Path) -> None:
    unquoted = load_config(demo_with(tmp_path, "unquoted.yaml", UNQUOTED))
    quoted = load_config(demo_with(tmp_path, "quoted.yaml", QUOTED))
    data = unquoted.data
    assert data.start == "2000-01-03" and data.end == "2000-06-30T18:00:00"
    assert data.splits.train == ("2000-01-03", "2000-04-30T18:00:00")
    assert data.splits.val == ("2000-05-01", "2000-05-31T18:00:00")
    assert data.splits.test == ("2000-06-01", "2000-06-30T18:00:00")  # +02:00 -> UTC
    assert unquoted == quoted and config_hash(unquoted) == config_hash(quoted)
    # the resolved config a run keeps reads back as the same config
    dump_config(unquoted, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == unquoted and config_hash(again) == config_hash(unquoted)
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["data"]["start"] == "2000-01-03"


def test_unquoted_dates_in_overrides() -> None:
    cfg = load_config(DEMO, ["data.start=2000-01-03", "data.end=2000-06-30 06:00:00",
                             "data.splits.val=[2000-05-01, 2000-05-31 18:00:00]"])
    assert cfg.data.start == "2000-01-03" and cfg.data.end == "2000-06-30T06:00:00"
    assert cfg.data.splits.val == ("2000-05-01", "2000-05-31T18:00:00")
    assert config_hash(cfg) == config_hash(load_config(DEMO, [
        "data.start='2000-01-03'", "data.end='2000-06-30T06:00:00'",
        "data.splits.val=['2000-05-01', '2000-05-31T18:00:00']"]))


def test_a_360_day_date_stays_text_and_selects_in_that_calendar() -> None:
    """2000-02-30 is no Gregorian date (YAML's own date parser fails on it), but a day of
    the 360_day calendar; cftime calendars select with the converted text too."""
    cfg = load_config(DEMO, ["data.start=2000-02-28", "data.end=2000-02-30 18:00:00"])
    assert cfg.data.start == "2000-02-28" and cfg.data.end == "2000-02-30 18:00:00"
    index = xr.date_range("2000-02-27", periods=24, freq="6h", calendar="360_day",
                          use_cftime=True)
    picked = index[within(index, cfg.data.start, cfg.data.end)]
    assert picked[0].isoformat() == "2000-02-28T00:00:00"
    assert picked[-1].isoformat() == "2000-02-30T18:00:00" and len(picked) == 12
    # noleap: an unquoted datetime; 2000-02-29 does not exist there
    cfg = load_config(DEMO, ["data.start=2000-02-28", "data.end=2000-03-01 06:00:00"])
    index = xr.date_range("2000-02-27", periods=24, freq="6h", calendar="noleap",
                          use_cftime=True)
    picked = index[within(index, cfg.data.start, cfg.data.end)]
    assert [t.isoformat() for t in picked[[0, -1]]] == ["2000-02-28T00:00:00",
                                                        "2000-03-01T06:00:00"]
    assert len(picked) == 6


def _unquoted_config(path: Path, tiny_raw: Path, store: Path, end: str) -> Path:
    """The tiny data's config, written with its dates unquoted (as a user types them)."""
    tree = base_config(tiny_raw, store)
    del tree["data"]["splits"]
    text = yaml.safe_dump(tree, sort_keys=False).replace("  frequency: 6h\n", f"""\
  frequency: 6h
  start: 2000-01-02
  end: {end}
  splits:
    train: [2000-01-01, 2000-02-15 18:00:00]
    val: [2000-02-16, 2000-03-05 18:00:00]
    test: [2000-03-06, 2000-03-31 18:00:00]
""")
    assert "splits" in text
    path.write_text(text)
    return path


@pytest.mark.integration
def test_preprocess_with_unquoted_dates(tiny_raw: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    config = _unquoted_config(tmp_path / "c.yaml", tiny_raw, store, "2000-03-30 18:00:00")
    result = run_cli("preprocess", str(config), "--workers", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    attrs = zarr.open_group(str(store), mode="r").attrs
    assert attrs["complete"]
    assert attrs["time_start"].startswith("2000-01-02T00:00")
    assert attrs["time_end"].startswith("2000-03-30T18:00")
    assert attrs["statistics_period"] == ["2000-01-01", "2000-02-15T18:00:00"]
    times = xr.open_zarr(store)["time"].values
    assert str(times[0]).startswith("2000-01-02T00:00") and len(times) == (30 + 29 + 30) * 4


@pytest.mark.integration
def test_unquoted_impossible_date_is_a_one_line_error(tiny_raw: Path, tmp_path: Path) -> None:
    config = _unquoted_config(tmp_path / "c.yaml", tiny_raw, tmp_path / "s.zarr", "2000-02-30")
    result = run_cli("preprocess", str(config), "--workers", "1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "2000-02-30" in result.stderr and "standard" in result.stderr


def test_an_unquoted_slurm_time_is_the_time_written(tmp_path: Path) -> None:
    """YAML 1.1 reads ``1:30:00`` as the base-60 number 5400, which Slurm would take as
    5400 minutes; the config keeps it as written, in the file, in overrides and in the
    resolved config, and the job script asks for that time."""
    from pipeline.slurm import render

    path = tmp_path / "cfg.yaml"
    path.write_text(DEMO.read_text() + "\nslurm:\n  time: 1:30:00\n")
    cfg = load_config(path)
    assert cfg.slurm.time == "1:30:00"
    assert load_config(DEMO, ["slurm.time=1:00:00"]).slurm.time == "1:00:00"
    with pytest.raises(ConfigError, match="train.max_steps"):  # not 60
        load_config(DEMO, ["train.max_steps=1:00"])
    assert "#SBATCH --time=1:30:00" in render("train", cfg, str(path), [])
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml").slurm.time == "1:30:00"
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["slurm"]["time"] == "1:30:00"

"""Evaluation and forecasts: metrics against hand-computed values and a plain numpy
implementation, the climatology against a groupby, chunked against in-memory
evaluation, metrics.json and the report on a model trained here with the plain loop,
``pipeline predict``, bad inputs through the CLI, the real storm data, and the report
rendered in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml
import zarr

from pipeline.cli import main
from pipeline.config import Config, config_from_dict, dump_config, load_config
from pipeline.data.build import preprocess
from pipeline.data.dataset import ForecastDataset
from pipeline.data.forcings import forcing_field
from pipeline.data.store import StoreInfo
from pipeline.errors import ConfigError
from pipeline.evaluate import climatology, metrics, rollout
from pipeline.evaluate.evaluate import evaluate, pick_inits
from pipeline.evaluate.forecast import init_index, target_forcings
from pipeline.train import checkpoint
from pipeline.train.loop import train_loop
from pipeline.train.runtime import local_runtime
from pipeline.train.stepper import build_stepper
from tests.conftest import IN_CI, base_config, run_cli, train_config, write_config
from tests.test_real_data import storm_store  # noqa: F401 - the real-data store fixture

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
RECORD_FIELDS = {"channel", "lead", "rmse", "acc", "rmse_persistence", "rmse_climatology",
                 "acc_persistence", "skill_persistence", "skill_climatology"}
OUTPUTS = ["t2m", "msl", "t850", "t500", "u850", "v850", "ws850"]


# --------------------------------------------------------------------------- metrics: by hand


@pytest.mark.unit
def test_pole_row_rmse_is_sin_22_5_degrees() -> None:
    # lat -90, 0, 90: bounds -90, -45, 45, 90; the north row covers (1 - sin 45)/2 of the
    # sphere, so a unit error there alone gives RMSE sqrt((1 - sin 45)/2) = sin 22.5
    lat = np.array([-90.0, 0.0, 90.0])
    from pipeline.data.grid import area_weights

    w = area_weights(lat)
    np.testing.assert_allclose(w, [0.4393398, 2.1213203, 0.4393398], rtol=1e-6)
    err = np.zeros((1, 3, 4))
    err[0, 2] = 1.0
    np.testing.assert_allclose(metrics.rmse(err, np.zeros_like(err), w), math.sin(math.radians(22.5)))
    equator = np.zeros((1, 3, 4))
    equator[0, 1] = 1.0
    np.testing.assert_allclose(metrics.spatial_mean(equator, w), [math.sin(math.radians(45))])


@pytest.mark.unit
def test_non_uniform_regional_grid_by_hand() -> None:
    # lat 0, 10, 40 (regional): bounds -5, 5, 25, 55 (edges extrapolated by half a cell)
    from pipeline.data.grid import area_weights

    s = lambda deg: math.sin(math.radians(deg))  # noqa: E731
    cell = [s(5) - s(-5), s(25) - s(5), s(55) - s(25)]
    w = area_weights(np.array([0.0, 10.0, 40.0]))
    np.testing.assert_allclose(w, np.array(cell) / np.mean(cell), rtol=1e-12)
    truth = np.zeros((1, 3, 5))
    forecast = truth.copy()
    forecast[0, 1] = 2.0  # error 2 in the 10-degree row only
    np.testing.assert_allclose(metrics.rmse(forecast, truth, w), math.sqrt(4 * cell[1] / sum(cell)))


@pytest.mark.unit
def test_rmse_averages_mse_over_time_before_the_root() -> None:
    w = np.ones(2)
    truth = np.zeros((2, 2, 3))
    forecast = np.stack([np.full((2, 3), 1.0), np.full((2, 3), 3.0)])
    assert metrics.rmse(forecast, truth, w) == pytest.approx(math.sqrt(5.0))  # not (1 + 3) / 2


@pytest.mark.unit
def test_acc_by_hand() -> None:
    w = np.array([1.0, 3.0])
    clim = np.full((1, 2, 2), 10.0)
    truth = clim + np.array([[[1.0, -1.0], [2.0, 0.5]]])
    assert metrics.acc(clim + 2 * (truth - clim), truth, clim, w) == pytest.approx(1.0)
    assert metrics.acc(clim - (truth - clim), truth, clim, w) == pytest.approx(-1.0)
    # uncentred, as in WB2: a uniform warm anomaly forecast for a uniform warm anomaly is 1
    assert metrics.acc(clim + 1, clim + 3, clim, w) == pytest.approx(1.0)
    # orthogonal patterns under the weights: <w f o> = 1*(1*1 + 1*-1) + 3*0 = 0
    f = clim + np.array([[[1.0, 1.0], [0.0, 0.0]]])
    o = clim + np.array([[[1.0, -1.0], [0.0, 0.0]]])
    assert metrics.acc(f, o, clim, w) == pytest.approx(0.0)
    assert np.isnan(metrics.acc(clim, truth, clim, w))  # no forecast anomaly: undefined


@pytest.mark.unit
def test_skill_score() -> None:
    np.testing.assert_allclose(metrics.skill_score([1.0, 4.0, 2.0], [4.0, 4.0, 1.0]),
                               [0.75, 0.0, -1.0])
    assert np.isnan(metrics.skill_score(1.0, 0.0))


def _reference_scores(forecast, truth, clim, cell_bounds):
    """Straightforward loops: cell areas from explicit bounds, np.average per field."""
    b = np.radians(cell_bounds)
    area = np.sin(b[1:]) - np.sin(b[:-1])
    n, n_lead, n_ch, ny, nx = truth.shape
    weights = np.repeat(area[:, None], nx, axis=1)
    rmse = np.zeros((n_lead, n_ch))
    acc = np.zeros((n_lead, n_ch))
    for j in range(n_lead):
        for c in range(n_ch):
            mse, corr = [], []
            for i in range(n):
                f, o, m = forecast[i, j, c], truth[i, j, c], clim[i, j, c]
                mse.append(np.average((f - o) ** 2, weights=weights))
                fa, oa = f - m, o - m
                corr.append(np.average(fa * oa, weights=weights) / np.sqrt(
                    np.average(fa**2, weights=weights) * np.average(oa**2, weights=weights)))
            rmse[j, c] = np.sqrt(np.mean(mse))
            acc[j, c] = np.mean(corr)
    return rmse, acc


@pytest.mark.unit
def test_metrics_match_a_plain_numpy_implementation_on_a_non_uniform_grid() -> None:
    from pipeline.data.grid import area_weights

    lat = np.array([-80.0, -50.0, -10.0, 0.0, 20.0, 60.0, 85.0])
    bounds = [-90.0, -65.0, -30.0, -5.0, 10.0, 40.0, 72.5, 90.0]  # edges clipped at the poles
    rng = np.random.default_rng(1)
    shape = (9, 2, 3, lat.size, 8)
    truth = rng.normal(size=shape)
    clim = rng.normal(size=shape) * 0.5
    forecast = truth + rng.normal(size=shape) * 0.7
    w = area_weights(lat)
    ref_rmse, ref_acc = _reference_scores(forecast, truth, clim, bounds)
    np.testing.assert_allclose(metrics.rmse(forecast, truth, w), ref_rmse, rtol=1e-12)
    np.testing.assert_allclose(metrics.acc(forecast, truth, clim, w), ref_acc, rtol=1e-12)
    # partial sums over uneven chunks merge to the same numbers
    total = metrics.ScoreSums.zeros(ref_rmse.shape)
    for lo, hi in [(0, 2), (2, 7), (7, 9)]:
        total = total + metrics.ScoreSums.of_chunk(forecast[lo:hi], truth[lo:hi], clim[lo:hi], w)
    assert total.count == 9
    np.testing.assert_allclose(total.rmse(), ref_rmse, rtol=1e-12)
    np.testing.assert_allclose(total.mean_acc(), ref_acc, rtol=1e-12)


@pytest.mark.unit
def test_pick_inits_spreads_evenly() -> None:
    picked = pick_inits(100, 24)
    assert picked[0] == 0 and picked[-1] == 99 and len(picked) == 24
    gaps = np.diff(picked)
    assert gaps.min() >= 4 and gaps.max() <= 5
    np.testing.assert_array_equal(pick_inits(10, None), np.arange(10))
    np.testing.assert_array_equal(pick_inits(10, 50), np.arange(10))


# --------------------------------------------------------------------------- climatology


def _train_block(store: Path) -> tuple[StoreInfo, int, int, np.ndarray, pd.DatetimeIndex]:
    info = StoreInfo(store)
    first, last = info.split_range("train")
    ds = xr.open_zarr(store)
    values = ds["data"].isel(time=slice(first, last + 1),
                             channel=list(info.layout.outputs)).values.astype(np.float64)
    return info, first, last, values, ds.indexes["time"][first:last + 1]


def test_climatology_equals_numpy_groupby_on_the_train_split(tiny_store: Path) -> None:
    info, first, last, values, times = _train_block(tiny_store)
    out, names = list(info.layout.outputs), info.layout.output_names
    groups = pd.DataFrame({"doy": times.day_of_year, "hour": times.hour}).groupby(["doy", "hour"])
    clim = climatology.compute(info.path, info.times, first, last, out, names, "6h", block=7)
    assert clim.by == "dayofyear_hour" and len(clim.keys) == groups.ngroups
    for (doy, hour), rows in groups.indices.items():
        np.testing.assert_allclose(clim.value((doy, hour)), values[rows].mean(axis=0), rtol=1e-12)
    # by month: many samples per group, summed across read blocks
    monthly = climatology.compute(info.path, info.times, first, last, out, names, "6h",
                                  block=5, by="month")
    for month, rows in pd.DataFrame({"m": times.month}).groupby("m").indices.items():
        np.testing.assert_allclose(monthly.value((month, 0)), values[rows].mean(axis=0),
                                   rtol=1e-12)
    assert monthly.counts.sum() == last - first + 1


def test_climatology_smoothing_window_and_nearest_day(tiny_store: Path) -> None:
    info, first, last, values, times = _train_block(tiny_store)
    out, names = list(info.layout.outputs), info.layout.output_names
    clim = climatology.compute(info.path, info.times, first, last, out, names, "6h", window=5,
                               block=16)
    doy, hour = 20, 12
    near = (np.abs(times.day_of_year - doy) <= 2) & (times.hour == hour)
    assert near.sum() == 5
    np.testing.assert_allclose(clim.value((doy, hour)), values[near].mean(axis=0), rtol=1e-12)
    # a day far from the train split takes the nearest day with data (15 Feb = day 46)
    assert clim.filled == 0
    far = clim.value((80, 6))
    assert clim.filled == 1
    edge = (np.abs(times.day_of_year - 46) <= 2) & (times.hour == 6)
    np.testing.assert_allclose(far, values[edge].mean(axis=0), rtol=1e-12)


@pytest.mark.unit
def test_climatology_window_wraps_around_the_year() -> None:
    keys = np.array([[1, 0], [366, 0], [180, 0]])
    sums = np.array([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1)
    clim = climatology.Climatology("dayofyear_hour", keys, sums, np.ones(3, int), ["x"], window=3)
    assert clim.value((1, 0)).item() == pytest.approx(1.5)
    assert clim.value((180, 0)).item() == pytest.approx(3.0)


@pytest.mark.unit
def test_climatology_groupings() -> None:
    assert climatology.grouping("6h") == "dayofyear_hour"
    assert climatology.grouping("1D") == "dayofyear_hour"
    assert climatology.grouping("MS") == "month"
    assert climatology.grouping("W") == "dayofyear_hour"
    assert climatology.step_duration("6h") == pd.Timedelta(hours=6)
    assert climatology.step_duration("1D") == pd.Timedelta(days=1)
    assert climatology.step_duration("MS") is None
    keys = climatology.calendar_keys(pd.date_range("2001-02-27", periods=3, freq="1D"), "month")
    np.testing.assert_array_equal(keys, [[2, 0], [2, 0], [3, 0]])
    with pytest.raises(ConfigError, match="odd"):
        climatology.compute("unused", pd.date_range("2000", periods=3), 0, 2, [0], ["x"], "6h",
                            window=4)


# --------------------------------------------------------------------------- verdicts


def _record(channel: str, lead: int, rmse, persistence, clim, hours: float | None = None) -> dict:
    return {"channel": channel, "lead": lead, "rmse": rmse, "rmse_persistence": persistence,
            "rmse_climatology": clim, "lead_steps": lead, "lead_hours": hours}


@pytest.mark.unit
def test_verdicts_count_per_lead_and_name_channels_without_scores() -> None:
    from pipeline.evaluate.verdict import lead_verdicts

    records = [_record("t2m", 1, 1.0, 2.0, 3.0, 6.0), _record("msl", 1, 2.0, 1.0, 3.0, 6.0),
               _record("sst", 1, None, 1.0, 1.0, 6.0), _record("z500", 1, 1.0, 2.0, math.nan, 6.0),
               _record("t2m", 8, 3.0, 2.0, 2.0, 48.0), _record("msl", 8, 1.0, 1.0, 3.0, 48.0),
               _record("sst", 8, 0.5, 1.0, 1.0, 48.0), _record("z500", 8, 1.0, 2.0, 3.0, 48.0)]
    assert lead_verdicts({"leads": [8, 1], "records": records, "frequency": "6h"}) == [
        "lead 1 (6 h): beats persistence on 2 of 3 channels, beats climatology on 2 of 2; "
        "2 channels not compared (no valid RMSE): sst, z500 (vs climatology)",
        "lead 8 (2 d): beats persistence on 2 of 4 channels, beats climatology on 3 of 4",
    ]


@pytest.mark.unit
def test_verdict_leads_of_monthly_data_and_of_a_multi_step_model() -> None:
    from pipeline.evaluate.verdict import lead_verdict

    monthly = [{**_record("sst", 1, 1.0, 2.0, 0.5), "lead_steps": 3}]
    assert lead_verdict({"records": monthly, "frequency": "MS"}, 1) == (
        "lead 1 (3 store steps, 3 months): beats persistence on 1 of 1 channels, beats "
        "climatology on 0 of 1")
    six_hourly = [{**_record("t2m", 2, 1.0, 2.0, 3.0, 24.0), "lead_steps": 4}]
    assert lead_verdict({"records": six_hourly, "frequency": "6h"}, 2).startswith(
        "lead 2 (4 store steps, 24 h): ")
    unknown = [_record("t2m", 1, 1.0, 2.0, 3.0)]
    assert lead_verdict({"records": unknown}, 1).startswith("lead 1 (1 store step): ")


# --------------------------------------------------------------------------- a trained run


@dataclass
class Run:
    cfg: Config
    run_dir: Path
    config: Path  # the YAML file
    store: Path


@pytest.fixture(scope="module")
def run(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A tiny U-Net trained 40 steps with the plain loop: best/ and metrics.jsonl."""
    root = tmp_path_factory.mktemp("eval_run")
    tree = train_config(tiny_store, root / "runs", max_steps=40)
    tree["evaluate"] = {"leads": [1, 2, 4], "max_samples": 24, "channels_to_plot": ["t2m", "u850"]}
    cfg = config_from_dict(tree)
    train_loop(cfg, local_runtime(cfg))
    dump_config(cfg, cfg.run_dir() / "config.yaml")
    return Run(cfg, cfg.run_dir(), write_config(root / "config.yaml", tree), tiny_store)


@pytest.fixture(scope="module")
def evaluated(run: Run) -> dict:
    return evaluate(run.cfg, run.run_dir)


def copy_run(run: Run, where: Path) -> Path:
    shutil.copytree(run.run_dir, where, ignore=shutil.ignore_patterns("eval"))
    return where


def by_key(records: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["channel"], r["lead"]): r for r in records}


def test_metrics_json_structure_and_baselines(run: Run, evaluated: dict) -> None:
    on_disk = json.loads((run.run_dir / "eval" / "metrics.json").read_text())
    assert on_disk == evaluated
    assert on_disk["checkpoint"] == str((run.run_dir / "best").resolve())
    assert on_disk["store_version"] == StoreInfo(run.store).dataset_version
    assert len(on_disk["config_hash"]) == 16
    assert on_disk["split"] == "test" and on_disk["leads"] == [1, 2, 4]
    assert on_disk["init_times"] == 24
    # the test split is 2000-03-06 .. 03-31T18; lead 4 (one day) must stay inside it
    assert on_disk["first_init"].startswith("2000-03-06T00:00")
    assert on_disk["last_init"].startswith("2000-03-30T18:00")
    records = by_key(on_disk["records"])
    assert set(records) == {(c, ld) for c in OUTPUTS for ld in (1, 2, 4)}
    for r in on_disk["records"]:
        assert set(r) >= RECORD_FIELDS
        for key in RECORD_FIELDS - {"channel", "lead"}:
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["channel"], key)
        assert r["rmse_persistence"] > 0 and r["rmse_climatology"] > r["rmse_persistence"]
        assert r["skill_persistence"] == pytest.approx(
            1 - r["rmse"] ** 2 / r["rmse_persistence"] ** 2)
    assert records[("t2m", 1)]["units"] == "K" and records[("msl", 1)]["units"] == "Pa"
    # persistence degrades with lead for the advected fields
    for channel in ("msl", "t850", "u850"):
        assert (records[(channel, 1)]["rmse_persistence"] < records[(channel, 2)]["rmse_persistence"]
                < records[(channel, 4)]["rmse_persistence"])
    # After 40 steps the model beats persistence one step ahead in every channel
    # (skill 0.15 for ws850 to 0.6 on this run; deterministic on CPU).
    for channel in OUTPUTS:
        assert records[(channel, 1)]["rmse"] < records[(channel, 1)]["rmse_persistence"], channel


def test_scores_match_direct_numpy_computation(run: Run) -> None:
    """Persistence and one-step model RMSE recomputed from the store and the network."""
    info = StoreInfo(run.store)
    model = rollout.load(run.run_dir, info, torch.device("cpu"))
    dataset = ForecastDataset(info, "test", 1, 1, 2)
    inits = np.arange(0, len(dataset), 9)
    clim = climatology.compute(info.path, info.times, *info.split_range("train"),
                               list(info.layout.outputs), info.layout.output_names, "6h")
    from pipeline.evaluate.evaluate import score

    scores = score(model, dataset, inits, [1, 2], clim, chunk_size=4)
    data = zarr.open_array(str(run.store), path="data")[:].astype(np.float64)
    out = list(info.layout.outputs)
    w = info.area_weight[:, None]
    times = dataset.times[inits]
    for k in (1, 2):
        err = data[times + k][:, out] - data[times][:, out]
        expected = np.sqrt((err**2 * w).mean(axis=(2, 3)).mean(axis=0))
        np.testing.assert_allclose(scores.sums["persistence"].rmse()[k - 1], expected, rtol=1e-10)
    state, _ = checkpoint.load(run.run_dir / "best")
    stepper = build_stepper(run.cfg, info)
    stepper.load_state_dict(state["model"])
    stepper.eval()
    mean, std = info.normalisation()
    with torch.no_grad():
        preds = []
        for i in inits:
            s = dataset[int(i)]
            preds.append(stepper.step(s["inputs"][None], s["target_forcings"][None, 0])[0].numpy())
    pred = np.stack(preds) * std[out][:, None, None] + mean[out][:, None, None]
    err = pred - data[times + 1][:, out]
    expected = np.sqrt((err**2 * w).mean(axis=(2, 3)).mean(axis=0))
    np.testing.assert_allclose(scores.sums["model"].rmse()[0], expected, rtol=1e-5)


def test_chunked_evaluation_equals_one_chunk(run: Run, tmp_path: Path) -> None:
    results = {}
    for size in (5, 1000):  # 24 init times: five chunks (the last short), or one
        cfg = run.cfg.model_copy(update={"evaluate": run.cfg.evaluate.model_copy(
            update={"chunk_size": size})})
        results[size] = evaluate(cfg, copy_run(run, tmp_path / f"run{size}"), report=False)
    chunked, whole = by_key(results[5]["records"]), by_key(results[1000]["records"])
    assert chunked.keys() == whole.keys()
    for key, rec in chunked.items():
        for field in RECORD_FIELDS - {"channel", "lead"}:
            assert rec[field] == pytest.approx(whole[key][field], rel=1e-6, abs=1e-12), (key, field)


def test_latest_checkpoint_is_used_without_best(run: Run, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    shutil.rmtree(copy / "best")
    cfg = run.cfg.model_copy(update={"evaluate": run.cfg.evaluate.model_copy(
        update={"max_samples": 4, "leads": [1]})})
    result = evaluate(cfg, copy, report=False)
    assert result["checkpoint"].endswith("step-00000040") and result["checkpoint_step"] == 40


# --------------------------------------------------------------------------- the report


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.src: list[str] = []
        self.rows = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.src.append(dict(attrs)["src"] or "")
        if tag == "tr":
            self.rows += 1


def report_images(eval_dir: Path) -> _Images:
    parser = _Images()
    parser.feed((eval_dir / "report.html").read_text())
    return parser


def test_report_references_only_images_that_exist(run: Run, evaluated: dict) -> None:
    eval_dir = run.run_dir / "eval"
    found = report_images(eval_dir)
    assert set(found.src) == {"rmse_vs_lead.png", "acc_vs_lead.png", "map_t2m.png",
                              "map_u850.png", "loss.png"}
    for src in found.src:
        assert "://" not in src and not src.startswith("/")
        assert (eval_dir / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    # the table: a header row and one row per channel and lead, after the 6 summary rows
    assert found.rows == 6 + 1 + len(evaluated["records"])


def expected_verdict(records: list[dict], lead: int, when: str) -> str:
    """What the report and the CLI say about ``lead``, counted here from the records."""
    rows = [r for r in records if r["lead"] == lead]
    persistence = sum(r["rmse"] < r["rmse_persistence"] for r in rows)
    clim = sum(r["rmse"] < r["rmse_climatology"] for r in rows)
    return (f"lead {lead} ({when}): beats persistence on {persistence} of {len(rows)} channels, "
            f"beats climatology on {clim} of {len(rows)}")


def test_report_says_per_lead_whether_the_model_beats_the_baselines(
        run: Run, evaluated: dict) -> None:
    html = (run.run_dir / "eval" / "report.html").read_text()
    for lead, when in ((1, "6 h"), (2, "12 h"), (4, "24 h")):
        assert f"<li>{expected_verdict(evaluated['records'], lead, when)}</li>" in html
    # after 40 steps it beats persistence one step ahead everywhere (see above)
    assert "lead 1 (6 h): beats persistence on 7 of 7 channels" in html


def chromium() -> str:
    """Debian's chromium: installed as root when missing; CI must have it."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env,
                       capture_output=True)
        exe = shutil.which("chromium")
        if exe:
            return exe
    if IN_CI:
        pytest.fail("chromium is not installed; .ci/run must install it")
    pytest.skip("needs chromium: apt-get install chromium (as root)")


def test_report_renders_in_headless_chromium(run: Run, evaluated: dict, tmp_path: Path) -> None:
    from matplotlib.image import imread

    exe = chromium()
    report = (run.run_dir / "eval" / "report.html").resolve()
    shot = tmp_path / "report.png"
    common = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              "--disable-extensions", "--no-proxy-server", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}"]
    result = subprocess.run([*common, "--window-size=1280,4000", f"--screenshot={shot}",
                             report.as_uri()], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (4000, 1280)
    assert pixels.std() > 0.05  # not a blank page
    colourful = (pixels.max(axis=2) - pixels.min(axis=2)) > 0.3
    assert colourful.sum() > 10_000  # the plots were drawn (text and table are grey)
    dom = subprocess.run([*common, "--dump-dom", report.as_uri()], capture_output=True,
                         text=True, timeout=180)
    assert dom.returncode == 0 and "skill vs persistence" in dom.stdout
    parser = _Images()
    parser.feed(dom.stdout)
    assert len(parser.src) == 5
    assert all((report.parent / src).is_file() for src in parser.src)


# --------------------------------------------------------------------------- predict


def test_predict_equals_the_network_run_directly(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "forecast.zarr"
    result = run_cli("predict", str(run.run_dir / "best"), "--init", "2000-03-10T06:00",
                     "--steps", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["forecast.zarr"]  # no temporary left
    ds = xr.open_zarr(out)
    assert set(ds.data_vars) == set(OUTPUTS)
    assert ds["t2m"].dims == ("init_time", "lead_time", "lat", "lon")
    assert ds.sizes == {"init_time": 1, "lead_time": 4, "lat": 17, "lon": 32}
    assert ds["init_time"].values[0] == np.datetime64("2000-03-10T06:00")
    np.testing.assert_array_equal(ds["lead_time"].values,
                                  np.arange(1, 5) * np.timedelta64(6, "h"))
    assert ds["valid_time"].values[0, -1] == np.datetime64("2000-03-11T06:00")
    assert ds["t2m"].attrs["units"] == "K" and ds["msl"].attrs["units"] == "Pa"
    assert ds["t850"].attrs["long_name"] == "Temperature at 850 hPa"
    assert ds["init_time"].attrs["standard_name"] == "forecast_reference_time"
    assert ds.attrs["checkpoint"] == str((run.run_dir / "best").resolve())
    assert ds.attrs["config_hash"] == json.loads((run.run_dir / "best" / "meta.json").read_text())[
        "config_hash"]
    assert ds.attrs["store_version"] == 1 and ds.attrs["code_version"]
    # the same numbers from the checkpoint's network fed by the training loader
    info = StoreInfo(run.store)
    state, _ = checkpoint.load(run.run_dir / "best")
    stepper = build_stepper(run.cfg, info)
    stepper.load_state_dict(state["model"])
    stepper.eval()
    dataset = ForecastDataset(info, "test", 1, 1, 4)
    t = int(np.flatnonzero(info.times == pd.Timestamp("2000-03-10T06:00"))[0])
    sample = dataset[int(np.flatnonzero(dataset.times == t)[0])]
    with torch.no_grad():
        one = stepper.step(sample["inputs"][None], sample["target_forcings"][None, 0])[0].numpy()
        four = stepper(sample["inputs"][None], sample["target_forcings"][None])[0].numpy()
    mean, std = info.normalisation()
    out_idx = list(info.layout.outputs)
    physical = lambda x: x * std[out_idx][:, None, None] + mean[out_idx][:, None, None]  # noqa: E731
    for c, name in enumerate(info.layout.output_names):
        tol = 1e-5 * std[out_idx][c]
        np.testing.assert_allclose(ds[name].values[0, 0], physical(one)[c], rtol=1e-6, atol=tol)
        for k in range(4):
            np.testing.assert_allclose(ds[name].values[0, k], physical(four[k])[c], rtol=1e-6,
                                       atol=tol)


def test_predict_runs_past_the_end_of_the_store(run: Run, tmp_path: Path) -> None:
    info = StoreInfo(run.store)
    model = rollout.load(run.run_dir, info, torch.device("cpu"))
    t = info.n_time - 3
    forcings, valid = target_forcings(model, t, 6)  # 2 stored steps, 4 computed
    assert list(valid) == list(pd.date_range(info.times[t], periods=7, freq="6h")[1:])
    mean, std = info.normalisation()
    f = list(info.layout.forcings)
    times = xr.DataArray(valid, dims="time")
    analytic = np.stack([forcing_field(info.layout.channels[c], times, info.lat, info.lon)
                         for c in f], axis=1)
    analytic = (analytic - mean[f][:, None, None]) / std[f][:, None, None]
    np.testing.assert_allclose(forcings, analytic, atol=1e-5)
    out = tmp_path / "late.zarr"
    assert main(["predict", str(run.run_dir), "--init", "2000-03-31T00:00", "--steps", "12",
                 "--out", str(out)]) == 0
    ds = xr.open_zarr(out)
    assert ds["valid_time"].values[0, -1] == np.datetime64("2000-04-03T00:00")
    assert all(np.isfinite(ds[v].values).all() for v in ds.data_vars)
    # running again replaces the earlier forecast
    assert main(["predict", str(run.run_dir), "--init", "2000-03-31T00:00", "--steps", "2",
                 "--out", str(out)]) == 0
    assert xr.open_zarr(out).sizes["lead_time"] == 2


def test_init_needs_the_model_history(tiny_store: Path) -> None:
    info = StoreInfo(tiny_store)
    assert init_index(info, "2000-01-01T06:00", history=2) == 1
    with pytest.raises(ConfigError, match="too close to the start"):
        init_index(info, "2000-01-01T00:00", history=2)


# --------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def other_store(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real store of the same data with fewer channels (t2m and msl only)."""
    tmp = tmp_path_factory.mktemp("other_store")
    config = write_config(tmp / "c.yaml", base_config(tiny_raw, tmp / "other.zarr",
                                                      variables=["t2m", "msl"], derived=[]))
    preprocess(load_config(config), workers=1)
    return tmp / "other.zarr"


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["--init", "2001-05-01T00:00", "--steps", "2"], "not a time step of the store"),
    (["--init", "2000-03-10T00:00", "--steps", "-3"], "at least one step"),
    (["--init", "2000-03-10T00:00", "--steps", "0"], "at least one step"),
    (["--init", "tomorrow", "--steps", "2"], "not a time of the store's calendar"),
    (["--init", "2000-03-10", "--steps", "2"], "matches 4 time steps"),
])
def test_predict_bad_arguments_exit_2(args: list[str], fragment: str, run: Run, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "f.zarr"
    assert main(["predict", str(run.run_dir / "best"), *args, "--out", str(out)]) == 2
    assert fragment in one_line_error(capsys)
    assert not out.exists()


def test_predict_missing_checkpoint_and_foreign_output_exit_2(
        run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(tmp_path / "nope"), "--init", "2000-03-10T00:00", "--steps", "1",
                 "--out", str(tmp_path / "f.zarr")]) == 2
    assert "no checkpoint at" in one_line_error(capsys)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["predict", str(run.run_dir), "--init", "2000-03-10T00:00", "--steps", "1",
                 "--out", str(tmp_path / "mine")]) == 2
    assert "is not a forecast written by pipeline" in one_line_error(capsys)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_checkpoint_of_another_store_exit_2(run: Run, other_store: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(run.config), "--set", f"data.store={other_store}"]) == 2
    message = one_line_error(capsys)
    assert "trained on channels" in message and "ws850" in message
    assert main(["predict", str(run.run_dir / "best"), "--init", "2000-03-10T00:00", "--steps",
                 "1", "--out", str(tmp_path / "f.zarr"), "--set", f"data.store={other_store}"]) == 2
    assert "trained on channels" in one_line_error(capsys)


def test_cli_evaluate_incomplete_store_exit_2(run: Run, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    shutil.copytree(run.store, store)
    zarr.open_group(str(store), mode="r+").attrs["complete"] = False
    result = run_cli("evaluate", str(run.config), "--set", f"data.store={store}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and "incomplete" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_evaluate_run_dir_with_split_and_leads(run: Run, tmp_path: Path) -> None:
    copy = copy_run(run, tmp_path / "run")
    result = run_cli("evaluate", str(copy), "--split", "val", "--leads", "1,2",
                     "--set", "evaluate.max_samples=6")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((copy / "eval" / "metrics.json").read_text())
    assert written["split"] == "val" and written["leads"] == [1, 2] and written["init_times"] == 6
    assert written["first_init"].startswith("2000-02-16T00:00")
    assert (copy / "eval" / "report.html").is_file()
    lines = result.stdout.splitlines()
    assert lines[0] == "val split, 6 init times:"
    assert [line.strip() for line in lines[1:3]] == [
        expected_verdict(written["records"], 1, "6 h"),
        expected_verdict(written["records"], 2, "12 h")]


def test_cli_evaluate_bad_leads_and_split_exit_2(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(run.run_dir), "--leads", "1,0"])
    assert info.value.code == 2
    assert main(["evaluate", str(run.run_dir), "--leads", "500"]) == 2
    assert "too short for leads up to 500" in one_line_error(capsys)
    assert main(["evaluate", str(run.run_dir), "--set", "evaluate.channels_to_plot=[z999]"]) == 2
    assert "z999" in one_line_error(capsys)


# --------------------------------------------------------------------------- real data


def test_storm_evaluation_has_finite_metrics_for_every_channel(
        storm_store: Path, tmp_path: Path) -> None:  # noqa: F811 - the imported fixture
    tree = yaml.safe_load((REPO / "configs" / "storm.yaml").read_text())
    tree["data"]["store"] = str(storm_store)
    tree["runs_dir"] = str(tmp_path)
    tree["train"].update(max_steps=10, val_every=10, checkpoint_every=10, warmup_steps=2,
                         workers=1)
    cfg = config_from_dict(tree)
    train_loop(cfg, local_runtime(cfg))
    result = evaluate(cfg)
    channels = {r["channel"] for r in result["records"]}
    assert channels == {"slp", "t", "u", "v", "u500", "v500", "ws500"}
    assert len(result["records"]) == len(channels) * len(cfg.evaluate.leads)
    for r in result["records"]:
        for key in RECORD_FIELDS - {"channel", "lead"}:
            assert r[key] is not None and math.isfinite(r[key]), (r["channel"], r["lead"], key)
    assert (cfg.run_dir() / "eval" / "report.html").is_file()

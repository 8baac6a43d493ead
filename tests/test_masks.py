"""Masked points carry no weight downstream (``data.nan.policy: fill``): not in the
training loss, not in the evaluation scores or the climatology, and a forecast is NaN
there. One store of the tiny data with a fixed mask (a block of ``t2m`` missing in
every step, like land under sea-surface temperature) and a time-varying one (a block
of ``u850`` that moves every step in January and March, like sea ice; none in
February), which the derived ``ws850`` inherits. Expected values come from numpy on
the store's own arrays."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from torch.utils.data import DataLoader

from pipeline.cli import main
from pipeline.config import Config, config_from_dict, dump_config, load_config
from pipeline.data.build import preprocess
from pipeline.data.dataset import ForecastDataset
from pipeline.data.loading.batches import BatchLoader
from pipeline.data.loading.resident import ResidentLoader, ResidentSplit
from pipeline.data.sampler import BlockShuffleSampler
from pipeline.data.store import StoreInfo
from pipeline.evaluate import climatology, rollout
from pipeline.evaluate.evaluate import evaluate, pick_inits
from pipeline.train.loop import Batch, Trainer, train_loop
from pipeline.train.models import area_weighted_mse
from pipeline.train.runtime import local_runtime
from pipeline.train.stepper import target_validity
from tests.conftest import base_config, train_config, write_config

pytestmark = pytest.mark.integration

FILL = 0.0  # 0 K, 0 m/s: a value far from the data, which would dominate any score
MASKED = {"t2m": ["t2m"], "u850": ["u850"], "ws850": ["u850"]}  # output -> its masks' channels


def moving_block(step: int) -> tuple[slice, slice]:
    """(rows, columns) of the raw grid where u850 is missing at a step of the month."""
    start = (3 * step) % 26
    return slice(9, 13), slice(start, start + 6)


def write_masked_raw(tiny_raw: Path, out: Path) -> Path:
    """The tiny data with t2m missing in one block always and u850 in a moving block in
    January and March."""
    out.mkdir(parents=True)
    for i, path in enumerate(sorted(tiny_raw.glob("demo_*.nc"))):
        ds = xr.open_dataset(path).load()
        t2m = ds["t2m"].values.copy()
        t2m[:, 4:8, 10:16] = np.nan
        u = ds["u"].values.copy()
        level = int(np.flatnonzero(ds["level"].values == 850)[0])
        if i != 1:
            for step in range(u.shape[0]):
                rows, cols = moving_block(step)
                u[step, level, rows, cols] = np.nan
        ds = ds.assign(t2m=ds["t2m"].copy(data=t2m), u=ds["u"].copy(data=u))
        ds.to_netcdf(out / path.name)
    xr.open_dataset(tiny_raw / "static.nc").load().to_netcdf(out / "static.nc")
    return out


@dataclass
class MaskedRun:
    raw: Path
    store: Path
    cfg: Config
    run_dir: Path


@pytest.fixture(scope="module")
def masked_store(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(raw data, complete store) with the fixed and the moving mask."""
    root = tmp_path_factory.mktemp("masked")
    raw = write_masked_raw(tiny_raw, root / "raw")
    nan = {"policy": "fill", "fill_value": FILL, "channels": ["t2m", "u850"]}
    config = write_config(root / "c.yaml", base_config(raw, root / "store.zarr", nan=nan))
    preprocess(load_config(config), workers=2)
    return raw, root / "store.zarr"


@pytest.fixture(scope="module")
def masked_run(masked_store: tuple[Path, Path],
               tmp_path_factory: pytest.TempPathFactory) -> MaskedRun:
    """A tiny U-Net trained a few steps on the masked store (rollout 2)."""
    raw, store = masked_store
    tree = train_config(store, tmp_path_factory.mktemp("masked_runs"), raw, max_steps=6,
                        val_every=3, checkpoint_every=3, warmup_steps=1, rollout=2)
    tree["model"] = {"arch": "unet", "width": 8, "depth": 2}
    tree["evaluate"] = {"leads": [1, 2], "max_samples": 12, "channels_to_plot": ["t2m", "u850"]}
    cfg = config_from_dict(tree)
    final = train_loop(cfg, local_runtime(cfg))
    assert np.isfinite(final["train_loss"]) and np.isfinite(final["val_loss"])
    assert all(np.isfinite(v) for v in final["val_rmse"].values())
    dump_config(cfg, cfg.run_dir() / "config.yaml")
    return MaskedRun(raw, store, cfg, cfg.run_dir())


def store_arrays(store: Path) -> tuple[np.ndarray, list[str]]:
    """The whole ``data`` array (float64) and the channel names."""
    group = zarr.open_group(str(store), mode="r")
    return group["data"][:].astype(np.float64), [str(c) for c in group["channel"][:]]


def valid_of(data: np.ndarray, channels: list[str], outputs: list[str]) -> np.ndarray:
    """Where each output holds data, from the store's mask channels: ``data`` (..., C,
    Y, X) -> bool (..., C_out, Y, X)."""
    valid = np.ones((*data.shape[:-3], len(outputs), *data.shape[-2:]), bool)
    for j, name in enumerate(outputs):
        for source in MASKED.get(name, []):
            valid[..., j, :, :] &= data[..., channels.index(f"{source}_mask"), :, :] == 0
    return valid


def test_store_masks_and_layout(masked_store: tuple[Path, Path]) -> None:
    """The fixture is what the tests assume: a fixed and a moving mask, and a layout
    that ties t2m, u850 and ws850 (derived from u850) to them."""
    _, store = masked_store
    data, channels = store_arrays(store)
    fixed, moving = data[:, channels.index("t2m_mask")], data[:, channels.index("u850_mask")]
    assert fixed.sum() == 4 * 6 * data.shape[0] and (fixed == fixed[0]).all()
    assert (data[:, channels.index("t2m")][fixed == 1] == FILL).all()
    assert moving[124:240].sum() == 0 and (moving[:124].sum(axis=(1, 2)) == 24).all()
    assert not (moving[10] == moving[11]).all()
    info = StoreInfo(store)
    masks = {info.layout.channels[m] for m in info.layout.masks}
    assert masks == {"t2m_mask", "u850_mask"}
    by_name = dict(zip(info.layout.output_names, info.layout.output_masks, strict=True))
    for name, positions in by_name.items():
        got = [info.layout.channels[info.layout.masks[p]] for p in positions]
        assert got == [f"{s}_mask" for s in MASKED.get(name, [])], name
    outputs = info.layout.output_names
    np.testing.assert_array_equal(info.layout.valid(data[:20]),
                                  valid_of(data[:20], channels, outputs))


@pytest.mark.parametrize("loader", ["host", "assembled", "resident"])
def test_every_loader_gives_the_masks_at_the_targets(masked_store: tuple[Path, Path],
                                                     loader: str) -> None:
    """The batch loader (samples made on the host, or assembled from raw steps) and the
    split in memory give bitwise the DataLoader's batches, ``target_masks`` included:
    the normalised masks at each rollout step's target time, which ``target_validity``
    turns into the store's missing points."""
    _, store = masked_store
    info = StoreInfo(store)
    ds = ForecastDataset(info, "train", history=2, lead=1, rollout=2)
    sampler = BlockShuffleSampler(len(ds), 4, seed=1)
    expected = list(DataLoader(ds, batch_size=4, sampler=sampler, drop_last=True))[:6]
    if loader == "resident":
        batches = ResidentLoader(ResidentSplit(ds, torch.device("cpu")), sampler, 4)
    else:
        batches = BatchLoader(ds, sampler, 4, workers=2, on_device=loader == "assembled")
    try:  # batches are reused buffers: copy them
        got = [{k: v.clone() for k, v in b.items()} for b in islice(batches, 6)]
    finally:
        batches.close()
    data, channels = store_arrays(store)
    masks = [channels.index("t2m_mask"), channels.index("u850_mask")]
    mean, std = info.normalisation()
    above = torch.from_numpy(info.missing_above())[:, None, None]
    incidence = torch.from_numpy(info.layout.mask_incidence())
    for want, batch in zip(expected, got, strict=True):
        assert batch.keys() == want.keys()
        for key in want:
            assert torch.equal(batch[key], want[key]), key
        steps = batch["index"].numpy()[:, None] + np.arange(1, 3)
        raw = data[steps][:, :, masks].astype(np.float32)
        normalised = (raw - mean[masks][:, None, None]) * (1.0 / std[masks])[:, None, None]
        np.testing.assert_array_equal(batch["target_masks"].numpy(), normalised)
        np.testing.assert_array_equal(
            target_validity(batch["target_masks"], above, incidence).numpy(),
            valid_of(data[steps], channels, info.layout.output_names))


def test_loss_gives_no_weight_to_missing_targets(masked_run: MaskedRun) -> None:
    """Changing the targets where their own step's mask is set leaves the loss bitwise
    unchanged (whatever the fill value), in both rollout steps; a point missing at the
    input but present at the target still counts; the loss is the area-weighted mean
    over the valid points (of the per-channel weighted squared errors)."""
    trainer = Trainer(masked_run.cfg, local_runtime(masked_run.cfg))  # the trained weights
    trainer.model.eval()
    ds, info = trainer.train_set, trainer.info
    data, channels = store_arrays(masked_run.store)
    outputs = info.layout.output_names
    indices = list(range(8))  # January: the moving mask moves between input and targets
    batch = Batch.to(ds.read_batch(indices), torch.device("cpu"))
    assert batch.target_masks is not None
    target_steps = ds.times[indices][:, None] + np.arange(1, 3)  # (sample, rollout)
    valid = valid_of(data[target_steps], channels, outputs)  # (B, R, C_out, Y, X)
    assert not valid.all()
    with torch.no_grad():
        loss = trainer.loss(batch)
        changed = batch.targets.clone()
        changed[torch.from_numpy(~valid)] += 1000.0
        assert trainer.loss(Batch(batch.inputs, batch.target_forcings, changed,
                                  batch.target_masks)) == loss
        # u850 missing at the last input step but present at the first target
        last_input = valid_of(data[ds.times[indices]], channels, outputs)
        u = outputs.index("u850")
        b, y, x = map(int, np.argwhere(~last_input[:, u] & valid[:, 0, u])[0])
        nudged = batch.targets.clone()
        nudged[b, 0, u, y, x] += 1.0
        assert trainer.loss(Batch(batch.inputs, batch.target_forcings, nudged,
                                  batch.target_masks)) != loss
        preds = trainer.model(batch.inputs, batch.target_forcings).double().numpy()
    err = (preds - batch.targets.double().numpy()) ** 2
    if trainer.channel_w is not None:  # model.predict_tendency: changes in units of their size
        err *= trainer.channel_w.double().numpy()[:, None, None]
    w = np.broadcast_to(info.area_weight[:, None], err.shape[-2:])
    expected = (err * w * valid).sum() / (w * valid).sum()
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(loss) != pytest.approx((err * w).mean(), rel=1e-3)  # not the plain mean


def test_validation_scores_model_and_persistence_where_both_have_data(
        masked_run: MaskedRun) -> None:
    """Validation leaves out the points missing at the target or at the last input:
    there persistence's forecast is the fill value, which scored against a present
    target made persistence look worse than it is (the moving mask)."""
    trainer = Trainer(masked_run.cfg, local_runtime(masked_run.cfg))  # the trained weights
    val, info = trainer.val_set, trainer.info
    data, channels = store_arrays(masked_run.store)
    outputs = info.layout.output_names
    got = trainer.validate()
    model = trainer.stepper.eval()
    loss, persistence, target_only = [], [], []
    with torch.no_grad():
        for i in range(len(val)):
            s, t = val[i], int(val.times[i])
            both = torch.from_numpy(valid_of(data[[t + 1]], channels, outputs)
                                    & valid_of(data[[t]], channels, outputs))
            target, last = s["targets"][None, 0], s["inputs"][None, -1, model.outputs]
            pred = model.step(s["inputs"][None], s["target_forcings"][None, 0])
            w = (trainer.lat_w, trainer.channel_w)
            loss.append(float(area_weighted_mse(pred, target, *w, both)))
            persistence.append(float(area_weighted_mse(last, target, *w, both)))
            target_only.append(float(area_weighted_mse(
                last, target, *w, torch.from_numpy(valid_of(data[[t + 1]], channels, outputs)))))
    # batch means against one-sample means: float32 sums in another order
    assert got["val_loss"] == pytest.approx(np.mean(loss), rel=1e-4)
    assert got["val_loss_persistence"] == pytest.approx(np.mean(persistence), rel=1e-4)
    assert np.mean(target_only) > 1.01 * np.mean(persistence)  # the fill value scored


def masked_rmse(forecast: np.ndarray, truth: np.ndarray, valid: np.ndarray,
                lat_w: np.ndarray) -> np.ndarray:
    """sqrt(mean over samples of the area-weighted MSE over the valid points) per
    (lead, channel), samples without a valid point left out."""
    w = np.where(valid, lat_w[:, None], 0.0)
    area = w.sum(axis=(-2, -1))
    mse = (np.where(valid, (forecast - truth) ** 2, 0.0) * w).sum(axis=(-2, -1))
    mse = np.where(area > 0, mse / np.where(area > 0, area, 1.0), 0.0)
    return np.sqrt(mse.sum(axis=0) / (area > 0).sum(axis=0))


def test_evaluation_scores_only_valid_points(masked_run: MaskedRun) -> None:
    """metrics.json's RMSE of the model, persistence and climatology, and the ACC of
    persistence, equal numpy over the points valid at the init and at the valid time
    (fixed and moving masks), and differ from the scores over every point."""
    got = evaluate(masked_run.cfg, masked_run.run_dir)  # with the report: maps with NaNs
    assert (masked_run.run_dir / "eval" / "map_t2m.png").is_file()
    records = {(r["channel"], r["lead"]): r for r in got["records"]}
    info = StoreInfo(masked_run.store)
    data, channels = store_arrays(masked_run.store)
    outputs, out = info.layout.output_names, list(info.layout.outputs)
    model = rollout.load(masked_run.run_dir, info, torch.device("cpu"))
    dataset = ForecastDataset(info, "test", 1, 1, 2)
    inits = pick_inits(len(dataset), 12)
    times = dataset.times[inits]
    steps = times[:, None] + np.arange(1, 3)  # (init, lead)
    truth = data[steps][:, :, out]
    valid = valid_of(data[steps], channels, outputs) & valid_of(data[times], channels,
                                                                 outputs)[:, None]
    assert not valid.all() and valid.any(axis=(-2, -1)).all()
    batch = dataset.read_batch([int(i) for i in inits])
    forecasts = {
        "model": model.rollout(batch["inputs"].numpy(), batch["target_forcings"].numpy()),
        "persistence": np.broadcast_to(data[times][:, None][:, :, out], truth.shape),
    }
    first, last = info.split_range("train")
    clim = climatology.compute(info.path, info.times, first, last, out, outputs, "6h",
                               masked_run.cfg.evaluate.climatology_window,
                               valid=info.layout.valid)
    forecasts["climatology"] = clim.at(info.times[steps.reshape(-1)]).reshape(truth.shape)
    assert np.isfinite(forecasts["climatology"][valid]).all()
    lat_w = info.area_weight
    for name, key in (("model", "rmse"), ("persistence", "rmse_persistence"),
                      ("climatology", "rmse_climatology")):
        expected = masked_rmse(forecasts[name], truth, valid, lat_w)
        everywhere = masked_rmse(forecasts[name], truth, np.ones_like(valid), lat_w)
        for c, channel in enumerate(outputs):
            for j, lead in enumerate((1, 2)):
                value = records[(channel, lead)][key]
                assert value == pytest.approx(expected[j, c], rel=1e-5), (name, channel, lead)
                if channel in MASKED:
                    assert value != pytest.approx(everywhere[j, c], rel=1e-3), (name, channel)
    # ACC of persistence: anomalies against the climatology, over the valid points
    f = forecasts["persistence"] - forecasts["climatology"]
    o = truth - forecasts["climatology"]
    w = np.where(valid, lat_w[:, None], 0.0)

    def mean(x: np.ndarray) -> np.ndarray:
        return (np.where(valid, x, 0.0) * w).sum(axis=(-2, -1)) / w.sum(axis=(-2, -1))

    acc = (mean(f * o) / np.sqrt(mean(f * f) * mean(o * o))).mean(axis=0)
    for c, channel in enumerate(outputs):
        for j, lead in enumerate((1, 2)):
            assert records[(channel, lead)]["acc_persistence"] == pytest.approx(
                acc[j, c], rel=1e-6), (channel, lead)


def test_climatology_averages_only_valid_points(masked_store: tuple[Path, Path]) -> None:
    """By month over the train split: the moving mask's points average over the steps
    where they are present, never the fill value; the fixed block has no climatology."""
    _, store = masked_store
    info = StoreInfo(store)
    data, channels = store_arrays(store)
    outputs, out = info.layout.output_names, list(info.layout.outputs)
    first, last = info.split_range("train")
    clim = climatology.compute(info.path, info.times, first, last, out, outputs, "6h",
                               by=climatology.BY_MONTH, valid=info.layout.valid)
    plain = climatology.compute(info.path, info.times, first, last, out, outputs, "6h",
                                by=climatology.BY_MONTH)
    months = np.asarray(info.times[first:last + 1].month)
    assert [int(k[0]) for k in clim.keys] == [1, 2]
    values = data[first:last + 1][:, out]
    valid = valid_of(data[first:last + 1], channels, outputs)
    for k, month in enumerate((1, 2)):
        pick = months == month
        n = valid[pick].sum(axis=0)
        total = np.where(valid[pick], values[pick], 0.0).sum(axis=0)
        expected = np.where(n > 0, total / np.where(n > 0, n, 1), np.nan)
        np.testing.assert_allclose(clim.means()[k], expected, rtol=1e-12)
    u, t2m = outputs.index("u850"), outputs.index("t2m")
    fixed = data[0, channels.index("t2m_mask")] == 1
    assert np.isnan(clim.means()[:, t2m][:, fixed]).all()
    assert np.isfinite(clim.means()[:, t2m][:, ~fixed]).all()
    assert np.isfinite(clim.means()[:, u]).all()  # every point is present in some step
    # without the masks January's u850 would average in the fill value
    assert not np.allclose(plain.means()[0, u], clim.means()[0, u])
    np.testing.assert_array_equal(plain.means()[1, u], clim.means()[1, u])  # no mask in Feb


def test_predict_is_nan_where_the_input_was_missing(masked_run: MaskedRun, tmp_path: Path) -> None:
    """The forecast is NaN exactly where the init's mask is set, at every lead (the
    init's mask also for the moving one), finite elsewhere; the ``<channel>_mask``
    variables hold the store's mask at the init time."""
    out = tmp_path / "forecast.zarr"
    init = "2000-03-10T06:00"
    assert main(["predict", str(masked_run.run_dir), "--init", init, "--steps", "3",
                 "--out", str(out)]) == 0
    ds = xr.open_zarr(out)
    info = StoreInfo(masked_run.store)
    data, channels = store_arrays(masked_run.store)
    t = int(np.flatnonzero(info.times == np.datetime64(init))[0])
    moving = data[:, channels.index("u850_mask")]
    assert not (moving[t] == moving[t + 1]).all()  # the init's mask, not the valid time's
    assert set(ds.data_vars) == set(info.layout.output_names) | {f"{c}_mask" for c in MASKED}
    for name in info.layout.output_names:
        values = ds[name].values[0]  # (lead, lat, lon)
        if name not in MASKED:
            assert np.isfinite(values).all(), name
            assert "ancillary_variables" not in ds[name].attrs
            continue
        missing = data[t, channels.index(f"{MASKED[name][0]}_mask")] == 1
        mask = ds[f"{name}_mask"]
        assert mask.dims == ("init_time", "lat", "lon") and mask.dtype == np.int8
        np.testing.assert_array_equal(mask.values[0], missing.astype(np.int8))
        assert list(mask.attrs["flag_values"]) == [0, 1]
        assert ds[name].attrs["ancillary_variables"] == f"{name}_mask"
        for k in range(3):
            np.testing.assert_array_equal(np.isnan(values[k]), missing, err_msg=f"{name} {k}")

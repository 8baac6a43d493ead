"""``pipeline predict``: an autoregressive forecast written as a CF-style Zarr dataset.

The output has one data variable per predicted channel with dims ``(init_time,
lead_time, lat, lon)`` in physical units, ``init_time``, ``lead_time`` (timedelta) and
``valid_time`` coordinates, and provenance attributes (checkpoint, config hash, store
version, code version). It is written to a temporary path and renamed, so a path that
exists holds a whole forecast. Forcings come from the store up to its last time step
and are computed analytically beyond it, so a forecast may run past the store's end.

In a store with masks (``data.nan.policy: fill``) a forecast is NaN where its input was
missing, and a ``<channel>_mask`` variable (``int8``, dims ``(init_time, lat, lon)``,
CF ``flag_values`` 0 valid / 1 missing, named by the channel's ``ancillary_variables``)
says where. The mask is known only up to the init time, so every lead time takes the
init's (the last input step's) mask: for a fixed mask (land under sea-surface
temperature) that is the mask everywhere; for a time-varying one (sea ice) it is the
state at the init, carried forward as the model itself carries it. A derived channel
is missing where any of its inputs is.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from pipeline import __version__, files
from pipeline.config import Config, apply_overrides, config_from_dict, load_config
from pipeline.data import store
from pipeline.data.forcings import forcing_field
from pipeline.data.sources import within
from pipeline.data.store import StoreInfo
from pipeline.data.timeaxis import time_label
from pipeline.data.transforms import mask_name
from pipeline.errors import ConfigError, PipelineError
from pipeline.evaluate import rollout
from pipeline.evaluate.climatology import step_duration

log = logging.getLogger(__name__)

FORECAST_MARK = "pipeline_forecast"


def init_index(info: StoreInfo, text: str, history: int) -> int:
    """The store's time index of ``--init``, with ``history - 1`` steps before it."""
    start, end = time_label(info.times[0]), time_label(info.times[-1])
    try:
        hits = np.flatnonzero(within(info.times, text, text))
    except PipelineError:
        raise ConfigError(f"--init '{text}' is not a time of the store's calendar",
                          f"give an ISO time between {start} and {end}") from None
    if hits.size == 0:
        raise ConfigError(f"--init {text} is not a time step of the store ({start} .. {end}, "
                          f"every {info.attrs.frequency})", "choose a time step in that range")
    if hits.size > 1:
        raise ConfigError(f"--init {text} matches {hits.size} time steps "
                          f"({time_label(info.times[hits[0]])} .. {time_label(info.times[hits[-1]])})",
                          f"give one, e.g. --init {time_label(info.times[hits[0]])}")
    t = int(hits[0])
    if t - history + 1 < 0:
        raise ConfigError(f"--init {text} is too close to the start of the store for the model's "
                          f"history of {history} steps (the store starts at {start})",
                          f"choose an init at or after {time_label(info.times[history - 1])}")
    return t


def extend_times(times: Any, n: int, frequency: str) -> Any:
    """The ``n`` time steps after the end of ``times``, in its calendar."""
    if n <= 0:
        return times[:0]
    calendar = getattr(times, "calendar", None) if isinstance(times, xr.CFTimeIndex) else None
    more = xr.date_range(start=times[-1], periods=n + 1, freq=frequency,
                         calendar=calendar or "standard", use_cftime=calendar is not None)
    return more[1:]


def target_forcings(model: rollout.Forecaster, t: int, steps: int) -> tuple[np.ndarray, Any]:
    """Normalised forcings ``(steps, C_forcing, Y, X)`` at the target times, and the
    target (valid) times."""
    info = model.info
    idx = t + model.lead * np.arange(1, steps + 1)
    inside = idx[idx < info.n_time]
    future = extend_times(info.times, int(idx[-1]) - info.n_time + 1, info.attrs.frequency)
    valid = info.times[inside].append(future[idx[idx >= info.n_time] - info.n_time])
    forcing = list(info.layout.forcings)
    values = np.empty((steps, len(forcing), info.lat.size, info.lon.size), np.float32)
    data = store.DataReader(info.path)
    for k, j in enumerate(inside):
        values[k] = data[int(j)][forcing]
    if inside.size < steps:
        times = xr.DataArray(valid[inside.size:], dims="time")
        for f, c in enumerate(forcing):
            values[inside.size:, f] = forcing_field(info.layout.channels[c], times, info.lat,
                                                    info.lon)
    mean, std = info.normalisation()
    norm = (values - mean[forcing][:, None, None]) / std[forcing][:, None, None]
    return norm.astype(np.float32), valid


def lead_coordinate(info: StoreInfo, steps: np.ndarray) -> tuple[Any, dict[str, str]]:
    """Lead times as timedeltas (fixed frequencies) or step counts (calendar months)."""
    step = step_duration(info.attrs.frequency)
    attrs = {"long_name": "lead time", "standard_name": "forecast_period"}
    if step is not None:
        return pd.to_timedelta(steps * step).to_numpy(), attrs
    return steps, {**attrs, "units": f"steps of {info.attrs.frequency}"}


def channel_attrs(info: StoreInfo, name: str) -> dict[str, str]:
    """CF attributes of a channel (units, long_name, standard_name) as the store records
    them from the sources (stores built before it did have only the name)."""
    known = info.attrs.channel_attrs.get(name, {})
    attrs = {k: str(v) for k, v in known.items() if k in ("units", "long_name", "standard_name")}
    attrs.setdefault("long_name", name)
    return attrs


def mask_variables(info: StoreInfo, valid: np.ndarray) -> dict[str, Any]:
    """The ``<channel>_mask`` variables of the channels that can be missing, from where
    they held data at the init (``valid``: bool ``(C_out, Y, X)``)."""
    out = {}
    for c, name in enumerate(info.layout.output_names):
        if info.layout.output_masks[c]:
            out[mask_name(name)] = (
                ("init_time", "lat", "lon"), (~valid[None, c]).astype(np.int8),
                {"long_name": f"1 where the input of {name} was missing at the init time "
                              "(the forecast is NaN there at every lead time)",
                 "units": "1", "flag_values": [0, 1], "flag_meanings": "valid missing"})
    return out


def forecast_dataset(model: rollout.Forecaster, t: int, pred: np.ndarray, valid: Any,
                     valid_at_init: np.ndarray | None = None) -> xr.Dataset:
    """``pred`` ``(steps, C_out, Y, X)`` in physical units as a CF-style Dataset;
    ``valid_at_init`` (bool ``(C_out, Y, X)``, stores with masks): where the input held
    data, the forecast being NaN elsewhere."""
    info, meta = model.info, model.meta
    steps = model.lead * np.arange(1, pred.shape[0] + 1)
    lead, lead_attrs = lead_coordinate(info, steps)
    coords = {
        "init_time": ("init_time", info.times[[t]],
                      {"long_name": "initial time of the forecast",
                       "standard_name": "forecast_reference_time"}),
        "lead_time": ("lead_time", lead, lead_attrs),
        "valid_time": (("init_time", "lead_time"), np.asarray(valid)[None, :],
                       {"long_name": "time the forecast is valid for", "standard_name": "time"}),
        "lat": ("lat", info.lat, {"units": "degrees_north", "standard_name": "latitude",
                                  "long_name": "latitude"}),
        "lon": ("lon", info.lon, {"units": "degrees_east", "standard_name": "longitude",
                                  "long_name": "longitude"}),
    }
    data = {name: (("init_time", "lead_time", "lat", "lon"),
                   pred[None, :, c].astype(np.float32), channel_attrs(info, name))
            for c, name in enumerate(info.layout.output_names)}
    if valid_at_init is not None:
        masks = mask_variables(info, valid_at_init)
        for name in info.layout.output_names:
            if mask_name(name) in masks:
                data[name][2]["ancillary_variables"] = mask_name(name)
        data.update(masks)
    attrs = {
        "Conventions": "CF-1.8",
        "title": f"forecast of the model {model.cfg.name}",
        "source": "pipeline predict",
        FORECAST_MARK: 1,
        "checkpoint": str(model.folder),
        "checkpoint_step": meta.step,
        "config_hash": meta.config_hash,
        "store": info.path,
        "store_version": info.dataset_version,
        "store_data_hash": info.attrs.data_hash,
        "frequency": info.attrs.frequency,
        "code_version": __version__,
        "created": store.now(),
        "history": f"{store.now()} pipeline predict from {time_label(info.times[t])}, "
                   f"{pred.shape[0]} steps",
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def write_atomic(ds: xr.Dataset, out: Path) -> None:
    """Write ``ds`` to a temporary Zarr v3 store next to ``out``, then rename it.

    An existing ``out`` is replaced only if it is an earlier forecast."""
    out = Path(out)
    if out.exists() and not _is_forecast(out):
        raise ConfigError(f"--out {out} exists and is not a forecast written by pipeline",
                          "choose another path, or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    files.clean_stale(out)  # what killed writers of this forecast left
    tmp = files.temporary_name(out)
    try:
        ds.to_zarr(str(tmp), mode="w-", zarr_format=3, consolidated=False)
        store.consolidate(tmp)
        files.replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_forecast(path: Path) -> bool:
    try:
        return bool(zarr.open_group(str(path), mode="r").attrs.get(FORECAST_MARK))
    except Exception:  # noqa: BLE001 - unreadable means "not ours"
        return False


def config_for(found_meta: dict[str, Any], config: str | Path | None,
               overrides: list[str] | None) -> Config:
    """The given config file, or else the checkpoint's own config; with overrides."""
    if config is not None:
        return load_config(config, overrides)
    tree = apply_overrides(copy.deepcopy(found_meta["config"]), overrides or [])
    return config_from_dict(tree, origin="the checkpoint's config")


def predict(checkpoint_path: str | Path, init: str, steps: int, out: str | Path,
            config: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    """Forecast ``steps`` model steps from ``init``; write the dataset to ``out``."""
    if steps < 1:
        raise ConfigError(f"--steps {steps}: a forecast needs at least one step",
                          "give a positive number of model steps, e.g. --steps 8")
    found = rollout.find_checkpoint(Path(checkpoint_path))
    cfg = config_for(found[2].model_dump(), config, overrides)
    info = StoreInfo(cfg.data.store)
    model = rollout.from_checkpoint(found, info)
    t = init_index(info, init, model.history)
    data = store.DataReader(info.path)
    raw = data[t - model.history + 1: t + 1]
    forcings, valid = target_forcings(model, t, steps)
    pred = model.rollout(model.normalise(raw)[None], forcings[None])[0]
    valid_at_init = info.layout.valid(raw[-1])
    if valid_at_init is not None:
        pred = np.where(valid_at_init[None], pred, np.nan)
    write_atomic(forecast_dataset(model, t, pred, valid, valid_at_init), Path(out))
    log.info("forecast of %d steps from %s written to %s", steps, time_label(info.times[t]), out)
    return Path(out)

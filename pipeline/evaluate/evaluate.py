"""``pipeline evaluate``: score a run's best checkpoint on a held-out split.

From every init time of the split (``evaluate.max_samples`` caps them, spread evenly)
the model rolls out to ``max(evaluate.leads)`` model steps; forecasts, persistence (the
init state) and climatology (of the train split, at the valid time) are compared with
the truth in physical units. Init times are processed ``evaluate.chunk_size`` at a
time and the scores kept as mergeable sums, so memory stays bounded. In a store with
masks a point is scored only where the truth holds data at the valid time and the
input held data at the init (the forecast is NaN there: ``pipeline predict``), and
where the climatology has a value; the same points for the model and both baselines,
so that a fill value scores for no one. Writes
``<run>/eval/metrics.json`` (see the README, "Evaluation and forecasts"), plots and
``report.html``, as one folder that appears whole or not at all (``results``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__, files
from pipeline.config import Config, config_hash, load_config
from pipeline.data.dataset import ForecastDataset
from pipeline.data.store import DataReader, StoreInfo, now
from pipeline.data.timeaxis import time_label
from pipeline.errors import ConfigError
from pipeline.evaluate import climatology, rollout
from pipeline.evaluate.metrics import ScoreSums, skill_score
from pipeline.train.rundir import EVAL_METRICS_FILE, REPORT_FILE, RunFiles

log = logging.getLogger(__name__)

FORECASTS = ("model", "persistence", "climatology")


@dataclass
class MapSample:
    """One init time's forecast and truth at one lead, for the maps."""

    init_time: str
    lead: int
    channels: list[str]
    forecast: np.ndarray  # (C, Y, X)
    truth: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    units: dict[str, str] = field(default_factory=dict)


@dataclass
class Scores:
    """Sums over init times of each forecast's scores, shape (lead, channel)."""

    leads: list[int]
    channels: list[str]
    sums: dict[str, ScoreSums]
    sample: MapSample | None = None


def load_target(target: str | Path, overrides: list[str] | None = None) -> tuple[Config, Path]:
    """A config file (its run is ``<runs_dir>/<name>``) or a run directory (with its
    ``config.yaml``) -> (config, run directory)."""
    path = Path(target)
    if path.is_dir():
        config = RunFiles(path).config
        if not config.is_file():
            raise ConfigError(f"run directory {path} has no config.yaml",
                              "pass the run's YAML config instead")
        return load_config(config, overrides), path
    cfg = load_config(path, overrides)
    return cfg, cfg.run_dir()


def pick_inits(n: int, max_samples: int | None) -> np.ndarray:
    """Positions of the init times to use: all, or ``max_samples`` spread evenly."""
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_samples)).astype(int))


def chunks(items: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def lead_hours(info: StoreInfo, steps: int) -> float | None:
    """Hours in ``steps`` store time steps, or None for calendar frequencies (months)."""
    step = climatology.step_duration(info.attrs.frequency)
    return None if step is None else steps * step.total_seconds() / 3600.0


def scored_points(info: StoreInfo, truth_steps: np.ndarray, init_steps: np.ndarray,
                  clim_values: np.ndarray) -> np.ndarray | None:
    """Where to score ``(B, L, C_out, Y, X)``: the truth valid at the valid time, the
    input valid at the init, a climatology there. Raw ``truth_steps`` ``(B, L, C, Y, X)``
    and ``init_steps`` ``(B, C, Y, X)`` (all channels); None for a store without masks."""
    truth_valid, init_valid = info.layout.valid(truth_steps), info.layout.valid(init_steps)
    if truth_valid is None or init_valid is None:
        return None
    return truth_valid & init_valid[:, None] & np.isfinite(clim_values)


def score(model: rollout.Forecaster, dataset: ForecastDataset, inits: np.ndarray,
          leads: list[int], clim: climatology.Climatology, chunk_size: int,
          plot_channels: list[str] | None = None) -> Scores:
    """Roll out from each init, chunk by chunk, and accumulate the scores."""
    info = model.info
    out = list(info.layout.outputs)
    names = info.layout.output_names
    steps = np.asarray(leads) * model.lead  # store time steps of each scored lead
    shape = (len(leads), len(out))
    sums = {name: ScoreSums.zeros(shape) for name in FORECASTS}
    data = DataReader(info.path)
    sample = None
    for chunk in chunks(inits, chunk_size):
        batch = dataset.read_batch([int(i) for i in chunk])  # consecutive inits share reads
        inputs, forcings = batch["inputs"].numpy(), batch["target_forcings"].numpy()
        forecast = model.rollout(inputs, forcings)[:, np.asarray(leads) - 1]  # (B, L, C, Y, X)
        t0 = dataset.times[chunk]
        truth_steps = np.stack([data[int(t) + steps[0]: int(t) + steps[-1] + 1][steps - steps[0]]
                                for t in t0])
        truth = truth_steps[:, :, out].astype(np.float64)
        init_steps = np.stack([data[int(t)] for t in t0])
        persistence = init_steps[:, out].astype(np.float64)
        valid_times = (t0[:, None] + steps[None, :]).reshape(-1)
        clim_values = clim.at(info.times[valid_times]).reshape(truth.shape)
        valid = scored_points(info, truth_steps, init_steps, clim_values)
        w = info.area_weight
        sums["model"] += ScoreSums.of_chunk(forecast, truth, clim_values, w, valid)
        sums["persistence"] += ScoreSums.of_chunk(
            np.broadcast_to(persistence[:, None], truth.shape), truth, clim_values, w, valid)
        sums["climatology"] += ScoreSums.of_chunk(clim_values, truth, clim_values, w, valid)
        if sample is None and plot_channels:
            pick = [names.index(c) for c in plot_channels]
            shown_forecast, shown_truth = (
                np.where(valid[0, -1, pick], x, np.nan) if valid is not None else x
                for x in (forecast[0, -1, pick], truth[0, -1, pick]))
            sample = MapSample(time_label(info.times[int(t0[0])]), leads[-1], list(plot_channels),
                               shown_forecast, shown_truth, info.lat, info.lon,
                               {c: units(info, c) for c in plot_channels})
        log.info("scored %d init times", sums["model"].count)
    return Scores(list(leads), names, sums, sample)


def units(info: StoreInfo, channel: str) -> str:
    """The channel's units as the store records them ('' if it does not)."""
    return info.attrs.channel_attrs.get(channel, {}).get("units", "")


def records(scores: Scores, info: StoreInfo, lead: int) -> list[dict[str, Any]]:
    """One record per (channel, lead), in physical units (the README's documented fields first)."""
    s = scores.sums
    rmse = {k: v.rmse() for k, v in s.items()}
    acc = {k: v.mean_acc() for k, v in s.items()}
    skill_p = skill_score(s["model"].mse(), s["persistence"].mse())
    skill_c = skill_score(s["model"].mse(), s["climatology"].mse())
    rows = []
    for c, channel in enumerate(scores.channels):
        for j, ld in enumerate(scores.leads):
            rows.append({
                "channel": channel, "lead": ld,
                "rmse": rmse["model"][j, c], "acc": acc["model"][j, c],
                "rmse_persistence": rmse["persistence"][j, c],
                "rmse_climatology": rmse["climatology"][j, c],
                "acc_persistence": acc["persistence"][j, c],
                "skill_persistence": skill_p[j, c], "skill_climatology": skill_c[j, c],
                "lead_steps": ld * lead, "lead_hours": lead_hours(info, ld * lead),
                "units": units(info, channel),
            })
    return [{k: _json_number(v) for k, v in row.items()} for row in rows]


def _json_number(value: Any) -> Any:
    """Floats as JSON numbers, NaN and infinities as null (JSON has neither)."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a file."""
    files.atomic_write(path, json.dumps(payload, indent=1, allow_nan=False) + "\n")


def default_plot_channels(cfg: Config, names: list[str]) -> list[str]:
    wanted = cfg.evaluate.channels_to_plot or names[:2]
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise ConfigError(f"evaluate.channels_to_plot names channels {unknown} that the model "
                          "does not predict", f"choose among {', '.join(names)}")
    return list(wanted)


def evaluate(cfg: Config, run_dir: Path | None = None, report: bool = True) -> dict[str, Any]:
    """Evaluate the run's best checkpoint; write ``eval/``; return the metrics."""
    run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir()
    ev = cfg.evaluate
    info = StoreInfo(cfg.data.store)
    model = rollout.load(run_dir, info)
    leads = sorted(set(ev.leads))
    names = info.layout.output_names
    plot_channels = default_plot_channels(cfg, names)
    try:
        dataset = ForecastDataset(info, ev.split, model.history, model.lead, leads[-1])
    except ConfigError:
        raise ConfigError(f"split '{ev.split}' is too short for leads up to {leads[-1]} model "
                          f"steps of {model.lead} (history {model.history})",
                          "use shorter evaluate.leads or a longer split") from None
    inits = pick_inits(len(dataset), ev.max_samples)
    first, last = info.split_range("train")
    out = list(info.layout.outputs)
    clim = climatology.compute(info.path, info.times, first, last, out, names,
                               info.attrs.frequency, ev.climatology_window,
                               block=info.attrs.shard_size,
                               valid=info.layout.valid)
    scores = score(model, dataset, inits, leads, clim, ev.chunk_size, plot_channels)
    init_times = dataset.times[inits]
    metrics = {
        "checkpoint": str(model.folder),
        "checkpoint_step": model.meta.step,
        "store": info.path,
        "store_version": info.dataset_version,
        "config_hash": config_hash(cfg),
        "checkpoint_config_hash": model.meta.config_hash,
        "split": ev.split,
        "leads": leads,
        "lead_unit": f"model steps of {model.lead} x {info.attrs.frequency}",
        "frequency": info.attrs.frequency,
        "init_times": len(inits),
        "first_init": time_label(info.times[int(init_times[0])]),
        "last_init": time_label(info.times[int(init_times[-1])]),
        "climatology": clim.summary(),
        "skill": "1 - MSE / MSE of the reference (persistence or climatology)",
        "code_version": __version__,
        "created": now(),
        "records": records(scores, info, model.lead),
    }
    run = RunFiles(run_dir)
    write_eval_dir(run.eval, metrics, scores.sample, cfg.name, report)
    log.info("evaluated %s on %d init times of '%s': %s", model.folder, len(inits), ev.split,
             run.eval_metrics)
    return metrics


def write_eval_dir(eval_dir: Path, metrics: dict[str, Any], sample: MapSample | None,
                   run_name: str, report: bool) -> None:
    """Write plots, report and (last, listing the others in ``files``) ``metrics.json``
    into a private temporary folder, then rename it to ``eval_dir``: the evaluation
    counts only once all of it is there (``results.current_metrics``)."""
    files.clean_stale(eval_dir)  # what killed evaluations of this run left
    tmp = files.temporary_name(eval_dir)
    tmp.mkdir(parents=True)
    try:
        written: list[str] = []
        if report:
            from pipeline.evaluate import plots
            from pipeline.evaluate import report as html

            figures = plots.write_all(tmp, metrics, sample, RunFiles(eval_dir.parent).metrics)
            html.write(tmp, metrics, figures, run_name=run_name)
            written = [f.file for f in figures] + [REPORT_FILE]
        metrics["files"] = written
        write_json(tmp / EVAL_METRICS_FILE, metrics)
        files.replace_folder(tmp, eval_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def evaluate_target(target: str | Path, overrides: list[str] | None = None) -> Path:
    """What ``pipeline evaluate CONFIG|RUN_DIR`` does; returns the eval directory."""
    cfg, run_dir = load_target(target, overrides)
    evaluate(cfg, run_dir)
    return RunFiles(run_dir).eval

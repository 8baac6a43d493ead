"""The evaluation's figures, as PNG files in ``eval/`` (matplotlib's Agg canvas; no
pyplot, so no global state and no display needed).

- ``map_<channel>.png``: truth, forecast and error at one init time and lead;
- ``rmse_vs_lead.png``, ``acc_vs_lead.png``: the model and the baselines per channel;
- ``loss.png``: training and validation loss from the run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from pipeline.evaluate.evaluate import MapSample

DPI = 100
STYLES = {"model": ("C0", "o", "-"), "persistence": ("C1", "s", "--"),
          "climatology": ("C2", "^", ":")}


@dataclass
class Plot:
    """A written figure: its file name (relative to ``eval/``) and a caption."""

    file: str
    title: str
    kind: str  # map, lead or loss


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def map_figure(sample: MapSample, index: int, path: Path) -> None:
    """Truth, forecast (same colour scale) and error (symmetric) side by side."""
    channel = sample.channels[index]
    truth, forecast = sample.truth[index], sample.forecast[index]
    error = forecast - truth
    # masked points are NaN (blank on the map)
    lo = float(min(np.nanmin(truth), np.nanmin(forecast)))
    hi = float(max(np.nanmax(truth), np.nanmax(forecast)))
    bound = float(np.nanmax(np.abs(error))) or 1.0
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    panels = [("truth", truth, "viridis", lo, hi), ("forecast", forecast, "viridis", lo, hi),
              ("forecast - truth", error, "RdBu_r", -bound, bound)]
    for ax, (title, values, cmap, vmin, vmax) in zip(axes, panels, strict=True):
        mesh = ax.pcolormesh(sample.lon, sample.lat, values, cmap=cmap, vmin=vmin, vmax=vmax,
                             shading="nearest")
        ax.set_title(title)
        ax.set_xlabel("longitude")
        fig.colorbar(mesh, ax=ax, shrink=0.85)
    axes[0].set_ylabel("latitude")
    units = sample.units.get(channel)
    fig.suptitle(f"{channel}{f' [{units}]' if units else ''}: init {sample.init_time}, "
                 f"lead {sample.lead}")
    _save(fig, path)


def lead_figure(records: list[dict[str, Any]], metric: str, path: Path) -> None:
    """``metric`` (rmse or acc) against lead, one panel per channel, model and baselines."""
    channels = list(dict.fromkeys(r["channel"] for r in records))
    rows, cols = _grid(len(channels))
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    series = ["model", "persistence", "climatology"] if metric == "rmse" else ["model", "persistence"]
    for ax, channel in zip(axes, channels, strict=False):
        rows_c = sorted((r for r in records if r["channel"] == channel), key=lambda r: r["lead"])
        leads = [r["lead"] for r in rows_c]
        for name in series:
            key = metric if name == "model" else f"{metric}_{name}"
            values = [np.nan if r[key] is None else r[key] for r in rows_c]
            color, marker, line = STYLES[name]
            ax.plot(leads, values, color=color, marker=marker, linestyle=line, label=name)
        ax.set_title(channel)
        ax.set_xlabel("lead (model steps)")
        ax.set_ylabel(metric.upper())
        ax.set_xticks(leads)
        ax.grid(alpha=0.3)
    for ax in axes[len(channels):]:
        ax.set_visible(False)
    axes[0].legend()
    _save(fig, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a torn last line (a crash) is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def loss_figure(metrics_jsonl: Path, path: Path) -> bool:
    """Training and validation loss against step; False if there is nothing to plot."""
    if not metrics_jsonl.is_file():
        return False
    rows = [r for r in read_jsonl(metrics_jsonl) if "step" in r]
    if not rows:
        return False
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for key, label, style in [("train_loss", "train", "-"), ("val_loss", "validation", "-"),
                              ("val_loss_persistence", "validation, persistence", "--")]:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, style, marker="." if len(points) < 50 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (normalised, area-weighted MSE)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(fig, path)
    return True


def write_all(eval_dir: Path, metrics: dict[str, Any], sample: MapSample | None,
              metrics_jsonl: Path) -> list[Plot]:
    """Write every figure into ``eval_dir``; return what was written, in report order."""
    plots: list[Plot] = []
    records = metrics["records"]
    for metric, title in [("rmse", "RMSE against lead time"), ("acc", "ACC against lead time")]:
        name = f"{metric}_vs_lead.png"
        lead_figure(records, metric, eval_dir / name)
        plots.append(Plot(name, title, "lead"))
    if sample is not None:
        for i, channel in enumerate(sample.channels):
            name = f"map_{safe_name(channel)}.png"
            map_figure(sample, i, eval_dir / name)
            plots.append(Plot(name, f"{channel}: truth, forecast and error", "map"))
    if loss_figure(metrics_jsonl, eval_dir / "loss.png"):
        plots.append(Plot("loss.png", "Training and validation loss", "loss"))
    return plots

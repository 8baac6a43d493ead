"""The build plan: the config checked against the sources' metadata, before any data
is read. Every step of the build (init, the shard tasks, finalise, append) works from
one :class:`BuildPlan`, and a shard task recomputes it from the config alone.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.config import Config, Data, config_hash
from pipeline.data.grid import coarsen_area_weighted
from pipeline.data.sources import SourceScan, scan_sources, time_axis, within
from pipeline.data.transforms import ChannelPlan, plan_channels
from pipeline.errors import SourceError

log = logging.getLogger(__name__)


@dataclass
class BuildPlan:
    """Everything a shard task needs, computed from the config and the sources alone."""

    data: Data
    store_path: str
    scans: list[SourceScan]
    times: pd.Index
    channels: ChannelPlan
    lat: np.ndarray  # after coarsening
    lon: np.ndarray
    train_mask: np.ndarray  # (time,) bool

    @property
    def n_shards(self) -> int:
        return -(-len(self.times) // self.data.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        t0 = shard * self.data.shard_size
        return t0, min(t0 + self.data.shard_size, len(self.times))

    def data_hash(self) -> str:
        """Identity of the store's content definition: the data section minus what may
        change between builds of the same store (end, statistics policy)."""
        return config_hash(self.data.model_copy(update={"end": None, "statistics": None}))

    def provenance(self) -> list[dict[str, Any]]:
        """Path, size and modification time of every source file (the store records them)."""
        return [f.provenance() for scan in self.scans for f in scan.files]


def make_plan(cfg: Config) -> BuildPlan:
    """Scan and validate the sources against the config (no data is read)."""
    scans = scan_sources(cfg.data)
    channels = plan_channels(cfg.data, scans)
    times = time_axis(scans, cfg.data)
    lat, lon = _coarse_grid(*scans[0].grid, cfg.data.coarsen)
    train_mask = _split_mask(times, cfg.data)
    return BuildPlan(data=cfg.data, store_path=os.path.abspath(cfg.data.store), scans=scans,
                     times=times, channels=channels, lat=lat, lon=lon, train_mask=train_mask)


def _coarse_grid(lat: np.ndarray, lon: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    grid = xr.Dataset(coords={"lat": lat, "lon": lon})
    grid["x"] = xr.DataArray(np.zeros((lat.size, lon.size)), dims=("lat", "lon"))
    coarse = coarsen_area_weighted(grid, factor)
    return coarse["lat"].values.astype(np.float64), coarse["lon"].values.astype(np.float64)


def _split_mask(times: pd.Index, cfg: Data) -> np.ndarray:
    """Train-split mask, after checking that every split selects some stored steps."""
    masks = {}
    for name in ("train", "val", "test"):
        start, end = getattr(cfg.splits, name)
        masks[name] = within(times, start, end)
        if name != "train" and not masks[name].any():
            # Allowed: a store built before its evaluation period's data has arrived.
            log.warning("data.splits.%s [%s, %s] selects no stored time step yet", name, start, end)
    if masks["train"].sum() < 2:
        raise SourceError("data.splits.train selects fewer than 2 steps",
                          "widen the train split (statistics need at least 2 steps)")
    if (masks["train"] & (masks["val"] | masks["test"])).any():
        raise SourceError("data.splits.train overlaps val or test", "make the splits disjoint")
    return masks["train"]

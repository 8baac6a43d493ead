"""Climatology of the train split, the reference for anomalies and a baseline.

Sub-monthly data (e.g. 6-hourly) is grouped by (day of year, hour of day), as in
WeatherBench 2; monthly (or coarser calendar) data by month. The sums and counts per
group are accumulated in one pass over the train split, a block of time steps at a
time, in physical units and float64, so memory is bounded by the climatology itself.

In a store with masks only the valid points enter (per point, the number of valid
steps is kept beside the sums): a point missing in some years averages over the others
and never over the fill value; a point never valid in a group's window has a NaN
climatology there.

Looking up the climatology at a valid time averages the groups of the same hour within
``window`` days (circular over the year; ``window=1`` is no smoothing). A split shorter
than a year leaves days without data: those take the nearest day of year that has
data (same hour), and :attr:`Climatology.filled` counts how often that happened.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.data.store import DataReader
from pipeline.errors import ConfigError

BY_DAY = "dayofyear_hour"
BY_MONTH = "month"
DAYS_IN_YEAR = {"noleap": 365, "365_day": 365, "360_day": 360}


def step_duration(frequency: str) -> pd.Timedelta | None:
    """The fixed length of a time step (hours, days, weeks), or None for calendar steps
    such as months, whose length varies."""
    offset = pd.tseries.frequencies.to_offset(frequency)
    if isinstance(offset, pd.offsets.Week) and offset.weekday is None:
        return pd.Timedelta(weeks=offset.n)
    try:
        return pd.Timedelta(offset)
    except (TypeError, ValueError):
        return None


def grouping(frequency: str) -> str:
    """``dayofyear_hour`` for fixed steps (hours, days, weeks), else ``month``."""
    offset = pd.tseries.frequencies.to_offset(frequency)
    fixed = step_duration(frequency) is not None or isinstance(offset, pd.offsets.Week)
    return BY_DAY if fixed else BY_MONTH


def calendar_keys(times: Any, by: str) -> np.ndarray:
    """``(n, 2)`` integer keys: (day of year, hour), or (month, 0)."""
    index = times if isinstance(times, pd.Index) else pd.Index(times)
    if not isinstance(index, (pd.DatetimeIndex, xr.CFTimeIndex)):
        index = xr.CFTimeIndex(index) if len(index) and hasattr(index[0], "calendar") \
            else pd.DatetimeIndex(index)
    if by == BY_MONTH:
        return np.stack([np.asarray(index.month), np.zeros(len(index), int)], axis=1).astype(int)
    return np.stack([np.asarray(index.day_of_year), np.asarray(index.hour)], axis=1).astype(int)


def year_length(times: Any) -> int:
    """Days in the calendar's year (the period of the day-of-year axis)."""
    calendar = getattr(times, "calendar", None) if isinstance(times, xr.CFTimeIndex) else None
    return DAYS_IN_YEAR.get(calendar or "standard", 366)


@dataclass
class Climatology:
    """Sums and counts per calendar group of the predicted channels."""

    by: str
    keys: np.ndarray  # (K, 2) observed groups
    sums: np.ndarray  # (K, C, Y, X) float64
    counts: np.ndarray  # (K,) time steps
    channels: list[str]
    window: int = 1
    period: int = 366
    valid_counts: np.ndarray | None = None  # (K, C, Y, X) valid steps per point, with masks
    lookups: int = 0
    filled: int = 0
    _cache: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)
    _filled: set[tuple[int, int]] = field(default_factory=set, repr=False)

    def means(self) -> np.ndarray:
        """The unsmoothed mean of each observed group, ``(K, C, Y, X)``."""
        if self.valid_counts is None:
            return self.sums / self.counts[:, None, None, None]
        return _mean_over_valid(self.sums, self.valid_counts)

    def value(self, key: tuple[int, int]) -> np.ndarray:
        """The (smoothed) climatology of one group, ``(C, Y, X)`` float64."""
        self.lookups += 1
        key = (int(key[0]), int(key[1]))
        if key not in self._cache:
            self._cache[key] = self._compute(key)
        if key in self._filled:
            self.filled += 1
        return self._cache[key]

    def _compute(self, key: tuple[int, int]) -> np.ndarray:
        first, second = key
        same = self.keys[:, 1] == second
        if self.by == BY_MONTH:
            dist = _circular(self.keys[:, 0], first, 12)
            half = 0
        else:
            dist = _circular(self.keys[:, 0], first, self.period)
            half = self.window // 2
        pick = same & (dist <= half)
        if not pick.any():  # no data near this day: the climatology of the nearest that has
            self._filled.add(key)
            score = dist * 100 + np.abs(self.keys[:, 1] - second)  # same hour first
            if same.any():
                score = np.where(same, score, np.iinfo(np.int64).max)
            nearest = self.keys[int(np.argmin(score))]
            return self._compute((int(nearest[0]), int(nearest[1])))
        if self.valid_counts is None:
            return self.sums[pick].sum(axis=0) / self.counts[pick].sum()
        return _mean_over_valid(self.sums[pick].sum(axis=0), self.valid_counts[pick].sum(axis=0))

    def at(self, times: Any) -> np.ndarray:
        """The climatology at each time, ``(T, C, Y, X)`` float64."""
        keys = calendar_keys(times, self.by)
        return np.stack([self.value(tuple(k)) for k in keys])

    def summary(self) -> dict[str, Any]:
        """What metrics.json records about the climatology."""
        return {"split": "train", "by": self.by, "window_days": self.window,
                "groups": int(len(self.keys)), "samples": int(self.counts.sum()),
                "lookups": self.lookups, "filled_from_nearest_day": self.filled}


def _mean_over_valid(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``sums / counts``, NaN where no step was valid."""
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _circular(values: np.ndarray, target: int, period: int) -> np.ndarray:
    d = np.abs(values.astype(np.int64) - target) % period
    return np.minimum(d, period - d)


def compute(path: str, times: Any, first: int, last: int, channels: list[int],
            names: list[str], frequency: str, window: int = 1, block: int = 32,
            by: str | None = None,
            valid: Callable[[np.ndarray], np.ndarray | None] | None = None) -> Climatology:
    """One pass over time steps ``first..last`` (inclusive) of the store's ``data``.

    ``channels`` are the indices of the channels to keep; ``block`` time steps are read
    at a time; ``by`` overrides the grouping that ``frequency`` implies; ``valid`` maps
    raw steps (all channels) to where the kept channels hold data (bool, or None for
    all: ``Layout.valid``), so that missing points stay out of the means.
    """
    if window < 1 or window % 2 == 0:
        raise ConfigError(f"evaluate.climatology_window={window} must be an odd number of days",
                          "use 1 (no smoothing), 15, 31, ...")
    if last < first:
        raise ConfigError("the train split is empty: no climatology", "check data.splits.train")
    by = by or grouping(frequency)
    index = times[first:last + 1]
    keys = calendar_keys(index, by)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    data = DataReader(path)
    n_lat, n_lon = data.shape[2], data.shape[3]
    sums = np.zeros((len(unique), len(channels), n_lat, n_lon))
    counts = np.bincount(inverse, minlength=len(unique)).astype(np.int64)
    valid_counts = None
    for start in range(first, last + 1, block):
        stop = min(start + block, last + 1)
        steps = data[start:stop]
        values = steps[:, channels].astype(np.float64)
        ok = valid(steps) if valid is not None else None
        if ok is not None:
            values = np.where(ok, values, 0.0)
            if valid_counts is None:
                valid_counts = np.zeros(sums.shape, np.int64)
        groups = inverse[start - first: stop - first]
        for g in np.unique(groups):
            sums[g] += values[groups == g].sum(axis=0)
            if ok is not None and valid_counts is not None:  # both set, or neither
                valid_counts[g] += ok[groups == g].sum(axis=0)
    return Climatology(by, unique, sums, counts, list(names), window, year_length(index),
                       valid_counts)

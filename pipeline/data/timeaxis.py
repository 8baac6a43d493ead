"""The store's time axis: fixed steps (hours, days), or one step per calendar period.

For fixed steps the store keeps the sources' times, which must follow each other at
``data.frequency`` exactly. For calendar frequencies (months, quarters, years: ``MS``,
``ME``, ``M``, ``QS-DEC``, ``YS``, ...) a source's stamp may lie anywhere in its period:
CMIP6 ``Amon`` and most observational products stamp monthly means mid-month
(``1850-01-16 12:00``, ``1850-02-15 00:00``), others at the first or the last day. The
store then records each step by **its period's start** (``1850-01-01``): every product
gives the same axis, the axis is ``xarray.date_range`` of the start-anchored frequency
(what evaluation's monthly climatology and forecasts' valid times build on), and the
store's ``frequency`` attribute is that frequency (``MS`` for ``ME`` or ``M``).

Which period a step belongs to comes from the file's time bounds (CF ``bounds``, e.g.
``time_bnds``) where it has them, so that a mean stamped at the end of its month (the
next month's first day) is not taken for the next month; without bounds, a stamp lies
in the period it falls in, and a stamp on a period's first instant begins that period.
All of it works in every cftime calendar (``noleap``, ``360_day``, ``standard``, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.errors import SourceError

MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_CALENDAR_FREQUENCY = re.compile(
    r"^(?P<n>[1-9][0-9]*)?(?P<unit>MS|ME|M|QS|QE|Q|YS|YE|Y|AS|A)(?:-(?P<anchor>[A-Z]{3}))?$")
_MONTHS_PER_UNIT = {"M": 1, "Q": 3, "Y": 12, "A": 12}


@dataclass(frozen=True)
class CalendarStep:
    """A calendar frequency: ``months`` per step, periods starting in the months whose
    index (``year * 12 + month - 1``) is ``offset`` modulo ``months``."""

    months: int
    offset: int
    unit: str  # M, Q or Y

    @property
    def frequency(self) -> str:
        """The start-anchored pandas/xarray frequency of these periods (``MS``, ``QS-DEC``)."""
        n = self.months // _MONTHS_PER_UNIT[self.unit]
        count = "" if n == 1 else str(n)
        if self.unit == "M":
            return f"{count}MS"
        return f"{count}{self.unit}S-{MONTH_NAMES[self.offset % 12]}"

    def start(self, t: Any) -> Any:
        """The first instant of the period that holds ``t`` (same type and calendar)."""
        index = t.year * 12 + t.month - 1
        index -= (index - self.offset) % self.months
        return _first_of_month(t, index)

    def next(self, start: Any) -> Any:
        """The start of the period after the one that starts at ``start``."""
        return _first_of_month(start, start.year * 12 + start.month - 1 + self.months)

    def number(self, t: Any) -> int:
        """The period's running number, consecutive for consecutive periods."""
        return (t.year * 12 + t.month - 1 - self.offset) // self.months


def _first_of_month(t: Any, month_index: int) -> Any:
    year, month = divmod(month_index, 12)
    fields = {"year": year, "month": month + 1, "day": 1, "hour": 0, "minute": 0, "second": 0,
              "microsecond": 0}
    if isinstance(t, pd.Timestamp):
        fields["nanosecond"] = 0
    return t.replace(**fields)


def calendar_step(frequency: str) -> CalendarStep | None:
    """The calendar frequency ``frequency`` names, or None for a fixed step (``6h``, ``1D``)."""
    match = _CALENDAR_FREQUENCY.match(frequency)
    if match is None:
        return None
    unit = "Y" if match["unit"][0] == "A" else match["unit"][0]
    months = int(match["n"] or 1) * _MONTHS_PER_UNIT[unit]
    anchor = match["anchor"]
    if anchor is not None and anchor not in MONTH_NAMES:
        raise SourceError(f"data.frequency '{frequency}': unknown month '{anchor}'",
                          f"use one of {', '.join(MONTH_NAMES)}")
    if unit == "M" and anchor is not None:
        raise SourceError(f"data.frequency '{frequency}': monthly steps take no month",
                          "write MS (or 3MS for three months)")
    first = MONTH_NAMES.index(anchor) if anchor else 0
    if match["unit"] in ("QE", "Q", "YE", "Y", "A") and anchor:
        first = (first + 1) % 12  # pandas anchors period ends at the named month
    return CalendarStep(months=months, offset=first % months, unit=unit)


def store_frequency(frequency: str) -> str:
    """The frequency the store records: calendar frequencies start-anchored (``MS``)."""
    step = calendar_step(frequency)
    return step.frequency if step is not None else frequency


def _index_like(values: list[Any], like: pd.Index) -> pd.Index:
    if isinstance(like, xr.CFTimeIndex):
        return xr.CFTimeIndex(values, calendar=like.calendar)
    return pd.DatetimeIndex(values)


def period_labels(times: pd.Index, bounds: np.ndarray | None, frequency: str,
                  origin: str) -> pd.Index:
    """The store's label of each of a file's steps: the source's times for fixed steps,
    the start of each step's period for calendar frequencies (from ``bounds``, the
    file's ``(n, 2)`` time bounds, where given)."""
    step = calendar_step(frequency)
    if step is None or len(times) == 0:
        return times
    if bounds is None:
        labels = [step.start(t) for t in times]
    else:
        lower = _index_like(list(np.asarray(bounds)[:, 0]), times)
        upper = _index_like(list(np.asarray(bounds)[:, 1]), times)
        labels = [step.start(lo) for lo in lower]
        for i, (lo, hi, t) in enumerate(zip(lower, upper, times, strict=True)):
            if lo != labels[i] or hi != step.next(labels[i]):
                raise SourceError(
                    f"{origin}: the time bounds of step {i} ({time_label(lo)} to {time_label(hi)}) "
                    f"are not one period of data.frequency={frequency}",
                    "set data.frequency to the files' averaging period")
            if not lo <= t <= hi:
                raise SourceError(f"{origin}: time {time_label(t)} lies outside its bounds "
                                  f"({time_label(lo)} to {time_label(hi)})", "fix the file's time_bnds")
    for i in range(1, len(labels)):
        if labels[i] == labels[i - 1]:
            raise SourceError(
                f"{origin}: two steps in the period from {time_label(labels[i])} "
                f"({time_label(times[i - 1])} and {time_label(times[i])}): data.frequency={frequency} "
                "is one step per period", "set data.frequency to the files' time step")
    return _index_like(labels, times)


def time_label(t: Any) -> str:
    """A time as ISO text, for messages and attributes (numpy and cftime alike)."""
    if isinstance(t, (np.datetime64, pd.Timestamp)):
        return pd.Timestamp(t).isoformat()
    return t.isoformat() if hasattr(t, "isoformat") else str(t)


def check_regular(index: pd.Index, frequency: str) -> None:
    """Raise naming the first gap if ``index`` is not every ``frequency`` step (for a
    calendar frequency: one label per consecutive period)."""
    if len(index) == 0:
        return
    step = calendar_step(frequency)
    if step is not None:
        numbers = np.array([step.number(t) for t in index])
        gaps = np.flatnonzero(np.diff(numbers) != 1)
        if gaps.size:
            bad = int(gaps[0]) + 1
            _gap(step.next(index[bad - 1]), index[bad - 1], index[bad], frequency)
        return
    calendar = index.calendar if isinstance(index, xr.CFTimeIndex) else None
    try:
        expected = xr.date_range(start=index[0], periods=len(index), freq=frequency,
                                 calendar=calendar or "standard", use_cftime=calendar is not None)
    except ValueError as err:
        raise SourceError(f"data.frequency '{frequency}' is not a valid frequency: {err}",
                          "use a pandas offset such as 6h, 1D or MS") from None
    same = np.array([x == y for x, y in zip(index, expected, strict=True)], dtype=bool)
    if not same.all():
        bad = int(np.argmax(~same))  # >= 1: the expected axis starts at index[0]
        _gap(expected[bad], index[bad - 1], index[bad], frequency)


def _gap(expected: Any, before: Any, found: Any, frequency: str) -> None:
    raise SourceError(
        f"time gap: expected {time_label(expected)} after {time_label(before)} but the sources have "
        f"{time_label(found)} (data.frequency={frequency})",
        "fill the missing files or steps, or set data.start/data.end to avoid the gap")

"""What the demo simulates: a :class:`DemoSpec` (grid, levels, time span, calendar) and
the named sizes, and its time axis in any CF calendar."""

from __future__ import annotations

import re
from dataclasses import dataclass

import cftime
import numpy as np

SIZES = ("tiny", "small", "large")
TIME_UNITS = "hours since 1970-01-01 00:00:00"
ERA5_LEVELS = (1000.0, 925.0, 850.0, 700.0, 600.0, 500.0, 400.0, 300.0, 250.0, 200.0,
               150.0, 100.0, 50.0)
_SIZE_ARGS: dict[str, dict] = {
    "tiny": {"n_lat": 17, "n_lon": 32, "levels": (850.0, 500.0), "months": 3},
    "small": {"n_lat": 33, "n_lon": 64, "levels": (850.0, 500.0, 250.0), "months": 6},
    "large": {"n_lat": 121, "n_lon": 240, "levels": ERA5_LEVELS, "months": 6},
}
YEAR_DAYS = {"360_day": 360.0, "noleap": 365.0, "365_day": 365.0, "all_leap": 366.0,
              "366_day": 366.0, "julian": 365.25}
STANDARD_CALENDARS = ("standard", "gregorian", "proleptic_gregorian")



@dataclass(frozen=True)
class DemoSpec:
    """What to simulate: grid (poles included), pressure levels (descending), time span."""

    n_lat: int
    n_lon: int
    levels: tuple[float, ...]
    start: str = "2000-01-01"
    months: int = 3
    step_hours: int = 6
    calendar: str = "standard"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(float(p) for p in self.levels))
        if self.n_lat < 3 or self.n_lon < 4:
            raise ValueError(f"grid {self.n_lat}x{self.n_lon} too small (need n_lat>=3, n_lon>=4)")
        lv = self.levels
        if not lv or lv[-1] <= 0 or any(a <= b for a, b in zip(lv, lv[1:], strict=False)):
            raise ValueError(f"levels {lv} must be positive hPa, strictly descending like ERA5")
        if self.months < 1 or self.step_hours < 1:
            raise ValueError("months and step_hours must be >= 1")
        start_date(self)  # validates start and calendar


def demo_spec(size: str, **overrides) -> DemoSpec:
    """The spec of a named demo size (tiny, small, large), with fields overridden."""
    if size not in _SIZE_ARGS:
        raise ValueError(f"unknown demo size {size!r} (allowed: {', '.join(SIZES)})")
    return DemoSpec(**{**_SIZE_ARGS[size], **overrides})


# ----------------------------------------------------------------------------- time axis
def start_date(spec: DemoSpec) -> cftime.datetime:
    """Parse ``start`` (YYYY-MM-DD[THH[:00[:00]]]) as a date in the spec's calendar."""
    m = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2})(?::00(?::00)?)?)?", spec.start.strip())
    if not m:
        raise ValueError(f"start {spec.start!r} is not YYYY-MM-DD or YYYY-MM-DDTHH:00")
    y, mo, d, h = (int(g) if g else 0 for g in m.groups())
    return cftime.datetime(y, mo, d, h, calendar=spec.calendar)  # ValueError if invalid


def month_times(spec: DemoSpec) -> list[tuple[int, int, np.ndarray]]:
    """(year, month, hours since 1970) per calendar month; one global step grid from start."""
    first = start_date(spec)
    edges, (y, mo) = [], (first.year, first.month)
    for _ in range(spec.months):
        y, mo = (y + 1, 1) if mo == 12 else (y, mo + 1)
        edges.append(cftime.date2num(cftime.datetime(y, mo, 1, calendar=spec.calendar),
                                     TIME_UNITS, calendar=spec.calendar))
    h0 = float(cftime.date2num(first, TIME_UNITS, calendar=spec.calendar))
    hours = h0 + spec.step_hours * np.arange(int(np.ceil((edges[-1] - h0) / spec.step_hours)))
    out, lo, (y, mo) = [], h0, (first.year, first.month)
    for hi in edges:
        out.append((y, mo, hours[(hours >= lo) & (hours < hi)]))
        lo, (y, mo) = hi, ((y + 1, 1) if mo == 12 else (y, mo + 1))
    return out


def time_values(hours: np.ndarray, calendar: str) -> np.ndarray:
    """Hours since 1970 as datetime64 (standard calendars) or cftime dates (others)."""
    if calendar in STANDARD_CALENDARS:
        ns = np.round(hours * 3.6e12).astype("int64").astype("timedelta64[ns]")
        return np.datetime64("1970-01-01T00:00:00", "ns") + ns
    return np.asarray(cftime.num2date(hours, TIME_UNITS, calendar=calendar))

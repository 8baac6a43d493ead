"""Forcing channels computed analytically from time and position.

Solar geometry uses the standard low-order formulas (Spencer 1971) for declination and
the equation of time; the year fraction comes from the time's own calendar, so
``noleap`` and ``360_day`` model calendars work. Values are float32 fields
``(time, lat, lon)``.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

SOLAR_CONSTANT = 1361.0  # W m-2


def year_fraction(times: xr.DataArray) -> np.ndarray:
    """Fraction of the calendar year elapsed at each time, in [0, 1)."""
    dt = times.dt
    days_in_year = dt.days_in_year.values if hasattr(dt, "days_in_year") else np.where(
        dt.is_leap_year.values, 366, 365)
    day = dt.dayofyear.values - 1 + hour_of_day(times) / 24.0
    return (day / days_in_year).astype(np.float64)


def hour_of_day(times: xr.DataArray) -> np.ndarray:
    """UTC hour of day as a float."""
    dt = times.dt
    return (dt.hour.values + dt.minute.values / 60.0 + dt.second.values / 3600.0).astype(np.float64)


def cos_zenith(times: xr.DataArray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Cosine of the solar zenith angle, clipped at 0 (night), shape (time, lat, lon)."""
    gamma = 2.0 * np.pi * year_fraction(times)
    decl = (0.006918 - 0.399912 * np.cos(gamma) + 0.070257 * np.sin(gamma)
            - 0.006758 * np.cos(2 * gamma) + 0.000907 * np.sin(2 * gamma)
            - 0.002697 * np.cos(3 * gamma) + 0.00148 * np.sin(3 * gamma))
    eqtime_min = 229.18 * (0.000075 + 0.001868 * np.cos(gamma) - 0.032077 * np.sin(gamma)
                           - 0.014615 * np.cos(2 * gamma) - 0.040849 * np.sin(2 * gamma))
    solar_time_h = (hour_of_day(times)[:, None] + eqtime_min[:, None] / 60.0
                    + np.asarray(lon, dtype=np.float64)[None, :] / 15.0)
    hour_angle = np.deg2rad(15.0 * (solar_time_h - 12.0))  # (time, lon)
    phi = np.deg2rad(np.asarray(lat, dtype=np.float64))
    cz = (np.sin(phi)[None, :, None] * np.sin(decl)[:, None, None]
          + np.cos(phi)[None, :, None] * np.cos(decl)[:, None, None] * np.cos(hour_angle)[:, None, :])
    return np.clip(cz, 0.0, None)


def toa_insolation(times: xr.DataArray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Instantaneous top-of-atmosphere insolation in W m-2, with Earth-Sun distance."""
    gamma = 2.0 * np.pi * year_fraction(times)
    distance_factor = (1.000110 + 0.034221 * np.cos(gamma) + 0.001280 * np.sin(gamma)
                       + 0.000719 * np.cos(2 * gamma) + 0.000077 * np.sin(2 * gamma))
    return SOLAR_CONSTANT * distance_factor[:, None, None] * cos_zenith(times, lat, lon)


def _uniform(values: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    return np.broadcast_to(values[:, None, None], (values.size, len(lat), len(lon)))


def forcing_field(name: str, times: xr.DataArray, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """The named forcing (one of ``pipeline.config.FORCINGS``) as float32 (time, lat, lon)."""
    if name == "cos_zenith":
        out = cos_zenith(times, lat, lon)
    elif name == "toa_insolation":
        out = toa_insolation(times, lat, lon)
    elif name in ("sin_time_of_day", "cos_time_of_day"):
        angle = 2.0 * np.pi * hour_of_day(times) / 24.0
        out = _uniform(np.sin(angle) if name.startswith("sin") else np.cos(angle), lat, lon)
    elif name in ("sin_year", "cos_year"):
        angle = 2.0 * np.pi * year_fraction(times)
        out = _uniform(np.sin(angle) if name.startswith("sin") else np.cos(angle), lat, lon)
    else:
        raise ValueError(f"unknown forcing '{name}'")
    return np.ascontiguousarray(out, dtype=np.float32)

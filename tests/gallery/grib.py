"""ERA5 as GRIB, the CDS's default format (and what MARS retrievals give), written with
ecCodes: the same fields as :func:`tests.gallery.products.era5_cds`, small.

Pressure levels are GRIB1 (the CDS default for ERA5 pressure levels), single levels
GRIB2 (``2t`` at 2 m above ground, read as ``t2m``; ``msl`` at mean sea level), the
invariant fields GRIB1 at one date; a 3-degree global grid stored north to south, as
ECMWF writes it. Values are :func:`tests.gallery.products.truth` at each message's
valid time, level and grid point (:func:`value`), so that tests can check a store
against it at known points. The config that reads them is
``configs/examples/era5_grib.yaml``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import eccodes
import numpy as np
import pandas as pd

from tests.gallery.products import truth

LAT = np.arange(90.0, -90.1, -3.0)  # north to south: 90 .. -90
LON = np.arange(0.0, 360.0, 3.0)  # 0 .. 357
LEVELS = (850, 500)  # hPa
START = pd.Timestamp("2000-01-01")  # the reference of truth()'s hours
BITS_PER_VALUE = 24  # simple packing; the CDS uses 16, too coarse to compare values closely
CF_NAMES = {"2t": "t2m"}  # cfgrib's variable name where it differs from the GRIB shortName


@dataclass(frozen=True)
class Field:
    """One GRIB message: a parameter (GRIB shortName) at a reference time, level (hPa;
    None for single levels) and forecast step (hours; 0 for analyses)."""

    short_name: str
    time: pd.Timestamp
    level: int | None = None
    step: int = 0


def value(short_name: str, time: pd.Timestamp, level: float, lat: np.ndarray | float,
          lon: np.ndarray | float) -> np.ndarray:
    """What a message holds: :func:`truth` of its parameter at a valid time and level
    (0 for single levels), broadcast over ``lat`` and ``lon``."""
    hours = (pd.Timestamp(time) - START) / pd.Timedelta(hours=1)
    return truth(CF_NAMES.get(short_name, short_name), hours, level, lat, lon)


def land_sea_mask(lat: np.ndarray) -> np.ndarray:
    """The invariant ``lsm``: land within 50 degrees of the equator (as ``era5_cds``)."""
    return (np.abs(lat) < 50).astype(np.float64)


def surface_geopotential(lat: np.ndarray) -> np.ndarray:
    """The invariant ``z`` at the surface (as ``era5_cds``)."""
    return 100.0 * np.cos(np.deg2rad(lat))


def packing_error(values: np.ndarray) -> float:
    """The largest error of simple packing at :data:`BITS_PER_VALUE` bits on messages
    with these values: their range over the number of steps the bits give."""
    return float(np.ptp(values)) / (2**BITS_PER_VALUE - 1)


def write_grib(path: Path, fields: Iterable[Field], edition: int = 1) -> Path:
    """Write the fields as GRIB messages of one edition, each holding :func:`value` at
    its valid time (reference time + step) on the :data:`LAT` x :data:`LON` grid."""
    grid = np.meshgrid(LAT, LON, indexing="ij")
    return _write_messages(path, ((f, value(f.short_name, f.time + pd.Timedelta(hours=f.step),
                                            f.level or 0, *grid)) for f in fields), edition)


def _write_messages(path: Path, messages: Iterable[tuple[Field, np.ndarray]],
                    edition: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        for field, values in messages:
            kind = "sfc" if field.level is None else "pl"
            handle = eccodes.codes_grib_new_from_samples(f"regular_ll_{kind}_grib{edition}")
            try:
                eccodes.codes_set_key_vals(handle, _grid_keys())
                eccodes.codes_set(handle, "shortName", field.short_name)
                if field.level is not None:
                    eccodes.codes_set(handle, "level", field.level)
                eccodes.codes_set(handle, "dataDate", int(field.time.strftime("%Y%m%d")))
                eccodes.codes_set(handle, "dataTime", int(field.time.strftime("%H%M")))
                eccodes.codes_set(handle, "step", field.step)
                eccodes.codes_set(handle, "bitsPerValue", BITS_PER_VALUE)
                eccodes.codes_set_values(handle, np.asarray(values, dtype=np.float64).ravel())
                eccodes.codes_write(handle, out)
            finally:
                eccodes.codes_release(handle)
    return path


def _grid_keys() -> dict[str, float | int]:
    """The regular lat-lon grid, first row north (ECMWF's scanning order)."""
    step = float(LON[1] - LON[0])
    return {"Ni": LON.size, "Nj": LAT.size, "iDirectionIncrementInDegrees": step,
            "jDirectionIncrementInDegrees": step, "jScansPositively": 0,
            "latitudeOfFirstGridPointInDegrees": float(LAT[0]),
            "latitudeOfLastGridPointInDegrees": float(LAT[-1]),
            "longitudeOfFirstGridPointInDegrees": float(LON[0]),
            "longitudeOfLastGridPointInDegrees": float(LON[-1])}


def write_era5_grib(directory: Path, days: int = 3) -> Path:
    """Six-hourly analyses from :data:`START`, one file per day and kind as the CDS
    delivers them, and the invariant fields; returns ``directory``, which then holds
    ``era5_pressure_levels_DATE.grib`` (GRIB1: ``t``, ``z`` on :data:`LEVELS`),
    ``era5_single_levels_DATE.grib`` (GRIB2: ``2t``, ``msl``) and ``era5_invariant.grib``
    (GRIB1: ``lsm``, surface ``z``)."""
    times = pd.date_range(START, periods=4 * days, freq="6h")
    for day in pd.date_range(START, periods=days, freq="D"):
        steps = [t for t in times if t.normalize() == day]
        label = day.strftime("%Y-%m-%d")
        write_grib(directory / f"era5_pressure_levels_{label}.grib", [
            Field(name, t, level) for t in steps for name in ("t", "z") for level in LEVELS])
        write_grib(directory / f"era5_single_levels_{label}.grib", [
            Field(name, t) for t in steps for name in ("2t", "msl")], edition=2)
    lat = np.broadcast_to(LAT[:, None], (LAT.size, LON.size))
    _write_messages(directory / "era5_invariant.grib", [
        (Field("lsm", START), land_sea_mask(lat)), (Field("z", START), surface_geopotential(lat))],
        edition=1)
    return directory

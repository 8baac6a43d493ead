"""The demo planet: its grid, its geography (orography, land and sea) and its sun.

Fixed by the spec's seed and calendar; :mod:`pipeline.demo.simulation` runs the weather
on it.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.demo.spec import DemoSpec

EARTH_RADIUS = 6.371e6            # m
OMEGA = 7.292e-5                  # rotation rate (1/s)
OBLIQUITY = math.radians(23.44)


class Grid:
    """Lat-lon grid (latitude descending 90..-90, longitude 0..360-dx) and metric factors."""

    def __init__(self, spec: DemoSpec) -> None:
        self.ny, self.nx = spec.n_lat, spec.n_lon
        self.lat = np.linspace(90.0, -90.0, self.ny)
        self.lon = np.arange(self.nx) * (360.0 / self.nx)
        self.dphi, self.dlam = math.pi / (self.ny - 1), 2 * math.pi / self.nx
        phi = np.deg2rad(self.lat)[:, None]
        self.sin = np.sin(phi)
        self.cos = np.cos(phi)
        self.cos[[0, -1]] = 0.0                       # exact poles
        self.lam = np.deg2rad(self.lon)[None, :]
        s0 = math.sin(math.radians(15.0))             # 1/f regularised inside ~15 degrees
        self.finv = self.sin / (2 * OMEGA * (self.sin**2 + s0**2))
        cos_t = math.cos(math.radians(70.0))          # winds tapered like cos(lat) poleward of 70
        self.taper = np.minimum(1.0, self.cos / cos_t)
        self.taper_over_cos = 1.0 / np.maximum(self.cos, cos_t)
        self.xyz = (self.cos * np.cos(self.lam), self.cos * np.sin(self.lam),
                    self.sin * np.ones_like(self.lam))


def _blobs(rng: np.random.Generator, grid: Grid, n: int, radius: tuple[float, float],
           weight: tuple[float, float]) -> np.ndarray:
    """Sum of Gaussian bumps at random points of the sphere (smooth, periodic, poles exact)."""
    centres = rng.normal(size=(n, 3))
    centres /= np.sqrt((centres**2).sum(axis=1, keepdims=True))
    radii = np.deg2rad(rng.uniform(*radius, n))
    weights = rng.uniform(*weight, n)
    x, y, z = grid.xyz
    out = np.zeros((grid.ny, grid.nx))
    for (cx, cy, cz), r, w in zip(centres, radii, weights, strict=True):
        dist = np.arccos(np.clip(x * cx + y * cy + z * cz, -1.0, 1.0))
        out += w * np.exp(-((dist / r) ** 2))
    return out


def geography(spec: DemoSpec, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(orography m, binary land-sea mask, smooth land fraction) from the seed."""
    rng = np.random.default_rng([spec.seed, 1])
    f = _blobs(rng, grid, 14, (15.0, 35.0), (0.5, 1.0)) - _blobs(rng, grid, 6, (15.0, 30.0),
                                                                  (0.3, 0.7))
    area = np.broadcast_to(np.maximum(grid.cos, 1e-3 / grid.nx), f.shape).ravel()
    order = np.argsort(f.ravel(), kind="stable")
    cum = np.cumsum(area[order]) / area.sum()
    threshold = f.ravel()[order][np.searchsorted(cum, 0.70)]     # ~30 % land by area
    width = 0.25 * f.std()
    lsm = (f > threshold).astype(np.float64)
    ramp = np.clip((f - threshold) / width, 0.0, 1.0)
    mountains = _blobs(rng, grid, 16, (6.0, 14.0), (800.0, 3500.0))
    orog = ramp * (150.0 + mountains)
    land = 1.0 / (1.0 + np.exp(-4.0 * (f - threshold) / width))
    return orog, lsm, land


def declination(hours: float, year_days: float) -> float:
    """Solar declination (rad) from the orbital phase of the calendar year."""
    phase = (hours / 24.0 / year_days) % 1.0
    return OBLIQUITY * math.sin(2 * math.pi * (phase - 80.0 / 365.0))


def daily_insolation(sin: np.ndarray, cos: np.ndarray, decl: float) -> np.ndarray:
    """Daily-mean top-of-atmosphere insolation / (S0/pi): 1 at the equator at equinox."""
    tan = sin / np.maximum(cos, 1e-12)
    h0 = np.arccos(np.clip(-tan * math.tan(decl), -1.0, 1.0))
    return h0 * sin * math.sin(decl) + cos * math.cos(decl) * np.sin(h0)


def radiative_t(grid: Grid, decl: float) -> np.ndarray:
    """Radiative-equilibrium surface temperature (K) per latitude, with polar albedo."""
    q = daily_insolation(grid.sin, grid.cos, decl) * (1.0 - 0.6 * grid.sin**4)
    return 232.0 + 70.0 * np.sqrt(np.maximum(q, 0.0))

"""The demo's climate simulation: a small, deterministic, learnable model on a lat-lon
grid, written out as ERA5-like monthly datasets (:func:`simulate`, :func:`static_fields`).

The model (vectorised numpy, float64 state, substeps of at most 6 h):
- temperature on the pressure levels and the surface temperature (``t2m``) are advected
  semi-Lagrangian by the level winds (periodic in longitude), lightly diffused and relaxed
  toward a radiative equilibrium that follows insolation (season and time of day; land
  reacts faster than sea, mountains are colder) and is coupled between surface and air;
- ``msl`` = climatological pressure belts + travelling Rossby-wave packets + a thermal low
  over warm ground; ``z`` is the hydrostatic integral of ``t`` up from (msl, t2m);
  ``u``, ``v`` are geostrophic from ``z`` (1/f regularised at the equator, winds tapered
  to zero at the poles), so the jet stream comes from the thermal wind.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import xarray as xr

from pipeline.demo.planet import (
    EARTH_RADIUS,
    OBLIQUITY,
    Grid,
    daily_insolation,
    declination,
    geography,
    radiative_t,
)
from pipeline.demo.spec import (
    TIME_UNITS,
    YEAR_DAYS,
    DemoSpec,
    month_times,
    time_values,
)

log = logging.getLogger(__name__)

_RD = 287.05            # gas constant of dry air (J/kg/K)
_LAPSE = 0.0065         # standard lapse rate (K/m)
_KAPPA = _RD * _LAPSE / 9.80665   # T ~ p**_KAPPA for the standard lapse rate
_SPINUP_DAYS = 30
_MAX_SUBSTEP_HOURS = 6.0
_WIND_SCALE = 300e3    # m: winds are geostrophic from z smoothed on this scale
_ATTRS = {
    "t2m": ("K", "air_temperature", "2 metre temperature"),
    "msl": ("Pa", "air_pressure_at_mean_sea_level", "Mean sea level pressure"),
    "t": ("K", "air_temperature", "Temperature"),
    "z": ("m2 s-2", "geopotential", "Geopotential"),
    "u": ("m s-1", "eastward_wind", "U component of wind"),
    "v": ("m s-1", "northward_wind", "V component of wind"),
    "orog": ("m", "surface_altitude", "Orography"),
    "lsm": ("1", "land_binary_mask", "Land-sea mask"),
}


def static_fields(spec: DemoSpec) -> xr.Dataset:
    """Orography ``orog`` (m) and land-sea mask ``lsm`` (0/1) on the spec's grid."""
    grid = Grid(spec)
    orog, lsm, _ = geography(spec, grid)
    data = {k: (("latitude", "longitude"), a.astype(np.float32), _var_attrs(k))
            for k, a in (("orog", orog), ("lsm", lsm))}
    return xr.Dataset(data, coords=_coords(grid), attrs=_global_attrs(spec))


# ----------------------------------------------------------------------------- the model
class _Waves:
    """Travelling Rossby-wave packets in msl: amplitudes, wavenumbers, speeds from the seed."""

    def __init__(self, spec: DemoSpec, n_per_hemisphere: int = 5) -> None:
        rng = np.random.default_rng([spec.seed, 2])
        n = 2 * n_per_hemisphere
        self.hemi = np.repeat([1.0, -1.0], n_per_hemisphere)
        self.m = rng.integers(3, 8, n).astype(np.float64)
        self.lat0 = np.deg2rad(rng.uniform(45.0, 60.0, n)) * self.hemi
        self.width = np.deg2rad(rng.uniform(10.0, 16.0, n))
        self.amp = rng.uniform(800.0, 2000.0, n)
        lam_rate = rng.uniform(4.0, 14.0, n) / (EARTH_RADIUS * np.cos(self.lat0))   # eastward, rad/s
        self.omega = self.m * lam_rate
        self.phase = rng.uniform(0.0, 2 * np.pi, n)
        self.env_omega = 2 * np.pi / (rng.uniform(5.0, 15.0, n) * 86400.0)
        self.env_phase = rng.uniform(0.0, 2 * np.pi, n)

    def msl(self, grid: Grid, seconds: float, decl: float) -> np.ndarray:
        """The wave part of msl (Pa): stronger in the winter hemisphere, poleward in summer."""
        winter = -self.hemi * decl / OBLIQUITY
        amp = self.amp * (1.0 + 0.3 * winter) * (1.0 + 0.35 * np.cos(
            self.env_omega * seconds + self.env_phase))
        centre = self.lat0 - self.hemi * np.deg2rad(5.0) * winter
        out = np.zeros((grid.ny, grid.nx))
        phi = np.deg2rad(grid.lat)
        for k in range(len(self.m)):
            shape = amp[k] * np.exp(-(((phi - centre[k]) / self.width[k]) ** 2))
            wave = np.cos(self.m[k] * grid.lam[0] - self.omega[k] * seconds + self.phase[k])
            out += (shape * grid.cos[:, 0])[:, None] * wave[None, :]
        return out


class _Model:
    """The state (``state[:-1]``: t on levels, ``state[-1]``: t2m), diagnostics and time step."""

    def __init__(self, spec: DemoSpec) -> None:
        self.spec, self.grid = spec, Grid(spec)
        self.orog, _, self.land = geography(spec, self.grid)
        self.waves = _Waves(spec)
        self.year_days = YEAR_DAYS.get(spec.calendar, 365.2425)
        self.p = np.array(spec.levels)[:, None, None] * 100.0          # Pa
        self.sigma = self.p / 1e5
        self.standard = 288.0 * self.sigma**_KAPPA                      # K, standard atmosphere
        decls = [OBLIQUITY * math.sin(2 * math.pi * k / 48) for k in range(48)]
        self.t_annual = np.mean([radiative_t(self.grid, d) for d in decls], axis=0)
        self.seasonal = self.land + 0.35 * (1.0 - self.land)            # sea damps the season
        self.diurnal = 1.0 + 11.0 * self.land                           # K, day-night swing
        self.n_sub = max(1, math.ceil(spec.step_hours / _MAX_SUBSTEP_HOURS))
        self.dt = spec.step_hours * 3600.0 / self.n_sub
        tau_air = (5.0 + 15.0 * np.clip(1.0 - self.sigma, 0.0, 1.0)) * 86400.0
        tau_sfc = 86400.0 / (self.land / 0.3 + (1.0 - self.land) / 6.0)
        self.keep_air = np.exp(-self.dt / tau_air)                      # exact relaxation
        self.keep_sfc = np.exp(-self.dt / tau_sfc)
        self._set_wind_constants()
        shape = (len(spec.levels) + 1, self.grid.ny, self.grid.nx)
        self.state = np.zeros(shape)
        self.dj, self.di = np.zeros(shape), np.zeros(shape)             # departure offsets
        # float buffers wj, wi, a, b and index buffers j0, i0 (_advect)
        self._floats = tuple(np.empty(shape) for _ in range(4))
        self._indices = tuple(np.empty(shape, np.intp) for _ in range(2))
        self.hours = math.nan

    @property
    def t(self) -> np.ndarray:
        return self.state[:-1]

    @property
    def t2m(self) -> np.ndarray:
        return self.state[-1]

    def _set_wind_constants(self) -> None:
        """Geostrophic factors, the large-scale zonal filter, index-space displacements."""
        g, dt = self.grid, self.dt
        self.cu = -g.finv * g.taper / (EARTH_RADIUS * 2 * g.dphi)          # u = cu * (z[j-1] - z[j+1])
        self.cv = g.finv * g.taper_over_cos / EARTH_RADIUS                 # v = cv * dz/dlambda
        self.cj = self.cv * dt / (EARTH_RADIUS * g.dphi)                   # rows moved, per dz/dlambda
        self.ci = g.finv * g.taper_over_cos * dt / (EARTH_RADIUS**2 * 2 * g.dphi * g.dlam)
        m = np.arange(g.nx // 2 + 1)[None, :]
        scale = m * _WIND_SCALE / (EARTH_RADIUS * np.maximum(g.cos, 1e-9))  # wavenumber * length scale
        self.zonal_filter = np.exp(-0.5 * scale**2)               # Gaussian, exact zero at poles
        self.zonal_deriv = 1j * m * self.zonal_filter
        if g.nx % 2 == 0:
            self.zonal_deriv[:, -1] = 0.0
        self.j_idx = np.arange(g.ny, dtype=np.float64)[:, None]
        self.i_idx = np.arange(g.nx, dtype=np.float64)[None, :]

    def _surface_target(self, decl: float, msl: np.ndarray) -> np.ndarray:
        """t2m relaxes toward insolation (season, time of day) mixed with the air above."""
        g = self.grid
        q = daily_insolation(g.sin, g.cos, decl)
        hour_angle = 2 * math.pi * (self.hours % 24.0) / 24.0 + g.lam - math.pi
        cosz = g.sin * math.sin(decl) + g.cos * math.cos(decl) * np.cos(hour_angle)
        rad = (self.t_annual + self.seasonal * (radiative_t(g, decl) - self.t_annual)
               + self.diurnal * (np.maximum(cosz, 0.0) - q / math.pi))
        air = self.t[0] * (msl / self.p[0]) ** _KAPPA
        return 0.65 * rad + 0.35 * air - _LAPSE * self.orog

    def _air_target(self, decl: float) -> np.ndarray:
        """Air relaxes to a standard lapse-rate profile plus the surface anomaly (fading
        with height, as observed contrasts do), floored by a stratosphere (smooth max)."""
        g = self.grid
        trop = (self.t2m + _LAPSE * self.orog - 288.0) * self.sigma
        trop += self.standard
        strat = 200.0 + 18.0 * g.sin**2 + 14.0 * g.sin * math.sin(decl) / OBLIQUITY
        out = trop - strat
        out *= out
        out += 16.0
        np.sqrt(out, out=out)
        out += trop
        out += strat
        out *= 0.5
        return out

    def diagnose(self) -> dict[str, np.ndarray]:
        """msl, z and the z gradients of the wind (and the departure offsets) at self.hours."""
        g, decl = self.grid, declination(self.hours, self.year_days)
        t_sl = self.t2m + _LAPSE * self.orog
        belts = np.abs(np.deg2rad(g.lat)[:, None] - 0.4 * decl)
        msl = (101100.0 + 900.0 * np.exp(-(((belts - 0.56) / 0.21) ** 2))
               - 1300.0 * np.exp(-(((belts - 1.08) / 0.17) ** 2))       # pressure belts
               - 40.0 * (t_sl - t_sl.mean(axis=1, keepdims=True))        # thermal lows
               + self.waves.msl(g, self.hours * 3600.0, decl))
        z = np.empty_like(self.t)
        below_p, below_t, below_z = msl, t_sl, 0.0                     # hydrostatic, upward
        for k in range(len(self.p)):
            z[k] = below_z + _RD * 0.5 * (below_t + self.t[k]) * np.log(below_p / self.p[k])
            below_p, below_t, below_z = self.p[k], self.t[k], z[k]
        spectrum = np.fft.rfft(z, axis=-1)                         # winds see only large scales
        smooth = np.fft.irfft(spectrum * self.zonal_filter, n=g.nx, axis=-1)
        dz_lam = np.fft.irfft(spectrum * self.zonal_deriv, n=g.nx, axis=-1)
        dz_phi = np.zeros_like(z)
        np.subtract(smooth[:, :-2], smooth[:, 2:], out=dz_phi[:, 1:-1])   # rows run N to S
        np.multiply(self.cj, dz_lam, out=self.dj[:-1])
        np.multiply(self.ci, dz_phi, out=self.di[:-1])
        np.multiply(self.dj[0], 0.8, out=self.dj[-1])              # t2m moves with the low wind
        np.multiply(self.di[0], 0.8, out=self.di[-1])
        return {"msl": msl, "z": z, "dz_phi": dz_phi, "dz_lam": dz_lam}

    def _advect(self, f: np.ndarray) -> np.ndarray:
        """Semi-Lagrangian bilinear advection of the state stack by the offsets ``dj``, ``di``
        (rows, columns; longitude wraps). Works in place on preallocated buffers, because
        fresh 3-D temporaries cost as much as the arithmetic."""
        ny, nx = self.grid.ny, self.grid.nx
        (wj, wi, a, b), (j0, i0) = self._floats, self._indices
        width = nx + 1                                    # one wrapped column: i0 + 1 is valid
        padded = np.concatenate([f, f[..., :1]], axis=-1).ravel()
        np.add(self.j_idx, self.dj, out=wj)
        np.clip(wj, 0.0, ny - 1.0, out=wj)
        np.minimum(wj, ny - 2, out=j0, casting="unsafe")  # truncation == floor here
        wj -= j0
        np.add(self.i_idx, self.di, out=wi)
        np.floor(wi, out=a)
        wi -= a
        i0[...] = a
        np.remainder(i0, nx, out=i0)                      # integer modulo (float % is slow)
        j0 *= width
        i0 += j0
        i0 += (np.arange(f.shape[0]) * (ny * width))[:, None, None]
        north = padded.take(i0)
        i0 += 1
        padded.take(i0, out=b)
        b -= north
        b *= wi
        north += b                                        # row j0 interpolated in longitude
        i0 += width
        padded.take(i0, out=b)
        i0 -= 1
        padded.take(i0, out=a)
        b -= a
        b *= wi
        b += a                                            # row j0 + 1
        b -= north
        b *= wj
        north += b
        return north

    @staticmethod
    def _diffuse(f: np.ndarray, k: float = 0.04) -> np.ndarray:
        """Light index-space diffusion (longitude periodic, poles untouched)."""
        lap = -4.0 * f
        lap[..., 1:] += f[..., :-1]
        lap[..., :-1] += f[..., 1:]
        lap[..., 0] += f[..., -1]
        lap[..., -1] += f[..., 0]
        lap[..., 1:-1, :] += f[..., :-2, :]
        lap[..., 1:-1, :] += f[..., 2:, :]
        lap[..., [0, -1], :] += 2.0 * f[..., [0, -1], :]             # no meridional flux at poles
        lap *= k
        lap += f
        return lap

    def _substep(self, msl: np.ndarray) -> None:
        """Advect and diffuse (offsets from the last diagnose), relax toward the new targets."""
        self.state = self._diffuse(self._advect(self.state))
        self.hours += self.dt / 3600.0
        decl = declination(self.hours, self.year_days)
        target = self._surface_target(decl, msl)
        self.state[-1] -= target
        self.state[-1] *= self.keep_sfc
        self.state[-1] += target
        target = self._air_target(decl)
        self.state[:-1] -= target
        self.state[:-1] *= self.keep_air
        self.state[:-1] += target

    def start(self, hours: float) -> None:
        """Initialise near equilibrium and spin up so that ``hours`` starts in a settled state."""
        self.hours = hours - _SPINUP_DAYS * 24.0
        decl = declination(self.hours, self.year_days)
        self.state[-1] = self.t_annual + self.seasonal * (radiative_t(self.grid, decl)
                                                          - self.t_annual)
        self.state[-1] -= _LAPSE * self.orog
        self.state[:-1] = self._air_target(decl)
        for _ in range(round(_SPINUP_DAYS * 24 * 3600 / self.dt)):
            self._substep(self.diagnose()["msl"])
        self.hours = hours                                  # exact, no float drift

    def step(self, diag: dict[str, np.ndarray] | None = None) -> None:
        """Advance by one output step (``diag``: from diagnose() of the current state)."""
        h = self.hours
        for _ in range(self.n_sub):
            self._substep((diag or self.diagnose())["msl"])
            diag = None
        self.hours = h + self.spec.step_hours


# ----------------------------------------------------------------------------- datasets
def _var_attrs(name: str) -> dict[str, str]:
    units, standard_name, long_name = _ATTRS[name]
    return {"units": units, "standard_name": standard_name, "long_name": long_name}


def _coords(grid: Grid) -> dict[str, tuple]:
    """ERA5-like coordinates: latitude descending, longitude ascending from 0."""
    return {
        "latitude": ("latitude", grid.lat, {"units": "degrees_north", "standard_name": "latitude",
                                            "long_name": "latitude", "axis": "Y"}),
        "longitude": ("longitude", grid.lon, {"units": "degrees_east",
                                              "standard_name": "longitude",
                                              "long_name": "longitude", "axis": "X"}),
    }


def _global_attrs(spec: DemoSpec) -> dict:
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}
    return {"title": "Synthetic ERA5-like demo data", "source": "pipeline synthetic demo",
            "Conventions": "CF-1.8", **fields}


def _month_dataset(model: _Model, hours: np.ndarray) -> xr.Dataset:
    """Run the model through ``hours`` (the first is the current time) into a Dataset."""
    spec, grid = model.spec, model.grid
    n, shape2, shape3 = len(hours), (grid.ny, grid.nx), (len(spec.levels), grid.ny, grid.nx)
    out = {k: np.empty((n, *shape2), np.float32) for k in ("t2m", "msl")}
    out.update({k: np.empty((n, *shape3), np.float32) for k in ("t", "z", "u", "v")})
    for i, h in enumerate(hours):
        if model.hours != h:
            raise RuntimeError(f"model at {model.hours} h, expected {h} h")
        diag = model.diagnose()
        out["t2m"][i], out["t"][i], out["msl"][i], out["z"][i] = (
            model.t2m, model.t, diag["msl"], diag["z"])
        np.multiply(model.cu, diag["dz_phi"], out=out["u"][i], casting="same_kind")
        np.multiply(model.cv, diag["dz_lam"], out=out["v"][i], casting="same_kind")
        model.step(diag)
    dims2, dims3 = ("time", "latitude", "longitude"), ("time", "level", "latitude", "longitude")
    data = {k: (dims3 if a.ndim == 4 else dims2, a, _var_attrs(k)) for k, a in out.items()}
    coords = _coords(grid)
    coords["level"] = ("level", np.array(spec.levels), {
        "units": "hPa", "positive": "down", "standard_name": "air_pressure",
        "long_name": "pressure level", "axis": "Z"})
    coords["time"] = ("time", time_values(hours, spec.calendar),
                      {"standard_name": "time", "long_name": "time", "axis": "T"})
    ds = xr.Dataset(data, coords=coords, attrs=_global_attrs(spec))
    ds["time"].encoding.update({"units": TIME_UNITS, "calendar": spec.calendar,
                                "dtype": "int64"})
    return ds


def simulate(spec: DemoSpec) -> Iterator[xr.Dataset]:
    """Yield one xarray Dataset per calendar month, in time order."""
    months = month_times(spec)
    model = _Model(spec)
    model.start(float(months[0][2][0]))
    for year, month, hours in months:
        if len(hours):                      # a step longer than a month can skip one
            log.debug("simulating %04d-%02d (%d steps)", year, month, len(hours))
            yield _month_dataset(model, hours)

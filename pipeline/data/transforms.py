"""Pure transforms from source variables to the stored channels.

The order is fixed: select variables and levels -> NaN policy -> derived channels ->
area-weighted coarsening -> analytic forcings. Every function takes and returns
in-memory xarray objects for one time window, so that a shard is built from its own
window alone (parts stay independent and order-free).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from pipeline.config import Data, level_channel
from pipeline.data.axes import LEVEL
from pipeline.data.forcings import forcing_field
from pipeline.data.grid import coarsen_area_weighted
from pipeline.data.sources import SourceScan
from pipeline.data.timeaxis import time_label
from pipeline.errors import SourceError

ROLES = ("prognostic", "derived", "mask", "forcing")


@dataclass(frozen=True)
class ChannelPlan:
    """The stored channels in order, with their roles and where each variable comes from."""

    prognostic: tuple[str, ...]
    derived: tuple[str, ...]
    masks: tuple[str, ...]
    forcings: tuple[str, ...]
    static: tuple[str, ...]
    # (variable, position of its source in the scans): by position, not by path, as
    # one file read twice with two GRIB filters is two sources of one path
    variable_source: tuple[tuple[str, int], ...]

    @property
    def names(self) -> list[str]:
        return [*self.prognostic, *self.derived, *self.masks, *self.forcings]

    @property
    def roles(self) -> list[str]:
        return ([ROLES[0]] * len(self.prognostic) + [ROLES[1]] * len(self.derived)
                + [ROLES[2]] * len(self.masks) + [ROLES[3]] * len(self.forcings))

    def wanted_by_source(self) -> dict[int, set[str]]:
        """The variables read from each source, by its position in the scans."""
        wanted: dict[int, set[str]] = {}
        for var, source in self.variable_source:
            wanted.setdefault(source, set()).add(var)
        return wanted


def mask_name(channel: str) -> str:
    return f"{channel}_mask"


def plan_channels(cfg: Data, scans: list[SourceScan]) -> ChannelPlan:
    """Check that every configured variable, level and static field exists; order channels."""
    dynamic = [s for s in scans if not s.source.static]
    var_source: list[tuple[str, int]] = []
    position = {id(scan): i for i, scan in enumerate(scans)}
    invariant = sorted({v for s in scans for v in s.time_invariant()})
    for var in cfg.variable_specs():
        scan = next((s for s in dynamic if var.name in s.variables
                     and var.name not in s.time_invariant()), None)
        if scan is None:
            if var.name in invariant:
                raise SourceError(f"variable '{var.name}' has no time dimension",
                                  "list it under data.static, not data.variables")
            available = sorted({v for s in dynamic for v in s.variables} - set(invariant))
            raise SourceError(f"variable '{var.name}' is in no source",
                              f"available variables: {', '.join(available)}; "
                              "fix data.variables or a source's 'rename'")
        dims = scan.variables[var.name]
        if var.levels is not None:
            if LEVEL not in dims:
                raise SourceError(f"variable '{var.name}' has no vertical dimension "
                                  f"(dims {list(dims)})", "remove 'levels', or name it with "
                                  "data.level_dim")
            _check_levels(var.name, var.levels, scan.levels[var.name],
                          scan.attributes[var.name].get("level_units"))
        elif LEVEL in dims:
            raise SourceError(f"variable '{var.name}' has levels; choose some",
                              f"write {{name: {var.name}, levels: [...]}} in data.variables")
        var_source.append((var.name, position[id(scan)]))
    for name in cfg.static:
        if name not in invariant:
            hint = (f"'{name}' has a time dimension: list it under data.variables"
                    if any(name in s.variables for s in scans)
                    else f"time-invariant fields: {', '.join(invariant) or 'none'}")
            raise SourceError(f"static field '{name}' is in no source without a time "
                              "dimension", hint)
    prognostic = tuple(cfg.prognostic_channels())
    masks: tuple[str, ...] = ()
    if cfg.nan.policy == "fill":
        masks = tuple(mask_name(c) for c in (cfg.nan.channels or prognostic))
    return ChannelPlan(prognostic=prognostic, derived=tuple(d.name for d in cfg.derived),
                       masks=masks, forcings=tuple(cfg.forcings), static=tuple(cfg.static),
                       variable_source=tuple(var_source))


def _check_levels(name: str, wanted: list[float], have: np.ndarray, units: str | None) -> None:
    """Every wanted level (hPa) on the source's axis, which :mod:`pipeline.data.axes`
    converted to hPa where its units are a pressure unit. An axis without units whose
    values could be Pa or hPa, and on which the wanted levels exist in both readings
    (1000 hPa as 100000 Pa, and a 1000 that would be 10 hPa in Pa), is refused."""
    shown = ", ".join(f"{x:g}" for x in have)
    for lev in wanted:
        if not np.any(np.isclose(have, lev)):
            raise SourceError(f"variable '{name}' has no level {lev:g}"
                              f"{' ' + units if units else ''}",
                              f"available levels: {shown}{' ' + units if units else ''}"
                              + ("" if units else "; the level axis has no units: if they are "
                                 "Pa, set data.sources[].level_units: Pa"))
    if units is None and np.nanmax(have) > 1100:  # above any surface pressure in hPa
        as_pa = [lev for lev in wanted if np.any(np.isclose(have, lev * 100))]
        if as_pa:
            raise SourceError(
                f"variable '{name}': levels {', '.join(f'{x:g}' for x in wanted)} are ambiguous: "
                f"its level axis has no units and holds both {', '.join(f'{x:g}' for x in wanted)} "
                f"(as {', '.join(f'{x / 100:g}' for x in wanted)} hPa if in Pa) and "
                f"{', '.join(f'{x * 100:g}' for x in as_pa)} (as {', '.join(f'{x:g}' for x in as_pa)}"
                " hPa)", "set data.sources[].level_units: Pa (or hPa)")


FORCING_ATTRS = {
    "cos_zenith": ("1", "cosine of the solar zenith angle"),
    "toa_insolation": ("W m-2", "top-of-atmosphere incoming solar radiation"),
    "sin_time_of_day": ("1", "sine of the UTC time of day"),
    "cos_time_of_day": ("1", "cosine of the UTC time of day"),
    "sin_year": ("1", "sine of the fraction of the year"),
    "cos_year": ("1", "cosine of the fraction of the year"),
}


def channel_attributes(cfg: Data, plan: ChannelPlan,
                       scans: list[SourceScan]) -> dict[str, dict[str, str]]:
    """CF attributes (units, long_name, standard_name) of every stored channel, from the
    sources' variables where they have them: what forecasts and reports label values with."""
    found = {name: attrs for s in scans if not s.source.static
             for name, attrs in s.attributes.items()}
    out: dict[str, dict[str, str]] = {}
    for var in cfg.variable_specs():
        attrs = dict(found.get(var.name, {}))
        level_units = attrs.pop("level_units", "")
        for lev in var.levels or (None,):
            channel = var.name if lev is None else level_channel(var.name, lev)
            item = dict(attrs)
            if lev is not None:
                item["long_name"] = (f"{attrs.get('long_name', var.name)} at {lev:g}"
                                     f"{' ' + level_units if level_units else ''}")
            out[channel] = item
    for d in cfg.derived:
        first = out.get(d.inputs[0], {})
        item = {"long_name": f"{d.function.replace('_', ' ')} of {', '.join(d.inputs)}"}
        if "units" in first:
            item["units"] = first["units"]
        out[d.name] = item
    for m in plan.masks:
        out[m] = {"units": "1", "long_name": f"1 where {m.removesuffix('_mask')} was missing"}
    for f in plan.forcings:
        units, long_name = FORCING_ATTRS.get(f, ("1", f))
        out[f] = {"units": units, "long_name": long_name}
    return out


def select_channels(ds: xr.Dataset, cfg: Data) -> dict[str, xr.DataArray]:
    """One (time, lat, lon) float array per prognostic channel (levels split out)."""
    out: dict[str, xr.DataArray] = {}
    for var in cfg.variable_specs():
        da = ds[var.name]
        if var.levels is None:
            out[var.name] = _time_lat_lon(da)
            continue
        have = ds[LEVEL].values
        for lev in var.levels:
            index = int(np.flatnonzero(np.isclose(have, lev))[0])  # presence checked in the plan
            out[level_channel(var.name, lev)] = _time_lat_lon(da.isel({LEVEL: index}, drop=True))
    return out


def _time_lat_lon(da: xr.DataArray) -> xr.DataArray:
    """``da`` with dims (time, lat, lon); transposing only when needed saves xarray's
    overhead on every channel of every shard (half of the channel selection's time)."""
    return da if da.dims == ("time", "lat", "lon") else da.transpose("time", "lat", "lon")


def _all_finite(values: np.ndarray) -> bool:
    """Whether no value is NaN or infinite, without a mask as large as the data: a NaN
    or an infinity anywhere makes the sum NaN or infinite. A sum that overflows while
    every value is finite reads as "not finite"; callers then look value by value."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(values.sum()))


def apply_nan_policy(channels: dict[str, xr.DataArray], cfg: Data) -> dict[str, xr.DataArray]:
    """Reject non-finite values (naming channel and time) or fill them and add masks."""
    fill = set(cfg.nan.channels or channels) if cfg.nan.policy == "fill" else set()
    out = dict(channels)
    masks: dict[str, xr.DataArray] = {}
    for name, da in channels.items():
        if name in fill:
            bad = ~np.isfinite(da.values)
            masks[mask_name(name)] = da.copy(data=bad.astype(np.float32))
            out[name] = da.copy(data=np.where(bad, np.float32(cfg.nan.fill_value), da.values))
        elif not _all_finite(da.values) and (bad := ~np.isfinite(da.values)).any():
            t = int(np.argmax(bad.reshape(bad.shape[0], -1).any(axis=1)))
            raise SourceError(
                f"NaN in variable '{name}' at {time_label(da['time'].values[t])} "
                f"({int(bad[t].sum())} points)",
                "fix the source, or set data.nan.policy: fill to fill them and store a mask")
    return {**out, **masks}


def add_derived(channels: dict[str, xr.DataArray], cfg: Data) -> dict[str, xr.DataArray]:
    """Append the configured derived channels, computed from the stored ones."""
    out = dict(channels)
    for d in cfg.derived:
        inputs = [out[name] for name in d.inputs]
        if d.function == "wind_speed":
            if len(inputs) != 2:
                raise SourceError(f"derived '{d.name}': wind_speed takes 2 inputs (u, v)",
                                  "fix data.derived[].inputs")
            # numpy's stubs do not know __array_ufunc__: of DataArrays, a DataArray
            out[d.name] = np.hypot(inputs[0], inputs[1])  # type: ignore[assignment]
        elif d.function == "difference":
            if len(inputs) != 2:
                raise SourceError(f"derived '{d.name}': difference takes 2 inputs",
                                  "fix data.derived[].inputs")
            out[d.name] = inputs[0] - inputs[1]
        else:  # sum
            out[d.name] = sum(inputs[1:], inputs[0])
    return out


def transform_window(ds: xr.Dataset, cfg: Data,
                     plan: ChannelPlan) -> tuple[xr.DataArray, np.ndarray | None]:
    """Source window -> stored channels ``(time, channel, lat, lon)`` float32.

    Also returns validity weights of the same shape where masks exist (1 where every
    input cell was present, the valid fraction after coarsening; None when all values
    are valid), so statistics skip filled values. The output is filled channel by
    channel so that peak memory stays near twice the window's size.
    """
    channels = add_derived(apply_nan_policy(select_channels(ds, cfg), cfg), cfg)
    direct = [*plan.prognostic, *plan.derived, *plan.masks]
    first = coarsen_area_weighted(channels[direct[0]].to_dataset(name="x"), cfg.coarsen)["x"]
    times, lat, lon = first["time"], first["lat"].values, first["lon"].values
    data = np.empty((times.size, len(plan.names), lat.size, lon.size), dtype=np.float32)
    for i, name in enumerate(direct):
        da = channels.pop(name)
        if cfg.coarsen > 1:
            da = coarsen_area_weighted(da.astype(np.float64).to_dataset(name="x"), cfg.coarsen)["x"]
        data[:, i] = da.values
    for j, name in enumerate(plan.forcings):
        data[:, len(direct) + j] = forcing_field(name, times, lat, lon)
    out = xr.DataArray(data, dims=("time", "channel", "lat", "lon"),
                       coords={"time": times, "channel": plan.names, "lat": lat, "lon": lon})
    return out, _validity(data, cfg, plan)


def _validity(data: np.ndarray, cfg: Data, plan: ChannelPlan) -> np.ndarray | None:
    """Weights in [0, 1] of each stored value for statistics; None if all are valid."""
    if not plan.masks:
        return None
    valid = np.ones_like(data)
    index = {name: i for i, name in enumerate(plan.names)}
    for channel in plan.prognostic:
        if mask_name(channel) in index:
            valid[:, index[channel]] = 1.0 - data[:, index[mask_name(channel)]]
    for d in cfg.derived:  # a derived value is only as valid as its least valid input
        valid[:, index[d.name]] = np.min([valid[:, index[n]] for n in d.inputs], axis=0)
    return valid


def transform_static(ds: xr.Dataset, cfg: Data, plan: ChannelPlan) -> xr.DataArray:
    """Static fields -> ``(static_channel, lat, lon)`` float32, NaNs filled or rejected.

    Needs at least one static field (the caller makes the empty array for none)."""
    fields = []
    for name in plan.static:
        da = ds[name].transpose("lat", "lon").astype(np.float64)
        bad = ~np.isfinite(da.values)
        if bad.any():
            if cfg.nan.policy != "fill":
                raise SourceError(f"NaN in static field '{name}' ({int(bad.sum())} points)",
                                  "fix the source, or set data.nan.policy: fill")
            da = da.copy(data=np.where(bad, cfg.nan.fill_value, da.values))
        fields.append(da.expand_dims(static_channel=[name]))
    stacked = xr.concat(fields, dim="static_channel")
    stacked = coarsen_area_weighted(stacked.to_dataset(name="x"), cfg.coarsen)["x"]
    return stacked.astype(np.float32)

"""The ``data`` section: sources, variables and levels, time range, splits, transforms,
NaN policy and the store's layout (what ``pipeline preprocess`` builds).
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from pipeline.config.base import Section, TimeRange, TimeText

Forcing = Literal["cos_zenith", "toa_insolation", "sin_time_of_day", "cos_time_of_day",
                  "sin_year", "cos_year"]
FORCINGS: tuple[str, ...] = get_args(Forcing)
DerivedFunction = Literal["wind_speed", "difference", "sum"]


class TimeCoding(Section):
    """How to decode a source's time axis when its files carry no CF time units.

    Example: the storm files have ``timestep`` (integer hours) plus a separate
    reference time; ``dim: timestep, units: "hours since 1996-01-05 00:00"``.
    """

    dim: str = Field("time", description="Name of the time dimension in the files.")
    units: str = Field(description="CF units for the integer steps, e.g. 'hours since 2000-01-01'.")
    calendar: str = Field("standard", description="CF calendar of the reference time.")


class Source(Section):
    """One input: NetCDF/HDF5 or GRIB files by glob, or a Zarr store. Its variables are
    merged with those of the other sources on the same grid and time axis."""

    path: str = Field(description="Glob of NetCDF/HDF5 or GRIB files, or the path of a Zarr store.")
    engine: Literal["netcdf4", "h5netcdf", "zarr", "cfgrib"] | None = Field(
        None, description="xarray engine; inferred from the file suffix when omitted "
        "(.grib, .grib1, .grib2, .grb, .grb2: cfgrib).")
    filter_by_keys: dict[str, str | int | float | list[str | int | float]] = Field(
        default_factory=dict, description="GRIB only: the messages to read, by GRIB key, e.g. "
        "{shortName: t, typeOfLevel: isobaricInhPa} (cfgrib reads one kind of message at a "
        "time; a file that mixes levels or parameters needs one source per kind).")
    rename: dict[str, str] = Field(default_factory=dict,
                                   description="Rename variables or dimensions: {old: new}.")
    static: bool = Field(False, description="Time-invariant fields (orography, land-sea mask).")
    time: TimeCoding | None = Field(None, description="Decode integer time steps (see TimeCoding).")
    axes: dict[Literal["time", "lat", "lon", "level"], str] = Field(
        default_factory=dict, description="The variable holding each axis where CF attributes "
        "and common names do not find it, e.g. {time: valid_time, lat: latitude}; a 1-D "
        "variable of a plain HDF5 file becomes the coordinate of its dimension.")
    select: dict[str, str | int | float] = Field(
        default_factory=dict, description="One value of each extra dimension or coordinate, "
        "e.g. {number: 0} (an ensemble member) or {expver: '0001'}.")
    level_units: str | None = Field(
        None, description="Units of the level axis where the files do not say (Pa, hPa); "
        "pressure levels are converted to hPa, the unit of data.variables[].levels.")


class Variable(Section):
    """A variable to store; with ``levels`` each level is one channel (``t`` at 850 -> ``t850``)."""

    name: str
    levels: list[float] | None = None


class Derived(Section):
    """A channel computed from stored channels with a named function."""

    name: str
    function: DerivedFunction
    inputs: list[str] = Field(min_length=1)


class NanPolicy(Section):
    """What to do with NaNs in the inputs."""

    policy: Literal["reject", "fill"] = Field(
        "reject", description="reject: error naming variable and time; fill: fill and store a mask.")
    fill_value: float = Field(0.0, description="Value written where the input is NaN (fill).")
    channels: list[str] | None = Field(
        None, description="Channels that may hold NaNs under 'fill' (default: all); each gets "
                          "a '<channel>_mask' channel (1 where the input was missing).")


class Codec(Section):
    """Compression of the stored data. The default, Blosc LZ4 with byte shuffle, is
    chosen for read speed: the training loader decompresses every sample it reads."""

    name: Literal["blosc", "zstd", "none"] = "blosc"
    cname: Literal["lz4", "lz4hc", "zstd", "zlib"] = Field("lz4", description="Blosc's inner codec.")
    level: int = Field(5, ge=0, le=22, description="Compression level (Blosc: 0-9).")
    shuffle: bool = Field(True, description="Blosc byte shuffle (better ratio for floats).")


class Splits(Section):
    """Inclusive ``[start, end]`` time ranges (ISO strings)."""

    train: TimeRange
    val: TimeRange
    test: TimeRange


class Statistics(Section):
    """Normalisation statistics (over the train split, area weighted)."""

    recompute_on_append: bool = Field(
        False, description="Recompute statistics when appending (default: keep them frozen).")


class Data(Section):
    """Sources, selection, transforms and the store layout."""

    sources: list[Source] = Field(min_length=1)
    variables: list[Variable | str] = Field(min_length=1)
    static: list[str] = Field(default_factory=list, description="Static fields to store.")
    level_dim: str = Field("level", description="Name of the vertical dimension in the "
                           "sources where CF attributes do not mark it (positive, axis: Z).")
    start: TimeText | None = Field(None, description="First time to store (default: first in sources).")
    end: TimeText | None = Field(None, description="Last time to store (default: last in sources).")
    frequency: str = Field("6h", description="Time step as a pandas offset: 6h, 1D, MS (monthly).")
    splits: Splits
    coarsen: int = Field(1, ge=1, description="Integer coarsening factor in lat and lon (area weighted).")
    derived: list[Derived] = Field(default_factory=list)
    forcings: list[Forcing] = Field(default_factory=list)
    nan: NanPolicy = Field(default_factory=NanPolicy)
    store: str = Field(description="Path of the Zarr v3 training store.")
    shard_size: int = Field(32, ge=1, le=100_000,
                            description="Time steps per shard (the unit of writing).")
    codec: Codec = Field(default_factory=Codec)
    statistics: Statistics = Field(default_factory=Statistics)

    def variable_specs(self) -> list[Variable]:
        """The variables as :class:`Variable` objects (strings are normalised on load)."""
        return [v if isinstance(v, Variable) else Variable(name=v) for v in self.variables]

    def prognostic_channels(self) -> list[str]:
        """Channel names of the selected variables, in config order (levels expanded)."""
        names: list[str] = []
        for var in self.variable_specs():
            if var.levels is None:
                names.append(var.name)
            else:
                names.extend(level_channel(var.name, lev) for lev in var.levels)
        return names

    @model_validator(mode="after")
    def _check_channels(self) -> Data:
        base = self.prognostic_channels()
        seen = set(base)
        if len(seen) != len(base):
            raise ValueError(f"data.variables gives duplicate channels: {base}")
        for d in self.derived:
            missing = [i for i in d.inputs if i not in seen]
            if missing:
                raise ValueError(f"data.derived '{d.name}' uses unknown channels {missing}; "
                                 f"known: {sorted(seen)}")
            if d.name in seen:
                raise ValueError(f"data.derived name '{d.name}' repeats a channel name")
            seen.add(d.name)
        if self.nan.channels is not None:
            unknown = sorted(set(self.nan.channels) - seen)
            if unknown:
                raise ValueError(f"data.nan.channels names unknown channels {unknown}")
        return self


def level_channel(name: str, level: float) -> str:
    """Channel name of a variable on a level: ``t`` at 850.0 -> ``t850``."""
    return f"{name}{int(level) if float(level).is_integer() else level}"

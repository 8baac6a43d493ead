"""GRIB sources through cfgrib: how their files are opened, and what is refused.

ERA5 from the CDS and MARS output come as GRIB, one message per field, time and level.
cfgrib turns messages that form one hypercube (parameters on one type of level, at the
same levels and times) into xarray variables; ``filter_by_keys`` picks them where a
file mixes several. cfgrib's ``errors: raise`` makes a truncated file or a message that
does not fit an error, where by default cfgrib would skip it and log a traceback.

Index files are disabled (``indexpath: ""``): cfgrib would write a ``.idx`` beside each
GRIB file, which fails on read-only data directories and races between processes that
open the same file. Without one, opening scans the file's messages: about 1.5 ms per
message (a 0.25-degree field, from the page cache), some 5 s for a month of ERA5 on 13
levels, once per process and file (``windows._open_for_reading`` keeps files open).

Analyses (and one chosen forecast step) are read with their valid time as the time
axis; files with several forecast steps are refused with the filter that selects one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from pipeline.config import Source
from pipeline.errors import SourceError

GRIB_SUFFIXES = (".grib", ".grib1", ".grib2", ".grb", ".grb2")


def backend_kwargs(source: Source) -> dict[str, Any]:
    """cfgrib's options for a source: its message filter, and no index files."""
    return {"filter_by_keys": dict(source.filter_by_keys), "indexpath": "", "errors": "raise"}


def is_build_error(err: Exception) -> bool:
    """Whether cfgrib failed because the messages do not form one dataset."""
    from cfgrib.dataset import DatasetBuildError

    return isinstance(err, DatasetBuildError)


def mixed_messages(path: str, err: Exception) -> SourceError:
    """The error for a file whose messages cfgrib cannot read as one dataset, with the
    filters cfgrib suggests where it has some."""
    fix = ("read each kind as its own source with data.sources[].filter_by_keys, e.g. "
           "{shortName: z, typeOfLevel: isobaricInhPa}")
    if len(err.args) == 3 and isinstance(err.args[2], list):  # several values of one key
        key, filters = err.args[1], err.args[2]
        choices = " or ".join("{" + ", ".join(f"{k}: {v}" for k, v in f.items()) + "}"
                              for f in filters)
        return SourceError(f"{path} mixes GRIB messages with several values of {key}",
                           f"read each as its own source with data.sources[].filter_by_keys: "
                           f"{choices}")
    reason = " ".join(str(err).split())[:120]
    return SourceError(f"cannot read {path} as one GRIB dataset: its parameters are on "
                       f"different levels or times (cfgrib: {reason})", fix)


def conform(ds: xr.Dataset, source: Source, path: str) -> xr.Dataset:
    """A cfgrib dataset with its valid time as ``time``; raises where no message matched
    the filter or where the file holds several forecast steps."""
    if not ds.data_vars:
        raise _no_messages(source, path)
    if "step" in ds.dims:
        hours = ds["step"].values / np.timedelta64(1, "h")
        steps = ", ".join(f"{h:g}" for h in hours[:8]) + (", ..." if hours.size > 8 else "")
        raise SourceError(f"{path} holds forecasts with {hours.size} steps ({steps} hours): "
                          "only analyses or one forecast step per source are supported",
                          "select one step with data.sources[].filter_by_keys, e.g. "
                          f"{{step: {hours[-1]:g}}} (its valid time becomes the time axis)")
    if "valid_time" not in ds.coords:
        return ds
    valid = ds["valid_time"].variable  # reference time + step: the time the field is for
    ds = ds.drop_vars([n for n in ("time", "step", "valid_time") if n in ds.coords])
    return ds.assign_coords(time=valid)


def _no_messages(source: Source, path: str) -> SourceError:
    """The error for a file of which cfgrib read nothing, naming what the file has."""
    if not source.filter_by_keys:
        return SourceError(f"no GRIB fields in {path}",
                           "the file is empty, truncated or not GRIB; re-download it")
    keys = dict.fromkeys(["shortName", "typeOfLevel", *source.filter_by_keys])
    found = ", ".join(f"{key}: {'/'.join(map(str, values)) or '-'}"
                      for key, values in _key_values(path, list(keys)).items())
    wanted = ", ".join(f"{k}: {v}" for k, v in source.filter_by_keys.items())
    return SourceError(f"no GRIB messages in {path} match filter_by_keys {{{wanted}}}",
                       f"the file has {found}")


def _key_values(path: str, keys: list[str]) -> dict[str, list[Any]]:
    """The distinct values of some GRIB keys over the messages of a file (in order)."""
    import eccodes

    values: dict[str, dict[Any, None]] = {key: {} for key in keys}
    with open(path, "rb") as f:
        while (handle := eccodes.codes_grib_new_from_file(f)) is not None:
            try:
                for key in keys:
                    if eccodes.codes_is_defined(handle, key):
                        values[key].setdefault(eccodes.codes_get(handle, key))
            finally:
                eccodes.codes_release(handle)
    return {key: list(seen) for key, seen in values.items()}

"""Reading values from the scanned sources: the time window a shard needs, and the
static fields.

:mod:`pipeline.data.sources` finds and checks the files; this module reads them. A
window opens only the files that hold its steps and reads only those steps; each
worker keeps the last few files open, as windows move forward through them.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import xarray as xr

from pipeline.config import Source
from pipeline.data.axes import TIME
from pipeline.data.sources import SourceScan, open_file
from pipeline.errors import SourceError


@functools.lru_cache(maxsize=4)
def _open_for_reading(path: str, size: int, mtime: float, source_json: str,
                      level_dim: str) -> xr.Dataset:
    """``open_file``, kept open for the next windows of the same file: opening decodes
    the file's metadata and coordinates (9 ms for a month of the benchmark's data, a
    fifth of reading a shard's window). Keyed by size and modification time, so a file
    rewritten since is opened again; a handful are kept, as windows move forward."""
    return open_file(path, Source.model_validate_json(source_json), level_dim)


def load_window(scans: list[SourceScan], times: pd.Index, names: dict[int, set[str]]) -> xr.Dataset:
    """Load the given time steps of the named variables from the dynamic sources.

    ``names`` maps a source's position in ``scans`` to the variables wanted from it.
    Only the files that hold the requested times are opened, and only those steps are
    read.
    """
    parts: list[xr.Dataset] = []
    for position, scan in enumerate(scans):
        wanted = names.get(position)
        if scan.source.static or not wanted:
            continue
        pieces = []
        for entry in scan.files:
            positions = np.flatnonzero(np.asarray(entry.times.isin(times)))
            if positions.size == 0:
                continue
            ds = _open_for_reading(entry.path, entry.size, entry.mtime,
                                   scan.source.model_dump_json(), scan.level_dim)
            try:  # the steps get the store's labels (a period's start for monthly means)
                pieces.append(ds[sorted(wanted)].isel(time=positions).load()
                              .assign_coords(time=entry.times[positions]))
            except Exception as err:  # noqa: BLE001 - a read error deep in a file
                raise SourceError(f"cannot read {entry.path}: {' '.join(str(err).split())[:200]}",
                                  "the file is corrupt or truncated; re-download or remove it"
                                  ) from None
        parts.append(xr.concat(pieces, dim="time", data_vars="all", coords="minimal",
                               compat="override", join="override") if len(pieces) > 1 else pieces[0])
    merged = xr.merge(parts, join="override", compat="override")
    if merged.sizes.get("time") != len(times):
        raise SourceError(f"sources changed while building: found {merged.sizes.get('time')} of "
                          f"{len(times)} steps from {times[0]}", "rerun the build")
    return merged


def load_static(scans: list[SourceScan], wanted: list[str]) -> xr.Dataset:
    """Load the named static fields, each from the first source that has it without a
    time dimension (a static source, or a store such as WeatherBench 2's that holds
    time steps and time-invariant fields side by side)."""
    found: dict[str, xr.DataArray] = {}
    for scan in scans:
        names = [n for n in wanted if n in scan.time_invariant() and n not in found]
        if not names:
            continue
        for entry in scan.files:
            ds = open_file(entry.path, scan.source, scan.level_dim)
            for name in [n for n in names if n in ds.data_vars and n not in found]:
                var = ds[name]
                if TIME in var.dims:
                    var = var.isel(time=0, drop=True)
                found[name] = var.drop_vars([c for c in var.coords
                                             if c not in ("lat", "lon")]).load()
            ds.close()
            if all(n in found for n in names):
                break
    return xr.Dataset(found)

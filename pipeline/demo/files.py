"""The demo's raw files: one NetCDF file per month and one of static fields, written
whole (never half a file), and never over files a user made (:func:`ensure_demo_data`)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path

import cftime
import numpy as np
import xarray as xr

from pipeline.demo.simulation import simulate, static_fields
from pipeline.demo.spec import TIME_UNITS, DemoSpec, demo_spec
from pipeline.errors import PipelineError
from pipeline.files import atomic_write

log = logging.getLogger(__name__)

MARKER = ".demo-spec.json"  # the spec and file names that ensure_demo_data wrote



def _compress(spec: DemoSpec) -> bool:
    """zlib for the small demos; the large one is written raw (speed over size)."""
    return spec.n_lat * spec.n_lon <= 10_000


def _encoding(ds: xr.Dataset, compress: bool) -> dict[str, dict]:
    """netCDF4 encodings: no fill values; zlib and per-step chunks only when compressing."""
    enc: dict[str, dict] = {str(name): {"_FillValue": None} for name in ds.coords}
    for key, var in ds.data_vars.items():
        name = str(key)
        enc[name] = {"dtype": "float32", "_FillValue": None}
        if compress:
            chunks = tuple(1 if d == "time" else var.sizes[d] for d in var.dims)
            enc[name].update(zlib=True, complevel=1, shuffle=True, chunksizes=chunks)
    return enc


def _encode_time(ds: xr.Dataset) -> xr.Dataset:
    """Time as int64 hours with exactly TIME_UNITS (xarray would shorten the units string)."""
    if "time" not in ds.coords:
        return ds
    values, calendar = ds["time"].values, ds.attrs["calendar"]
    if np.issubdtype(values.dtype, np.datetime64):
        hours = (values - np.datetime64("1970-01-01", "ns")) // np.timedelta64(1, "h")
    else:
        hours = cftime.date2num(list(values), TIME_UNITS, calendar=calendar)
    attrs = {**ds["time"].attrs, "units": TIME_UNITS, "calendar": calendar}
    return ds.assign_coords(time=("time", np.asarray(hours, dtype=np.int64), attrs))


def _write_atomic(ds: xr.Dataset, path: Path, compress: bool) -> None:
    """Write to a hidden temporary file next to ``path``, then rename it into place."""
    ds = _encode_time(ds)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=_encoding(ds, compress))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_demo_data(out_dir: Path, spec_or_size: DemoSpec | str,
                    keep: Collection[str] = ()) -> list[Path]:
    """Write demo_YYYY-MM.nc (one per month) and static.nc into out_dir; return the paths
    (months sorted, static last). Each file appears complete or not at all. Files named
    in ``keep`` are left as they are (the simulation still runs through their months)."""
    spec = demo_spec(spec_or_size) if isinstance(spec_or_size, str) else spec_or_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    compress = _compress(spec)
    paths = []
    for ds in simulate(spec):
        first = ds.indexes["time"][0]
        path = out_dir / f"demo_{first.year:04d}-{first.month:02d}.nc"
        if path.name not in keep:
            _write_atomic(ds, path, compress)
            log.info("wrote %s (%d steps)", path, ds.sizes["time"])
        paths.append(path)
    static = out_dir / "static.nc"
    if static.name not in keep:
        _write_atomic(static_fields(spec), static, compress)
    return [*paths, static]


def _recorded(out_dir: Path) -> dict | None:
    """What ``.demo-spec.json`` in ``out_dir`` records (spec, files), None if unreadable."""
    try:
        recorded = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def _spec_differences(recorded: dict, spec: DemoSpec) -> list[str]:
    have, want = recorded.get("spec") or {}, json.loads(json.dumps(asdict(spec)))
    return [f"{key} {have.get(key)} (expected {value})" for key, value in want.items()
            if have.get(key) != value]


def demo_differences(out_dir: Path, spec: DemoSpec) -> list[str] | None:
    """How the files in ``out_dir`` differ from ``spec``'s demo data: None when it holds
    no files, [] when they are exactly that spec's, else one phrase per difference."""
    out_dir = Path(out_dir)
    present = sorted(p.name for p in out_dir.glob("*") if not p.name.startswith("."))
    if not present:
        return None
    recorded = _recorded(out_dir)
    if recorded is None:
        return [f"{len(present)} files not written by `pipeline demo-data` (no readable {MARKER})"]
    missing = [name for name in recorded.get("files", []) if name not in present]
    return (_spec_differences(recorded, spec)
            + ([f"files missing: {', '.join(missing)}"] if missing else []))


def ensure_demo_data(out_dir: Path, spec: DemoSpec) -> tuple[list[Path], bool]:
    """Write the demo data into ``out_dir`` without overwriting any file there.

    Files already there may be the user's, and a store built from them records their
    modification times: an empty folder is written, exactly this spec's files are kept
    (a second ``make demo`` finds its store still valid), this spec's files with some
    deleted get just those back, and files of another spec (or of no known spec) are a
    :class:`PipelineError` that says how they differ. Returns the paths and whether any
    file was written now.
    """
    out_dir = Path(out_dir)
    differences = demo_differences(out_dir, spec)
    recorded = _recorded(out_dir) if differences is not None else None
    if differences == [] and recorded is not None:
        return [out_dir / name for name in recorded["files"]], False
    if differences and (recorded is None or _spec_differences(recorded, spec)):
        raise PipelineError(
            f"{out_dir} already holds demo files that differ from the ones asked for: "
            f"{'; '.join(differences)}; they are not overwritten",
            f"write into another directory, or delete the files in {out_dir} first")
    if differences:  # this spec's marker, some of its files deleted: only those come back
        return write_demo_data(out_dir, spec, keep={p.name for p in out_dir.glob("*")}), True
    paths = write_demo_data(out_dir, spec)
    atomic_write(out_dir / MARKER, json.dumps(
        {"spec": asdict(spec), "files": [p.name for p in paths]}, sort_keys=True))
    return paths, True

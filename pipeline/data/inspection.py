"""What ``pipeline inspect`` reports of a store: a summary of its attributes, arrays and
statistics, and (``--verify``) every shard read back against its checksums."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.data import store
from pipeline.data.shards import ShardFiles
from pipeline.errors import StoreError


def summary(path: str | Path) -> str:
    """A human-readable description of a store, complete or not; a store whose
    attributes do not fit :class:`~pipeline.data.attrs.StoreAttrs` is a StoreError."""
    group = store.open_group(path)
    attrs = store.store_attrs(group)
    data = store.get_array(group, "data")
    done = store.done_flags(group)
    channels = store.channel_names(group)
    roles = [str(r) for r in store.read_array(group, "channel_role")]
    lines = [
        f"store      {os.path.abspath(path)}",
        f"status     {'complete' if attrs.complete else 'INCOMPLETE'}: "
        f"{int(done.sum())}/{done.size} shards written; dataset version "
        f"{attrs.dataset_version}, format {attrs.format_version}",
        f"shape      data {tuple(data.shape)} float32; chunk {tuple(data.chunks)}; "
        f"shard {tuple(data.shards or data.chunks)}",
        f"time       {attrs.time_start} .. {attrs.time_end} "
        f"every {attrs.frequency} ({data.shape[0]} steps)",
        f"grid       {data.shape[2]} lat x {data.shape[3]} lon "
        f"({attrs.grid.lat_range}, {attrs.grid.lon_range})",
    ]
    for split in ("train", "val", "test"):
        start, end = attrs.splits.of(split)
        lines.append(f"split      {split:<5} {start} .. {end}")
    lines.append(f"statistics over {attrs.statistics_period} "
                 f"(frozen since version {attrs.statistics_version})")
    # the name and role columns fit their longest entry, with a space after it
    wide = max(len(c) for c in ["channel", *channels]) + 2
    role_wide = max(len(r) for r in ["role", *roles]) + 1
    header = f"  {'channel':<{wide}}{'role':<{role_wide}}{'mean':>12}{'std':>12}{'min':>12}{'max':>12}"
    lines.append(header)
    stats = store.statistics(group) if attrs.complete else None
    for i, (name, role) in enumerate(zip(channels, roles, strict=True)):
        if stats is None:
            lines.append(f"  {name:<{wide}}{role}")
            continue
        values = "".join(f"{stats[k][i]:>12.5g}" for k in ("mean", "std", "min", "max"))
        lines.append(f"  {name:<{wide}}{role:<{role_wide}}{values}")
    static = [str(c) for c in store.read_array(group, "static_channel")]
    lines.append(f"static     {', '.join(static) or 'none'}")
    lines.append(f"sources    {len(attrs.sources)} files; config hash {attrs.config_hash}; "
                 f"created {attrs.created}, updated {attrs.updated}; code {attrs.code_version}")
    return "\n".join(lines)


def verify(path: str | Path) -> tuple[list[str], bool]:
    """Read every shard of ``data`` whole, checking every checksum it has: the problems
    found (one line each) and whether the chunks carry checksums (format 2)."""
    group = store.open_group(path)
    array = store.data_array(path)
    written = store.done_flags(group) | bool(group.attrs.get("complete"))  # only those count
    missing = [s for s in store.missing_shards(array) if written[s]]
    problems = [f"shard {s}: file missing ({store.shard_path(array, s)})" for s in missing]
    files, reader = ShardFiles.of(array, complete=True), store.DataReader(path)
    steps = store.shard_steps(array)
    for s in sorted(set(np.flatnonzero(written).tolist()) - set(missing)):
        t0, t1 = s * steps, min((s + 1) * steps, array.shape[0])
        try:
            if files is not None:
                files.read(t0, np.empty((t1 - t0, *array.shape[1:]), np.float32))
            else:
                reader[t0:t1]
        except StoreError as err:
            problems.append(f"shard {s}: {err.message}")
    return problems, store.has_checksums(array)

"""Shared set-up for the benchmarks: a store of the ``large`` demo data, built once."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import load_config
from pipeline.data.build import preprocess
from pipeline.demo.files import ensure_demo_data
from pipeline.demo.spec import demo_spec


def bench_config(workdir: Path, months: int, forcings: list[str] | None = None) -> Path:
    """Config of a 1.5-degree store (121 x 240) of every demo variable on every level."""
    spec = demo_spec("large", months=months)
    raw = workdir / f"raw-large-{months}"
    ensure_demo_data(raw, spec)
    levels = list(spec.levels)
    cfg = {
        "name": "bench",
        "runs_dir": str(workdir / "runs"),
        "data": {
            "sources": [{"path": str(raw / "demo_*.nc")},
                        {"path": str(raw / "static.nc"), "static": True}],
            "variables": ["t2m", "msl"] + [{"name": v, "levels": levels} for v in "tzuv"],
            "static": ["orog", "lsm"],
            "derived": [{"name": "ws850", "function": "wind_speed", "inputs": ["u850", "v850"]}],
            "forcings": forcings if forcings is not None else
            ["cos_zenith", "toa_insolation", "sin_time_of_day", "cos_time_of_day", "sin_year",
             "cos_year"],
            "splits": {"train": ["2000-01-01", "2000-01-24T18:00"],
                       "val": ["2000-01-25", "2000-01-27T18:00"],
                       "test": ["2000-01-28", "2000-12-31T18:00"]},
            "store": str(workdir / f"store-large-{months}.zarr"),
            "shard_size": 8,
        },
    }
    path = workdir / f"bench-large-{months}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ensure_store(workdir: Path, months: int = 1, workers: int = 2) -> Path:
    """Build (or reuse) the benchmark store with ``workers`` Dask processes; return its config."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = bench_config(workdir, months)
    preprocess(load_config(config), workers=workers)
    return config


def machine() -> dict[str, Any]:
    info = {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def write_result(path: str, result: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))

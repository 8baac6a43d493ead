"""Preprocessing benchmark: the pipeline against a naive xarray baseline, same run.

Measures, on the same raw files and the same variable/level selection:
- ``pipeline``: ``pipeline preprocess`` (LocalCluster, 2 workers; shards, statistics,
  validation, provenance);
- ``naive``: ``xarray.open_mfdataset(...)[selection].to_zarr(...)`` with default
  settings (what users often start with; no statistics, no validation);
- ``codec``: the store's compressor alone (the config's default, Blosc LZ4 with
  shuffle, one thread) on the same float32 fields: the limit for each worker.

Throughput is MB/s of uncompressed float32 output; peak memory is the RSS of the whole
process tree (Dask workers included). The two run ``--rounds`` times each in
alternating order, each after a ``sync``; the fastest run of each counts. Results go
to a JSON file; ratios compare runs made minutes apart on the same machine.

    python -m bench.preprocess --size large --months 6 --out bench/results/preprocess.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench.monitor import PeakMemory, run_measured
from pipeline.demo.files import write_demo_data
from pipeline.demo.spec import demo_spec

NAIVE = """
import sys, xarray as xr
raw, out, levels = sys.argv[1], sys.argv[2], [float(x) for x in sys.argv[3].split(",")]
ds = xr.open_mfdataset(sorted(__import__("glob").glob(raw + "/demo_*.nc")))
ds = ds[["t2m", "msl", "t", "z", "u", "v"]].sel(level=levels)
# Monthly files differ in length; Zarr needs uniform chunks: the smallest fix a user makes.
ds = ds.chunk({"time": max(ds.chunks["time"])})
ds.to_zarr(out, zarr_format=3, consolidated=False)
"""


def split_dates(raw: Path) -> dict[str, list[str]]:
    """Train on the first 70 % of the steps, validate on the next 15 %, test on the rest,
    as a user would: statistics then cover most shards, as they would in practice."""
    import pandas as pd
    import xarray as xr

    times = pd.DatetimeIndex(np.concatenate(
        [xr.open_dataset(f)["time"].values for f in sorted(raw.glob("demo_*.nc"))]))
    a, b = int(len(times) * 0.70), int(len(times) * 0.85)
    label = lambda t: t.strftime("%Y-%m-%dT%H:%M")  # noqa: E731
    return {"train": [label(times[0]), label(times[a - 1])],
            "val": [label(times[a]), label(times[b - 1])],
            "test": [label(times[b]), label(times[-1])]}


def make_config(raw: Path, store: Path, levels: list[float], workers_shard: int) -> dict:
    return {
        "name": "bench",
        "data": {
            "sources": [{"path": str(raw / "demo_*.nc")},
                        {"path": str(raw / "static.nc"), "static": True}],
            "variables": ["t2m", "msl"] + [{"name": v, "levels": levels} for v in "tzuv"],
            "static": ["orog", "lsm"],
            "splits": split_dates(raw),
            "store": str(store),
            "shard_size": workers_shard,
        },
    }


def codec_throughput(raw: Path, levels: list[float], seconds: float = 3.0) -> float:
    """MB/s of the default codec compressing real float32 fields, one thread."""
    import numcodecs
    import xarray as xr
    from numcodecs import Blosc

    from pipeline.config import Codec

    default = Codec()
    numcodecs.blosc.set_nthreads(1)
    ds = xr.open_dataset(sorted(raw.glob("demo_*.nc"))[0])
    block = np.ascontiguousarray(ds["t"].sel(level=levels).isel(time=slice(0, 4)).values,
                                 dtype=np.float32)
    codec = Blosc(cname=default.cname, clevel=default.level, shuffle=Blosc.SHUFFLE)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for step in block:
            codec.encode(step)
            done += step.nbytes
    return done / 1e6 / (time.perf_counter() - start)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large")
    parser.add_argument("--months", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5,
                        help="runs of each, in alternating order; the fastest counts")
    parser.add_argument("--workdir", default=None, help="where raw data and stores go")
    parser.add_argument("--out", default="bench/results/preprocess.json")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-"))
    raw = work / f"raw-{args.size}-{args.months}"
    spec = demo_spec(args.size, months=args.months)
    if not (raw / "static.nc").exists():
        write_demo_data(raw, spec)
    levels = list(spec.levels)
    input_mb = sum(p.stat().st_size for p in raw.glob("*.nc")) / 1e6

    store, naive_store = work / "pipeline.zarr", work / "naive.zarr"
    config = work / "bench.yaml"
    bench_cfg = make_config(raw, store, levels, args.shard_size)
    config.write_text(yaml.safe_dump(bench_cfg))
    commands = {
        "pipeline": (store, [sys.executable, "-m", "pipeline", "preprocess", str(config),
                             "--workers", str(args.workers)]),
        "naive": (naive_store, [sys.executable, "-c", NAIVE, str(raw), str(naive_store),
                                ",".join(str(x) for x in levels)]),
    }
    runs: dict[str, list[PeakMemory]] = {"pipeline": [], "naive": []}
    for round_ in range(args.rounds):
        # alternate the order, and start each run with no dirty pages left by the one
        # before: on 2 cores the kernel writing back gigabytes slows whoever runs next
        for name in (("pipeline", "naive") if round_ % 2 == 0 else ("naive", "pipeline")):
            out_store, cmd = commands[name]
            shutil.rmtree(out_store, ignore_errors=True)
            os.sync()
            run = run_measured(cmd)
            if run.returncode != 0:
                print(run.stderr[-3000:], file=sys.stderr)
                return 1
            runs[name].append(run)
    ours, naive = (min(runs[name], key=lambda r: r.seconds) for name in ("pipeline", "naive"))
    import zarr

    output_mb = float(np.prod(zarr.open_group(str(store), mode="r")["data"].shape)) * 4 / 1e6
    codec = codec_throughput(raw, levels)

    result = {
        "benchmark": "preprocess",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "data": {"size": args.size, "months": args.months, "input_mb": round(input_mb, 1),
                 "splits": bench_cfg["data"]["splits"],
                 "output_mb": round(output_mb, 1), "shard_size": args.shard_size,
                 "workers": args.workers, "rounds": args.rounds},
        "pipeline": {"seconds": round(ours.seconds, 2),
                     "all_seconds": [round(r.seconds, 2) for r in runs["pipeline"]],
                     "mb_per_s": round(output_mb / ours.seconds, 1),
                     "peak_total_mb": round(ours.peak_total / 1e6),
                     "peak_largest_process_mb": round(ours.peak_largest_process / 1e6)},
        "naive_xarray_to_zarr": {"seconds": round(naive.seconds, 2),
                                 "all_seconds": [round(r.seconds, 2) for r in runs["naive"]],
                                 "mb_per_s": round(output_mb / naive.seconds, 1),
                                 "peak_total_mb": round(naive.peak_total / 1e6)},
        "codec_one_thread_mb_per_s": round(codec, 1),
        "compression_ratio": {"pipeline": round(output_mb * 1e6 / du(store / "data"), 2),
                              "naive": round(output_mb * 1e6 / du(naive_store), 2)},
        "ratio_pipeline_over_naive_throughput": round(naive.seconds / ours.seconds, 2),
        # the fastest runs decide the ratio; the medians show how much one lucky run moves it
        "ratio_of_median_runs": round(statistics.median(r.seconds for r in runs["naive"])
                                      / statistics.median(r.seconds for r in runs["pipeline"]), 2),
        "ratio_pipeline_over_codec_limit": round(output_mb / ours.seconds / (codec * args.workers), 2),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Loader benchmark: samples/s of the training Dataset against two baselines, same run.

On the ``large`` store (121 x 240, 61 channels), for the same sample times in the same
order (the training sampler's), in one process:
- ``pipeline``: ``ForecastDataset[i]`` (one zarr read per sample, normalised tensors);
- ``zarr_limit``: the same zarr reads with nothing else (the limit for any loader);
- ``xarray_per_sample``: ``ds["data"].isel(time=...).values`` on ``xarray.open_zarr``,
  the way users often start (dask on the hot path).
Then the DataLoader with worker processes against the same number of processes doing
plain zarr reads.

    python -m bench.loader --out bench/results/loader.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from bench.common import ensure_store, machine, write_result
from pipeline.config import load_config
from pipeline.data.loader import BlockShuffleSampler, ForecastDataset, StoreInfo


def rate(fn, indices: list[int], min_seconds: float = 2.0) -> float:
    """Samples per second of ``fn(i)`` over ``indices`` (repeated to last min_seconds)."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for i in indices:
            fn(i)
            done += 1
    return done / (time.perf_counter() - start)


def _zarr_reader(args: tuple[str, list[tuple[int, int]]]) -> int:
    path, ranges = args
    arr = zarr.open_array(path, path="data", mode="r")
    for lo, hi in ranges:
        arr[lo:hi]
    return len(ranges)


def parallel_zarr_rate(path: str, ranges: list[tuple[int, int]], processes: int) -> float:
    """Samples/s of plain zarr reads split over ``processes`` processes."""
    chunks = [ranges[i::processes] for i in range(processes)]
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(_zarr_reader, [(path, c[:2]) for c in chunks])  # warm the imports
        start = time.perf_counter()
        done = sum(pool.map(_zarr_reader, [(path, c) for c in chunks]))
    return done / (time.perf_counter() - start)


def loader_rate(dataset: ForecastDataset, sampler: BlockShuffleSampler, workers: int,
                batch: int) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    iterator = iter(loader)
    next(iterator)  # start-up of the worker processes is not throughput
    start, done = time.perf_counter(), 0
    for b in iterator:
        done += b["inputs"].shape[0]
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "pipeline-bench"))
    parser.add_argument("--months", type=int, default=1)
    parser.add_argument("--store-config", default=None,
                        help="config of an existing store to use instead of the large one")
    parser.add_argument("--history", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench/results/loader.json")
    args = parser.parse_args()

    cfg = load_config(args.store_config or ensure_store(Path(args.workdir), args.months))
    info = StoreInfo(cfg.data.store)
    dataset = ForecastDataset(info, "train", history=args.history, lead=1)
    sampler = BlockShuffleSampler(len(dataset), 8, seed=0)
    order = list(sampler)[:64]
    times = [int(dataset.times[i]) for i in order]
    ranges = [(t - args.history + 1, t + 2) for t in times]
    arr = zarr.open_array(info.path, path="data", mode="r")
    sample_mb = float(np.prod(arr.shape[1:])) * 4 * (args.history + 1) / 1e6

    import xarray as xr

    xds = xr.open_zarr(info.path, consolidated=True)
    ours = rate(lambda i: dataset[i], order)
    limit = rate(lambda i: arr[ranges[order.index(i)][0]:ranges[order.index(i)][1]], order)
    naive = rate(lambda i: xds["data"].isel(time=slice(*ranges[order.index(i)])).values,
                 order[:16])
    full_order = list(sampler)
    all_ranges = [(int(dataset.times[i]) - args.history + 1, int(dataset.times[i]) + 2)
                  for i in full_order]
    ours_parallel = loader_rate(dataset, sampler, args.workers, 8)
    limit_parallel = parallel_zarr_rate(info.path, all_ranges, args.workers)

    write_result(args.out, {
        "benchmark": "loader",
        "machine": machine(),
        "store": {"shape": list(arr.shape), "history": args.history, "sample_mb": round(sample_mb, 2)},
        "one_process_samples_per_s": {"pipeline": round(ours, 1), "zarr_limit": round(limit, 1),
                                      "xarray_per_sample": round(naive, 1)},
        f"{args.workers}_processes_samples_per_s": {"pipeline_dataloader": round(ours_parallel, 1),
                                                    "zarr_limit": round(limit_parallel, 1)},
        "ratio_pipeline_over_zarr_limit": round(ours / limit, 2),
        "ratio_pipeline_over_zarr_limit_parallel": round(ours_parallel / limit_parallel, 2),
        "ratio_pipeline_over_xarray": round(ours / naive, 1),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

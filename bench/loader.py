"""Loader benchmark: samples/s of the training loaders against plain zarr reads, same run.

On the ``large`` store (121 x 240, 61 channels), for the same sample times in the same
order (the training sampler's), in one process:
- ``pipeline``: ``ForecastDataset[i]`` (one read per sample through ``ShardFiles``,
  normalised tensors);
- ``zarr_limit``: the same steps read by zarr with nothing else (``array[lo:hi]``, a fresh
  array each: the limit for any loader built on plain reads of each sample);
- ``zarr_limit_runs``: plain reads of what the batch loaders read, one read per run of
  consecutive samples in a batch (``ForecastDataset.read_run_into``): the limit for a
  loader that reads each run's steps once;
- ``zarr_reused_buffer``: the same zarr reads into one reused array (``out=``);
- ``xarray_per_sample``: ``ds["data"].isel(time=...).values`` on ``xarray.open_zarr``,
  the way users often start (dask on the hot path).
Then, at the same parallelism N: the BatchLoader with N reader threads, and with N
reader processes, and the DataLoader with N worker processes (all read runs, batches of
8), each against N processes doing plain zarr reads, per sample and per run (for N = 1,
the one-process limits above). On a machine with a GPU, also the BatchLoader delivering
batches to the GPU: samples made on the host then copied, or assembled on the GPU from
the raw steps (``train.assemble_on_device``, the default there). Last, the split kept
in memory (``train.resident``; on the GPU when there is one): its one-off read, then the
batches gathered from it. The limit under all of them, measured in the same run:
``codec_limit``, the store's own encoded steps (read once from its shard files into
memory) decoded by the codec alone into one reused buffer on one thread (and with
Blosc's own threads, ``codec_limit_blosc_threads``); every loader's decoded bytes per
second per reader are reported as a ratio of it (``decoded``). The machine is shared:
every measure runs once per round (``--rounds``), rounds interleave them, and the best
round counts.

    python -m bench.loader --out bench/results/loader.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
import zarr
from zarr.buffer import default_buffer_prototype

from bench.common import ensure_store, machine, write_result
from pipeline.config import load_config
from pipeline.data.dataset import RUN_LENGTH, ForecastDataset, consecutive_runs
from pipeline.data.loading.batches import BatchLoader, Readers
from pipeline.data.loading.resident import ResidentLoader, ResidentSplit
from pipeline.data.sampler import BlockShuffleSampler
from pipeline.data.shards import ShardFiles
from pipeline.data.store import StoreInfo


def rate(fn, indices: list[int], min_seconds: float = 2.0) -> float:
    """Samples per second of ``fn(i)`` over ``indices`` (repeated to last min_seconds)."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for i in indices:
            fn(i)
            done += 1
    return done / (time.perf_counter() - start)


Reads = list[tuple[int, int, int]]  # (first step, end step, samples the read serves)


def sample_reads(dataset: ForecastDataset, order: list[int], batch: int, runs: bool) -> Reads:
    """The reads behind ``order``: one per sample, or one per run of consecutive samples
    within each batch, as the loaders make them (``ForecastDataset.read_run_into``)."""
    span = dataset.history + dataset.lead * dataset.rollout
    reads: Reads = []
    for b in range(0, len(order) - batch + 1, batch):
        times = dataset.times[np.asarray(order[b:b + batch])]
        pieces = consecutive_runs(times, RUN_LENGTH) if runs else \
            [slice(j, j + 1) for j in range(batch)]
        for r in pieces:
            lo = int(times[r.start]) - dataset.history + 1
            reads.append((lo, lo + span + r.stop - r.start - 1, r.stop - r.start))
    return reads


def reads_rate(arr: zarr.Array, reads: Reads, min_seconds: float = 2.0) -> float:
    """Samples per second of plain ``arr[lo:hi]`` reads (a fresh array each)."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for lo, hi, n in reads:
            arr[lo:hi]
            done += n
    return done / (time.perf_counter() - start)


def _zarr_reader(args: tuple[str, Reads]) -> int:
    path, reads = args
    arr = zarr.open_array(path, path="data", mode="r")
    for lo, hi, _ in reads:
        arr[lo:hi]
    return sum(n for _, _, n in reads)


def codec_rate(codec: Any, encoded: list[bytes], out: np.ndarray, threads: int = 1,
               min_seconds: float = 2.0) -> float:
    """Decoded bytes per second of ``codec`` alone: ``encoded`` (steps already in memory)
    decoded into the one reused buffer ``out`` by ``threads`` Blosc threads (numcodecs'
    default: as many as cores, in a process's main thread only)."""
    default = numcodecs.blosc.use_threads
    numcodecs.blosc.use_threads = threads > 1
    before = numcodecs.blosc.set_nthreads(threads)
    try:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds:
            for e in encoded:
                codec.decode(e, out=out)
                done += out.nbytes
        return done / (time.perf_counter() - start)
    finally:
        numcodecs.blosc.use_threads = default
        numcodecs.blosc.set_nthreads(before)


def parallel_zarr_rate(path: str, ranges: Reads, processes: int) -> float:
    """Samples/s of plain zarr reads split over ``processes`` processes."""
    chunks = [ranges[i::processes] for i in range(processes)]
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(_zarr_reader, [(path, c[:2]) for c in chunks])  # warm the imports
        start = time.perf_counter()
        done = sum(pool.map(_zarr_reader, [(path, c) for c in chunks]))
    return done / (time.perf_counter() - start)


def epochs_rate(loader: Iterable[dict[str, Any]], min_seconds: float = 3.0) -> float:
    """Samples/s over whole epochs of ``loader`` (at least min_seconds), after its first batch."""
    iterator = iter(loader)
    next(iterator)  # start-up (worker processes, first reads) is not throughput
    start, done = time.perf_counter(), 0
    while True:
        for b in iterator:
            done += b["inputs"].shape[0]
        if time.perf_counter() - start >= min_seconds:
            return done / (time.perf_counter() - start)
        iterator = iter(loader)


def loader_rate(dataset: ForecastDataset, sampler: BlockShuffleSampler, workers: int,
                batch: int) -> float:
    """Samples/s of the torch DataLoader with ``workers`` worker processes."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                        drop_last=True)
    return epochs_rate(loader)


def batch_loader_rate(dataset: ForecastDataset, sampler: BlockShuffleSampler, readers: Readers,
                      n: int, batch: int) -> float:
    """Samples/s of the BatchLoader with ``n`` reader threads or processes."""
    with BatchLoader(dataset, sampler, batch, n, prefetch=4, readers=readers) as loader:
        return epochs_rate(loader)


class OnGpu:
    """A loader's batches on the GPU, moved there as the training loop moves them (a
    no-op for batches made there); an epoch ends once the GPU has them all."""

    def __init__(self, loader: Iterable[dict[str, torch.Tensor]], device: torch.device):
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        torch.cuda.synchronize()


def gpu_batch_loader_rate(dataset: ForecastDataset, sampler: BlockShuffleSampler,
                          readers: Readers, n: int, batch: int, on_device: bool) -> float:
    """Samples/s of the BatchLoader delivering batches to the GPU, samples made on the
    host (then copied) or assembled on the GPU from the raw steps."""
    with BatchLoader(dataset, sampler, batch, n, prefetch=4, device=torch.device("cuda"),
                     on_device=on_device, readers=readers) as loader:
        return epochs_rate(OnGpu(loader, loader.device))


def resident_measure(dataset: ForecastDataset, sampler: BlockShuffleSampler, readers: int,
                     batch: int) -> tuple[dict[str, Any], Callable[[], float]]:
    """The split read into memory (on the GPU when there is one) with ``readers`` threads:
    what the read took, and the measure of the batches gathered from it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    split = ResidentSplit(dataset, device, readers)
    loader = ResidentLoader(split, sampler, batch)
    facts = {"device": device.type, "read_seconds": round(split.load_seconds, 2),
             "gib": round(split.nbytes / 2**30, 2), "steps": int(split.steps.shape[0]),
             "readers": readers}
    return facts, lambda: epochs_rate(OnGpu(loader, device) if device.type == "cuda" else loader)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "pipeline-bench"))
    parser.add_argument("--months", type=int, default=1)
    parser.add_argument("--store-config", default=None,
                        help="config of an existing store to use instead of the large one")
    parser.add_argument("--history", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader worker processes for the DataLoader comparison")
    parser.add_argument("--readers", default="1,2",
                        help="comma-separated reader counts: the BatchLoader runs with each, "
                        "as threads and as processes")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of all measures, interleaved; the best of each counts")
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
    reused = np.empty((args.history + 1, *arr.shape[1:]), dtype=arr.dtype)
    out = default_buffer_prototype().nd_buffer.from_numpy_array(reused)
    full_order = list(sampler)
    reads = {kind: sample_reads(dataset, full_order, 8, runs=kind == "runs")
             for kind in ("samples", "runs")}
    first_runs = sample_reads(dataset, order, 8, runs=True)  # the one-process limit's reads
    counts = [int(x) for x in args.readers.split(",")]
    shard_files = ShardFiles.of(arr, complete=True)
    if shard_files is None or shard_files.codec is None:
        raise SystemExit("error: the codec limit needs a compressed store in the pipeline's "
                         "layout (use the benchmark store)")
    first_steps = sorted({t for lo, hi, _ in first_runs for t in range(lo, hi)})[:32]
    encoded = [shard_files.encoded(t) for t in first_steps]  # read once, before any measure
    step_buffer = np.empty(arr.shape[1:], dtype=arr.dtype)
    measures: dict[str, Callable[[], float]] = {
        "codec_limit": partial(codec_rate, shard_files.codec, encoded, step_buffer),
        "codec_limit_blosc_threads": partial(codec_rate, shard_files.codec, encoded, step_buffer,
                                             os.cpu_count() or 1),
        "pipeline": lambda: rate(lambda i: dataset[i], order),
        "zarr_limit": lambda: rate(lambda i: arr[slice(*ranges[order.index(i)])], order),
        "zarr_limit_runs": lambda: reads_rate(arr, first_runs),
        "zarr_reused_buffer": lambda: rate(
            lambda i: arr.get_basic_selection(slice(*ranges[order.index(i)]), out=out), order),
        "xarray_per_sample": lambda: rate(
            lambda i: xds["data"].isel(time=slice(*ranges[order.index(i)])).values, order[:16]),
        "dataloader": lambda: loader_rate(dataset, sampler, args.workers, 8),
    }
    for n in sorted({args.workers, *counts} - {1}):
        for kind in ("samples", "runs"):
            measures[f"zarr_{n}_processes_{kind}"] = partial(parallel_zarr_rate, info.path,
                                                             reads[kind], n)
    readers: tuple[Readers, ...] = ("threads", "processes")
    for n in counts:
        for kind in readers:
            measures[f"{kind}_{n}"] = partial(batch_loader_rate, dataset, sampler, kind, n, 8)
            if torch.cuda.is_available():
                for where in ("host", "assembled"):
                    measures[f"{kind}_{n}_gpu_{where}"] = partial(
                        gpu_batch_loader_rate, dataset, sampler, kind, n, 8, where == "assembled")
    resident, measures["resident"] = resident_measure(dataset, sampler, max(counts), 8)
    # the machine is shared: every measure runs once per round, rounds interleave them,
    # and the best round counts
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, measure in measures.items():
            best[name] = max(best.get(name, 0.0), measure())
    ours, limit, naive = best["pipeline"], best["zarr_limit"], best["xarray_per_sample"]
    limit_runs = best["zarr_limit_runs"]
    ours_parallel = best["dataloader"]

    def zarr_at(n: int, kind: str) -> float:
        """The plain zarr limit at parallelism ``n`` (1: the one-process limits)."""
        if n == 1:
            return limit if kind == "samples" else limit_runs
        return best[f"zarr_{n}_processes_{kind}"]

    limit_parallel = zarr_at(args.workers, "samples")
    limit_parallel_runs = zarr_at(args.workers, "runs")
    batch_loader = {}
    for n in counts:
        zarr_n, zarr_n_runs = zarr_at(n, "samples"), zarr_at(n, "runs")
        for kind in readers:
            ours_n = best[f"{kind}_{n}"]
            to_gpu = {f"to_gpu_{where}": round(best[f"{kind}_{n}_gpu_{where}"], 1)
                      for where in ("host", "assembled") if f"{kind}_{n}_gpu_{where}" in best}
            batch_loader[f"{n}_{kind}"] = {"pipeline": round(ours_n, 1), **to_gpu,
                                           "zarr_limit_same_parallelism": round(zarr_n, 1),
                                           "zarr_limit_runs_same_parallelism": round(zarr_n_runs, 1),
                                           "ratio": round(ours_n / zarr_n, 2),
                                           "ratio_runs": round(ours_n / zarr_n_runs, 2)}

    # decoded bytes: the steps each measure decodes per sample (the runs' union for the
    # loaders that read runs), times the bytes of a step
    step_bytes = float(np.prod(arr.shape[1:])) * 4
    per_run = sum(hi - lo for lo, hi, _ in reads["runs"]) / sum(n for _, _, n in reads["runs"])
    per_sample = args.history + 1
    codec_limit = best["codec_limit"]
    decoded_measures = {"pipeline": (per_sample, 1), "zarr_limit": (per_sample, 1),
                        "zarr_limit_runs": (per_run, 1), "dataloader": (per_run, args.workers),
                        **{f"{kind}_{n}": (per_run, n) for n in counts for kind in readers}}
    decoded = {}
    for name, (steps, n) in decoded_measures.items():
        gb = best[name] * steps * step_bytes / 1e9
        decoded[name] = {"readers": n, "gb_per_s": round(gb, 3),
                         "per_reader_gb_per_s": round(gb / n, 3),
                         "ratio_per_reader_to_codec": round(gb / n / (codec_limit / 1e9), 2)}
    scaling = {f"scaling_{max(counts)}_over_{min(counts)}_readers": {
        kind: round(best[f"{kind}_{max(counts)}"] / best[f"{kind}_{min(counts)}"], 2)
        for kind in readers}} if len(counts) > 1 else {}

    write_result(args.out, {
        "benchmark": "loader",
        "machine": machine(),
        "store": {"shape": list(arr.shape), "history": args.history, "sample_mb": round(sample_mb, 2)},
        "rounds": args.rounds,
        "decoded": {"codec_limit_gb_per_s": round(codec_limit / 1e9, 3),
                    "codec_limit_blosc_threads_gb_per_s": round(
                        best["codec_limit_blosc_threads"] / 1e9, 3),
                    "blosc_threads": os.cpu_count(),
                    "steps_per_sample": {"per_sample": per_sample, "runs": round(per_run, 3)},
                    "measures": decoded, **scaling},
        "one_process_samples_per_s": {"pipeline": round(ours, 1), "zarr_limit": round(limit, 1),
                                      "zarr_limit_runs": round(limit_runs, 1),
                                      "zarr_reused_buffer": round(best["zarr_reused_buffer"], 1),
                                      "xarray_per_sample": round(naive, 1)},
        f"{args.workers}_processes_samples_per_s": {"pipeline_dataloader": round(ours_parallel, 1),
                                                    "zarr_limit": round(limit_parallel, 1),
                                                    "zarr_limit_runs": round(limit_parallel_runs, 1)},
        "batch_loader_samples_per_s": batch_loader,
        "resident": {**resident, "samples_per_s": round(best["resident"], 1),
                     "ratio_over_xarray": round(best["resident"] / naive, 1)},
        "ratio_pipeline_over_zarr_limit": round(ours / limit, 2),
        "ratio_pipeline_over_zarr_limit_parallel": round(ours_parallel / limit_parallel, 2),
        "ratio_pipeline_over_zarr_limit_runs_parallel": round(ours_parallel / limit_parallel_runs, 2),
        "ratio_pipeline_over_xarray": round(ours / naive, 1),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

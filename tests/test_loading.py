"""The batch loaders over a finished store (pipeline/data/loading/): reader threads and
processes, the resident split, their errors and their end."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import threading
from concurrent.futures import wait
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.config import config_from_dict
from pipeline.data.dataset import ForecastDataset
from pipeline.data.loading.batches import THREAD_PREFIX, BatchLoader
from pipeline.data.loading.resident import ResidentLoader, ResidentSplit, fits_on, resident_bytes
from pipeline.data.sampler import BlockShuffleSampler
from pipeline.data.store import StoreInfo
from pipeline.errors import ConfigError, PipelineError, StoreError
from pipeline.train import checkpoint
from pipeline.train.loop import train_loop
from pipeline.train.runtime import local_runtime
from tests.conftest import run_in_two_gloo_ranks, train_config

pytestmark = pytest.mark.integration


def loader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def corrupt_shard(tiny_store: Path, tmp_path: Path) -> Path:
    """A copy of the store whose shard of time steps 32-47 has a wrong index checksum."""
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    shard = store / "data" / "c" / "2" / "0" / "0" / "0"  # shard_size 16: steps 32..47
    shard.write_bytes(shard.read_bytes()[:-4] + bytes(4))  # the CRC32C ends the index
    return store


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "assembled"])
@pytest.mark.parametrize(("readers", "workers"),
                         [("threads", 0), ("threads", 2), ("processes", 2)])
def test_batch_loader_yields_the_dataloader_batches_bitwise(tiny_store: Path, readers: str,
                                                            workers: int, on_device: bool) -> None:
    """Samples made in the batch buffers, or assembled from the raw steps of the batch's
    runs (what happens on a GPU, here on the CPU), by reader threads or processes (into
    shared memory): bitwise the DataLoader's batches."""
    ds = ForecastDataset(StoreInfo(tiny_store), "train", history=2, lead=1, rollout=2)
    sampler = BlockShuffleSampler(len(ds), 4, seed=1)
    reference = DataLoader(ds, batch_size=4, sampler=sampler, drop_last=True)
    with BatchLoader(ds, sampler, 4, workers, prefetch=2, on_device=on_device,
                     readers=readers) as loader:
        # a whole epoch, a start mid-epoch (resume), then the next epoch on the same buffers
        for epoch, start in [(0, 0), (1, 5), (2, 0)]:
            sampler.set_epoch(epoch, start)
            expected = list(reference)
            assert len(expected) == len(loader) == len(ds) // 4 - start
            iterator = iter(loader)
            for want, batch in zip(expected, iterator, strict=True):
                # every read in flight has finished: none may have written into this batch
                wait([f for pending in iterator.pending for f in pending.futures])
                assert batch.keys() == want.keys()
                for key in want:
                    assert batch[key].dtype == want[key].dtype
                    assert torch.equal(batch[key], want[key]), (epoch, key)


def test_assembly_from_raw_steps_handles_lead_gaps_and_channel_lists(tiny_store: Path) -> None:
    """Lead 3 (a run's block holds steps no sample uses), output channels picked by an
    index array, and batches of runs, gaps and lone samples: the samples assembled from
    raw steps are bitwise those read one by one."""
    ds = ForecastDataset(StoreInfo(tiny_store), "train", history=2, lead=3, rollout=2)
    ds._outputs = np.asarray(ds.layout.outputs)  # the index-array path, same channels
    sampler = BlockShuffleSampler(len(ds), 6, block=3, seed=4)
    with BatchLoader(ds, sampler, 6, workers=2, prefetch=2, on_device=True) as loader:
        for batch, indices in zip(loader, np.asarray(list(sampler)).reshape(-1, 6), strict=True):
            assert batch["index"].tolist() == ds.times[indices].tolist()
            for row, i in enumerate(indices):
                alone = ds[int(i)]
                for key in ("inputs", "target_forcings", "targets"):
                    assert batch[key][row].is_contiguous()
                    assert torch.equal(batch[key][row], alone[key]), (int(i), key)


@pytest.mark.parametrize(("lead", "rollout", "readers"), [(1, 2, 1), (3, 2, 2), (2, 1, 3)])
def test_resident_split_yields_the_dataloader_batches_bitwise(tiny_store: Path, lead: int,
                                                             rollout: int, readers: int) -> None:
    """The split read once (shard by shard, by 1-3 threads) and normalised in memory, its
    batches gathered from it: bitwise the DataLoader's, whole epochs and a start
    mid-epoch, with the steps between lead-3 targets and every shard boundary."""
    ds = ForecastDataset(StoreInfo(tiny_store), "train", history=2, lead=lead, rollout=rollout)
    split = ResidentSplit(ds, torch.device("cpu"), readers)
    first = int(ds.times[0]) - 1
    assert split.steps.shape[0] == int(ds.times[-1]) + lead * rollout - first + 1
    assert split.nbytes == resident_bytes(ds)
    assert not fits_on(torch.device("cpu"), 1)  # auto never keeps a split on the CPU
    raw = np.empty((split.steps.shape[0], *ds.sample_shapes["inputs"][1:]), dtype=np.float32)
    ds.read_steps_into(first, raw)
    assert np.array_equal(split.steps.numpy(), (raw - ds._mean) * ds._inv_std)
    sampler = BlockShuffleSampler(len(ds), 4, seed=3)
    loader = ResidentLoader(split, sampler, 4)
    for epoch, start in [(0, 0), (1, 5)]:
        sampler.set_epoch(epoch, start)
        expected = list(DataLoader(ds, batch_size=4, sampler=sampler, drop_last=True))
        got = [{k: v.clone() for k, v in batch.items()} for batch in loader]  # buffers reused
        assert len(got) == len(expected) == len(loader)
        for want, batch in zip(expected, got, strict=True):
            assert batch.keys() == want.keys()
            for key in want:
                assert batch[key].dtype == want[key].dtype
                assert torch.equal(batch[key], want[key]), (epoch, key)
    loader.close()
    assert split.steps.numel() == 0


def test_resident_split_of_a_damaged_store_fails_with_the_shard_named(tiny_store: Path,
                                                                      tmp_path: Path) -> None:
    ds = ForecastDataset(StoreInfo(corrupt_shard(tiny_store, tmp_path)), "train", 1, 1)
    with pytest.raises(StoreError, match="checksum") as err:
        ResidentSplit(ds, torch.device("cpu"), readers=2)
    assert "data/c/2/0/0/0" in str(err.value)
    assert not [t for t in threading.enumerate() if t.name.startswith("pipeline-resident")]


def _read_shared_split(rank: int, store: str, out: str, too_large_on: int) -> None:
    """One of two gloo ranks: the train split read together (on rank ``too_large_on``,
    one far too large for memory)."""
    try:
        ds = ForecastDataset(StoreInfo(store), "train", history=2, lead=1, rollout=2)
        if rank == too_large_on:
            ds.times = np.array([0, 10**9])
        split = ResidentSplit(ds, torch.device("cpu"), 2, rank, 2)
        np.save(f"{out}-{rank}.npy", split.steps.numpy())
        Path(f"{out}-{rank}.shards").write_text(str(split.shards_read))
    except PipelineError as err:  # the rank's own error, or RanksStopped naming the other
        Path(f"{out}-{rank}.error").write_text(str(err))


def read_split_in_two_ranks(store: Path, tmp_path: Path, too_large_on: int = -1) -> None:
    run_in_two_gloo_ranks(_read_shared_split, tmp_path / "rendezvous", str(store),
                          str(tmp_path / "rank"), too_large_on)


def test_ranks_read_a_share_of_the_shards_and_broadcast_them(tiny_store: Path,
                                                             tmp_path: Path) -> None:
    """Two gloo ranks: each reads every other shard and both end with the steps of a
    split read in one process, bitwise."""
    read_split_in_two_ranks(tiny_store, tmp_path)
    alone = ResidentSplit(ForecastDataset(StoreInfo(tiny_store), "train", 2, 1, 2),
                          torch.device("cpu"), readers=2)
    shards = [int((tmp_path / f"rank-{r}.shards").read_text()) for r in range(2)]
    assert sum(shards) == alone.shards_read and min(shards) >= alone.shards_read // 2 >= 1
    for r in range(2):
        assert np.array_equal(np.load(tmp_path / f"rank-{r}.npy"), alone.steps.numpy())


def test_a_rank_that_cannot_read_its_shard_fails_every_rank(tiny_store: Path,
                                                            tmp_path: Path) -> None:
    """The damaged shard is one rank's to read: that rank names it, the other says that
    another rank failed, and neither waits for the broadcasts."""
    read_split_in_two_ranks(corrupt_shard(tiny_store, tmp_path), tmp_path)
    errors = [(tmp_path / f"rank-{r}.error").read_text() for r in range(2)]
    reader = next(r for r in range(2) if "checksum" in errors[r])
    assert "data/c/2/0/0/0" in errors[reader]
    assert (f"stopped with rank {reader}, which could not hold or read its shards of the "
            "train split") in errors[1 - reader]


def test_a_rank_that_cannot_hold_the_split_fails_every_rank(tiny_store: Path,
                                                            tmp_path: Path) -> None:
    read_split_in_two_ranks(tiny_store, tmp_path, too_large_on=1)
    assert "does not fit in the memory of cpu" in (tmp_path / "rank-1.error").read_text()
    assert "stopped with rank 1, which could not hold or read its shards" in \
        (tmp_path / "rank-0.error").read_text()


def test_resident_split_that_does_not_fit_is_a_config_error(tiny_store: Path) -> None:
    """A split far larger than memory (its samples made to span 10^9 steps, about 18
    TiB): the allocation fails at once, with the size and the fix."""
    ds = ForecastDataset(StoreInfo(tiny_store), "val", 1, 1)
    ds.times = np.array([0, 10**9])
    with pytest.raises(ConfigError, match=r"the val split \(\d+\.\d GiB\) does not fit in the "
                       r"memory of cpu") as err:
        ResidentSplit(ds, torch.device("cpu"))
    assert "train.resident: false" in str(err.value)


def gpu_case(tiny_store: Path) -> tuple[ForecastDataset, BlockShuffleSampler, list[dict]]:
    """A dataset, a sampler and the DataLoader's batches for the CUDA tests, then about a
    second of GPU work queued ahead of everything that follows: copies run long after
    the loop has asked for the next batches, so a buffer refilled too early would show."""
    ds = ForecastDataset(StoreInfo(tiny_store), "train", history=2, lead=1, rollout=2)
    sampler = BlockShuffleSampler(len(ds), 4, seed=2)
    expected = list(DataLoader(ds, batch_size=4, sampler=sampler, drop_last=True))
    torch.cuda._sleep(2_000_000_000)
    return ds, sampler, expected


def assert_same_batches(expected: list[dict], got: list[dict]) -> None:
    torch.cuda.synchronize()
    assert len(got) == len(expected)
    for want, batch in zip(expected, got, strict=True):
        for key in want:
            assert torch.equal(batch[key].cpu(), want[key]), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("readers", ["threads", "processes"])
def test_batches_assembled_on_the_gpu_equal_the_dataloader_batches(tiny_store: Path,
                                                                   readers: str) -> None:
    """The device path on CUDA: copies on a side stream, buffers refilled while earlier
    copies may still be queued behind GPU work, batches on the GPU."""
    ds, sampler, expected = gpu_case(tiny_store)
    got = []
    with BatchLoader(ds, sampler, 4, workers=2, prefetch=2, device=torch.device("cuda"),
                     readers=readers) as loader:
        assert loader.on_device
        for batch in loader:
            assert all(t.device.type == "cuda" for t in batch.values())
            got.append({k: v.clone() for k, v in batch.items()})
    assert_same_batches(expected, got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("readers", ["threads", "processes"])
def test_batch_buffers_outlive_the_asynchronous_copy(tiny_store: Path, readers: str) -> None:
    cuda = torch.device("cuda")
    ds, sampler, expected = gpu_case(tiny_store)
    copies = []
    with BatchLoader(ds, sampler, 4, workers=2, prefetch=2, device=cuda, on_device=False,
                     readers=readers) as loader:
        for batch in loader:
            assert all(t.is_pinned() for t in batch.values())
            copies.append({k: v.to(cuda, non_blocking=True) for k, v in batch.items()})
    assert_same_batches(expected, copies)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resident_split_on_the_gpu_yields_the_dataloader_batches(tiny_store: Path) -> None:
    """Normalised on the GPU, batches gathered there: bitwise the DataLoader's; and
    ``auto`` keeps so small a split there."""
    ds, sampler, expected = gpu_case(tiny_store)
    cuda = torch.device("cuda")
    assert fits_on(cuda, resident_bytes(ds))
    got = []
    for batch in ResidentLoader(ResidentSplit(ds, cuda, readers=2), sampler, 4):
        assert all(t.device.type == "cuda" for t in batch.values())
        got.append({k: v.clone() for k, v in batch.items()})
    assert_same_batches(expected, got)


@pytest.mark.parametrize("readers", ["threads", "processes"])
def test_a_reader_error_surfaces_with_its_message(tiny_store: Path, tmp_path: Path,
                                                  readers: str) -> None:
    ds = ForecastDataset(StoreInfo(corrupt_shard(tiny_store, tmp_path)), "train", 1, 1)
    sampler = BlockShuffleSampler(len(ds), 4, seed=0)
    order = list(sampler)
    first_bad = next(k for k, i in enumerate(order) if 31 <= ds.times[i] <= 47)
    with pytest.raises(ValueError) as direct:
        ds[order[first_bad]]
    assert "checksum" in str(direct.value)
    seen, children = 0, set(mp.active_children())
    with (BatchLoader(ds, sampler, 4, workers=2, prefetch=2, readers=readers) as loader,
          pytest.raises(ValueError) as err):
        for _ in loader:
            seen += 1
    assert type(err.value) is type(direct.value) and str(err.value) == str(direct.value)
    assert seen == first_bad // 4  # every batch before the broken one arrived
    assert loader_threads() == []
    assert set(mp.active_children()) <= children  # the reader processes have ended


@pytest.mark.parametrize("readers", ["threads", "processes"])
def test_readers_end_on_close(tiny_store: Path, readers: str) -> None:
    ds = ForecastDataset(StoreInfo(tiny_store), "train", 1, 1)
    children = set(mp.active_children())
    loader = BatchLoader(ds, BlockShuffleSampler(len(ds), 4), 4, workers=3, prefetch=3,
                         readers=readers)
    next(iter(loader))  # leaves reads in flight
    if readers == "threads":
        assert loader_threads()
    else:
        assert len(set(mp.active_children()) - children) == 3
    loader.close()
    assert loader_threads() == []
    assert set(mp.active_children()) <= children
    loader.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        iter(loader)


def test_plain_loop_trains_bitwise_alike_with_every_loader(tiny_store: Path,
                                                          tmp_path: Path) -> None:
    weights = {}
    backends = ("threads", "processes", "resident")
    for backend in backends:
        # batch 16: 11 batches per epoch, so 14 steps cross an epoch boundary; the threads
        # and resident runs also stop at step 6 and resume mid-epoch
        resident = backend == "resident"
        cfg = config_from_dict(train_config(
            tiny_store, tmp_path / backend, max_steps=14, batch_size=16, val_every=14,
            checkpoint_every=14, loader="threads" if resident else backend, loader_workers=2,
            resident=resident))
        if backend in ("threads", "resident"):
            train_loop(cfg, local_runtime(cfg), stop_at=6)
            assert checkpoint.list_steps(cfg.run_dir() / "checkpoints")[0].name.endswith("06")
        train_loop(cfg, local_runtime(cfg))
        weights[backend] = checkpoint.load(checkpoint.list_steps(
            cfg.run_dir() / "checkpoints")[0])[0]["model"]
    for backend in backends[1:]:
        assert weights[backend].keys() == weights["threads"].keys()
        for name in weights["threads"]:
            assert torch.equal(weights[backend][name], weights["threads"][name]), (backend, name)
    assert loader_threads() == []


def test_training_error_in_a_reader_stops_the_threads(tiny_store: Path, tmp_path: Path) -> None:
    store = corrupt_shard(tiny_store, tmp_path)
    cfg = config_from_dict(train_config(store, tmp_path, max_steps=30, loader="threads",
                                        loader_workers=2))
    with pytest.raises(ValueError, match="checksum"):
        train_loop(cfg, local_runtime(cfg))
    assert loader_threads() == []

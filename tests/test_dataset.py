"""The torch Dataset and the sampler over a finished store (pipeline/data/dataset.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from torch.utils.data import DataLoader

from pipeline.data.dataset import ForecastDataset, consecutive_runs, sample_times
from pipeline.data.sampler import BlockShuffleSampler
from pipeline.data.store import StoreInfo
from pipeline.errors import ConfigError, StoreError

pytestmark = pytest.mark.integration


def test_sample_is_the_normalised_store_window(tiny_store: Path) -> None:
    info = StoreInfo(tiny_store)
    ds = ForecastDataset(info, "train", history=2, lead=2, rollout=3)
    raw = xr.open_zarr(tiny_store)
    sample = ds[5]
    t = int(sample["index"])
    assert t == ds.times[5] and t >= 1
    mean, std = info.normalisation()
    norm = lambda x: (x - mean[:, None, None]) / std[:, None, None]  # noqa: E731
    data = raw["data"].values
    np.testing.assert_allclose(sample["inputs"].numpy(), norm(data[t - 1:t + 1]), rtol=1e-6)
    targets = norm(data[[t + 2, t + 4, t + 6]])
    outputs = [i for i, r in enumerate(raw["channel_role"].values) if r in ("prognostic", "derived")]
    forcings = [i for i, r in enumerate(raw["channel_role"].values) if r == "forcing"]
    np.testing.assert_allclose(sample["targets"].numpy(), targets[:, outputs], rtol=1e-6)
    np.testing.assert_allclose(sample["target_forcings"].numpy(), targets[:, forcings], rtol=1e-6)
    assert sample["inputs"].dtype == torch.float32


def test_samples_stay_inside_their_split(tiny_store: Path) -> None:
    info = StoreInfo(tiny_store)
    first, last = info.split_range("val")
    ds = ForecastDataset(info, "val", history=3, lead=1, rollout=2)
    assert ds.times.min() - 2 == first and ds.times.max() + 2 == last
    np.testing.assert_array_equal(sample_times(0, 9, 2, 3, 2), np.arange(1, 4))
    with pytest.raises(ConfigError, match="too short"):
        ForecastDataset(info, "val", history=200, lead=1)


def test_incomplete_store_is_refused(tiny_store: Path, tmp_path: Path) -> None:

    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    zarr.open_group(str(copy), mode="r+").attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        StoreInfo(copy)


def test_sampler_equal_batches_disjoint_ranks_and_block_locality() -> None:
    n, batch, block = 103, 4, 8
    ranks = [BlockShuffleSampler(n, batch, num_replicas=3, rank=r, block=block, seed=1)
             for r in range(3)]
    orders = [list(s) for s in ranks]
    assert {len(o) for o in orders} == {(n // (3 * batch)) * batch}
    flat = [i for o in orders for i in o]
    assert len(flat) == len(set(flat))  # disjoint
    runs = sum(1 for a, b in zip(flat, flat[1:], strict=False) if b != a + 1)
    assert runs <= len(flat) // block + 3  # consecutive within blocks
    again = BlockShuffleSampler(n, batch, num_replicas=3, rank=0, block=block, seed=1)
    assert list(again) == orders[0]
    again.set_epoch(1)
    assert list(again) != orders[0]


def test_sampler_resumes_mid_epoch() -> None:
    sampler = BlockShuffleSampler(64, 4, block=8, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_batch=5)
    assert list(sampler) == full[20:] and len(sampler) == len(full) - 20
    with pytest.raises(ConfigError, match="cannot fill one batch"):
        BlockShuffleSampler(5, 4, num_replicas=2)


def test_loader_workers_read_the_same_samples(tiny_store: Path) -> None:

    info = StoreInfo(tiny_store)
    ds = ForecastDataset(info, "train", history=1, lead=1)
    sampler = BlockShuffleSampler(len(ds), 4, seed=0)
    direct = [ds[i]["index"].item() for i in list(sampler)[:8]]
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, persistent_workers=True,
                        prefetch_factor=2)
    got = [int(x) for batch, _ in zip(loader, range(2), strict=False) for x in batch["index"]]
    assert got == direct


def test_consecutive_runs_split_at_gaps_and_at_the_longest() -> None:
    times = np.array([5, 6, 7, 8, 9, 20, 21, 3, 40])
    runs = consecutive_runs(times, longest=3)
    assert [(r.start, r.stop) for r in runs] == [(0, 3), (3, 5), (5, 7), (7, 8), (8, 9)]
    assert consecutive_runs(np.array([], dtype=int), 3) == []


@pytest.mark.parametrize("lead", [1, 3])
def test_runs_read_once_give_the_samples_read_one_by_one(tiny_store: Path, lead: int) -> None:
    """A batch with runs of consecutive samples (read as one block each), a gap and a
    lone sample: bitwise the samples read alone, in the batch's order (lead 3: a lone
    sample's block holds steps that no sample uses, and that are left unnormalised)."""
    ds = ForecastDataset(StoreInfo(tiny_store), "train", history=2, lead=lead, rollout=2)
    batch = [10, 11, 12, 13, 30, 3, 4, 50]
    together = ds.__getitems__(batch)
    for i, got in zip(batch, together, strict=True):
        alone = ds[i]
        assert int(got["index"]) == int(ds.times[i])
        for key in alone:
            assert torch.equal(got[key], alone[key]), (i, key)
    arrays = [np.empty((2, *shape), np.float32) for shape in ds.sample_shapes.values()]
    with pytest.raises(ValueError, match="consecutive"):
        ds.read_run_into([10, 12], *arrays)


def test_read_into_handles_channels_that_are_not_consecutive(tiny_store: Path) -> None:
    ds = ForecastDataset(StoreInfo(tiny_store), "train", history=2, lead=1, rollout=2)
    assert isinstance(ds._outputs, slice)  # this store's outputs are consecutive
    expected = ds[7]
    ds._outputs = np.asarray(ds.layout.outputs)  # the index-array path, same channels
    got = ds[7]
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_runs_bitwise_alike_through_zarr_into_strided_arrays_and_channel_lists(
        tiny_store: Path) -> None:
    """A run's steps are decoded into the samples' own inputs where they can be
    (ShardFiles), else into the reused block (through zarr, or into inputs that are not
    contiguous), with consecutive or listed target channels: bitwise the samples alone."""
    ds = ForecastDataset(StoreInfo(tiny_store), "train", history=2, lead=1, rollout=2)
    run = [20, 21, 22, 23, 24]
    alone = [ds[i] for i in run]

    def read(strided: bool) -> dict[str, np.ndarray]:
        arrays = {k: np.full((len(run), *shape), 7.0, np.float32)
                  for k, shape in ds.sample_shapes.items()}
        if strided:  # every other lon of a buffer twice as wide
            wide = np.full((len(run), *ds.sample_shapes["inputs"][:-1],
                            2 * ds.sample_shapes["inputs"][-1]), 7.0, np.float32)
            arrays["inputs"] = wide[..., ::2]
        ds.read_run_into(run, arrays["inputs"], arrays["target_forcings"], arrays["targets"],
                         arrays.get("target_masks"))
        return arrays

    def check(arrays: dict[str, np.ndarray], how: str) -> None:
        for j, sample in enumerate(alone):
            for key, array in arrays.items():
                assert torch.equal(torch.from_numpy(np.ascontiguousarray(array[j])),
                                   sample[key]), (how, run[j], key)

    assert ds._steps is not None  # the store's shards, decoded by ShardFiles
    check(read(strided=False), "shards")
    check(read(strided=True), "shards, strided inputs")
    ds._outputs = np.asarray(ds.layout.outputs)  # the index-array path, same channels
    check(read(strided=False), "channel list")
    ds._steps = None  # what any other layout reads through: zarr
    check(read(strided=False), "zarr")

"""Training samples straight from the Zarr store: a torch Dataset and a sampler.

A sample is ``history`` consecutive input steps ending at time index ``t`` (all
channels), the forcing channels at each target time, and the predicted channels
(prognostic and derived) at ``t + lead * k`` for ``k = 1 .. rollout``, all normalised
with the store's statistics. Reads go through zarr directly, one call per sample for
the contiguous range of steps it needs (each step is one chunk): no dask and no xarray
on the hot path. The store is opened lazily in each process, so DataLoader workers
(forked or spawned) each get their own handle.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
import xarray as xr
import zarr
from torch.utils.data import Dataset, Sampler

from pipeline.data import store
from pipeline.data.sources import within
from pipeline.errors import ConfigError, StoreError

OUTPUT_ROLES = ("prognostic", "derived")


@dataclass(frozen=True)
class Layout:
    """Which stored channels are predicted, which are forcings, which are masks."""

    channels: tuple[str, ...]
    outputs: tuple[int, ...]  # predicted: prognostic and derived
    forcings: tuple[int, ...]
    masks: tuple[int, ...]

    @classmethod
    def from_roles(cls, channels: list[str], roles: list[str]) -> Layout:
        pick = lambda wanted: tuple(i for i, r in enumerate(roles) if r in wanted)  # noqa: E731
        return cls(tuple(channels), pick(OUTPUT_ROLES), pick(("forcing",)), pick(("mask",)))

    @property
    def output_names(self) -> list[str]:
        return [self.channels[i] for i in self.outputs]


class StoreInfo:
    """What training needs to know about a complete store, read once (small arrays)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.path.abspath(path)
        group = store.open_complete(self.path)
        self.attrs = group.attrs.asdict()
        channels = store.channel_names(group)
        self.layout = Layout.from_roles(channels, [str(r) for r in group["channel_role"][:]])
        self.n_time = int(group["data"].shape[0])
        self.lat = np.asarray(group["lat"][:], dtype=np.float64)
        self.lon = np.asarray(group["lon"][:], dtype=np.float64)
        self.area_weight = np.asarray(group["area_weight"][:], dtype=np.float64)
        self.stats = store.statistics(group)
        self.static = np.asarray(group["static"][:], dtype=np.float32)
        self.static_mean = np.asarray(group["static_mean"][:], dtype=np.float64)
        self.static_std = np.asarray(group["static_std"][:], dtype=np.float64)

    @property
    def dataset_version(self) -> int:
        return int(self.attrs["dataset_version"])

    @property
    def periodic_lon(self) -> bool:
        """True for global grids: the longitudes cover the whole circle evenly."""
        if self.lon.size < 2:
            return False
        step = np.diff(self.lon)
        return bool(np.allclose(step, step[0]) and abs(step[0] * self.lon.size - 360.0) < 1e-6)

    @cached_property
    def times(self) -> Any:
        return xr.open_zarr(self.path, consolidated=True)["time"].to_index()

    def split_range(self, split: str) -> tuple[int, int]:
        """Inclusive index range of a split (train, val or test) on the time axis."""
        start, end = self.attrs["splits"][split]
        mask = within(self.times, start, end)
        if not mask.any():
            raise StoreError(f"split '{split}' [{start}, {end}] has no time steps in {self.path}",
                             "check data.splits, or append the data it needs")
        idx = np.flatnonzero(mask)
        return int(idx[0]), int(idx[-1])

    def normalisation(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (mean, std) as float32; constant channels get std 1."""
        std = np.where(self.stats["std"] > 1e-12, self.stats["std"], 1.0)
        return self.stats["mean"].astype(np.float32), std.astype(np.float32)

    def tendency_scale(self) -> np.ndarray:
        """diff_std / std of the predicted channels: the size of a normalised one-step change."""
        _, std = self.normalisation()
        diff = np.where(self.stats["diff_std"] > 1e-12, self.stats["diff_std"], std)
        return (diff / std)[list(self.layout.outputs)].astype(np.float32)

    def normalised_static(self) -> np.ndarray:
        std = np.where(self.static_std > 1e-12, self.static_std, 1.0)
        return ((self.static - self.static_mean[:, None, None]) / std[:, None, None]).astype(np.float32)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records of the store it was trained on."""
        return {"path": self.path, "data_hash": self.attrs["data_hash"],
                "dataset_version": self.dataset_version, "channels": list(self.layout.channels),
                "mean": self.stats["mean"].tolist(), "std": self.stats["std"].tolist()}


def sample_times(first: int, last: int, history: int, lead: int, rollout: int) -> np.ndarray:
    """Indices t of the last input step such that inputs and targets lie in [first, last]."""
    lo = first + history - 1
    hi = last - lead * rollout
    return np.arange(lo, hi + 1) if hi >= lo else np.arange(0)


class ForecastDataset(Dataset):
    """Normalised (inputs, target forcings, targets) samples of one split of a store."""

    def __init__(self, info: StoreInfo, split: str, history: int, lead: int, rollout: int = 1):
        if history < 1 or lead < 1 or rollout < 1:
            raise ConfigError("train.history, train.lead and train.rollout must be >= 1",
                              "fix the train section")
        self.path = info.path
        self.layout = info.layout
        self.history, self.lead, self.rollout = history, lead, rollout
        first, last = info.split_range(split)
        self.times = sample_times(first, last, history, lead, rollout)
        if self.times.size == 0:
            raise ConfigError(f"split '{split}' is too short for history={history}, lead={lead}, "
                              f"rollout={rollout}", "shorten them or widen the split")
        mean, std = info.normalisation()
        self._mean, self._inv_std = mean[:, None, None], (1.0 / std)[:, None, None]
        self._outputs = np.asarray(self.layout.outputs)
        self._forcings = np.asarray(self.layout.forcings, dtype=np.int64)
        self._array: zarr.Array | None = None
        self._pid = -1

    def __len__(self) -> int:
        return int(self.times.size)

    def _data(self) -> zarr.Array:
        if self._array is None or self._pid != os.getpid():  # reopen after a fork
            self._array = zarr.open_array(self.path, path="data", mode="r")
            self._pid = os.getpid()
        return self._array

    def read_steps(self, t: int) -> np.ndarray:
        """The normalised steps ``t - history + 1 .. t + lead * rollout`` in one read."""
        block = self._data()[t - self.history + 1: t + self.lead * self.rollout + 1]
        block -= self._mean  # in place: the read returned a fresh array
        block *= self._inv_std
        return block

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = int(self.times[i])
        block = self.read_steps(t)
        h = self.history
        targets = block[h - 1 + self.lead:: self.lead][: self.rollout]
        return {
            "inputs": torch.from_numpy(block[:h]),  # a contiguous view: no copy
            "target_forcings": torch.from_numpy(np.ascontiguousarray(targets[:, self._forcings])),
            "targets": torch.from_numpy(np.ascontiguousarray(targets[:, self._outputs])),
            "index": torch.tensor(t),
        }


class BlockShuffleSampler(Sampler[int]):
    """Shuffles blocks of consecutive samples (reads stay within nearby shards), gives
    every rank the same number of whole batches, and can start mid-epoch.

    The order depends only on (seed, epoch), so a resumed run sees the same batches.
    Each rank takes a contiguous share of the shuffled order.
    """

    def __init__(self, n: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 block: int = 8, seed: int = 0, shuffle: bool = True):
        self.n, self.batch_size, self.block = n, batch_size, block
        self.num_replicas, self.rank = num_replicas, rank
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = n // (num_replicas * batch_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(f"{n} samples cannot fill one batch of {batch_size} on each of "
                              f"{num_replicas} workers", "lower train.batch_size or train.workers")
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's order and skip the batches already consumed in it."""
        self.epoch, self.start_batch = epoch, start_batch

    def order(self) -> np.ndarray:
        """This rank's sample indices for the whole current epoch."""
        idx = np.arange(self.n)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            blocks = [idx[i:i + self.block] for i in range(0, self.n, self.block)]
            idx = np.concatenate([blocks[j] for j in rng.permutation(len(blocks))])
        per_rank = self.batches_per_epoch * self.batch_size
        return idx[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start_batch * self.batch_size:].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

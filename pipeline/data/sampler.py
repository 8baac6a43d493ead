"""The order of the training samples: blocks of consecutive samples shuffled, an equal
share of whole batches per rank, resumable mid-epoch (:class:`BlockShuffleSampler`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from pipeline.errors import ConfigError


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

"""How training batches reach the step: one small interface, two backends, one factory.

Every backend is a :class:`BatchSource`: it iterates the batches of one epoch in the
sampler's order (``dict`` of tensors, each valid until the next batch is asked for),
has a length (batches per epoch, equal on every rank), and is closed once. The resume
state is the sampler's (``BlockShuffleSampler.set_epoch(epoch, start_batch)``), which
every backend draws from, so a run resumes bitwise whichever backend it uses.

The backends, each kept because a measurement in ``docs/benchmarks.md`` shows a user
gains from it:
- ``batches.BatchLoader``: streaming from the store's shards by reader processes
  (``train.loader: processes``, the default: the fastest in training, 1.23x threads on
  the H100) or threads (``threads``: the fastest loader alone, 320 against 276
  samples/s on the H100, with no processes to start), into reused (pinned) buffers;
- ``resident.ResidentLoader``: the split kept in the device's memory and batches
  gathered there (``train.resident``; 417 samples/s on the large store against 201
  streaming, on 2 cores).
torch's DataLoader, slower than the reader processes in every measurement (3.8-4.2x on
2 cores, 4x on the H100), is a baseline of ``bench/loader.py`` only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from pipeline.data.dataset import ForecastDataset
from pipeline.data.loading.batches import BatchLoader
from pipeline.data.loading.resident import ResidentLoader, ResidentSplit, fits_on, resident_bytes
from pipeline.data.sampler import BlockShuffleSampler
from pipeline.plan import ExecutionPlan

log = logging.getLogger(__name__)


class BatchSource(Protocol):
    """What the training loop reads batches from (see the module docstring)."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...


@dataclass
class Loaders:
    """The training batches, and the validation split when it is kept in memory too."""

    train: BatchSource
    val_split: ResidentSplit | None


def keeps_resident(plan: ExecutionPlan, device: torch.device, datasets: list[ForecastDataset],
                   on_every_rank: Callable[[bool], bool]) -> bool:
    """Whether the splits are kept in the device's memory, as the plan says; ``if_fits``
    (train.resident auto on a GPU) measures the device, and decides for all ranks or
    none (``on_every_rank``, a collective): the ranks read the splits together, and one
    GPU may have less memory free than the others."""
    if plan.resident != "if_fits":
        return bool(plan.resident)
    return on_every_rank(fits_on(device, sum(resident_bytes(d) for d in datasets)))


def open_loaders(plan: ExecutionPlan, train_set: ForecastDataset, val_set: ForecastDataset,
                 sampler: BlockShuffleSampler, batch_size: int, prefetch: int,
                 assemble_on_device: bool, device: torch.device, rank: int, world_size: int,
                 on_every_rank: Callable[[bool], bool]) -> Loaders:
    """The backend the plan chooses: the splits in memory (each rank reading every
    ``world_size``-th shard of them, then all by broadcasts), or streaming readers."""
    readers = plan.loader_workers
    if keeps_resident(plan, device, [train_set, val_set], on_every_rank):
        split = ResidentSplit(train_set, device, readers, rank, world_size)
        val_split = ResidentSplit(val_set, device, readers, rank, world_size)
        if rank == 0:
            log.info("train and val splits kept in %s memory: %d + %d steps, %.2f GiB, "
                     "read in %.1f s (%d of their shards by this rank)", device,
                     split.steps.shape[0], val_split.steps.shape[0],
                     (split.nbytes + val_split.nbytes) / 2**30,
                     split.load_seconds + val_split.load_seconds,
                     split.shards_read + val_split.shards_read)
        return Loaders(ResidentLoader(split, sampler, batch_size), val_split)
    on_gpu = assemble_on_device and device.type == "cuda"
    return Loaders(BatchLoader(train_set, sampler, batch_size, readers, prefetch, device,
                               on_gpu, readers=plan.loader), None)

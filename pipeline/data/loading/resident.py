"""The training split kept whole in the training device's memory, batches made from it
by indexing: the loader for stores whose split fits (``train.resident``).

Every epoch reads and decompresses the same steps again through the streaming loaders
(``pipeline.data.loading.batches``), and on a GPU that bounds training: the readers deliver
fewer samples per second than the GPU consumes (docs/benchmarks.md). A 1.5-degree
store with 61 channels is 7 MB per step, 10 GB per year of 6-hourly steps: a few years
fit beside the model on an 80 GB GPU. ``ResidentSplit`` reads the steps that the split's
samples use once, normalises them on the device, and keeps them there; a batch is then
three gathers on the device (inputs, target forcings, targets), with no host work but
the index arithmetic. The batches are bitwise those of the other loaders (the same
float32 normalisation, tested).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from pipeline.data.dataset import ForecastDataset
from pipeline.errors import ConfigError, PipelineError, RanksStopped

# ``train.resident: auto`` keeps a split on a GPU when it takes at most this share of the
# GPU's free memory: the rest is for the model, its activations and the optimiser
GPU_SHARE = 0.5


def resident_bytes(dataset: ForecastDataset) -> int:
    """Bytes that :class:`ResidentSplit` holds for ``dataset``: every step its samples use."""
    return int(np.prod(_steps_shape(dataset))) * 4


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether ``train.resident: auto`` keeps ``nbytes`` on ``device``: on a GPU when they
    take at most ``GPU_SHARE`` of its free memory. Never on the CPU: there the split would
    be copied into every rank's process on the node, the page cache already holds the
    store, and the reader processes overlap their reads with the step."""
    if device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= GPU_SHARE * free


def _first_step(dataset: ForecastDataset) -> int:
    """Time index of the first step the split's samples use."""
    return int(dataset.times[0]) - dataset.history + 1


def _steps_shape(dataset: ForecastDataset) -> tuple[int, ...]:
    """(steps, channel, lat, lon): every step from the first the split's samples use to
    the last."""
    last = int(dataset.times[-1]) + dataset.lead * dataset.rollout
    return (last - _first_step(dataset) + 1, *dataset.sample_shapes["inputs"][1:])


class ResidentSplit:
    """The normalised steps of a split on ``device``, and batches gathered from them.

    The steps are read a shard at a time by ``readers`` threads (decompression releases
    the GIL) with at most ``2 * readers`` shards in host memory at once, copied to the
    device and normalised there.

    With ``world_size > 1`` (``torch.distributed`` initialised, its default group on the
    ranks' devices: NCCL on GPUs, gloo on the CPU) every rank needs every step, since
    the sampler deals each rank samples from the whole split; so each rank reads every
    ``world_size``-th shard and broadcasts it to the others. The file system serves
    the split once, not once per rank (8 GPUs a node would otherwise read it 8 times),
    and the ranks' reads run side by side.
    """

    def __init__(self, dataset: ForecastDataset, device: torch.device, readers: int = 1,
                 rank: int = 0, world_size: int = 1):
        self.dataset, self.device = dataset, device
        self.first = _first_step(dataset)
        try:
            self.steps = torch.empty(_steps_shape(dataset), dtype=torch.float32, device=device)
        except RuntimeError:  # torch.cuda.OutOfMemoryError, or the CPU allocator's error
            error = ConfigError(f"the {dataset.split} split ({resident_bytes(dataset) / 2**30:.1f} "
                                f"GiB) does not fit in the memory of {device}",
                                "set train.resident: false to stream it")
            if world_size > 1:  # the others must not wait for this rank
                raise RanksStopped(error, self._failed_ranks(True, rank, world_size)) from None
            raise error from None
        started = time.perf_counter()
        self.shards_read = 0  # by this rank
        self._load(max(1, readers), rank, world_size)
        self.load_seconds = time.perf_counter() - started
        self._history = torch.arange(dataset.history, device=device) - (dataset.history - 1)
        self._leads = dataset.lead * torch.arange(1, dataset.rollout + 1, device=device)
        self._sample_rows = torch.from_numpy(dataset.times - self.first).to(device)
        self._out: dict[str, torch.Tensor] = {}  # the batch buffers, reused (see batch)

    def release(self) -> None:
        """Free the memory the steps and the batch buffers hold."""
        self.steps, self._out = torch.empty(0), {}

    @property
    def nbytes(self) -> int:
        return self.steps.numel() * self.steps.element_size()

    def _span_rows(self, span: tuple[int, int]) -> torch.Tensor:
        """The steps of the time indices ``[lo, hi)``: a view of ``self.steps``."""
        return self.steps[span[0] - self.first:span[1] - self.first]

    def _spans(self) -> list[tuple[int, int]]:
        """The steps' time indices ``[lo, hi)`` cut at the shard files' bounds."""
        ds, n = self.dataset, self.steps.shape[0]
        per_shard = ds.steps_per_shard  # also opens the store here, for the readers to share
        bounds, t = [], self.first
        while t < self.first + n:
            end = min(self.first + n, (t // per_shard + 1) * per_shard)
            bounds.append((t, end))
            t = end
        return bounds

    def _load(self, readers: int, rank: int, world_size: int) -> None:
        """Read the shards, or (several ranks) this rank's share of them and then all of
        them by broadcasts."""
        spans = self._spans()
        if world_size == 1:
            self._read(spans, readers)
            return
        try:
            self._read(spans[rank::world_size], readers)
        except Exception as err:
            failed = self._failed_ranks(True, rank, world_size)  # the others must not wait
            if isinstance(err, PipelineError):
                raise RanksStopped(err, failed) from err
            raise
        failed = self._failed_ranks(False, rank, world_size)
        if failed:
            raise RanksStopped(None, failed, f"could not hold or read its shards of the "
                                             f"{self.dataset.split} split")
        for k, span in enumerate(spans):
            dist.broadcast(self._span_rows(span), src=k % world_size)

    def _failed_ranks(self, failed: bool, rank: int, world_size: int) -> list[int]:
        """The ranks that failed to allocate the split or read its shards: a collective
        that every rank calls once, before the broadcasts."""
        flags = torch.zeros(world_size, device=self.device)
        flags[rank] = float(failed)
        dist.all_reduce(flags)
        return [k for k, flag in enumerate(flags.tolist()) if flag]

    def _read(self, bounds: list[tuple[int, int]], readers: int) -> None:
        """Read the spans ``bounds`` into place, ``readers`` reads at once."""
        ds = self.dataset
        host = self.steps.numpy() if self.device.type == "cpu" else None  # read in place

        def read(span: tuple[int, int]) -> tuple[tuple[int, int], np.ndarray]:
            lo, hi = span
            out = host[lo - self.first:hi - self.first] if host is not None else \
                np.empty((hi - lo, *self.steps.shape[1:]), dtype=np.float32)
            ds.read_steps_into(lo, out)
            return span, out

        with ThreadPoolExecutor(readers, thread_name_prefix="pipeline-resident") as pool:
            queued: deque[Future[tuple[tuple[int, int], np.ndarray]]] = deque()
            for span in bounds:
                queued.append(pool.submit(read, span))
                if len(queued) >= 2 * readers:
                    self._place(*queued.popleft().result())
            while queued:
                self._place(*queued.popleft().result())

    def _place(self, span: tuple[int, int], values: np.ndarray) -> None:
        """Put a span's raw steps in place (on the CPU they were read there) and
        normalise them."""
        rows = self._span_rows(span)
        if self.device.type != "cpu":
            rows.copy_(torch.from_numpy(values))
        self.dataset.normalise_(rows)
        self.shards_read += 1

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The samples ``indices`` (positions in the dataset, on the device) and their time
        indices (``index``), as the other loaders give them, in buffers that the next
        batch reuses: like the batch loader's, a batch is valid until the next is made
        (on a GPU the next gather is queued behind the step that reads this one). Fresh
        100 MB tensors on the CPU cost several times their copy in page faults."""
        rows = self._sample_rows.index_select(0, indices)
        inputs_at = rows[:, None] + self._history
        targets_at = rows[:, None] + self._leads
        if not self._out or self._out["inputs"].shape[0] != indices.shape[0]:
            self._out = {k: torch.empty((indices.shape[0], *shape), device=self.device)
                         for k, shape in self.dataset.sample_shapes.items()}
        batch = self.dataset.gather(self.steps, inputs_at, targets_at, out=dict(self._out))
        batch["index"] = rows + self.first
        return batch


class ResidentLoader:
    """Batches of a :class:`ResidentSplit` in the sampler's order (the other loaders'
    batches, bitwise), each valid until the next is asked for: an iterable with ``len``
    like ``BatchLoader``."""

    def __init__(self, split: ResidentSplit, sampler: Sampler[int], batch_size: int):
        self.split, self.sampler, self.batch_size = split, sampler, batch_size

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        n = order.size // self.batch_size  # drop_last, like the other loaders
        batches = torch.from_numpy(order[: n * self.batch_size].reshape(n, self.batch_size))
        batches = batches.to(self.split.device)
        for batch in batches:
            yield self.split.batch(batch)

    def close(self) -> None:
        """Free the device memory the split holds."""
        self.split.release()

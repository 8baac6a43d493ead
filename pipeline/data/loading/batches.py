"""Training batches read by a pool of reader threads or processes into a ring of reused
buffers: the streaming backend of ``pipeline.data.loading`` (see ``BatchLoader``)."""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal

import numcodecs
import numpy as np
import torch
from torch.utils.data import Sampler

from pipeline.data.dataset import RUN_LENGTH, ForecastDataset, consecutive_runs
from pipeline.errors import ConfigError

THREAD_PREFIX = "pipeline-loader"  # names of the reader threads
Readers = Literal["threads", "processes"]


class BatchLoader:
    """Batches read by reader threads or processes into a ring of reused buffers.

    Each run of consecutive samples of a batch (up to ``RUN_LENGTH``) is one task that
    writes straight into a preallocated batch buffer (pinned when the device is CUDA):
    no per-batch allocation, pickling or collation as with the DataLoader. ``prefetch``
    batches are in flight while the consumer holds one, so the ring has ``prefetch +
    1`` buffers, allocated once. Batches come in the sampler's order, the same batches
    as ``DataLoader(dataset, batch_size, sampler=sampler, drop_last=True)``, bitwise.

    Readers (``readers``):
    - ``threads`` in this process. Decompression and numpy release the GIL, but each
      read also runs Python between those calls, which must take the GIL back; beside
      a training thread busy launching kernels, that wait bounded them (zarr's reads,
      H100: docs/benchmarks.md).
    - ``processes``: spawned reader processes, each with its own GIL, writing into the
      buffers in shared memory (registered with CUDA as pinned memory on a GPU).

    Where the samples are made (``on_device``; by default on the device when it is CUDA):
    - on the host: each task normalises its run's steps and copies them into its
      samples' rows of the buffer (``ForecastDataset.read_run_into``). A yielded batch
      is that buffer, valid until the consumer asks for the next one; the consumer
      moves it to the device.
    - on the device: each task only reads its run's raw steps into the buffer
      (``read_raw_run_into``). The consumer's thread copies the batch's steps to the
      device and normalises and gathers the samples there (``ForecastDataset.assemble``):
      a run of 8 samples with history 1 is 9 steps where its samples hold 16, so the
      host-to-device traffic halves and the CPU does nothing but decompress. On CUDA the
      copy runs on a side stream, and the next batch's copy starts as soon as its reads
      are done, so it overlaps the current step. Yielded tensors are the device's own.

    On CUDA a buffer is refilled only after the copies out of it have completed: reader
    threads wait for a CUDA event recorded after them; for reader processes, the
    consumer hands the buffer out again only once that event has passed. An error in a
    reader is raised in the consumer with its original type and message. ``close()``
    (or the ``with`` block) stops and joins the readers; a new iteration ends the last.
    """

    def __init__(self, dataset: ForecastDataset, sampler: Sampler[int], batch_size: int,
                 workers: int, prefetch: int = 2, device: torch.device | None = None,
                 on_device: bool | None = None, readers: Readers = "threads"):
        if workers < 0 or prefetch < 1 or batch_size < 1:
            raise ConfigError(f"batch loader needs workers >= 0, prefetch >= 1 and "
                              f"batch_size >= 1, got {workers}, {prefetch}, {batch_size}",
                              "fix train.loader_workers, train.prefetch_factor or train.batch_size")
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.device = device or torch.device("cpu")
        self._cuda = self.device.type == "cuda"
        self.on_device = self._cuda if on_device is None else on_device
        self.readers: Readers = readers if workers > 0 else "threads"
        # the device path's copies to a CUDA device run on their own stream
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda and self.on_device else None
        # without readers a batch is read when asked for: nothing to prefetch
        slots = prefetch + 1 if workers > 0 else 1
        self._tensors = [self._allocate() for _ in range(slots)]
        self._registered: list[int] = []  # shared buffers registered with CUDA (processes)
        if self.readers == "processes":
            self._share_buffers()
        self._arrays = [{k: v.numpy() for k, v in b.items()} for b in self._tensors]
        # per slot: the CUDA event to wait for before refilling it (None: free to write)
        self._ready: list[torch.cuda.Event | None] = [None] * slots
        self._pool = self._start_readers(workers)
        self._epoch: _EpochIterator | None = None
        self._closed = False

    def _allocate(self) -> dict[str, torch.Tensor]:
        """One batch buffer: the samples (host path) or the raw steps of the batch's runs
        and where each sample's rows are (device path; room for every sample alone)."""
        b, ds = self.batch_size, self.dataset
        if self.on_device:
            floats = {"steps": (b * ds.run_steps(1), *ds.sample_shapes["inputs"][1:])}
            ints = {"inputs_at": (b, ds.history), "targets_at": (b, ds.rollout), "index": (b,)}
        else:
            floats = {k: (b, *shape) for k, shape in ds.sample_shapes.items()}
            ints = {"index": (b,)}
        pin = self._cuda and self.readers == "threads"  # shared buffers are pinned after
        kinds = [(floats, torch.float32), (ints, torch.int64)]
        return {k: torch.empty(shape, dtype=dtype, pin_memory=pin)
                for shapes, dtype in kinds for k, shape in shapes.items()}

    def _share_buffers(self) -> None:
        """Move the buffers to shared memory for the reader processes; on CUDA, register
        them as pinned memory so that copies out of them run asynchronously."""
        for batch in self._tensors:
            for tensor in batch.values():
                tensor.share_memory_()
                if self._cuda:
                    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(
                        tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0))
                    self._registered.append(tensor.data_ptr())

    def _start_readers(self, workers: int) -> Executor | _InlineExecutor:
        if workers == 0:
            return _InlineExecutor()
        if self.readers == "processes":
            # spawned: the training process may hold CUDA, which a fork must not inherit
            return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                       initializer=_start_reader_process,
                                       initargs=(self.dataset, self._tensors))
        return ThreadPoolExecutor(workers, thread_name_prefix=THREAD_PREFIX)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._closed:
            raise RuntimeError("the loader is closed")
        if self._epoch is not None:
            self._epoch.close()
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        n = order.size // self.batch_size  # drop_last, like the DataLoader path
        self._epoch = _EpochIterator(self, order[: n * self.batch_size].reshape(n, self.batch_size))
        return self._epoch

    def _submit(self, slot: int, batch: np.ndarray) -> _Pending:
        """Queue the reads of ``batch`` (sample indices) into buffer ``slot``: a task per
        run; ``first_row``: where a run's raw steps go (device path), else None."""
        pending = _Pending(slot)
        for rows in consecutive_runs(self.dataset.times[batch], RUN_LENGTH):
            indices = batch[rows].tolist()
            first_row = pending.rows if self.on_device else None
            if self.readers == "processes":
                event = self._ready[slot]
                if event is not None:  # passed already but after a new epoch
                    event.synchronize()  # (see _EpochIterator.retire)
                future = self._pool.submit(_read_in_reader_process, slot, rows, first_row, indices)
            else:
                future = self._pool.submit(self._read_in_thread, slot, rows, first_row, indices,
                                           self._ready[slot])
            pending.futures.append(future)
            if self.on_device:
                pending.rows += self.dataset.run_steps(len(indices))
        return pending

    def _read_in_thread(self, slot: int, rows: slice, first_row: int | None,
                        indices: list[int], ready: torch.cuda.Event | None) -> None:
        if ready is not None:
            ready.synchronize()  # the copies out of this buffer have finished
        read_task(self.dataset, self._arrays[slot], rows, first_row, indices)

    def _release(self, slot: int) -> torch.cuda.Event | None:
        """Host path: the consumer is done with ``slot``; on CUDA, mark the copies queued
        so far and return that mark."""
        if not self._cuda:
            return None
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        self._ready[slot] = ready
        return ready

    def _stage(self, pending: _Pending) -> None:
        """Device path: start moving a read batch to the device. On CUDA the copy runs on
        the side stream, and the buffer may be refilled once it is done. In host memory
        the steps stay where they are (the assembly normalises them in place)."""
        source = self._tensors[pending.slot]
        parts = {k: source[k] for k in ("inputs_at", "targets_at", "index")}
        parts["steps"] = source["steps"][: pending.rows]
        if self._copy_stream is None:
            pending.staged = {**parts, "index": parts["index"].clone()}  # the rest is used at once
            return
        with torch.cuda.stream(self._copy_stream):
            pending.staged = {k: v.to(self.device, non_blocking=True) for k, v in parts.items()}
            pending.copied = torch.cuda.Event()
            pending.copied.record(self._copy_stream)
        self._ready[pending.slot] = pending.copied

    def _assemble(self, pending: _Pending) -> dict[str, torch.Tensor]:
        """Device path: the batch's samples from its staged steps, queued after the copy."""
        staged = pending.staged
        assert staged is not None
        if pending.copied is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(pending.copied)
            for tensor in staged.values():  # made on the copy stream, used on this one
                tensor.record_stream(stream)
        batch = self.dataset.assemble(staged["steps"], staged["inputs_at"], staged["targets_at"])
        batch["index"] = staged["index"]
        return batch

    def close(self) -> None:
        """End the current iteration and stop the readers (idempotent)."""
        if self._epoch is not None:
            self._epoch.close()
            self._epoch = None
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._registered:
            torch.cuda.synchronize(self.device)  # no copy may still read a buffer
            for pointer in self._registered:
                torch.cuda.cudart().cudaHostUnregister(pointer)
            self._registered.clear()
        self._closed = True

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_task(dataset: ForecastDataset, out: dict[str, np.ndarray], rows: slice,
              first_row: int | None, indices: list[int]) -> None:
    """One reader task: the run of samples ``indices`` into its ``rows`` of a batch
    buffer ``out``. Host path (``first_row`` None): the samples, normalised. Device
    path: the run's raw steps from ``first_row`` on, and where each sample's rows are."""
    if first_row is None:
        masks = out["target_masks"][rows] if "target_masks" in out else None
        out["index"][rows] = dataset.read_run_into(
            indices, out["inputs"][rows], out["target_forcings"][rows], out["targets"][rows],
            masks)
        return
    out["index"][rows] = dataset.read_raw_run_into(indices, out["steps"][first_row:])
    inputs_at, targets_at = dataset.sample_rows(len(indices))
    out["inputs_at"][rows] = first_row + inputs_at
    out["targets_at"][rows] = first_row + targets_at


_reader_process: tuple[ForecastDataset, list[dict[str, np.ndarray]]] | None = None


def _start_reader_process(dataset: ForecastDataset, buffers: list[dict[str, torch.Tensor]]) -> None:
    """In a reader process: keep the dataset and numpy views of the shared buffers, and
    decode with one Blosc thread (numcodecs' default in a process's main thread is one
    per core): a reader is one core, and more readers scale the whole read, where
    Blosc's threads scale only its decode (bench/loader.py)."""
    global _reader_process
    numcodecs.blosc.use_threads = False
    _reader_process = (dataset, [{k: v.numpy() for k, v in b.items()} for b in buffers])


def _read_in_reader_process(slot: int, rows: slice, first_row: int | None,
                            indices: list[int]) -> None:
    assert _reader_process is not None, "not a reader process"
    dataset, arrays = _reader_process
    read_task(dataset, arrays[slot], rows, first_row, indices)


class _InlineExecutor:
    """Runs each task at once in the calling thread (``workers=0``: no readers)."""

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        future: Future[None] = Future()
        try:
            fn(*args)
        except BaseException as err:  # surfaces from future.result() like a thread's error
            future.set_exception(err)
        else:
            future.set_result(None)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


@dataclass
class _Pending:
    """A batch whose reads are queued: its buffer, one future per run and, on the
    device path, how many rows of steps its runs fill and its copy to the device."""

    slot: int
    futures: list[Future[None]] = field(default_factory=list)
    rows: int = 0
    staged: dict[str, torch.Tensor] | None = None
    copied: torch.cuda.Event | None = None  # on CUDA: recorded after the copy

    def read(self) -> bool:
        """Whether every read has finished without an error."""
        return all(f.done() and not f.cancelled() and f.exception() is None
                   for f in self.futures)


class _EpochIterator:
    """One pass over a batch order: keeps ``slots - 1`` batches in flight."""

    def __init__(self, loader: BatchLoader, batches: np.ndarray):
        self.loader, self.batches = loader, batches
        self.free = deque(range(len(loader._tensors)))
        # reader processes cannot wait for CUDA events: a buffer whose copies are still
        # queued waits here until they have run (reader threads wait themselves)
        self.copying: deque[tuple[int, torch.cuda.Event]] = deque()
        self.pending: deque[_Pending] = deque()
        self.submitted = 0
        self.held: int | None = None  # host path: the slot the consumer has
        self.done = False

    def __iter__(self) -> _EpochIterator:
        return self

    def retire(self, slot: int, copies: torch.cuda.Event | None) -> None:
        """The consumer is done with ``slot`` once ``copies`` (if any) have run."""
        if copies is None or self.loader.readers == "threads":
            self.free.append(slot)
        else:
            self.copying.append((slot, copies))

    def _fill(self) -> None:
        while self.copying and self.copying[0][1].query():
            self.free.append(self.copying.popleft()[0])
        if not self.free and not self.pending and self.copying:
            slot, copies = self.copying.popleft()  # nothing else to wait for
            copies.synchronize()
            self.free.append(slot)
        while self.free and self.submitted < len(self.batches):
            self.pending.append(self.loader._submit(self.free.popleft(),
                                                    self.batches[self.submitted]))
            self.submitted += 1

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.done:
            raise StopIteration
        if self.held is not None:  # the consumer asks for the next: it is done with this one
            self.retire(self.held, self.loader._release(self.held))
            self.held = None
        self._fill()
        if not self.pending:
            self.close()
            raise StopIteration
        head = self.pending.popleft()
        try:
            for future in head.futures:
                future.result()
        except BaseException:
            self.close()
            raise
        if not self.loader.on_device:
            self.held = head.slot
            return self.loader._tensors[head.slot]
        if head.staged is None:
            self._stage(head)
        batch = self.loader._assemble(head)
        if head.copied is None:  # assembled in the buffer itself: free only now
            self.free.append(head.slot)
        upcoming = self.pending[0] if self.pending else None
        if (self.loader._copy_stream is not None and upcoming is not None
                and upcoming.staged is None and upcoming.read()):
            self._stage(upcoming)  # its copy overlaps the step about to run on this batch
        self._fill()
        return batch

    def _stage(self, pending: _Pending) -> None:
        self.loader._stage(pending)
        if pending.copied is not None:
            self.retire(pending.slot, pending.copied)

    def close(self) -> None:
        """Cancel the batches not started and wait for the reads under way."""
        self.done = True
        if self.held is not None:
            self.loader._release(self.held)
            self.held = None
        futures = [f for pending in self.pending for f in pending.futures]
        for future in futures:
            future.cancel()
        wait(futures)
        self.pending.clear()

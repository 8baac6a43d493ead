"""Training samples straight from the Zarr store: a torch Dataset (the order of the
samples: :mod:`pipeline.data.sampler`).

A sample is ``history`` consecutive input steps ending at time index ``t`` (all
channels), the forcing channels at each target time, and the predicted channels
(prognostic and derived) at ``t + lead * k`` for ``k = 1 .. rollout``, all normalised
with the store's statistics; in a store with masks (``data.nan.policy: fill``) also the
mask channels at each target time, which say where a target is missing
(``pipeline.data.layout``, :meth:`pipeline.data.store.StoreInfo.missing_above`). Each read takes the
contiguous range of steps a sample needs (each step is one chunk), or that a run of
samples at consecutive times needs
(they share all but one step), decoded straight from the shard files
(``pipeline.data.shards``) or, for other layouts, through zarr: no dask and no xarray
on the hot path. The store is opened lazily in each process, so DataLoader workers
(forked or spawned) each get their own handle. ``pipeline.data.loading.batches.BatchLoader``
reads batches with reader threads or processes into reused (pinned) batch buffers;
``pipeline.data.loading.resident`` keeps a whole split in the device's memory instead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset
from zarr.buffer import default_buffer_prototype

from pipeline.data import store
from pipeline.data.shards import ShardFiles
from pipeline.data.store import StoreInfo
from pipeline.errors import ConfigError


def sample_times(first: int, last: int, history: int, lead: int, rollout: int) -> np.ndarray:
    """Indices t of the last input step such that inputs and targets lie in [first, last]."""
    lo = first + history - 1
    hi = last - lead * rollout
    return np.arange(lo, hi + 1) if hi >= lo else np.arange(0)


RUN_LENGTH = 8  # samples per run read at once: bounds a reader's buffer to 7 extra steps


def consecutive_runs(times: np.ndarray, longest: int) -> list[slice]:
    """Split positions ``0 .. len(times)`` into slices of consecutive times (``t, t + 1,
    ...``), each at most ``longest`` long, in order."""
    runs, start = [], 0
    for j in range(1, len(times) + 1):
        if j == len(times) or times[j] != times[j - 1] + 1 or j - start == longest:
            runs.append(slice(start, j))
            start = j
    return runs


def _channel_selector(channels: tuple[int, ...]) -> slice | np.ndarray:
    """A slice when the channels are consecutive (a view, no copy), else an index array."""
    if channels and channels == tuple(range(channels[0], channels[-1] + 1)):
        return slice(channels[0], channels[-1] + 1)
    return np.asarray(channels, dtype=np.int64)


class ForecastDataset(Dataset):
    """Normalised (inputs, target forcings, targets) samples of one split of a store.

    :meth:`read_run_into` writes a run of samples into arrays the caller owns (the batch
    buffers of ``pipeline.data.loading.batches.BatchLoader``); ``__getitems__`` and ``__getitem__``
    allocate them (the DataLoader path). All give bitwise the same values.
    """

    def __init__(self, info: StoreInfo, split: str, history: int, lead: int, rollout: int = 1):
        if history < 1 or lead < 1 or rollout < 1:
            raise ConfigError("train.history, train.lead and train.rollout must be >= 1",
                              "fix the train section")
        self.path, self.split = info.path, split
        self.layout = info.layout
        self.history, self.lead, self.rollout = history, lead, rollout
        first, last = info.split_range(split)
        self.times = sample_times(first, last, history, lead, rollout)
        if self.times.size == 0:
            raise ConfigError(f"split '{split}' is too short for history={history}, lead={lead}, "
                              f"rollout={rollout}", "shorten them or widen the split")
        mean, std = info.normalisation()
        self._mean, self._inv_std = mean[:, None, None], (1.0 / std)[:, None, None]
        self._outputs = _channel_selector(self.layout.outputs)
        self._forcings = _channel_selector(self.layout.forcings)
        self._masks = _channel_selector(self.layout.masks) if self.layout.has_masks else None
        grid = (info.lat.size, info.lon.size)
        n_out, n_forcing = len(self.layout.outputs), len(self.layout.forcings)
        self.sample_shapes: dict[str, tuple[int, ...]] = {
            "inputs": (history, len(self.layout.channels), *grid),
            "target_forcings": (rollout, n_forcing, *grid),
            "targets": (rollout, n_out, *grid),
        }
        if self.layout.has_masks:
            self.sample_shapes["target_masks"] = (rollout, len(self.layout.masks), *grid)
        self._block_shape = (history + lead * rollout, len(self.layout.channels), *grid)
        self._array: zarr.Array | None = None
        self._steps: ShardFiles | None = None  # None: zarr reads (see read_steps_into)
        self._pid = -1
        self._local = threading.local()
        self._on_device: dict[torch.device, tuple[Any, ...]] = {}  # see _device_constants
        self._places: dict[int, list[list[tuple[str, int, int]]]] = {}  # see _step_places

    @property
    def _target_channels(self) -> dict[str, slice | np.ndarray]:
        """What a sample holds at its target times: key -> stored channels, in order."""
        channels = {"target_forcings": self._forcings, "targets": self._outputs}
        if self._masks is not None:
            channels["target_masks"] = self._masks
        return channels

    def __getstate__(self) -> dict[str, Any]:
        # the zarr handle, the per-thread read buffers and the device copies stay in the
        # process that made them
        return {**self.__dict__, "_array": None, "_steps": None, "_pid": -1, "_local": None,
                "_on_device": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _local=threading.local())

    def __len__(self) -> int:
        return int(self.times.size)

    def _data(self) -> zarr.Array:
        if self._array is None or self._pid != os.getpid():  # reopen after a fork
            self._array = store.data_array(self.path)
            self._steps = ShardFiles.of(self._array, complete=True)
            self._pid = os.getpid()
        return self._array

    def _read_block(self, t: int) -> np.ndarray:
        """The raw steps ``t - history + 1 .. t + lead * rollout`` in one read, into
        this thread's reused buffer."""
        block = self._block(self._block_shape[0])
        self.read_steps_into(t - self.history + 1, block)
        return block

    def _block(self, steps: int) -> np.ndarray:
        """This thread's reused buffer for ``steps`` raw steps: a fresh 10-20 MB array
        per read costs more in page faults than the normalisation (bench/loader.py)."""
        buffer = getattr(self._local, "block", None)
        if buffer is None or buffer.shape[0] < steps:
            buffer = self._local.block = np.empty((steps, *self._block_shape[1:]), dtype=np.float32)
        return buffer[:steps]  # contiguous: a view of the first steps

    @property
    def steps_per_shard(self) -> int:
        """Time steps per shard file of the store (the unit a read decodes whole)."""
        array = self._data()
        return int((getattr(array, "shards", None) or array.chunks)[0])

    def read_steps_into(self, first: int, out: np.ndarray | Sequence[np.ndarray],
                        then: Callable[[int], None] | None = None) -> None:
        """The raw steps ``first .. first + len(out) - 1`` into ``out`` (one C-contiguous
        array of them, or each step's own C-contiguous array): by ``shards.ShardFiles``,
        which decodes each step straight into ``out``, for the layout this pipeline
        writes; through zarr for any other. ``then(k)``, if given, runs once ``out[k]``
        is in: at once after its decode with ShardFiles (while the step is in cache),
        after the whole read with zarr."""
        array = self._data()
        if self._steps is not None:
            self._steps.read(first, out, then)
            return
        steps = out if isinstance(out, np.ndarray) else \
            np.empty((len(out), *self._block_shape[1:]), dtype=np.float32)
        buffer = default_buffer_prototype().nd_buffer.from_numpy_array(steps)
        try:
            array.get_basic_selection(slice(first, first + len(out)), out=buffer)
        except (ValueError, RuntimeError):  # a damaged chunk: name its step, or re-raise
            store.DataReader(self.path)[first:first + len(out)]
            raise
        for k in range(len(out)):
            if steps is not out:
                np.copyto(out[k], steps[k])
            if then is not None:
                then(k)

    def _run_times(self, indices: Sequence[int]) -> np.ndarray:
        """The time indices of a run's samples; they must be consecutive."""
        times = self.times[np.asarray(indices, dtype=np.int64)]
        if times.size == 0 or np.any(np.diff(times) != 1):
            raise ValueError(f"a run needs consecutive sample times, got {times.tolist()}")
        return times

    def run_steps(self, n: int) -> int:
        """How many steps a run of ``n`` consecutive samples spans (its block's rows)."""
        return n - 1 + self._block_shape[0]

    def sample_rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Where each sample of a run of ``n`` finds its steps in the run's block: the
        rows of its inputs, shape (n, history), and of its targets, (n, rollout)."""
        first = np.arange(n)[:, None]
        inputs = first + np.arange(self.history)
        targets = first + self.history - 1 + self.lead * np.arange(1, self.rollout + 1)
        return inputs, targets

    def read_raw_run_into(self, indices: Sequence[int], out: np.ndarray) -> np.ndarray:
        """The raw (not normalised) steps of the run of samples ``indices`` (consecutive
        times) into ``out[:run_steps(len(indices))]``, in one zarr read; return their
        time indices. :meth:`sample_rows` says which rows each sample uses, and
        :meth:`assemble` makes the samples from them (on the training device)."""
        times = self._run_times(indices)
        self.read_steps_into(int(times[0]) - self.history + 1, out[: self.run_steps(times.size)])
        return times

    def assemble(self, steps: torch.Tensor, inputs_at: torch.Tensor,
                 targets_at: torch.Tensor) -> dict[str, torch.Tensor]:
        """Samples from raw steps, on the steps' device: ``steps`` (rows, channel, lat,
        lon) is normalised in place, then each sample's rows are gathered (``inputs_at``:
        (batch, history) row indices, ``targets_at``: (batch, rollout), on the same
        device). The same float32 operations as the numpy path: bitwise its values."""
        self.normalise_(steps)
        return self.gather(steps, inputs_at, targets_at)

    def normalise_(self, steps: torch.Tensor) -> None:
        """Normalise raw steps (rows, channel, lat, lon) in place, on their device: the
        numpy path's float32 operations, so bitwise its values."""
        mean, inv_std, _ = self._device_constants(steps.device)
        steps.sub_(mean).mul_(inv_std)

    def gather(self, steps: torch.Tensor, inputs_at: torch.Tensor, targets_at: torch.Tensor,
               out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Samples from normalised steps: each sample's rows of ``steps`` (``inputs_at``:
        (batch, history) row indices, ``targets_at``: (batch, rollout), on its device),
        written into ``out`` (reused buffers shaped ``(batch, *sample_shapes[k])``) or
        into fresh tensors. Target channels are picked before the rows are gathered,
        so each value is copied once. (A fresh 100 MB tensor on the CPU costs several
        times its copy in page faults: reuse buffers there.)"""
        _, _, targets = self._device_constants(steps.device)
        batch = inputs_at.shape[0]
        if out is None:
            out = {k: torch.empty((batch, *shape), dtype=steps.dtype, device=steps.device)
                   for k, shape in self.sample_shapes.items()}
        torch.index_select(steps, 0, inputs_at.reshape(-1),
                           out=out["inputs"].view(-1, *steps.shape[1:]))
        rows = targets_at.reshape(-1)
        for key, channels in targets.items():
            into = out[key].view(-1, *out[key].shape[2:])
            if isinstance(channels, slice):
                torch.index_select(steps[:, channels], 0, rows, out=into)
            else:
                torch.index_select(steps.index_select(0, rows), 1, channels, out=into)
        return out

    def _device_constants(self, device: torch.device) -> tuple[
            torch.Tensor, torch.Tensor, dict[str, slice | torch.Tensor]]:
        """Mean, 1/std and the target channel selections on ``device``, copied there once."""
        if device not in self._on_device:
            put = lambda a: a if isinstance(a, slice) else torch.from_numpy(a).to(device)  # noqa: E731
            self._on_device[device] = (put(self._mean), put(self._inv_std),
                                       {k: put(c) for k, c in self._target_channels.items()})
        return self._on_device[device]

    def read_run_into(self, indices: Sequence[int], inputs: np.ndarray,
                      target_forcings: np.ndarray, targets: np.ndarray,
                      target_masks: np.ndarray | None = None) -> np.ndarray:
        """Write the samples ``indices``, whose times are consecutive (``t, t + 1, ...``),
        normalised into the given arrays (leading axis: one row per sample; ``target_masks``
        for a store with masks), and return their time indices. Neighbouring samples
        share all but one step, so the union of their steps is read once: a run of n
        samples reads ``n - 1 + history + lead * rollout`` steps instead of n times
        ``history + lead * rollout`` (the sampler's blocks keep runs of
        ``train.shuffle_block`` samples together). The values are bitwise those of
        reading each sample alone."""
        times = self._run_times(indices)
        outs = {"target_forcings": target_forcings, "targets": targets}
        if self._masks is not None:
            if target_masks is None:
                raise ValueError("this store has masks: read_run_into needs target_masks")
            outs["target_masks"] = target_masks
        if times.size == 1:  # nothing shared: normalise straight into the sample
            block = self._read_block(int(times[0]))
            self._normalise_into(block, inputs[0], {k: v[0] for k, v in outs.items()})
            return times
        outs["inputs"] = inputs
        places = self._step_places(times.size)
        block = self._block(self.run_steps(times.size))
        # each step is decoded straight into the inputs of a sample that uses it where
        # there is one (then copied to the others), else into the reused block
        into: list[np.ndarray] = []
        others: list[list[tuple[str, int, int]]] = []
        for row, where in enumerate(places):
            home = next((p for p in where if p[0] == "inputs"
                         and inputs[p[1], p[2]].flags.c_contiguous), None)
            into.append(block[row] if home is None else inputs[home[1], home[2]])
            others.append([p for p in where if p is not home])

        def settle(row: int) -> None:
            """Step ``row`` is in: normalise it and copy it into the other samples that
            use it while it is in cache (with the whole block read first, each step was
            out of cache again when normalised and when copied into each sample)."""
            if places[row]:
                self._settle_step(into[row], others[row], outs)

        self.read_steps_into(int(times[0]) - self.history + 1, into, settle)
        return times

    def _step_places(self, n: int) -> list[list[tuple[str, int, int]]]:
        """Per row of the block of a run of ``n`` samples: where the samples hold it,
        (key, sample, row of the sample). No place: a row no sample uses (with ``lead >
        1`` a lone sample skips the steps between its targets). The same per ``n``,
        so made once."""
        cache = self._places
        if n not in cache:
            places: list[list[tuple[str, int, int]]] = [[] for _ in range(self.run_steps(n))]
            inputs_at, targets_at = self.sample_rows(n)
            for k in range(n):
                for j, row in enumerate(inputs_at[k]):
                    places[row].append(("inputs", k, j))
                for j, row in enumerate(targets_at[k]):
                    places[row] += [(key, k, j) for key in self._target_channels]
            cache[n] = places
        return cache[n]

    def _settle_step(self, step: np.ndarray, places: list[tuple[str, int, int]],
                     outs: dict[str, np.ndarray]) -> None:
        """Normalise one raw step in place, once however many samples share it (the
        same float32 operations as every other path, so bitwise the same values), then
        copy it (inputs) or its channels (targets) into each of its ``places``."""
        np.subtract(step, self._mean, out=step)
        np.multiply(step, self._inv_std, out=step)
        target_channels = self._target_channels
        for key, k, j in places:
            if key == "inputs":
                np.copyto(outs[key][k, j], step)
                continue
            channels = target_channels[key]
            if isinstance(channels, slice):
                np.copyto(outs[key][k, j], step[channels])
            else:
                np.take(step, channels, axis=0, out=outs[key][k, j])

    def _normalise_into(self, window: np.ndarray, inputs: np.ndarray,
                        targets: dict[str, np.ndarray]) -> None:
        """One sample from its raw steps ``window`` (history, then the lead steps);
        ``targets``: the sample's arrays of each key of ``_target_channels``."""
        np.subtract(window[:self.history], self._mean, out=inputs)
        inputs *= self._inv_std
        rows = self._target_rows(window)
        for key, channels in self._target_channels.items():
            out = targets[key]
            np.subtract(rows[:, channels], self._mean[channels], out=out)
            out *= self._inv_std[channels]

    def _target_rows(self, window: np.ndarray) -> np.ndarray:
        """The steps of a sample's ``window`` that hold its targets (a view)."""
        return window[self.history - 1 + self.lead:: self.lead][: self.rollout]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """The samples ``indices`` (what a DataLoader worker fetches for one batch), each
        run of consecutive times read once (see ``read_run_into``)."""
        batch = self.read_batch(indices)
        return [{k: v[j] for k, v in batch.items()} for j in range(len(indices))]

    def read_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The samples ``indices`` stacked into one batch (leading axis: sample), with
        their time indices (``index``); each run of consecutive times read once."""
        n = len(indices)
        arrays = {k: np.empty((n, *shape), dtype=np.float32) for k, shape in self.sample_shapes.items()}
        times = np.empty(n, dtype=np.int64)
        for run in consecutive_runs(self.times[np.asarray(indices, dtype=np.int64)], RUN_LENGTH):
            masks = arrays["target_masks"][run] if "target_masks" in arrays else None
            times[run] = self.read_run_into(indices[run], arrays["inputs"][run],
                                            arrays["target_forcings"][run], arrays["targets"][run],
                                            masks)
        return {**{k: torch.from_numpy(a) for k, a in arrays.items()},
                "index": torch.from_numpy(times)}

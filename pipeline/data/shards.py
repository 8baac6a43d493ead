"""Whole time steps of the store's data array, decoded from their shard files straight
into the caller's buffer.

Zarr reads a step of a sharded array through its async codec pipeline: it fills a
buffer for the shard's selection, decodes the chunk into a fresh array, copies that into
the shard buffer, then copies the shard buffer into the caller's ``out``: about 50 MB
of memory traffic for a 7 MB step, and Python between every C call (which a reader
thread must take the GIL back for). The store this pipeline writes has one layout
(``store.create``): shards of whole steps along time, one inner chunk per step, the
bytes codec and Blosc, Zstd or no compression, the shard index at the end with a CRC32C.
For that layout, ``StepReader`` reads the shard index, checks its checksum, and
decodes each step's bytes straight into ``out`` (2.2x zarr's single-thread rate on the
benchmark store; bench/loader.py). Any other layout is read through zarr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
import zarr.codecs
from zarr.storage import LocalStore

from pipeline.errors import StoreError

EMPTY = 2**64 - 1  # offset and length of an inner chunk that was never written
_REBUILD = "rebuild the store's damaged shards: rerun `pipeline preprocess` on a fresh store path"


class StepReader:
    """Reads steps ``first .. first + len(out) - 1`` of a data array shaped (time, ...)
    into ``out``; made by :meth:`for_array` only for the layout above."""

    def __init__(self, root: Path, array: zarr.Array, decoder: Any | None):
        self._root, self._decoder = root, decoder
        self._metadata = array.metadata
        self._shard_steps = array.metadata.chunk_grid.chunk_shape[0]
        self._fill = np.float32(array.metadata.fill_value)
        self._index_bytes = 16 * self._shard_steps + 4  # (offset, length) per step, CRC32C
        self._crc = numcodecs.CRC32C(location="end")

    @classmethod
    def for_array(cls, array: zarr.Array) -> StepReader | None:
        """A reader for ``array`` if it has the layout this pipeline writes, else None."""
        meta = array.metadata
        if (not isinstance(array.store, LocalStore) or sys.byteorder != "little"
                or getattr(meta, "zarr_format", None) != 3 or np.dtype(array.dtype) != np.float32
                or len(meta.codecs) != 1 or not isinstance(meta.codecs[0], zarr.codecs.ShardingCodec)):
            return None
        sharding = meta.codecs[0]
        shard_shape = tuple(meta.chunk_grid.chunk_shape)
        if (tuple(sharding.chunk_shape) != (1, *array.shape[1:])
                or shard_shape[1:] != tuple(array.shape[1:])
                or sharding.index_location != zarr.codecs.ShardingCodecIndexLocation.end
                or [type(c) for c in sharding.index_codecs] != [zarr.codecs.BytesCodec,
                                                                 zarr.codecs.Crc32cCodec]):
            return None
        inner = list(sharding.codecs)
        if not inner or not isinstance(inner[0], zarr.codecs.BytesCodec) \
                or inner[0].endian not in (None, zarr.codecs.Endian.little):
            return None
        decoder: Any | None
        if len(inner) == 1:
            decoder = None
        elif len(inner) == 2 and isinstance(inner[1], zarr.codecs.BloscCodec):
            decoder = numcodecs.Blosc()  # Blosc frames describe themselves
        elif len(inner) == 2 and isinstance(inner[1], zarr.codecs.ZstdCodec):
            decoder = numcodecs.Zstd()
        else:
            return None
        return cls(Path(array.store.root) / array.path, array, decoder)

    def read(self, first: int, out: np.ndarray) -> None:
        t, stop = first, first + out.shape[0]
        while t < stop:
            shard = t // self._shard_steps
            end = min(stop, (shard + 1) * self._shard_steps)
            self._read_shard(shard, t, out[t - first:end - first])
            t = end

    def _read_shard(self, shard: int, first: int, out: np.ndarray) -> None:
        """Steps ``first ..`` (all in ``shard``) into ``out``."""
        path = self._root / self._metadata.encode_chunk_key((shard, *[0] * (out.ndim - 1)))
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            out[...] = self._fill  # a shard never written reads as the fill value, as in zarr
            return
        with f:
            f.seek(0, 2)
            if f.tell() < self._index_bytes:
                raise StoreError(f"shard {path} is truncated", _REBUILD)
            f.seek(-self._index_bytes, 2)
            try:
                index = self._crc.decode(f.read(self._index_bytes))
            except RuntimeError as err:
                raise StoreError(f"shard {path} is corrupt: its index checksum does not match",
                                 _REBUILD) from err
            pairs = np.frombuffer(index, dtype="<u8").reshape(self._shard_steps, 2)
            for k in range(out.shape[0]):
                offset, length = (int(v) for v in pairs[first - shard * self._shard_steps + k])
                step = out[k]
                if offset == EMPTY and length == EMPTY:
                    step[...] = self._fill
                    continue
                f.seek(offset)
                self._decode(f, length, step, path)

    def _decode(self, f: Any, length: int, step: np.ndarray, path: Path) -> None:
        if self._decoder is None:
            if length != step.nbytes or f.readinto(memoryview(step).cast("B")) != length:
                raise StoreError(f"shard {path} holds a step of the wrong size", _REBUILD)
            return
        try:
            self._decoder.decode(f.read(length), out=step)
        except (RuntimeError, ValueError) as err:
            raise StoreError(f"shard {path} holds a step that does not decode: {err}",
                             _REBUILD) from err


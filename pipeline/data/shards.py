"""The store's data array, read and written whole time steps at a time straight from and
into its shard files.

Zarr moves a step of a sharded array through its async codec pipeline. Reading: it
fills a buffer for the shard's selection, decodes the chunk into a fresh array, copies
that into the shard buffer, then into the caller's ``out`` (about 50 MB of memory
traffic for a 7 MB step), with Python between every C call (which a reader thread must
take the GIL back for). Writing: it fills each chunk with the fill value, copies the
step in, encodes it, and joins the encoded chunks into the shard's bytes. The store
this pipeline writes has one layout (``store.create``): shards of whole steps along
time, one inner chunk per step, the bytes codec then Blosc, Zstd or no compression,
then (format 2 stores) a CRC32C of the step's bytes, checked on every read, and the
shard index (offset and length of each step, little-endian uint64) at the end with a
CRC32C. For that layout, ``ShardFiles`` checks and decodes each step straight from
the shard file mapped into memory into the caller's buffer (2.2x zarr's single-thread
rate on the benchmark store, 0.6-0.8x of the codec's own decode; bench/loader.py),
and writes a shard as its encoded steps and its index in one file, atomically. The
metadata stays zarr's, and zarr and xarray read the shards as their own (tested). Any
other layout is left to zarr.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
import zarr.codecs
from zarr.storage import LocalStore

from pipeline import files
from pipeline.errors import StoreError

EMPTY = 2**64 - 1  # offset and length of an inner chunk that was never written
# how to repair a complete store's damaged shards (build.preprocess)
REBUILD = ("rerun `pipeline preprocess CONFIG`: it rebuilds the missing shards of a complete "
           "store (delete a damaged shard's file first)")
_BLOSC_SHUFFLE = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                  "bitshuffle": numcodecs.Blosc.BITSHUFFLE}


class ShardFiles:
    """Whole steps of a data array shaped (time, ...) in the layout above; made by
    :meth:`of` only for that layout."""

    def __init__(self, array: zarr.Array, store: LocalStore, codec: Any | None, checksum: bool,
                 complete: bool):
        self._store = Path(store.root)
        self._root = self._store / array.path
        self._codec = codec  # numcodecs compressor, or None for no compression
        self._checksum = checksum  # each step's bytes end with their CRC32C
        self._complete = complete  # a missing shard file is an error, not the fill value
        self._metadata = array.metadata
        self._step_shape = tuple(array.shape[1:])
        self._shard_steps = int((array.shards or array.chunks)[0])
        self._fill = np.float32(array.fill_value)
        self._index_bytes = 16 * self._shard_steps + 4  # (offset, length) per step, CRC32C
        self._crc = numcodecs.CRC32C(location="end")

    @classmethod
    def of(cls, array: zarr.Array, complete: bool = False) -> ShardFiles | None:
        """The shard files of ``array`` if it has the layout this pipeline writes, else None.
        ``complete``: the array is a finished store's, so every shard file must exist."""
        meta: Any = array.metadata  # its class is private to zarr; checked field by field
        store = array.store
        if (not isinstance(store, LocalStore) or sys.byteorder != "little"
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
        checksum = isinstance(inner[-1], zarr.codecs.Crc32cCodec)
        inner = inner[:-1] if checksum else inner
        if len(inner) == 1:
            return cls(array, store, None, checksum, complete)
        compressor = inner[1]
        if len(inner) == 2 and isinstance(compressor, zarr.codecs.BloscCodec):
            return cls(array, store, numcodecs.Blosc(
                cname=compressor.cname.value, clevel=compressor.clevel,
                shuffle=_BLOSC_SHUFFLE[compressor.shuffle.value], blocksize=compressor.blocksize),
                checksum, complete)
        if len(inner) == 2 and isinstance(compressor, zarr.codecs.ZstdCodec):
            return cls(array, store, numcodecs.Zstd(level=compressor.level, checksum=compressor.checksum),
                       checksum, complete)
        return None

    def _path(self, shard: int) -> Path:
        return self._root / self._metadata.encode_chunk_key((shard, *[0] * len(self._step_shape)))

    # ------------------------------------------------------------------ writing

    def write(self, shard: int, block: np.ndarray) -> None:
        """Write ``shard`` whole: ``block`` holds its steps (all of them, or those up to
        the end of the time axis). A temporary file renamed into place, so the shard is
        either the old one or the new one, never half of each."""
        if block.shape[1:] != self._step_shape or not 0 < block.shape[0] <= self._shard_steps:
            raise ValueError(f"a shard holds up to {self._shard_steps} steps of shape "
                             f"{self._step_shape}, got {block.shape}")
        steps = np.ascontiguousarray(block, dtype=np.float32)
        encoded = [self._encode(step) for step in steps]
        tail = 4 if self._checksum else 0
        index = np.full((self._shard_steps, 2), EMPTY, dtype="<u8")
        lengths = np.array([len(e) + tail for e in encoded], dtype="<u8")
        index[:len(encoded), 0] = np.cumsum(lengths) - lengths
        index[:len(encoded), 1] = lengths
        path = self._path(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        files.clean_stale(path)  # the partial files of killed writers of this shard
        partial = files.temporary_name(path)  # private: two tasks may write one shard
        try:
            with open(partial, "wb") as f:
                for part in encoded:
                    f.write(part)
                    if self._checksum:
                        f.write(_crc32c(part))
                f.write(self._crc.encode(index.tobytes()))
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def _encode(self, step: np.ndarray) -> Any:
        return step.data.cast("B") if self._codec is None else self._codec.encode(step)

    # ------------------------------------------------------------------ reading

    @property
    def codec(self) -> Any | None:
        """The numcodecs compressor of the steps (None: stored uncompressed)."""
        return self._codec

    def read(self, first: int, out: np.ndarray | Sequence[np.ndarray],
             then: Callable[[int], None] | None = None) -> None:
        """Steps ``first .. first + len(out) - 1`` into ``out`` (one C-contiguous array of
        them, or each step's own C-contiguous array); ``then(k)``, if given, runs as soon
        as ``out[k]`` is in, while it is still in the CPU's cache."""
        t, stop = first, first + len(out)
        while t < stop:
            shard = t // self._shard_steps
            end = min(stop, (shard + 1) * self._shard_steps)
            self._read_shard(shard, t, out[t - first:end - first], then, t - first)
            t = end

    def encoded(self, t: int) -> bytes:
        """Step ``t``'s bytes as stored, less their checksum (checked): what the codec
        decodes (the benchmark's codec limit, bench/loader.py)."""
        path, data, index = self._map(t // self._shard_steps)
        offset, length = (int(v) for v in index[t % self._shard_steps])
        if data is None or offset == EMPTY:
            raise ValueError(f"step {t} was never written")
        return self._body(data[offset:offset + length], length, path, t).tobytes()

    def _read_shard(self, shard: int, first: int, out: np.ndarray | Sequence[np.ndarray],
                    then: Callable[[int], None] | None, base: int) -> None:
        """Steps ``first ..`` (all in ``shard``) into ``out``; ``then(base + k)`` after
        ``out[k]``."""
        path, data, index = self._map(shard)
        for k in range(len(out)):
            offset, length = (int(v) for v in index[first - shard * self._shard_steps + k])
            step = out[k]
            if data is None or (offset == EMPTY and length == EMPTY):
                step[...] = self._fill  # never written: the fill value, as in zarr
            else:
                self._decode(data[offset:offset + length], length, step, path, first + k)
            if then is not None:
                then(base + k)

    def _map(self, shard: int) -> tuple[Path, np.ndarray | None, np.ndarray]:
        """The shard's file mapped into memory (None: never written, in a store that may
        lack shards) and its index checked, (offset, length) per step. Mapped, each step
        is checked and decoded straight from the page cache, where reading it into a
        buffer first copied it (the map, read-only, goes with its last view)."""
        path = self._path(shard)
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            if self._complete:
                raise StoreError(f"training store {self._store} has lost shard file {path}",
                                 REBUILD) from None
            return path, None, np.full((self._shard_steps, 2), EMPTY, dtype="<u8")
        with f:
            if os.fstat(f.fileno()).st_size < self._index_bytes:
                raise StoreError(f"shard {path} is truncated", REBUILD)
            data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
        try:
            index = self._crc.decode(data[data.size - self._index_bytes:])
        except RuntimeError as err:
            raise StoreError(f"shard {path} is corrupt: its index checksum does not match",
                             REBUILD) from err
        return path, data, np.frombuffer(index, dtype="<u8").reshape(self._shard_steps, 2)

    def _body(self, stored: np.ndarray, length: int, path: Path, t: int) -> np.ndarray:
        """A step's encoded bytes (``stored``, its ``length`` bytes in the file, checksum
        included), checked."""
        if stored.size != length:
            raise StoreError(f"shard {path} is truncated", REBUILD)
        tail = 4 if self._checksum else 0
        body = stored[:length - tail]
        if self._checksum and _crc32c(body) != stored[length - tail:].tobytes():
            raise StoreError(f"training store {self._store} is corrupt at time step {t}: its "
                             f"checksum does not match (shard file {path})", REBUILD)
        return body

    def _decode(self, stored: np.ndarray, length: int, step: np.ndarray, path: Path,
                t: int) -> None:
        """Step ``t`` from its ``stored`` bytes (``length`` in the file) into ``step``."""
        if self._codec is None:
            if length != step.nbytes + (4 if self._checksum else 0):
                raise StoreError(f"shard {path} holds a step of the wrong size", REBUILD)
            np.copyto(step.reshape(-1).view(np.uint8), self._body(stored, length, path, t))
            return
        body = self._body(stored, length, path, t)
        try:
            self._codec.decode(body, out=step)
        except (RuntimeError, ValueError) as err:
            raise StoreError(f"shard {path} holds a step that does not decode: {err}",
                             REBUILD) from err


def _crc32c(data: Any) -> bytes:
    """The CRC32C of ``data`` as zarr's ``crc32c`` codec stores it (little-endian uint32)."""
    return int(google_crc32c.value(np.frombuffer(data, dtype=np.uint8))).to_bytes(4, "little")

"""ShardFiles: whole steps read from and written to the store's shard files, bitwise
zarr's reads and readable by zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.config import Codec
from pipeline.data import store
from pipeline.data.shards import ShardFiles
from pipeline.errors import StoreError

pytestmark = pytest.mark.unit

SHAPE = (21, 3, 5, 8)  # time, channel, lat, lon: 3 shards of 8 steps, the last partial
SHARD = 8


def data_array(path: Path, codec: Codec, shards: int | None = SHARD,
               chunk_steps: int = 1) -> zarr.Array:
    """A data array laid out as ``store.create`` lays it out (or not, when asked), with
    NaNs, a shard never written (steps 8-15) and steps never written (19, 20)."""
    t, c, y, x = SHAPE
    array = zarr.create_array(
        str(path), name="data", shape=SHAPE, dtype="float32", chunks=(chunk_steps, c, y, x),
        shards=(shards, c, y, x) if shards else None, compressors=store.compressors(codec),
        fill_value=np.nan)
    values = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    values[3, 1, 2, :4] = np.nan
    array[0:8] = values[0:8]
    array[16:19] = values[16:19]
    return zarr.open_array(str(path), path="data", mode="r")


@pytest.mark.parametrize("codec", [Codec(), Codec(name="zstd", level=3), Codec(name="none")],
                         ids=["blosc", "zstd", "none"])
def test_steps_decoded_from_shards_are_bitwise_zarrs(tmp_path: Path, codec: Codec) -> None:
    array = data_array(tmp_path / "s.zarr", codec)
    reader = ShardFiles.of(array)
    assert reader is not None
    for first, n in [(0, 21), (2, 1), (5, 6), (7, 10), (15, 6), (19, 2)]:
        out = np.full((n, *SHAPE[1:]), 7.0, dtype=np.float32)
        reader.read(first, out)
        expected = array[first:first + n]
        assert out.view(np.uint32).tobytes() == expected.view(np.uint32).tobytes(), (first, n)


@pytest.mark.parametrize("codec", [Codec(), Codec(name="none")], ids=["blosc", "none"])
def test_steps_decoded_into_their_own_arrays_each_then_handed_on(tmp_path: Path,
                                                                 codec: Codec) -> None:
    """Each step into an array of its own (a sample's buffer), across shards and past
    steps never written; ``then(k)`` runs once step k is in, in order."""
    array = data_array(tmp_path / "s.zarr", codec)
    reader = ShardFiles.of(array)
    assert reader is not None
    first, n = 5, 16
    out = [np.full(SHAPE[1:], 7.0, dtype=np.float32) for _ in range(n)]
    seen: list[tuple[int, bytes]] = []
    reader.read(first, out, lambda k: seen.append((k, out[k].tobytes())))
    expected = array[first:first + n]
    assert [k for k, _ in seen] == list(range(n))
    for k in range(n):
        assert seen[k][1] == expected[k].tobytes() == out[k].tobytes(), k


def test_encoded_steps_decode_to_zarrs_values(tmp_path: Path) -> None:
    array = data_array(tmp_path / "s.zarr", Codec())
    reader = ShardFiles.of(array)
    assert reader is not None and reader.codec is not None
    step = np.empty(SHAPE[1:], dtype=np.float32)
    for t in (0, 7, 17):
        reader.codec.decode(reader.encoded(t), out=step)
        assert step.tobytes() == array[t].tobytes(), t
    with pytest.raises(ValueError, match="never written"):
        reader.encoded(9)


@pytest.mark.parametrize(("shards", "chunk_steps"), [(None, 1), (SHARD, 2)],
                         ids=["unsharded", "two-steps-per-chunk"])
def test_other_layouts_are_left_to_zarr(tmp_path: Path, shards: int | None,
                                        chunk_steps: int) -> None:
    array = data_array(tmp_path / "s.zarr", Codec(), shards, chunk_steps)
    assert ShardFiles.of(array) is None


def test_a_damaged_shard_is_named(tmp_path: Path) -> None:
    array = data_array(tmp_path / "s.zarr", Codec())
    reader = ShardFiles.of(array)
    assert reader is not None
    shard = tmp_path / "s.zarr" / "data" / "c" / "2" / "0" / "0" / "0"
    good = shard.read_bytes()
    out = np.empty((2, *SHAPE[1:]), dtype=np.float32)
    shard.write_bytes(good[:-4] + bytes(4))  # the CRC32C ends the index
    with pytest.raises(StoreError, match=r"c/2/0/0/0 is corrupt: its index checksum"):
        reader.read(16, out)
    shard.write_bytes(good[:20])
    with pytest.raises(StoreError, match="truncated"):
        reader.read(16, out)
    corrupt = bytearray(good)
    corrupt[10:30] = bytes(20)  # inside the first step's compressed bytes
    shard.write_bytes(bytes(corrupt))
    with pytest.raises(StoreError, match="does not decode"):
        reader.read(16, out)


@pytest.mark.parametrize("codec", [Codec(), Codec(name="zstd", level=3), Codec(name="none")],
                         ids=["blosc", "zstd", "none"])
def test_shards_written_whole_read_back_through_zarr(tmp_path: Path, codec: Codec) -> None:
    """A full shard and the last, partial one, written by ShardFiles over zarr's own
    shards and into a shard never written: zarr reads back exactly the blocks."""
    array = data_array(tmp_path / "s.zarr", codec)
    files = ShardFiles.of(array)
    assert files is not None
    blocks = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    blocks[9, 0, 0, 0] = np.nan
    for shard in (0, 1, 2):
        files.write(shard, blocks[shard * SHARD:(shard + 1) * SHARD])
    got = zarr.open_array(str(tmp_path / "s.zarr"), path="data", mode="r")[:]
    assert got.view(np.uint32).tobytes() == blocks.view(np.uint32).tobytes()
    shard_dir = tmp_path / "s.zarr" / "data" / "c" / "1" / "0" / "0"
    assert sorted(p.name for p in shard_dir.iterdir()) == ["0"]  # no temporary file left
    with pytest.raises(ValueError, match="a shard holds up to 8 steps"):
        files.write(0, blocks[:9])

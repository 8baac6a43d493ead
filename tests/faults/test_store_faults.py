"""A damaged store, a diverging run and hostile inputs end as one line, exit code 2.

Real stores built by preprocessing the tiny data, damaged on disk the way disks and
people damage them (a shard deleted, truncated, one bit flipped); real ``pipeline``
commands; training through Ray where the fault only shows inside a worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from pipeline.config import Codec, load_config
from pipeline.data import store as store_module
from pipeline.data.dataset import ForecastDataset
from pipeline.data.store import StoreInfo
from pipeline.errors import PipelineError, StoreError, TrainingError
from pipeline.train import checkpoint
from pipeline.train.loop import train_loop
from pipeline.train.meta import CheckpointMeta
from pipeline.train.runtime import local_runtime
from tests.conftest import base_config, run_cli, train_config, write_config

pytestmark = pytest.mark.integration

SHARD = ("data", "c", "2", "0", "0", "0")  # shard_size 16: time steps 32..47, in the train split
SHARD_KEY = "c/2/0/0/0"


def assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit code 2, one ``error:`` line last, no traceback; returns that line."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-4000:])
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-4000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    return errors[0]


def copy_store(tiny_store: Path, where: Path) -> Path:
    store = where / "store.zarr"
    shutil.copytree(tiny_store, store)
    return store


def damage(store: Path, kind: str) -> None:
    """Delete, truncate, or flip one bit inside the first step's bytes of shard 2."""
    shard = store.joinpath(*SHARD)
    data = bytearray(shard.read_bytes())
    if kind == "deleted":
        shard.unlink()
    elif kind == "truncated":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[100] ^= 0x10
        shard.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tiny_store: Path, tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained in this process on the good store (for evaluation): its runs dir."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = write_config(runs / "c.yaml", train_config(tiny_store, runs, tiny_raw, max_steps=10,
                                                     val_every=10, checkpoint_every=5))
    loaded = load_config(cfg)
    train_loop(loaded, local_runtime(loaded))
    return runs


def test_a_good_store_verifies(tiny_store: Path) -> None:
    result = run_cli("inspect", "--verify", str(tiny_store), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "every checksum matches" in result.stdout


@pytest.mark.parametrize("kind", ["deleted", "truncated", "flipped"])
def test_a_damaged_store_is_named_by_train_evaluate_and_verify(
        kind: str, tiny_store: Path, tiny_raw: Path, trained: Path, tmp_path: Path) -> None:
    store = copy_store(tiny_store, tmp_path)
    damage(store, kind)
    named = "time step 32" if kind == "flipped" else SHARD_KEY

    verify = run_cli("inspect", "--verify", str(store), timeout=120)
    assert verify.returncode == 2, (verify.stdout, verify.stderr)
    assert "1 damaged" in verify.stdout and SHARD_KEY in verify.stdout, verify.stdout
    assert "1 damaged shard" in verify.stderr.strip().splitlines()[-1]

    # training: a lost shard fails in the driver; damaged bytes in the one of two Ray
    # workers that reads them, once: a fault that cannot go away is not retried, and the
    # other worker stops with it. The flipped bit trains in this process (one Ray start
    # fewer: the same reader raises it)
    cfg = train_config(store, tmp_path / "runs", tiny_raw, max_steps=30, val_every=30,
                       checkpoint_every=30, max_failures=2, workers=2, batch_size=4)
    config = write_config(tmp_path / "t.yaml", cfg)
    if kind == "flipped":
        loaded = load_config(config)
        with pytest.raises(StoreError, match=f"{store} is corrupt at {named}") as err:
            train_loop(loaded, local_runtime(loaded))
        assert SHARD_KEY in str(err.value) and "pipeline preprocess" in str(err.value)
    else:
        result = run_cli("train", str(config), timeout=240)
        line = assert_user_error(result, named, "pipeline preprocess")
        assert str(store) in line
        log = result.stdout + result.stderr
        if kind == "truncated":
            assert log.count("training from step 0") == 1, log[-4000:]
            assert "RETRY" not in log and "Traceback" not in log, log[-4000:]

    # evaluation of a good run on the damaged store
    eval_cfg = train_config(store, trained, tiny_raw)
    result = run_cli("evaluate", str(write_config(tmp_path / "e.yaml", eval_cfg)), "--split",
                     "val", "--set", "evaluate.max_samples=4", timeout=240)
    assert_user_error(result, named, "pipeline preprocess")


def test_preprocess_rebuilds_a_lost_shard_bitwise(tiny_raw: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    config = write_config(tmp_path / "c.yaml", base_config(tiny_raw, store))
    assert run_cli("preprocess", str(config), "--workers", "1", timeout=240).returncode == 0
    good = store.joinpath(*SHARD).read_bytes()
    version = zarr.open_group(str(store), mode="r").attrs["dataset_version"]
    damage(store, "deleted")
    result = run_cli("preprocess", str(config), "--workers", "1", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 lost shard(s) rebuilt" in result.stdout
    assert store.joinpath(*SHARD).read_bytes() == good
    assert zarr.open_group(str(store), mode="r").attrs["dataset_version"] == version
    assert run_cli("inspect", "--verify", str(store), timeout=120).returncode == 0


def test_a_format_1_store_without_checksums_stays_readable(tiny_store: Path,
                                                           tmp_path: Path) -> None:
    """The data array rewritten as format 1 wrote it (no CRC32C in its chunks)."""
    store = copy_store(tiny_store, tmp_path)
    old = zarr.open_array(str(store), path="data", mode="r")
    values = old[:]
    zarr.create_array(str(store), name="data", shape=old.shape, dtype="float32",
                      chunks=old.chunks, shards=old.shards, fill_value=np.nan,
                      compressors=store_module.compressors(Codec()),
                      dimension_names=old.metadata.dimension_names,
                      attributes=old.attrs.asdict(), overwrite=True)[:] = values
    store_module.consolidate(store)
    array = zarr.open_array(str(store), path="data", mode="r")
    assert not store_module.has_checksums(array)
    dataset = ForecastDataset(StoreInfo(store), "train", 1, 1)
    out = np.empty((20, *values.shape[1:]), np.float32)
    dataset.read_steps_into(30, out)
    assert out.tobytes() == values[30:50].tobytes()
    result = run_cli("inspect", "--verify", str(store), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "checksums absent" in result.stdout


def test_a_diverging_loss_stops_the_run_before_saving(tiny_store: Path, tiny_raw: Path,
                                                      tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cfg = load_config(write_config(tmp_path / "c.yaml", train_config(
        tiny_store, runs, tiny_raw, lr=1e30, warmup_steps=1, max_steps=20, val_every=5,
        checkpoint_every=5)))
    with pytest.raises(TrainingError, match=r"not finite .* at step (\d+)") as err:
        train_loop(cfg, local_runtime(cfg))
    step = int(str(err.value).split("at step ")[1].split(";")[0])
    assert 1 <= step <= 20
    saved = [int(p.name.split("-")[1]) for p in checkpoint.list_steps(runs / "test" / "checkpoints")]
    assert all(s < step for s in saved), (saved, step)
    assert not (runs / "test" / "best").exists() or step > 5


def test_a_checkpoint_that_does_not_fit_falls_back_to_the_older_one(
        trained: Path, tiny_store: Path, tiny_raw: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(trained / "test", runs / "test")
    newest = runs / "test" / "checkpoints" / "step-00000010"
    state = torch.load(newest / "state.pt", weights_only=True)
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 1)  # loads, but has another shape than the model
    torch.save(state, newest / "state.pt")
    cfg = load_config(write_config(tmp_path / "c.yaml", train_config(
        tiny_store, runs, tiny_raw, max_steps=12, val_every=10, checkpoint_every=5)))
    with caplog.at_level("WARNING"):
        metrics = train_loop(cfg, local_runtime(cfg))
    assert metrics["step"] == 12 and metrics["start_step"] == 5
    assert any("step-00000010" in r.message and "does not fit" in r.message
               for r in caplog.records)


def test_a_corrupt_data_metadata_is_one_line(tiny_store: Path, tiny_raw: Path,
                                             tmp_path: Path) -> None:
    store = copy_store(tiny_store, tmp_path)
    (store / "data" / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    cfg = write_config(tmp_path / "t.yaml", train_config(store, tmp_path / "runs", tiny_raw))
    assert_user_error(run_cli("train", str(cfg), timeout=120), "data/zarr.json is unreadable")



def edit_attrs(store: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the root attributes in the store's ``zarr.json``, as a hand edit or an
    older build leaves them."""
    meta = store / "zarr.json"
    tree = json.loads(meta.read_text())
    change(tree["attributes"])
    meta.write_text(json.dumps(tree))


@pytest.mark.parametrize(("field", "change", "said"), [
    ("frequency", lambda a: a.pop("frequency"), "is missing"),
    ("dataset_version", lambda a: a.update(dataset_version="1"), "is '1': input should be a "
     "valid integer"),
    ("splits.val", lambda a: a["splits"].update(val=["2000-02-16"]), "at least 2 items"),
], ids=["missing", "wrong-type", "short-range"])
def test_bad_store_attributes_are_one_line_naming_the_field(
        field: str, change: Callable[[dict[str, Any]], None], said: str, tiny_store: Path,
        tiny_raw: Path, tmp_path: Path) -> None:
    store = copy_store(tiny_store, tmp_path)
    edit_attrs(store, change)
    cfg = write_config(tmp_path / "t.yaml", train_config(store, tmp_path / "runs", tiny_raw))
    for result in (run_cli("train", str(cfg), timeout=120),
                   run_cli("inspect", str(store), timeout=120)):
        line = assert_user_error(result, f"training store {store}: attribute '{field}' is",
                                 said, "pipeline preprocess")
        assert "more bad attribute" not in line
    with pytest.raises(StoreError, match=f"attribute '{field}'"):
        StoreInfo(store)


def test_store_attributes_read_back_as_written_and_keep_unknown_keys(
        tiny_store: Path, tmp_path: Path) -> None:
    written = zarr.open_group(str(tiny_store), mode="r").attrs.asdict()
    assert StoreInfo(tiny_store).attrs.to_json() == written  # the same JSON, key for key
    store = copy_store(tiny_store, tmp_path)
    edit_attrs(store, lambda a: a.update(added_by_a_newer_build={"x": 1}))
    info = StoreInfo(store)
    assert info.attrs.model_extra == {"added_by_a_newer_build": {"x": 1}}
    assert info.attrs.frequency == "6h" and info.dataset_version == written["dataset_version"]
    assert run_cli("inspect", str(store), timeout=120).returncode == 0

def test_runs_dir_naming_a_file_is_one_line(tiny_store: Path, tiny_raw: Path,
                                            tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.write_text("not a folder")
    cfg = write_config(tmp_path / "t.yaml", train_config(tiny_store, runs, tiny_raw))
    assert_user_error(run_cli("train", str(cfg), timeout=120), f"{runs} is a file", "runs_dir")


def test_a_huge_shard_size_is_a_config_error(tiny_raw: Path, tmp_path: Path) -> None:
    cfg = base_config(tiny_raw, tmp_path / "store.zarr")
    config = tmp_path / "c.yaml"
    config.write_text(write_config(config, cfg).read_text().replace("shard_size: 16",
                                                                    "shard_size: 1e30"))
    assert_user_error(run_cli("preprocess", str(config), timeout=120), "data.shard_size")
    assert not (tmp_path / "store.zarr").exists()


def test_a_full_disk_is_one_line_and_a_rerun_resumes(tiny_raw: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk") as disk:
        config = write_config(tmp_path / "c.yaml", base_config(tiny_raw, disk / "store.zarr"))
        line = assert_user_error(run_cli("preprocess", str(config), "--workers", "1",
                                         timeout=240), "no space left", "resumes")
        assert "intact" in line
        subprocess.run(["mount", "-o", "remount,size=64M", str(disk)], check=True, timeout=30)
        result = run_cli("preprocess", str(config), "--workers", "1", timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        assert run_cli("inspect", "--verify", str(disk / "store.zarr"),
                       timeout=120).returncode == 0


@contextlib.contextmanager
def small_tmpfs(disk: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at ``disk`` for the block; skips where mounting is not
    allowed."""
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


@contextlib.contextmanager
def full_disk(disk: Path, room: int) -> Iterator[Path]:
    """A :func:`small_tmpfs` filled but for ``room`` bytes."""
    with small_tmpfs(disk):
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:  # until ENOSPC
                f.write(bytes(65536))
        os.truncate(filler, max(0, filler.stat().st_size - room))
        yield disk


def meta_at(step: int) -> CheckpointMeta:
    """A valid (if made-up) checkpoint meta at ``step``."""
    return CheckpointMeta.model_validate({
        "step": step, "epoch": 0, "config": {}, "config_hash": "x", "world_size": 1,
        "channels_out": ["t"], "store": {"path": "s", "data_hash": None, "dataset_version": 1,
                                         "channels": ["t"], "mean": [0.0], "std": [1.0]}})


def test_a_checkpoint_onto_a_full_disk_is_a_user_error_and_leaves_no_partial_one(
        tmp_path: Path) -> None:
    with full_disk(tmp_path / "disk", room=64 * 1024) as disk:
        root = disk / "checkpoints"
        first = checkpoint.save(root, 1, {"w": torch.zeros(4)}, meta_at(1))
        with pytest.raises(PipelineError, match="no space left on the device writing") as err:
            checkpoint.save(root, 2, {"w": torch.zeros(1 << 18)}, meta_at(2))  # 1 MiB
        assert "state.pt" in str(err.value) and "resumes" in str(err.value)
        assert sorted(p.name for p in root.iterdir()) == [first.name]  # no temporary left
        found = checkpoint.latest_valid(checkpoint.list_steps(root))
        assert found is not None and found[0] == first.resolve() and found[2] == meta_at(1)


def test_a_full_disk_under_a_ray_workers_checkpoint_is_one_line(
        tiny_store: Path, tiny_raw: Path, tmp_path: Path) -> None:
    # A Ray worker writes each checkpoint into a temporary folder under TMPDIR, which
    # Ray then copies into the run. 8 KiB free: enough for tempfile's probe file (it
    # skips a TMPDIR it cannot write), not for state.pt. Ray's own files stay elsewhere.
    config = write_config(tmp_path / "c.yaml", train_config(
        tiny_store, tmp_path / "runs", tiny_raw, max_steps=10, val_every=5, checkpoint_every=5))
    with full_disk(tmp_path / "disk", room=8192) as disk:
        result = run_cli("train", str(config), timeout=240, env={
            "TMPDIR": str(disk), "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp")})
        line = assert_user_error(result, "no space left on the device writing", "resumes")
        assert str(disk) in line and "state.pt" in line
    assert checkpoint.list_steps(tmp_path / "runs" / "test" / "checkpoints") == []


def test_a_full_disk_under_the_run_directory_is_one_line(tiny_store: Path, tiny_raw: Path,
                                                         tmp_path: Path) -> None:
    """Room for the run's own small files, not for the checkpoint that Ray copies into
    it from the worker, nor for the worker's record of the error: exit 2 with one
    full-disk line (Ray's forwarded worker logs may come around it), and no checkpoint
    that looks complete."""
    with full_disk(tmp_path / "disk", room=48 * 1024) as disk:
        config = write_config(tmp_path / "c.yaml", train_config(
            tiny_store, disk / "runs", tiny_raw, max_steps=10, val_every=5,
            checkpoint_every=5, max_failures=0))
        result = run_cli("train", str(config), timeout=240)
        assert result.returncode == 2, (result.returncode, result.stderr[-4000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "no space left on the device" in errors[0], errors
        assert "resumes" in errors[0]
        assert checkpoint.latest_valid(checkpoint.list_steps(disk / "runs" / "test" /
                                                             "checkpoints")) is None

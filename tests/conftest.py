"""Shared fixtures: synthetic raw data on disk, configs, one Dask cluster, the CLI.

Everything is real: NetCDF files written by the package's own simulation, Zarr stores
on disk, a Dask ``LocalCluster`` of worker processes, and the ``pipeline`` command run
as a subprocess where exit codes and messages are under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.demo.files import write_demo_data
from pipeline.demo.spec import demo_spec

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo data set (3 months, 17 x 32), written once per test run."""
    out = tmp_path_factory.mktemp("tiny_raw")
    write_demo_data(out, demo_spec("tiny"))
    return out


def _gloo_rank(rank: int, rendezvous: str, target: Callable[..., None], args: tuple) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        target(rank, *args)
    finally:
        dist.destroy_process_group()


def run_in_two_gloo_ranks(target: Callable[..., None], rendezvous: Path, *args: Any) -> None:
    """``target(rank, *args)`` in two spawned processes that form a gloo group (ranks 0
    and 1); fails if either hangs for two minutes or does not exit cleanly. ``target``
    must be a module-level function (the processes import it)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ranks = [ctx.Process(target=_gloo_rank, args=(r, str(rendezvous), target, args))
             for r in range(2)]
    for proc in ranks:
        proc.start()
    for proc in ranks:
        proc.join(timeout=120)
        if proc.exitcode is None:
            proc.kill()
        assert proc.exitcode == 0, "a rank hung or crashed"


def base_config(raw: Path, store: Path, **data: Any) -> dict[str, Any]:
    """A config dict for the tiny demo data; ``data`` entries override data.* keys."""
    cfg: dict[str, Any] = {
        "name": "test",
        "data": {
            "sources": [
                {"path": str(raw / "demo_*.nc")},
                {"path": str(raw / "static.nc"), "static": True},
            ],
            "variables": ["t2m", "msl", {"name": "t", "levels": [850, 500]},
                          {"name": "u", "levels": [850]}, {"name": "v", "levels": [850]}],
            "static": ["orog", "lsm"],
            "derived": [{"name": "ws850", "function": "wind_speed", "inputs": ["u850", "v850"]}],
            "forcings": ["cos_zenith", "sin_year"],
            "frequency": "6h",
            "splits": {"train": ["2000-01-01", "2000-02-15T18:00"],
                       "val": ["2000-02-16", "2000-03-05T18:00"],
                       "test": ["2000-03-06", "2000-03-31T18:00"]},
            "store": str(store),
            "shard_size": 16,
        },
    }
    cfg["data"].update(data)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def make_config(tmp_path: Path, tiny_raw: Path) -> Callable[..., Path]:
    """Write a config for the tiny data into tmp_path; keyword args override data.*."""

    def make(name: str = "config.yaml", raw: Path | None = None, **data: Any) -> Path:
        store = data.pop("store", tmp_path / "store.zarr")
        return write_config(tmp_path / name, base_config(raw or tiny_raw, Path(store), **data))

    return make


@pytest.fixture(scope="session")
def dask_scheduler() -> Iterator[str]:
    """One Dask LocalCluster (2 worker processes) shared by the in-process tests."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pipeline ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, tiny_raw: Path) -> Path:
    """A complete training store of the tiny data, built once per test run."""
    from pipeline.config import load_config
    from pipeline.data.build import preprocess

    tmp = tmp_path_factory.mktemp("tiny_store")
    config = write_config(tmp / "c.yaml", base_config(tiny_raw, tmp / "store.zarr"))
    preprocess(load_config(config), workers=2)
    return tmp / "store.zarr"


def train_config(store: Path, runs: Path, raw: Path | None = None, **train: Any) -> dict[str, Any]:
    """A small training config over ``store``; keyword args override train.*."""
    cfg = base_config(raw or store.parent, store)
    cfg["runs_dir"] = str(runs)
    cfg["model"] = {"arch": "unet", "width": 16, "depth": 2}
    cfg["train"] = {"batch_size": 8, "max_steps": 40, "val_every": 20, "checkpoint_every": 10,
                    "warmup_steps": 5, "lr": 0.003, "workers": 1, "keep_checkpoints": 10, **train}
    return cfg


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One local Ray instance for the in-process training tests, started as ``pipeline
    train`` starts its own (token, loopback only, its own dashboard port). The
    environment variables that sets stay while Ray runs and are restored after it."""
    import ray

    from pipeline.train.trainer import start_local_ray

    before = dict(os.environ)
    start_local_ray(tmp_path_factory.mktemp("ray_session"), num_cpus=2, log_to_driver=False)
    changed = {key: value for key, value in os.environ.items() if before.get(key) != value}
    removed = [key for key in before if key not in os.environ]
    try:
        yield
    finally:
        ray.shutdown()
        for key, value in changed.items():
            if os.environ.get(key) == value:  # not changed again since
                if key in before:
                    os.environ[key] = before[key]
                else:
                    os.environ.pop(key, None)
        for key in removed:
            os.environ.setdefault(key, before[key])


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The real two-node Slurm cluster (tests/slurm_cluster.py), started once per run.

    Installs Debian's slurm-wlm and munge when missing and running as root; with
    CI=true a missing Slurm fails the run instead of skipping. Stopped in a ``finally``:
    after the last test, after a start-up that failed half-way (slurmctld up, a slurmd
    not) and after a test that pytest-timeout interrupted.
    """
    import shutil as _shutil

    from tests.slurm_cluster import SlurmCluster, available, install

    if not available():
        if os.geteuid() == 0 and _shutil.which("apt-get"):
            install()
        elif IN_CI:
            pytest.fail("Slurm is not installed; .ci/run must install slurm-wlm and munge")
        else:
            pytest.skip("needs Slurm: apt-get install slurm-wlm munge (as root)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()

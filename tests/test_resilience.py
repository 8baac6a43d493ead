"""A killed build resumes to identical bytes; data larger than the workers' memory is
processed with bounded memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from bench.monitor import run_measured
from pipeline.config import load_config
from pipeline.data.build import preprocess
from pipeline.data.cluster import MALLOC_RETURN, MALLOC_REUSE, dask_client
from pipeline.demo.files import write_demo_data
from pipeline.demo.spec import demo_spec
from tests.conftest import base_config, write_config
from tests.test_preprocess import assert_same_arrays

pytestmark = pytest.mark.integration


def done_count(store: Path) -> int:
    """Shards flagged done so far (0 while the store does not exist yet)."""
    try:
        return int(np.asarray(zarr.open_group(str(store), mode="r")["_build/done"][:]).sum())
    except Exception:  # noqa: BLE001 - the store may be mid-creation
        return 0


def start_build(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "preprocess", str(config),
                             "--workers", "2"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_tree(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its Dask scheduler, nannies and workers
    proc.wait()


def test_sigkill_at_random_points_then_resume_is_byte_identical(
        tiny_raw: Path, tmp_path: Path, dask_scheduler: str) -> None:
    reference = tmp_path / "reference.zarr"
    preprocess(load_config(write_config(tmp_path / "ref.yaml",
                                        base_config(tiny_raw, reference, shard_size=4))),
               scheduler=dask_scheduler)
    store = tmp_path / "killed.zarr"
    config = write_config(tmp_path / "c.yaml", base_config(tiny_raw, store, shard_size=4))
    n_shards = 91
    rng = np.random.default_rng(20261126)
    seen = []
    # first kill at a random moment (often during start-up or init) ...
    proc = start_build(config)
    time.sleep(rng.uniform(0.2, 2.0))
    kill_tree(proc)
    seen.append(done_count(store))
    # ... then kills when a random number of further shards has been written
    for _ in range(3):
        target = min(n_shards - 1, done_count(store) + int(rng.integers(3, 25)))
        proc = start_build(config)
        deadline = time.monotonic() + 120
        while done_count(store) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # land inside the next shard's write
        kill_tree(proc)
        seen.append(done_count(store))
        assert not zarr.open_group(str(store), mode="r").attrs["complete"]
    assert any(0 < n < n_shards for n in seen), seen
    result = subprocess.run([sys.executable, "-m", "pipeline", "preprocess", str(config),
                             "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_arrays(reference, store)
    assert zarr.open_group(str(store), mode="r").attrs["complete"]


@pytest.mark.slow
def test_larger_than_worker_memory_with_bounded_peak(tmp_path: Path) -> None:
    """1.5 GB of output through 2 workers limited to 500 MB each (1 GB together)."""
    raw = tmp_path / "raw"
    spec = demo_spec("large", months=2)
    write_demo_data(raw, spec)
    levels = list(spec.levels)
    cfg = base_config(raw, tmp_path / "store.zarr", shard_size=4, derived=[], forcings=[],
                      variables=["t2m", "msl"] + [{"name": v, "levels": levels} for v in "tzuv"],
                      splits={"train": ["2000-01-01", "2000-01-31T18:00"],
                              "val": ["2000-02-01", "2000-02-14T18:00"],
                              "test": ["2000-02-15", "2000-02-29T18:00"]})
    config = write_config(tmp_path / "c.yaml", cfg)
    limit = 500e6
    result = run_measured([sys.executable, "-m", "pipeline", "preprocess", str(config),
                           "--workers", "2", "--memory-limit", str(int(limit))])
    assert result.returncode == 0, result.stderr[-2000:]
    group = zarr.open_group(str(tmp_path / "store.zarr"), mode="r")
    data_bytes = np.prod(group["data"].shape) * 4
    assert data_bytes > 2 * limit  # the data does not fit in the workers' memory
    assert group.attrs["complete"]
    # bound: every process stays under the worker limit; all together under the data size
    assert result.peak_largest_process < limit, result.peak_per_process
    assert result.peak_total < data_bytes, (result.peak_total, data_bytes)
    assert "exceeded 95% memory budget" not in result.stderr


@pytest.mark.parametrize("limit, reuse", [("500MB", False), ("4GB", True), ("500MB", False)])
def test_local_workers_keep_freed_buffers_only_with_room(limit: str, reuse: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a tight limit the workers map every buffer over 128 kB afresh and give
    freed memory back at once; with room, glibc reuses shard-sized buffers (see
    cluster.worker_environ). The last case checks that a roomy cluster started earlier in this
    process does not leak its setting into the next one."""
    for name in MALLOC_REUSE:  # as exported by the user, these would win; other tests'
        monkeypatch.delenv(name, raising=False)  # clusters leave dask's values here
    with dask_client(2, None, limit) as client:
        seen = client.run(lambda: {k: os.environ.get(k) for k in MALLOC_REUSE})
    expected = MALLOC_REUSE if reuse else {**MALLOC_RETURN, "MALLOC_ARENA_MAX": None}
    assert list(seen.values()) == [expected] * 2, seen


def test_local_workers_are_forked_with_the_pipeline_imported(tmp_path: Path) -> None:
    """In a fresh process, the first cluster's workers come from the server that
    imported the pipeline (not spawned by this process), with its environment."""
    script = tmp_path / "workers.py"
    script.write_text(
        "import json, os, sys\n"
        "from pipeline.data.cluster import dask_client, start_worker_server, local_settings\n"
        "def probe():\n"
        "    return {'ppid': os.getppid(), 'imported': 'pipeline.data.build' in sys.modules,\n"
        "            'mmap': os.environ.get('MALLOC_MMAP_THRESHOLD_')}\n"
        "if __name__ == '__main__':\n"
        "    start_worker_server(local_settings(2, '4GB').environ)\n"
        "    with dask_client(2, None, '4GB') as client:\n"
        "        seen = list(client.run(probe).values())\n"
        "    print(json.dumps({'main': os.getpid(), 'workers': seen}))\n")
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_REUSE}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env=env, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["workers"]) == 2
    for worker in report["workers"]:
        assert worker["ppid"] != report["main"], worker  # spawned workers are this process's children
        assert worker["imported"], worker
        assert worker["mmap"] == MALLOC_REUSE["MALLOC_MMAP_THRESHOLD_"], worker

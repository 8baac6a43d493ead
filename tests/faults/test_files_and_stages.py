"""Faults at the file level (issue 16, items 5, 7, 8, 9): a killed evaluation, the
user's own demo files, two writers of one shard, a killed forecast's temporary, a
store path with no room for its lock. Real processes and files throughout."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.config import config_from_dict
from pipeline.data.build import preprocess
from pipeline.train.loop import train_loop
from pipeline.train.runtime import local_runtime
from tests.conftest import base_config, run_cli, train_config, write_config

pytestmark = pytest.mark.integration

TIMEOUT = 300  # seconds any wait below gives up after


def trained_run(tree: dict) -> None:
    """Train ``tree``'s run to its max_steps in this process (no Ray)."""
    cfg = config_from_dict(tree)
    train_loop(cfg, local_runtime(cfg))


def small_run(store: Path, runs: Path, raw: Path) -> dict:
    tree = train_config(store, runs, raw=raw, max_steps=4, val_every=2, checkpoint_every=2)
    tree["evaluate"] = {"leads": [1, 2], "max_samples": 4}
    return tree


def printed(output: str, prefix: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, output
    return lines[0][len(prefix):]


@pytest.fixture(scope="module")
def run_tree(tiny_store: Path, tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tree = small_run(tiny_store, tmp_path_factory.mktemp("runs"), tiny_raw)
    trained_run(tree)
    return tree


# --------------------------------------------------------------------------- item 5


def test_a_killed_evaluation_is_run_again_and_the_report_exists(run_tree: dict,
                                                                tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", run_tree)
    run_dir = Path(run_tree["runs_dir"]) / run_tree["name"]
    log = tmp_path / "evaluate.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "evaluate", str(config)],
                                stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT
    # the first figure is written after the metrics and before the report
    while not any(run_dir.rglob("*.png")):
        assert proc.poll() is None, f"evaluate ended before writing a plot: {log.read_text()}"
        assert time.monotonic() < deadline, "no plot within the timeout"
        time.sleep(0.005)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-way, not finished
    assert not (run_dir / "eval" / "report.html").exists()

    result = run_cli("run", str(config), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "evaluate: wrote" in result.stdout and "is current; skipped" not in result.stdout
    assert Path(printed(result.stdout, "report: ")).is_file()
    assert not list(run_dir.glob(".eval.tmp-*"))  # the killed evaluation's temporary is gone


# --------------------------------------------------------------------------- item 7


def test_run_uses_the_users_own_demo_files_and_never_rewrites_them(
        tmp_path: Path, dask_scheduler: str) -> None:
    raw = tmp_path / "data" / "demo" / "raw"
    made = run_cli("demo-data", str(raw), "--size", "tiny", "--months", "3", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in raw.iterdir()}
    tree = small_run(tmp_path / "store.zarr", tmp_path / "runs", raw)
    preprocess(config_from_dict(tree), scheduler=dask_scheduler)
    trained_run(tree)
    config = write_config(tmp_path / "c.yaml", tree)

    result = run_cli("run", str(config), cwd=tmp_path, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    demo = printed(result.stdout, "demo data: ")
    assert "as they are" in demo and "n_lat 17 (expected 33)" in demo, demo
    assert "already complete; nothing to do" in result.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in raw.iterdir()} == before
    assert Path(tmp_path, printed(result.stdout, "report: ")).is_file()


def files_of(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file in ``folder`` (the hidden spec marker too): modification time, bytes."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}


def test_demo_data_never_overwrites_files_of_another_spec(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    made = run_cli("demo-data", str(raw), "--size", "tiny", "--months", "2", timeout=TIMEOUT)
    assert made.returncode == 0 and made.stdout.startswith("wrote 3 files"), made.stderr
    before = files_of(raw)

    other = run_cli("demo-data", str(raw), "--size", "small", "--months", "2", timeout=TIMEOUT)
    assert other.returncode == 2, other.stderr
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), other.stderr
    assert "n_lat 17 (expected 33)" in lines[0] and "not overwritten" in lines[0], lines
    assert "another directory" in lines[0] and "delete" in lines[0], lines
    assert files_of(raw) == before

    again = run_cli("demo-data", str(raw), "--size", "tiny", "--months", "2", timeout=TIMEOUT)
    assert again.returncode == 0 and "kept (already there)" in again.stdout, again.stderr
    assert files_of(raw) == before

    (raw / "static.nc").unlink()  # one of this spec's files deleted: only it comes back
    refill = run_cli("demo-data", str(raw), "--size", "tiny", "--months", "2", timeout=TIMEOUT)
    assert refill.returncode == 0 and refill.stdout.startswith("wrote 3 files"), refill.stderr
    after = files_of(raw)
    assert sorted(after) == sorted(before)
    assert {k: v for k, v in after.items() if k != "static.nc"} == {
        k: v for k, v in before.items() if k != "static.nc"}

    own = tmp_path / "own"
    own.mkdir()
    (own / "mine.nc").write_bytes(b"the user's file")
    theirs = run_cli("demo-data", str(own), "--size", "tiny", "--months", "2", timeout=TIMEOUT)
    assert theirs.returncode == 2 and "not written by `pipeline demo-data`" in theirs.stderr
    assert [p.name for p in own.iterdir()] == ["mine.nc"]
    assert (own / "mine.nc").read_bytes() == b"the user's file"


# --------------------------------------------------------------------------- item 8

WRITER = """
import sys, time
from pathlib import Path
import numpy as np, zarr
from pipeline.data.shards import ShardFiles
array = zarr.open_array(sys.argv[1], path="data", mode="r+")
files = ShardFiles.of(array)
block = np.empty((array.metadata.chunk_grid.chunk_shape[0], *array.shape[1:]), np.float32)
files.read(0, block)
go, deadline = Path(sys.argv[2]), time.monotonic() + 120
while not go.exists():
    assert time.monotonic() < deadline, "no start signal"
    time.sleep(0.001)
for _ in range(int(sys.argv[3])):
    files.write(0, block)
"""


def test_two_writers_of_one_shard_both_succeed_and_the_shard_is_whole(
        tiny_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    data = zarr.open_array(str(store), path="data", mode="r")
    steps = data.metadata.chunk_grid.chunk_shape[0]
    expected = data[:steps]
    shard = store / "data" / data.metadata.encode_chunk_key((0, 0, 0, 0))
    original = shard.read_bytes()
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(store), str(go), "300"],
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(3)  # both have imported and read the shard (a writer waits up to 120 s)
    go.touch()
    for writer in writers:
        _, err = writer.communicate(timeout=TIMEOUT)
        assert writer.returncode == 0, err
    assert shard.read_bytes() == original
    again = zarr.open_array(str(store), path="data", mode="r")[:steps]
    assert again.view(np.uint32).tobytes() == expected.view(np.uint32).tobytes()
    assert sorted(p.name for p in shard.parent.iterdir()) == [shard.name]  # no temporaries


# --------------------------------------------------------------------------- item 9

MAKE_TEMPORARY = """
import sys
from pipeline.files import temporary_name
tmp = temporary_name(sys.argv[1])
tmp.mkdir()
(tmp / "zarr.json").write_text("{}")
print(tmp, flush=True)
sys.stdin.read()  # a live writer: holds on until its stdin closes
"""


def writer_temporary(out: Path) -> tuple[subprocess.Popen, Path]:
    """A real process that has made its temporary of ``out`` and is still running."""
    proc = subprocess.Popen([sys.executable, "-c", MAKE_TEMPORARY, str(out)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    return proc, Path(proc.stdout.readline().strip())


def test_predict_removes_dead_writers_temporaries_and_keeps_live_ones(
        run_tree: dict, tmp_path: Path) -> None:
    out = tmp_path / "fc.zarr"
    dead, dead_tmp = writer_temporary(out)
    dead.kill()
    dead.communicate(timeout=60)  # reaped: its pid is no process now
    live, live_tmp = writer_temporary(out)
    try:
        assert dead_tmp.is_dir() and live_tmp.is_dir()
        best = Path(run_tree["runs_dir"]) / run_tree["name"] / "best"
        result = run_cli("predict", str(best), "--init", "2000-03-10T06:00", "--steps", "2",
                         "--out", str(out), timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert (out / "zarr.json").is_file()
        assert not dead_tmp.exists()
        assert (live_tmp / "zarr.json").is_file()
    finally:
        live.communicate(input="", timeout=60)


@pytest.mark.parametrize("where", ["root", "under-a-file"])
def test_a_store_path_without_room_for_its_lock_is_a_one_line_error(
        where: str, tmp_path: Path, tiny_raw: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    store = "/" if where == "root" else str(tmp_path / "a-file" / "store.zarr")
    config = write_config(tmp_path / "c.yaml", base_config(tiny_raw, Path(store)))
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("preprocess", str(config), cwd=work, timeout=TIMEOUT)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "data.store" in errors[0], result.stderr
    assert list(work.iterdir()) == []  # nothing written where the command ran
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "c.yaml", "work"]

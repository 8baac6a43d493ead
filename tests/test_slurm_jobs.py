"""The Slurm stage on the real two-node test cluster (tests/slurm_cluster.py).

``pipeline slurm submit`` runs the chain as real jobs: the preprocess array and its
finalise job, a 2-node Ray training job (one Ray node per Slurm node, one CPU worker
each) and the evaluation. A failed stage cancels the rest; a training job that gets
its time-limit signal checkpoints, requeues itself and finishes; the scheduled
retraining job re-submits itself for the next period.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.train import checkpoint
from tests.conftest import base_config, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _no_job_left_running(slurm_cluster: Any) -> Iterator[None]:
    """A test that fails while its job runs (a job of a million steps, say) must not
    leave it taking the CPUs of the tests after it."""
    yield
    slurm_cluster.cancel_all()


def slurm_config(tmp: Path, raw: Path, **slurm: Any) -> dict[str, Any]:
    cfg = base_config(raw, tmp / "store.zarr")
    cfg["name"] = "slurm"
    cfg["runs_dir"] = str(tmp / "runs")
    cfg["model"] = {"arch": "unet", "width": 16, "depth": 2}
    cfg["train"] = {"batch_size": 8, "max_steps": 30, "val_every": 15, "checkpoint_every": 15,
                    "warmup_steps": 5, "lr": 0.003, "cpus_per_worker": 1}
    cfg["evaluate"] = {"leads": [1, 2], "max_samples": 8}
    cfg["slurm"] = {"nodes": 2, "cpus_per_task": 1, "preprocess_parts": 2, "time": "15:00",
                    "command": f"{sys.executable} -m pipeline", "node_timeout": 120, **slurm}
    return cfg


def error_lines(log: str) -> list[str]:
    """Error-level log lines (ours or Ray's) in a job log."""
    return [line for line in log.splitlines() if re.search(r"\bERROR\b|^error: ", line)]


def cli(cluster: Any, *args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=cluster.env,
                          capture_output=True, text=True, timeout=timeout)


def job_ids(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)\s+job (\d+)", stdout, flags=re.M))


def test_the_whole_chain_runs_on_two_nodes(slurm_cluster, tiny_raw: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", slurm_config(tmp_path, tiny_raw))
    out = cli(slurm_cluster, "slurm", "submit", str(config), "--wait", cwd=tmp_path)
    logs = tmp_path / "runs" / "slurm" / "slurm"
    detail = out.stdout + out.stderr + "".join(p.read_text() for p in sorted(logs.glob("*.out")))
    assert out.returncode == 0, detail
    ids = job_ids(out.stdout)
    assert list(ids) == ["preprocess", "finalise", "train", "evaluate"], out.stdout
    assert out.stdout.count("COMPLETED") >= 4, out.stdout

    # the preprocess array ran one task per part, and the store is complete
    assert len(list(logs.glob("slurm-preprocess-*_*.out"))) == 2
    import zarr

    assert zarr.open_group(tmp_path / "store.zarr", mode="r").attrs["complete"] is True
    # training ran on both Slurm nodes with one Ray worker each and reached its steps
    train_log = (logs / f"slurm-train-{ids['train']}.out").read_text()
    assert "2 node(s) (n1,n2)" in train_log, train_log
    assert "plan: 2 Ray Train workers (1 per node), CPU, 1 CPUs each" in train_log, train_log
    assert re.search(r"node n1 at \S+: 1 CPUs", train_log) and re.search(
        r"node n2 at \S+: 1 CPUs", train_log), train_log
    assert not error_lines(train_log), train_log
    run = tmp_path / "runs" / "slurm"
    plan = json.loads((run / "plan.json").read_text())  # what ran is what the plan said
    assert (plan["nodes"], plan["workers"], plan["ray_cpus_per_node"]) == (2, 2, 1), plan
    assert plan["allocation"]["job_id"] == ids["train"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 30
    assert (run / "checkpoints" / "step-00000030" / "meta.json").exists()
    assert (run / "best").exists()
    # evaluation ran after training, on its checkpoint
    evaluation = json.loads((run / "eval" / "metrics.json").read_text())
    assert evaluation["records"] and all(r["rmse"] >= 0 for r in evaluation["records"])
    assert json.loads((logs / "jobs.json").read_text())["jobs"][2]["id"] == ids["train"]


def test_a_failed_stage_cancels_the_rest_and_says_so(slurm_cluster, tiny_raw: Path,
                                                     tmp_path: Path) -> None:
    cfg = slurm_config(tmp_path, tiny_raw)
    cfg["data"]["sources"][0]["path"] = str(tmp_path / "missing" / "*.nc")
    config = write_config(tmp_path / "c.yaml", cfg)
    out = cli(slurm_cluster, "slurm", "submit", str(config), "--wait", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = dict(re.findall(r"^(\w+)\s+job \d+\s+(.*)$", out.stdout, flags=re.M))
    assert lines["preprocess"].startswith("FAILED"), out.stdout
    for stage in ("finalise", "train", "evaluate"):
        assert lines[stage].startswith("CANCELLED") and "not run because preprocess" in \
            lines[stage], out.stdout
    logs = tmp_path / "runs" / "slurm" / "slurm"
    part_log = next(logs.glob("slurm-preprocess-*_1.out")).read_text()
    assert "error: " in part_log and "missing" in part_log  # the user's error, one line
    assert not (tmp_path / "runs" / "slurm" / "checkpoints").exists()
    assert not list(logs.glob("slurm-train-*.out"))  # never started


def test_the_time_limit_signal_checkpoints_requeues_and_finishes(slurm_cluster, tiny_store: Path,
                                                                 tmp_path: Path) -> None:
    """A two-node job with a 4-minute limit and --signal=B:USR1@120: Slurm signals
    60-120 s after the start (it checks every 30 s and may signal up to 60 s early). The
    run is far too long for one allocation, so it checkpoints, stops the Ray cluster on
    both nodes and requeues itself; while the requeued job is held, the test shortens
    the run to 100 steps past that checkpoint, so that the next allocation finishes it
    however fast this machine trains."""
    cfg = slurm_config(tmp_path, tiny_store.parent, nodes=2, cpus_per_task=1, time="4",
                       signal_seconds=120)
    cfg["data"]["store"] = str(tiny_store)
    cfg["train"].update(max_steps=1_000_000, val_every=500, checkpoint_every=500)
    config = write_config(tmp_path / "c.yaml", cfg)
    out = cli(slurm_cluster, "slurm", "submit", str(config), "--stages", "train", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job = job_ids(out.stdout)["train"]
    run = tmp_path / "runs" / "slurm"
    log_path = run / "slurm" / f"slurm-train-{job}.out"
    deadline = time.monotonic() + 400
    while "requeued" not in (log_path.read_text() if log_path.exists() else ""):
        state = slurm_cluster.job_state(job)["JobState"]
        # SIGNALING: running, while slurmd delivers the --signal
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "SIGNALING"), \
            (state, log_path.read_text())
        assert time.monotonic() < deadline, "no requeue within 400 s"
        time.sleep(0.5)
    # Slurm holds a requeued job until the old credential expires (10 s here)
    slurm_cluster.run("scontrol", "hold", job)
    stopped_at = int(checkpoint.list_steps(run / "checkpoints")[0].name.removeprefix("step-"))
    cfg["train"]["max_steps"] = stopped_at + 100
    write_config(tmp_path / "c.yaml", cfg)
    slurm_cluster.run("scontrol", "release", job)
    state = slurm_cluster.wait_job(job, timeout=600)
    log = log_path.read_text()
    assert state["JobState"] == "COMPLETED", log
    assert int(state["Restarts"]) >= 1, log  # requeued at least once
    assert "asking the workers to checkpoint and stop" in log and "requeued" in log, log
    assert "resumed from" in log, log
    assert log.count("plan: 2 Ray Train workers (1 per node)") >= 2, log  # both allocations
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert stopped_at in steps and steps == sorted(steps), steps
    assert steps[-1] == stopped_at + 100, steps


def test_scheduled_retraining_queues_its_next_run(slurm_cluster, tiny_raw: Path,
                                                  tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml",
                          slurm_config(tmp_path, tiny_raw, retrain_every="2h"))
    out = cli(slurm_cluster, "slurm", "schedule", str(config), "--now", "--self-submit",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    first = re.search(r"retraining job (\d+) queued to start now", out.stdout).group(1)
    started = time.time()
    assert slurm_cluster.wait_job(first, timeout=600)["JobState"] == "COMPLETED"
    # the first run retrained for real: a champion in the registry
    assert json.loads((tmp_path / "registry" / "slurm" / "champion.json").read_text())
    pending = slurm_cluster.run("squeue", "--noheader", "--name", "slurm-retrain", "--states",
                                "PENDING", "--format", "%i").stdout.split()
    assert len(pending) == 1, pending
    state = slurm_cluster.job_state(pending[0])
    assert state["JobState"] == "PENDING" and state["Reason"] == "BeginTime"
    begin = time.mktime(time.strptime(state["StartTime"], "%Y-%m-%dT%H:%M:%S"))
    assert abs(begin - (started + 2 * 3600)) < 120, state["StartTime"]
    assert state["Command"].endswith("retrain.sbatch")
    slurm_cluster.run("scancel", pending[0])


def srun_train_in_two_node_job(cluster: Any, config: Path, tmp_path: Path, srun_args: str,
                               timeout: float) -> tuple[dict[str, str], str]:
    """``srun [srun_args] pipeline train CONFIG`` in a 2-node batch job; its state and log."""
    log = tmp_path / "job.out"
    command = f"srun {srun_args} {sys.executable} -m pipeline train {config}"
    job = cluster.run("sbatch", "--parsable", "-N", "2", "--ntasks-per-node", "1",
                      "--cpus-per-task", "1", "-o", str(log), "--chdir", str(tmp_path),
                      "--wrap", command).stdout.strip()
    state = cluster.wait_job(job, timeout=timeout)
    return state, log.read_text()


def test_train_under_srun_uses_one_task_per_node(slurm_cluster, tiny_store: Path,
                                                 tmp_path: Path) -> None:
    """The same command inside ``srun``: task 0 is head and driver, task 1 a Ray node."""
    cfg = slurm_config(tmp_path, tiny_store.parent)
    cfg["data"]["store"] = str(tiny_store)
    cfg["train"].update(max_steps=10, val_every=10, checkpoint_every=10)
    config = write_config(tmp_path / "c.yaml", cfg)
    state, text = srun_train_in_two_node_job(slurm_cluster, config, tmp_path, "", timeout=400)
    assert state["JobState"] == "COMPLETED", text
    assert "plan: 2 Ray Train workers (1 per node)" in text, text
    assert "served as a Ray worker node" in text, text
    assert text.count("plan: ") == 5, text  # the plan is logged once, by task 0
    assert re.search(r"node n2 at \S+: 1 CPUs", text), text
    metrics = (tmp_path / "runs" / "slurm" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 10


def test_a_node_that_never_joins_fails_the_job_naming_it(slurm_cluster, tiny_store: Path,
                                                         tmp_path: Path) -> None:
    """A 2-node allocation where only n1 runs a task: n2's Ray node never joins, and the
    job ends after slurm.node_timeout with an error that names n2."""
    cfg = slurm_config(tmp_path, tiny_store.parent, node_timeout=15)
    cfg["data"]["store"] = str(tiny_store)
    config = write_config(tmp_path / "c.yaml", cfg)
    state, text = srun_train_in_two_node_job(slurm_cluster, config, tmp_path,
                                             "--nodes=1 --ntasks=1 --nodelist=n1", timeout=300)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert errors and "Ray nodes missing after 15 s: n2 " in errors[0], text
    assert not (tmp_path / "runs" / "slurm" / "checkpoints").exists()


def test_one_node_jobs_follow_their_allocation_side_by_side(slurm_cluster, tiny_store: Path,
                                                            tmp_path: Path) -> None:
    """Two one-node jobs of one CPU each, started together on the same node n1, with a
    config that asks for 2 workers: each says so in one warning line, trains with
    exactly 1 worker on a Ray that sees 1 CPU, on ports and a temp dir of its own, and
    both finish with no error-level line; each plan.json says what ran."""
    ids = {}
    for name in ("first", "second"):
        cfg = slurm_config(tmp_path, tiny_store.parent, nodes=1, cpus_per_task=1,
                           extra_directives=["--nodelist=n1"])
        cfg["name"] = name
        cfg["data"]["store"] = str(tiny_store)
        cfg["train"].update(max_steps=10, val_every=10, checkpoint_every=10, workers=2)
        config = write_config(tmp_path / f"{name}.yaml", cfg)
        out = cli(slurm_cluster, "slurm", "submit", str(config), "--stages", "train",
                  cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        ids[name] = job_ids(out.stdout)["train"]
    plans, spans = {}, []
    for name, job in ids.items():
        state = slurm_cluster.wait_job(job, timeout=600)
        spans.append((state["StartTime"], state["EndTime"]))
        run = tmp_path / "runs" / name
        log = (run / "slurm" / f"{name}-train-{job}.out").read_text()
        assert state["JobState"] == "COMPLETED" and state["NodeList"] == "n1", log
        assert "plan: 1 Ray Train workers (1 per node), CPU, 1 CPUs each" in log, log
        assert re.search(r"WARNING \S+: train\.workers is 2, but the allocation \(1 node\(s\), "
                         r"1 CPUs and 0 GPUs each\) holds 1: training with 1", log), log
        assert re.search(r"node n1 at \S+: 1 CPUs, 0 GPUs", log), log
        assert not error_lines(log) and "Traceback" not in log, log
        assert "Reporting training result" not in log, log  # Ray Train's per-rank dumps
        plans[name] = json.loads((run / "plan.json").read_text())
        assert (plans[name]["workers"], plans[name]["ray_cpus_per_node"]) == (1, 1)
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1] == 10, steps
    first, second = plans["first"], plans["second"]
    # they ran at the same time on n1, each with its own Ray
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
    assert first["ports"]["port"] != second["ports"]["port"]
    assert first["ray_temp_dir"] != second["ray_temp_dir"]


def test_the_demo_config_runs_on_a_fresh_cluster(slurm_cluster, tmp_path: Path) -> None:
    """`pipeline slurm submit configs/demo.yaml` in a folder without the demo data: the
    chain's first job writes it (one month here, for a short time range), then the
    preprocess array and finalise build the store from it."""
    shutil.copy(Path(__file__).parents[1] / "configs" / "demo.yaml", tmp_path / "demo.yaml")
    sets = [f"slurm.command={sys.executable} -m pipeline", "slurm.cpus_per_task=1",
            'data.splits.train=["2000-01-01", "2000-01-20T18:00"]',
            'data.splits.val=["2000-01-21", "2000-01-25T18:00"]',
            'data.splits.test=["2000-01-26", "2000-01-31T18:00"]']
    out = cli(slurm_cluster, "slurm", "submit", "demo.yaml", "--stages", "preprocess", "--wait",
              *[arg for item in sets for arg in ("--set", item)], cwd=tmp_path)
    logs = tmp_path / "runs" / "demo" / "slurm"
    detail = out.stdout + out.stderr + "".join(p.read_text() for p in sorted(logs.glob("*.out")))
    assert out.returncode == 0, detail
    assert list(job_ids(out.stdout)) == ["demo_data", "preprocess", "finalise"], out.stdout
    assert sorted(p.name for p in (tmp_path / "data" / "demo" / "raw").glob("*.nc")) == [
        "demo_2000-01.nc", "static.nc"], detail
    import zarr

    store = zarr.open_group(tmp_path / "data" / "demo" / "demo.zarr", mode="r")
    assert store.attrs["complete"] is True and store["time"].shape == (124,)

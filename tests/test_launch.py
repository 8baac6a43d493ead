"""The launcher's Ray commands and the rendezvous of the tasks of an srun step."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pipeline.launch import (
    node_resource,
    ray_start_command,
    rendezvous_file,
    share_rendezvous,
    wait_for_rendezvous,
)
from pipeline.plan import Allocation, ray_ports

pytestmark = pytest.mark.unit

ALLOC = Allocation("4242", ("gpu01", "gpu02"), "gpu02", 32, 4, False, 0, 1, "/local")


def options(cmd: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in cmd if arg.startswith("--") and "=" in arg)


def test_ray_starts_with_the_allocation_and_the_planned_ports() -> None:
    ports = ray_ports(20000, 3, 1)
    head = options(ray_start_command(ALLOC, "gpu01", ports, None, "10.0.0.1"))
    worker_cmd = ray_start_command(ALLOC, "gpu02", ports, "10.0.0.1:21500", "10.0.0.2")
    worker = options(worker_cmd)
    for opts in (head, worker):
        assert opts["num-cpus"] == "32" and opts["num-gpus"] == "4"
    assert head["temp-dir"] == "/local/ray-4242-0" and worker["temp-dir"] == "/local/ray-4242-1"
    assert head["port"] == str(ports["port"]) and "--head" in ray_start_command(
        ALLOC, "gpu01", ports, None, "10.0.0.1")
    # a worker node opens none of the head's ports, and joins the head given to it
    assert "port" not in worker and "dashboard-port" not in worker
    assert worker["address"] == "10.0.0.1:21500"
    assert worker["min-worker-port"] == str(ports["min-worker-port"])
    assert '"slurm_node_gpu02": 1' in worker["resources"]
    assert node_resource("gpu-01.cluster") == "slurm_node_gpu_01_cluster"


def test_srun_tasks_meet_through_a_private_file_of_their_own_step(tmp_path: Path) -> None:
    env = {"SLURM_STEP_ID": "3", "SLURM_RESTART_COUNT": "1"}
    path = rendezvous_file(tmp_path, ALLOC, env)
    assert path != rendezvous_file(tmp_path, ALLOC, {**env, "SLURM_RESTART_COUNT": "2"})
    share_rendezvous(path, "secret", "10.0.0.1:21500")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert wait_for_rendezvous(path) == ("secret", "10.0.0.1:21500")
    with pytest.raises(Exception, match="no Ray head address from task 0"):
        wait_for_rendezvous(tmp_path / "missing.json", timeout=0.5)

"""The execution plan over a table of environments, and `pipeline plan` as a user runs it.

The plan is arithmetic on the config and the environment, so every cluster shape is
tested here without its hardware: a laptop, one node with 0 to 8 GPUs, several nodes,
the Slurm variables a site may leave unset, CUDA_VISIBLE_DEVICES narrower than the
node, and configs whose explicit settings the allocation overrides or cannot hold.
"""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import config_from_dict
from pipeline.plan import (
    JOB_SLOTS,
    Allocation,
    ExecutionPlan,
    PlanError,
    detect,
    free_block,
    job_block,
    port_is_free,
    ray_ports,
    resolve_plan,
)
from tests.conftest import write_config
from tests.test_slurm_render import golden_config

pytestmark = pytest.mark.unit


def expand(nodelist: str) -> tuple[str, ...]:
    """``scontrol show hostnames`` for the node lists of these tests."""
    return {"gpu[01-04]": ("gpu01", "gpu02", "gpu03", "gpu04"), "gpu[01-02]": ("gpu01", "gpu02"),
            "gpu01": ("gpu01",)}[nodelist]


def slurm_env(nodes: str = "gpu01", **extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": nodes, "SLURMD_NODENAME": "gpu01",
            **extra}


def plan_for(environ: dict[str, str], train: dict[str, Any] | None = None,
             address: str | None = None) -> ExecutionPlan:
    tree = golden_config()
    tree["train"] = train or {}
    return resolve_plan(config_from_dict(tree), environ, address=address, expand=expand,
                        is_free=lambda port: True, cpu_count=8)


# (environment, config's train section) -> (workers, use_gpu, cpus/worker, readers, Ray CPUs, Ray GPUs)
TABLE = {
    "laptop": ({}, {}, (2, False, 1, 0, 8, None)),
    "laptop, more workers than cores": ({}, {"workers": 4, "cpus_per_worker": 4},
                                        (4, False, 4, 0, 16, None)),
    "one node, no GPU": (slurm_env(SLURM_CPUS_PER_TASK="6"), {}, (6, False, 1, 0, 6, 0)),
    "one node, no GPU, 2 CPUs a worker": (slurm_env(SLURM_CPUS_PER_TASK="5"),
                                          {"cpus_per_worker": 2}, (2, False, 2, 0, 5, 0)),
    "one node, 1 GPU": (slurm_env(SLURM_CPUS_PER_TASK="8", SLURM_GPUS_ON_NODE="1"), {},
                        (1, True, 8, 7, 8, 1)),
    "one node, 4 GPUs": (slurm_env(SLURM_CPUS_PER_TASK="32", SLURM_GPUS_ON_NODE="4"), {},
                         (4, True, 8, 7, 32, 4)),
    "one node, 8 GPUs": (slurm_env(SLURM_CPUS_PER_TASK="128", SLURM_GPUS_PER_NODE="h100:8"), {},
                         (8, True, 16, 8, 128, 8)),
    "2 nodes, 4 GPUs each": (slurm_env("gpu[01-02]", SLURM_CPUS_PER_TASK="32",
                                       SLURM_GPUS_ON_NODE="4"), {}, (8, True, 8, 7, 32, 4)),
    "4 nodes on CPUs": (slurm_env("gpu[01-04]", SLURM_CPUS_PER_TASK="3"), {},
                        (12, False, 1, 0, 3, 0)),
    "SLURM_CPUS_PER_TASK unset": (slurm_env(SLURM_CPUS_ON_NODE="12", SLURM_GPUS_ON_NODE="2"), {},
                                  (2, True, 6, 5, 12, 2)),
    "CUDA_VISIBLE_DEVICES narrower": (slurm_env(SLURM_CPUS_PER_TASK="16", SLURM_GPUS_ON_NODE="4",
                                                CUDA_VISIBLE_DEVICES="2,3"), {},
                                      (2, True, 8, 7, 16, 2)),
    "CUDA_VISIBLE_DEVICES empty": (slurm_env(SLURM_CPUS_PER_TASK="4", SLURM_GPUS_ON_NODE="4",
                                             CUDA_VISIBLE_DEVICES=""), {}, (4, False, 1, 0, 4, 0)),
    "explicit readers kept": (slurm_env(SLURM_CPUS_PER_TASK="32", SLURM_GPUS_ON_NODE="4"),
                              {"loader_workers": 2}, (4, True, 8, 2, 32, 4)),
}


@pytest.mark.parametrize("case", TABLE)
def test_the_plan_of_each_cluster_shape(case: str) -> None:
    environ, train, expected = TABLE[case]
    plan = plan_for(environ, train)
    workers, use_gpu, cpus, readers, ray_cpus, ray_gpus = expected
    assert (plan.workers, plan.use_gpu, plan.cpus_per_worker, plan.loader_workers,
            plan.ray_cpus_per_node, plan.ray_gpus_per_node) == expected, plan
    assert plan.gpus_per_worker == int(use_gpu)
    assert plan.precision == ("bf16" if use_gpu else "fp32")
    assert plan.resident == ("if_fits" if use_gpu else False)
    assert plan.loader == "processes"
    assert plan.workers == plan.workers_per_node * plan.nodes
    if plan.where == "slurm":
        assert plan.ray_start == "cluster" and plan.ports is not None
        assert plan.ray_temp_dir == "/tmp/ray-4242-0"
        assert plan.nodes == len(expand(environ["SLURM_JOB_NODELIST"]))
    else:
        assert plan.where == "local" and plan.ray_start == "init" and plan.ports is None
    # the plan survives its JSON (what the workers get and <run>/plan.json holds)
    assert ExecutionPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


def test_explicit_workers_that_the_allocation_disagrees_with_are_overridden_with_a_warning() -> None:
    plan = plan_for(slurm_env(SLURM_CPUS_PER_TASK="1"), {"workers": 2})
    assert plan.workers == 1
    assert plan.warnings == ("train.workers is 2, but the allocation (1 node(s), 1 CPUs and 0 "
                             "GPUs each) holds 1: training with 1",)
    gpus = plan_for(slurm_env(SLURM_CPUS_PER_TASK="8", SLURM_GPUS_ON_NODE="2"),
                    {"workers": 2, "use_gpu": False})
    assert gpus.workers == 2 and gpus.use_gpu
    assert len(gpus.warnings) == 1 and "train.use_gpu is false" in gpus.warnings[0]
    # the same numbers left to their defaults: no warning
    assert plan_for(slurm_env(SLURM_CPUS_PER_TASK="1")).warnings == ()


@pytest.mark.parametrize(("environ", "train", "message"), [
    (slurm_env(SLURM_CPUS_PER_TASK="8"), {"use_gpu": True}, "train.use_gpu is true but Slurm job"),
    (slurm_env(SLURM_CPUS_PER_TASK="8", SLURM_GPUS_ON_NODE="4", CUDA_VISIBLE_DEVICES="-1"),
     {"use_gpu": True}, "no GPUs this process can use"),
    (slurm_env(SLURM_CPUS_PER_TASK="1"), {"cpus_per_worker": 2}, "no worker fits"),
    (slurm_env(SLURM_CPUS_PER_TASK="2", SLURM_GPUS_ON_NODE="4"), {}, "at least one CPU"),
    (slurm_env(SLURM_CPUS_PER_TASK="8", SLURM_GPUS_ON_NODE="4"), {"cpus_per_worker": 4},
     "each of the 4 GPU workers of a node gets 2"),
])
def test_an_allocation_that_cannot_hold_the_config_is_a_user_error(
        environ: dict[str, str], train: dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError, match=message) as err:
        plan_for(environ, train)
    assert err.value.exit_code == 2 and err.value.hint


def test_an_existing_ray_cluster_takes_the_configured_workers() -> None:
    plan = plan_for(slurm_env(SLURM_CPUS_PER_TASK="1"), {"workers": 3}, address="10.0.0.1:6379")
    assert plan.where == "ray_cluster" and plan.ray_start == "connect"
    assert plan.workers == 3 and plan.ray_address == "10.0.0.1:6379"
    assert plan.ray_cpus_per_node is None and plan.ports is None and plan.warnings == ()


def test_an_srun_task_knows_its_rank_and_gpus_per_node_forms() -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURMD_NODENAME": "gpu02",
           "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "4",
           "SLURM_GPUS_PER_NODE": "a100:2", "SLURM_TMPDIR": "/local"}
    alloc = detect(env, expand)
    assert alloc == Allocation(job_id="7", nodes=("gpu01", "gpu02", "gpu03", "gpu04"),
                               this_node="gpu02", cpus_per_node=1, gpus_per_node=2,
                               in_step=True, proc_id=1, n_tasks=4, tmp_root="/local")
    assert alloc.multi_node and alloc.slot("gpu04") == 3
    assert detect({"HOME": "/root"}, expand) is None


def test_node_lists_expand_without_scontrol_too() -> None:
    from pipeline.plan import _expand_simple

    assert _expand_simple("gpu[01-03,07],login1") == ("gpu01", "gpu02", "gpu03", "gpu07", "login1")
    assert _expand_simple("n1") == ("n1",)


def test_port_blocks_never_overlap_between_jobs_or_nodes_of_a_job() -> None:
    used: dict[int, tuple[int, int]] = {}
    for block, slot in itertools.product(range(JOB_SLOTS), range(4)):
        ports = ray_ports(20000, block, slot)
        span = range(min(ports.values()), ports["max-worker-port"] + 1)
        assert span.start >= 20000 and span.stop <= 60000
        for port in span:
            assert port not in used, (block, slot, used.get(port))
            used[port] = (block, slot)
    assert job_block("12_3") == job_block("123") == 123 % JOB_SLOTS  # array ids


def test_a_busy_port_moves_the_job_to_the_next_free_block() -> None:
    """Jobs 7 and 87 share block 7; with a port of it held by a real listening socket,
    the second job's plan takes block 8, and its ports avoid the busy one. The base lies
    below Linux's ephemeral range (32768-60999), where other tests' outgoing connections
    would hold ports of the block at random."""
    base = 21000
    first = ray_ports(base, job_block("87"), 0)
    if free_block(base, "87", 0) != job_block("87"):
        pytest.skip(f"ports of block {job_block('87')} from {base} are in use here already")
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", first["node-manager-port"]))
    except OSError:
        pytest.skip(f"port {first['node-manager-port']} is in use by something else here")
    busy.listen()
    try:
        assert not port_is_free(first["node-manager-port"])
        assert free_block(base, "87", 0) == job_block("87") + 1
        tree = golden_config(port_base=base)
        plan = resolve_plan(config_from_dict(tree), slurm_env(SLURM_JOB_ID="87",
                            SLURM_CPUS_PER_TASK="2"), expand=expand)
        assert plan.port_block == job_block("87") + 1
        assert first["node-manager-port"] not in range(plan.ports["port"],
                                                       plan.ports["max-worker-port"] + 1)
    finally:
        busy.close()
    assert free_block(base, "87", 0) == job_block("87")  # free again: the job's own block


def test_no_free_block_is_a_user_error() -> None:
    with pytest.raises(PlanError, match="no free block of Ray ports"):
        free_block(20000, "1", 0, is_free=lambda port: False)


def test_pipeline_plan_json_on_a_one_node_four_gpu_allocation(tmp_path: Path) -> None:
    """`pipeline plan --json` in a subprocess with the variables of a one-node, 4-GPU
    Slurm job (no GPU on this machine: the plan is arithmetic), importing no torch or Ray."""
    tree = golden_config()
    tree["train"] = {"workers": 2}
    config = write_config(tmp_path / "c.yaml", tree)
    env = {"PATH": "/usr/bin:/bin", **slurm_env(SLURM_CPUS_PER_TASK="32",
                                                 SLURM_GPUS_ON_NODE="4")}
    code = ("import sys; from pipeline.cli import main; code = main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'ray', 'dask') if m in sys.modules]; "
            "sys.exit(code or (3 if heavy else 0))")
    out = subprocess.run([sys.executable, "-c", code, "plan", str(config), "--json"],
                         capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert {k: plan[k] for k in ("nodes", "workers", "use_gpu", "cpus_per_worker",
                                 "gpus_per_worker", "loader", "loader_workers", "resident",
                                 "precision")} == {
        "nodes": 1, "workers": 4, "use_gpu": True, "cpus_per_worker": 8, "gpus_per_worker": 1,
        "loader": "processes", "loader_workers": 7, "resident": "if_fits", "precision": "bf16"}
    assert plan["ray_gpus_per_node"] == 4 and plan["allocation"]["job_id"] == "4242"
    # the human form says the same, and the config's train.workers: 2 is overridden aloud
    text = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(config)],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "4 Ray Train workers (4 per node), GPU, 1 GPU + 8 CPUs each, bf16" in text.stdout
    assert "warning: train.workers is 2, but the allocation" in text.stdout


def test_pipeline_plan_refuses_an_allocation_that_cannot_hold_a_worker(tmp_path: Path) -> None:
    tree = golden_config()
    tree["train"] = {"cpus_per_worker": 4}
    config = write_config(tmp_path / "c.yaml", tree)
    out = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(config)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin",
                              **slurm_env(SLURM_CPUS_PER_TASK="2")})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: train.cpus_per_worker is 4, but Slurm job 4242 has 2 "
                                 "CPUs per node: no worker fits ("), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

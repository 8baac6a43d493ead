"""The launcher's reading of the Slurm environment and its per-job Ray settings."""

from __future__ import annotations

import itertools

import pytest

from pipeline.config import config_from_dict
from pipeline.launch import Allocation, detect, node_resource, ray_ports, resources_overrides
from tests.test_slurm_render import golden_config

pytestmark = pytest.mark.unit


def expand(nodelist: str) -> tuple[str, ...]:
    return {"gpu[01-03]": ("gpu01", "gpu02", "gpu03"), "n1": ("n1",)}[nodelist]


def test_outside_slurm_the_launcher_is_local() -> None:
    assert detect({"HOME": "/root"}, expand) is None


def test_an_sbatch_script_sees_the_whole_allocation() -> None:
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURMD_NODENAME": "gpu01",
           "SLURM_CPUS_PER_TASK": "16", "SLURM_GPUS_ON_NODE": "4", "SLURM_TMPDIR": "/local"}
    alloc = detect(env, expand)
    assert alloc == Allocation(job_id="4242", nodes=("gpu01", "gpu02", "gpu03"),
                               this_node="gpu01", cpus_per_task=16, gpus_per_node=4,
                               in_step=False, proc_id=0, n_tasks=1, tmp_root="/local")
    assert alloc.multi_node and alloc.slot("gpu03") == 2


def test_an_srun_task_knows_its_rank_and_gpus_per_node_forms() -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURMD_NODENAME": "gpu02",
           "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "3",
           "SLURM_GPUS_PER_NODE": "a100:2"}
    alloc = detect(env, expand)
    assert alloc.in_step and alloc.proc_id == 1 and alloc.n_tasks == 3
    assert alloc.gpus_per_node == 2 and alloc.cpus_per_task == 1 and alloc.tmp_root == "/tmp"


def test_port_blocks_never_overlap_between_jobs_or_nodes_of_a_job() -> None:
    used: dict[int, tuple[int, int]] = {}
    for job, slot in itertools.product(range(1000, 1080), range(4)):
        ports = ray_ports(20000, str(job), slot)
        span = range(min(ports.values()), ports["max-worker-port"] + 1)
        assert span.start >= 20000 and span.stop <= 60000
        for port in span:
            assert port not in used, (job, slot, used.get(port))
            used[port] = (job, slot)
    assert ray_ports(20000, "12_3", 0) == ray_ports(20000, "123", 0)  # array ids


def test_workers_follow_the_allocation() -> None:
    cfg = config_from_dict(golden_config())
    gpu = Allocation("1", ("a", "b"), "a", 32, 4, False, 0, 1, "/tmp")
    assert resources_overrides(cfg, gpu).train.workers == 8
    assert resources_overrides(cfg, gpu).train.use_gpu is True
    # loader_workers auto: the GPU's share of the node's CPUs (8) less its training one
    assert resources_overrides(cfg, gpu).train.loader_workers == 7
    fat = Allocation("1", ("a",), "a", 128, 4, False, 0, 1, "/tmp")
    assert resources_overrides(cfg, fat).train.loader_workers == 8
    set_by_user = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"loader_workers": 2})})
    assert resources_overrides(set_by_user, gpu).train.loader_workers == 2
    cpu = Allocation("1", ("a", "b", "c"), "a", 4, 0, False, 0, 1, "/tmp")
    assert resources_overrides(cfg, cpu).train.workers == 3 * (4 // cfg.train.cpus_per_worker)
    assert resources_overrides(cfg, cpu).train.use_gpu is False
    assert resources_overrides(cfg, cpu).train.loader_workers == "auto"  # none on CPUs
    assert node_resource("gpu-01.cluster") == "slurm_node_gpu_01_cluster"

"""The execution plan: every ``auto`` of the config resolved once, for where this runs.

``resolve_plan(cfg, environ)`` takes the config and the environment of the process (no
Slurm job, a one-node or multi-node Slurm allocation, an existing Ray cluster given by
``--address``) and returns a frozen :class:`ExecutionPlan`: nodes, Ray Train workers,
CPUs and GPUs per worker, precision, loader backend and readers, resident or streamed,
the CPUs and GPUs Ray starts with on each node (the allocation's, not the machine's),
the Ray ports and the temp dir. The launcher, the Ray Train workers and the loop read
the plan; none of them looks at the environment or at an ``auto`` again.

One node is N nodes with N = 1: in a Slurm job the workers come from the allocation
(one per GPU this process can use, else ``cpus // train.cpus_per_worker`` per node),
whatever ``train.workers`` and ``train.use_gpu`` say; where the config set them and
the allocation disagrees, the plan carries a warning, and where the allocation cannot
hold a worker at all, :func:`resolve_plan` raises a :class:`PlanError` (exit 2).

The one decision left to run time is ``train.resident: auto`` on a GPU (``"if_fits"``):
it needs the GPU's free memory, which only the worker can measure.

Imports no torch, ray or dask: ``pipeline plan`` runs on login nodes and in ``salloc``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.files import atomic_write

PORTS_PER_JOB = 500
PORTS_PER_NODE = 125  # four nodes of one job may share a host (test clusters)
JOB_SLOTS = 80  # 20000 + 80 * 500 stays below 60000
PORT_NAMES = ("port", "ray-client-server-port", "dashboard-port", "node-manager-port",
              "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port", "metrics-export-port")
FIRST_WORKER_PORT = 10  # worker ports: from this offset to the end of the node's block

Resident = bool | Literal["if_fits"]

# ``train.loader: auto`` (bench/loader.py, bench/train_gpu.py; docs/benchmarks.md): on an
# H100 with 16 cores and 14 MB samples, DataLoader processes stalled at 81 samples/s
# whatever their number (a fresh shared-memory batch per step, unpickling, the
# pin-memory copy in one thread); 8 reader threads trained at 273-300, their reads
# waiting for the GIL beside the training thread; 8 reader processes at 337. On 2 CPU
# cores, 2 reader processes read 3.3-4.2x the DataLoader's samples/s.
LOADER_AUTO: Literal["processes"] = "processes"


class PlanError(PipelineError, ValueError):
    """The config cannot run on this allocation (e.g. a worker needs more CPUs than it has)."""


# --------------------------------------------------------------------------- the allocation


@dataclass(frozen=True)
class Allocation:
    """What the Slurm environment of this process says (see :func:`detect`)."""

    job_id: str
    nodes: tuple[str, ...]
    this_node: str
    cpus_per_node: int  # SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE (one task per node)
    gpus_per_node: int  # the allocation's GPUs, narrowed by CUDA_VISIBLE_DEVICES
    in_step: bool  # inside an srun step rather than the batch script
    proc_id: int
    n_tasks: int
    tmp_root: str

    @property
    def multi_node(self) -> bool:
        return len(self.nodes) > 1

    def slot(self, node: str) -> int:
        return self.nodes.index(node) if node in self.nodes else 0


def expand_nodelist(nodelist: str) -> tuple[str, ...]:
    """Slurm's compact node list (``gpu[01-03]``) as names, by ``scontrol``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return _expand_simple(nodelist)  # no scontrol here (a copied environment, tests)
    return tuple(out.stdout.split())


def _expand_simple(nodelist: str) -> tuple[str, ...]:
    """The common forms of a node list without ``scontrol``: ``a,b``, ``n[1-3,7]``."""
    names: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            names.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            names += [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi or lo) + 1)]
    return tuple(names)


def _count_gpus(environ: Mapping[str, str]) -> int:
    """GPUs this process may use: the allocation's per node (``SLURM_GPUS_ON_NODE``,
    else the last number of ``SLURM_GPUS_PER_NODE``, e.g. ``a100:4``), narrowed by
    ``CUDA_VISIBLE_DEVICES`` where that is set."""
    gpus = 0
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        match = re.search(r"(\d+)$", environ.get(key, ""))
        if match:
            gpus = int(match.group(1))
            break
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d for d in visible.split(",") if d.strip() and d.strip() not in
                   ("-1", "NoDevFiles")]
        gpus = min(gpus, len(devices)) if gpus else 0
    return gpus


def _cpus(environ: Mapping[str, str]) -> int:
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        match = re.match(r"(\d+)", environ.get(key, ""))  # ON_NODE may read "16(x2)"
        if match:
            return int(match.group(1))
    return 1


def detect(environ: Mapping[str, str] = os.environ,
           expand: Callable[[str], tuple[str, ...]] = expand_nodelist) -> Allocation | None:
    """The Slurm allocation this process runs in, or None outside Slurm."""
    job_id = environ.get("SLURM_JOB_ID")
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not job_id or not nodelist:
        return None
    in_step = environ.get("SLURM_STEP_ID", "batch") not in ("batch", "extern", "")
    nodes = expand(nodelist)  # the job's nodes: slots and ports derive from them
    return Allocation(
        job_id=job_id, nodes=nodes,
        this_node=environ.get("SLURMD_NODENAME", nodes[0]),
        cpus_per_node=_cpus(environ),
        gpus_per_node=_count_gpus(environ),
        in_step=in_step,
        proc_id=int(environ.get("SLURM_PROCID", "0")) if in_step else 0,
        n_tasks=int(environ.get("SLURM_NTASKS", "1")) if in_step else 1,
        tmp_root=environ.get("SLURM_TMPDIR") or environ.get("TMPDIR") or "/tmp",
    )


# --------------------------------------------------------------------------- ports


def ray_ports(port_base: int, block: int, slot: int) -> dict[str, int]:
    """The Ray ports of node ``slot`` in port block ``block``: a block of
    :data:`PORTS_PER_JOB` per job, a sub-block of :data:`PORTS_PER_NODE` per node."""
    base = port_base + (block % JOB_SLOTS) * PORTS_PER_JOB + (slot % 4) * PORTS_PER_NODE
    ports = {name: base + i for i, name in enumerate(PORT_NAMES)}
    ports["min-worker-port"] = base + FIRST_WORKER_PORT
    ports["max-worker-port"] = base + PORTS_PER_NODE - 1
    return ports


def job_block(job_id: str) -> int:
    """The port block a job tries first: from its id (``12_3`` for array tasks: 123)."""
    return int(re.sub(r"\D", "", job_id) or 0) % JOB_SLOTS


def port_is_free(port: int) -> bool:
    """Whether nothing listens on or holds ``port`` on this host (any interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_local_port() -> int:
    """A port that nothing on this host uses now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_block(port_base: int, job_id: str, slot: int,
               is_free: Callable[[int], bool] = port_is_free) -> int:
    """The first port block, from the job's own (:func:`job_block`) on, whose ports for
    node ``slot`` are all free here: two jobs whose ids share a block, or another
    program on those ports, move this job on to the next block."""
    first = job_block(job_id)
    for step in range(JOB_SLOTS):
        block = (first + step) % JOB_SLOTS
        ports = ray_ports(port_base, block, slot)
        if all(is_free(p) for p in range(ports["port"], ports["max-worker-port"] + 1)):
            return block
    raise PlanError(f"no free block of Ray ports from slurm.port_base {port_base} for node "
                    f"slot {slot}: all {JOB_SLOTS} blocks have ports in use",
                    "set slurm.port_base to a range this node leaves free")


def ray_temp_dir(alloc: Allocation, node: str) -> str:
    """Ray's temp dir for ``node`` of the job: node-local disk, one per job and node (Ray
    keeps sockets there; two jobs on one node must not share it)."""
    return str(Path(alloc.tmp_root) / f"ray-{alloc.job_id}-{alloc.slot(node)}")


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ExecutionPlan:
    """How and where a training run executes; see the module docstring."""

    where: Literal["local", "slurm", "ray_cluster"]
    nodes: int
    node_names: tuple[str, ...]
    workers: int
    workers_per_node: int
    use_gpu: bool
    cpus_per_worker: int
    gpus_per_worker: int
    precision: Literal["bf16", "fp32"]
    loader: Literal["processes", "threads"]
    loader_workers: int
    resident: Resident
    ray_start: Literal["init", "cluster", "connect"]  # ray.init here / ray start per node / join
    ray_address: str | None  # the cluster to join (connect)
    ray_cpus_per_node: int | None  # what Ray starts with on each node (None: Ray counts)
    ray_gpus_per_node: int | None
    ray_temp_dir: str | None  # node-local, per job (cluster); None: Ray's default
    allocation: Allocation | None = None  # the Slurm job, if any
    port_base: int | None = None
    port_block: int | None = None  # of the head node (slot 0)
    ports: dict[str, int] | None = None
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExecutionPlan:
        alloc = data.get("allocation")
        return cls(**{**data, "node_names": tuple(data["node_names"]),
                      "warnings": tuple(data.get("warnings", ())),
                      "allocation": Allocation(**{**alloc, "nodes": tuple(alloc["nodes"])})
                      if alloc else None})

    def write(self, path: Path) -> None:
        """Store the plan (``<run>/plan.json``), atomically."""
        atomic_write(path, json.dumps(self.to_json(), indent=2) + "\n")

    def lines(self) -> list[str]:
        """The plan as the one block of lines logged at start and printed by ``pipeline
        plan`` (its warnings apart: :attr:`warnings`)."""
        job = f"Slurm job {self.allocation.job_id}" if self.allocation else "no Slurm job"
        place = {"local": f"local Ray on this machine, {job}",
                 "slurm": job,
                 "ray_cluster": f"the Ray cluster at {self.ray_address}"}[self.where]
        devices = (f"{self.gpus_per_worker} GPU + {self.cpus_per_worker} CPUs each"
                   if self.use_gpu else f"{self.cpus_per_worker} CPUs each")
        if self.ray_start == "connect":
            ray = "the Ray cluster has the CPUs and GPUs it was started with"
        elif self.ray_gpus_per_node is None:
            ray = (f"Ray starts with {self.ray_cpus_per_node} CPUs and counts this machine's "
                   "GPUs")
        else:
            ray = (f"Ray starts with {self.ray_cpus_per_node} CPUs and {self.ray_gpus_per_node} "
                   "GPUs per node (the allocation's)")
        readers = {True: "yes", False: "no",
                   "if_fits": "if the splits fit in half the free GPU memory"}[self.resident]
        out = [f"plan: {place}, {self.nodes} node(s) ({','.join(self.node_names)})",
               f"plan: {self.workers} Ray Train workers ({self.workers_per_node} per node), "
               f"{'GPU' if self.use_gpu else 'CPU'}, {devices}, {self.precision}",
               f"plan: loader {self.loader} with {self.loader_workers} readers, splits kept in "
               f"memory: {readers}",
               f"plan: {ray}"]
        if self.ports:
            out.append(f"plan: Ray ports {self.ports['port']}-{self.ports['max-worker-port']} "
                       f"(block {self.port_block}), temp dir {self.ray_temp_dir}")
        return out


def auto_gpu_readers(cpus: int) -> int:
    """``train.loader_workers: auto`` for a GPU worker with ``cpus`` CPUs: all but the one
    it trains on, at least 1 so that reads overlap the step, at most 8 (past which
    reading stopped scaling on the H100 machine; docs/benchmarks.md)."""
    return min(8, max(1, cpus - 1))


def _explicit(cfg: Config, key: str) -> bool:
    """Whether the user set ``train.<key>`` (in the YAML or by ``--set``)."""
    return key in cfg.train.model_fields_set


def _allocation_workers(cfg: Config, alloc: Allocation) -> tuple[int, bool, int, list[str]]:
    """(workers per node, use GPUs, CPUs per worker, warnings) from the allocation."""
    t, gpus, cpus = cfg.train, alloc.gpus_per_node, alloc.cpus_per_node
    warnings: list[str] = []
    if _explicit(cfg, "use_gpu") and t.use_gpu and gpus == 0:
        raise PlanError(f"train.use_gpu is true but Slurm job {alloc.job_id} has no GPUs this "
                        "process can use (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES)",
                        "ask for GPUs (slurm.gpus_per_node, --gpus-per-node) or set "
                        "train.use_gpu: false")
    if gpus > 0:
        per_node, cpus_per_worker = gpus, cpus // gpus
        if cpus_per_worker < 1:
            raise PlanError(f"Slurm job {alloc.job_id} has {gpus} GPUs but {cpus} CPUs per "
                            "node: each GPU worker needs at least one CPU",
                            "ask for at least one CPU per GPU (slurm.cpus_per_task)")
        if _explicit(cfg, "use_gpu") and not t.use_gpu:
            warnings.append(f"train.use_gpu is false, but the allocation has {gpus} GPUs per "
                            "node: training on them, one worker per GPU")
        if _explicit(cfg, "cpus_per_worker") and t.cpus_per_worker > cpus_per_worker:
            raise PlanError(f"train.cpus_per_worker is {t.cpus_per_worker}, but each of the "
                            f"{gpus} GPU workers of a node gets {cpus_per_worker} of its {cpus} "
                            "CPUs", "lower train.cpus_per_worker or ask for more CPUs "
                            "(slurm.cpus_per_task)")
    else:
        per_node, cpus_per_worker = cpus // t.cpus_per_worker, t.cpus_per_worker
        if per_node < 1:
            raise PlanError(f"train.cpus_per_worker is {t.cpus_per_worker}, but Slurm job "
                            f"{alloc.job_id} has {cpus} CPUs per node: no worker fits",
                            "lower train.cpus_per_worker or ask for more CPUs "
                            "(slurm.cpus_per_task, --cpus-per-task)")
    workers = per_node * len(alloc.nodes)
    if _explicit(cfg, "workers") and t.workers != workers:
        warnings.append(f"train.workers is {t.workers}, but the allocation ({len(alloc.nodes)} "
                        f"node(s), {cpus} CPUs and {gpus} GPUs each) holds {workers}: "
                        f"training with {workers}")
    return per_node, gpus > 0, cpus_per_worker, warnings


def resolve_plan(cfg: Config, environ: Mapping[str, str] = os.environ,
                 address: str | None = None,
                 expand: Callable[[str], tuple[str, ...]] = expand_nodelist,
                 is_free: Callable[[int], bool] = port_is_free,
                 cpu_count: int | None = None) -> ExecutionPlan:
    """The plan for ``cfg`` where this process runs (see the module docstring).

    ``address`` is ``pipeline train --address``: join that Ray cluster, which sizes
    itself, with ``train.workers`` as configured. ``is_free`` checks a port (the head's
    block is moved on past ports in use); ``cpu_count`` is this machine's (local Ray).
    """
    t = cfg.train
    alloc = detect(environ, expand)
    warnings: list[str] = []
    temp_dir = port_block = ports = None
    ray_cpus: int | None
    ray_gpus: int | None
    if address is not None or alloc is None:
        per_node, use_gpu, cpus_per_worker = t.workers, t.use_gpu, t.cpus_per_worker
        nodes: tuple[str, ...] = (alloc.this_node,) if alloc else (socket.gethostname(),)
        where: Literal["local", "slurm", "ray_cluster"] = "ray_cluster" if address else "local"
        ray_start: Literal["init", "cluster", "connect"] = "connect" if address else "init"
        # a local Ray counts the machine, but holds at least the workers the config asks for
        machine = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
        ray_cpus = None if address else max(machine, t.workers * t.cpus_per_worker)
        ray_gpus = None
    else:
        per_node, use_gpu, cpus_per_worker, warnings = _allocation_workers(cfg, alloc)
        nodes, where, ray_start = alloc.nodes, "slurm", "cluster"
        ray_cpus, ray_gpus = alloc.cpus_per_node, alloc.gpus_per_node
        slot = alloc.slot(alloc.this_node)
        port_block = free_block(cfg.slurm.port_base, alloc.job_id, slot, is_free)
        ports = ray_ports(cfg.slurm.port_base, port_block, slot)
        temp_dir = ray_temp_dir(alloc, alloc.this_node)
    if t.loader_workers != "auto":
        readers = int(t.loader_workers)
    else:
        readers = auto_gpu_readers(cpus_per_worker) if use_gpu else 0
    resident: Resident = t.resident if t.resident != "auto" else (
        "if_fits" if use_gpu else False)
    return ExecutionPlan(
        where=where, nodes=len(nodes), node_names=tuple(nodes),
        workers=per_node * len(nodes),
        workers_per_node=per_node, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
        gpus_per_worker=1 if use_gpu else 0,
        precision="bf16" if use_gpu and t.precision in ("auto", "bf16") else "fp32",
        loader=LOADER_AUTO if t.loader == "auto" else t.loader,
        loader_workers=readers, resident=resident, ray_start=ray_start,
        ray_address=address, ray_cpus_per_node=ray_cpus, ray_gpus_per_node=ray_gpus,
        ray_temp_dir=temp_dir, allocation=alloc,
        port_base=cfg.slurm.port_base if ports else None, port_block=port_block, ports=ports,
        warnings=tuple(warnings))


def local_plan(cfg: Config) -> ExecutionPlan:
    """The plan of the loop run in this process without Ray (tests, debugging): the
    config's own settings, no environment read."""
    return resolve_plan(cfg, environ={}, cpu_count=1)

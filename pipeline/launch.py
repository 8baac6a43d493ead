"""Where training runs: a laptop, one Slurm node, or a multi-node Slurm allocation.

``launch_train(cfg)`` is what ``pipeline train`` calls. It reads the Slurm environment
when there is one and otherwise trains locally, so the same command works on a laptop,
under ``sbatch`` and under ``srun``:

- no Slurm, or a one-node allocation: a local Ray cluster (``train.workers`` workers);
- an ``sbatch`` job on N nodes (the batch script runs on the first node): this process
  starts the Ray head here and one Ray worker node on each other node through ``srun``,
  waits until every node has joined, prints what it found, and drives the training;
- an ``srun`` step with one task per node: task 0 does the same without ``srun``ing
  workers, the other tasks become the Ray worker nodes.

Each job gets its own block of ports (from the job id) and a node-local Ray temp dir,
so several jobs and users can share nodes; a random per-job token authenticates the
Ray nodes to each other. A SIGUSR1 (``--signal`` before the time limit) or SIGTERM
makes training checkpoint and stop; under Slurm the job is then requeued and the
requeued job resumes the same run. Imports no ray or torch at module level.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, auto_gpu_readers
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

PORTS_PER_JOB = 500
PORTS_PER_NODE = 125  # four nodes of one job may share a host (test clusters)
JOB_SLOTS = 80  # 20000 + 80 * 500 stays below 60000


class LaunchError(PipelineError):
    """The Ray cluster of a Slurm job could not be started."""


@dataclass(frozen=True)
class Allocation:
    """What training needs from the Slurm environment."""

    job_id: str
    nodes: tuple[str, ...]
    this_node: str
    cpus_per_task: int
    gpus_per_node: int
    in_step: bool  # inside an srun step rather than the batch script
    proc_id: int
    n_tasks: int
    tmp_root: str

    @property
    def multi_node(self) -> bool:
        return len(self.nodes) > 1

    def slot(self, node: str) -> int:
        return self.nodes.index(node) if node in self.nodes else 0


def _expand_nodelist(nodelist: str) -> tuple[str, ...]:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, check=True, timeout=30)
    return tuple(out.stdout.split())


def _gpus(environ: Mapping[str, str]) -> int:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = environ.get(key, "")
        match = re.search(r"(\d+)$", value)
        if match:
            return int(match.group(1))
    return 0


def detect(environ: Mapping[str, str] = os.environ,
           expand: Callable[[str], tuple[str, ...]] = _expand_nodelist) -> Allocation | None:
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
        cpus_per_task=int(environ.get("SLURM_CPUS_PER_TASK", "1")),
        gpus_per_node=_gpus(environ),
        in_step=in_step,
        proc_id=int(environ.get("SLURM_PROCID", "0")) if in_step else 0,
        n_tasks=int(environ.get("SLURM_NTASKS", "1")) if in_step else 1,
        tmp_root=environ.get("SLURM_TMPDIR") or environ.get("TMPDIR") or "/tmp",
    )


# --------------------------------------------------------------------------- Ray nodes


def ray_ports(port_base: int, job_id: str, slot: int) -> dict[str, int]:
    """This node's Ray ports: a block per job (from its id), a sub-block per node."""
    job = int(re.sub(r"\D", "", job_id) or 0)
    base = port_base + (job % JOB_SLOTS) * PORTS_PER_JOB + (slot % 4) * PORTS_PER_NODE
    names = ("port", "ray-client-server-port", "dashboard-port", "node-manager-port",
             "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port")
    ports = {name: base + i for i, name in enumerate(names)}
    ports["min-worker-port"] = base + 10
    ports["max-worker-port"] = base + PORTS_PER_NODE - 1
    return ports


def node_resource(node: str) -> str:
    """A custom Ray resource that marks the Ray node started on Slurm node ``node``."""
    return "slurm_node_" + re.sub(r"[^A-Za-z0-9_]", "_", node)


def node_address(node: str) -> str:
    """The IP address other nodes reach Slurm node ``node`` at (its NodeAddr)."""
    out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True,
                         text=True, timeout=30)
    match = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    host = match.group(1) if match else node
    try:
        return socket.gethostbyname(host)
    except OSError as err:
        raise LaunchError(f"cannot resolve the address of node {node} ({host}): {err}",
                          "check the node's NodeAddr in slurm.conf and DNS") from None


def ray_executable() -> list[str]:
    """The ``ray`` CLI of this Python environment (jobs may not have it on PATH)."""
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ray")
    return [found] if found else [sys.executable, "-m", "ray.scripts.scripts"]


def ray_start_command(alloc: Allocation, node: str, port_base: int, head_address: str | None,
                      node_ip: str) -> list[str]:
    """``ray start --block`` for the Ray node on Slurm node ``node`` (head if no address)."""
    ports = ray_ports(port_base, alloc.job_id, alloc.slot(node))
    head = head_address is None
    keep = ports if head else {k: v for k, v in ports.items()
                               if k not in ("port", "ray-client-server-port", "dashboard-port")}
    cmd = [*ray_executable(), "start", "--block", "--disable-usage-stats",
           f"--node-ip-address={node_ip}", f"--num-cpus={alloc.cpus_per_task}",
           f"--num-gpus={alloc.gpus_per_node}",
           f'--resources={{"{node_resource(node)}": 1}}',
           f"--temp-dir={Path(alloc.tmp_root) / f'ray-{alloc.job_id}-{alloc.slot(node)}'}"]
    cmd += ["--head"] if head else [f"--address={head_address}"]
    cmd += [f"--{name}={port}" for name, port in keep.items()]
    return cmd


def token_file(run_dir: Path, job_id: str) -> Path:
    """Where the tasks of an srun step share their job's Ray token (readable by the user only)."""
    return run_dir / f".ray-token-{job_id}"


def job_environment(shared: Path | None = None, create: bool = True) -> dict[str, str]:
    """Environment for this job's Ray processes, with a random per-job token.

    The token is inherited from the batch script when set; tasks of one srun step, which
    cannot inherit it from each other, share it through ``shared`` (a 0600 file on the
    shared run directory): task 0 ``create``s it, the others wait for it.
    """
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    if "RAY_AUTH_TOKEN" in env:
        return env
    if shared is None:
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    elif create:
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        shared.parent.mkdir(parents=True, exist_ok=True)
        tmp = shared.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(env["RAY_AUTH_TOKEN"])
        tmp.rename(shared)
    else:
        deadline = time.monotonic() + 120
        while not shared.exists():
            if time.monotonic() > deadline:
                raise LaunchError(f"no Ray token from task 0 at {shared}",
                                  "the run directory must be on storage shared by all nodes")
            time.sleep(0.5)
        env["RAY_AUTH_TOKEN"] = shared.read_text().strip()
    return env


class RayCluster:
    """The Ray head on this node plus worker nodes on the others (``srun`` when asked)."""

    def __init__(self, alloc: Allocation, cfg: Config, srun_workers: bool):
        self.alloc, self.cfg, self.srun_workers = alloc, cfg, srun_workers
        self.address = head_address(alloc, cfg.slurm.port_base)  # what the workers compute
        self.head_ip = self.address.rsplit(":", 1)[0]
        self.processes: list[subprocess.Popen] = []
        self.token_path = token_file(cfg.run_dir(), alloc.job_id)

    def start(self) -> None:
        shared = self.token_path if self.alloc.in_step else None
        os.environ.update(job_environment(shared))  # the driver and srun steps inherit it
        head = ray_start_command(self.alloc, self.alloc.this_node, self.cfg.slurm.port_base,
                                 None, self.head_ip)
        log.info("starting the Ray head on %s (%s)", self.alloc.this_node, self.address)
        self.processes.append(subprocess.Popen(head, start_new_session=True))
        others = [n for n in self.alloc.nodes if n != self.alloc.this_node]
        if self.srun_workers and others:
            log.info("starting Ray workers on %s through srun", ",".join(others))
            self.processes.append(subprocess.Popen(
                ["srun", f"--nodes={len(others)}", f"--ntasks={len(others)}",
                 "--ntasks-per-node=1", f"--nodelist={','.join(others)}", "--kill-on-bad-exit=0",
                 sys.executable, "-m", "pipeline.launch", "worker", "--head", self.address,
                 "--port-base", str(self.cfg.slurm.port_base)], start_new_session=True))
        self.wait_for_nodes(self.cfg.slurm.node_timeout)

    def wait_for_nodes(self, timeout: float) -> None:
        """Connect the driver; wait until every Slurm node has a live Ray node."""
        import ray

        deadline = time.monotonic() + timeout
        while True:
            try:
                if not ray.is_initialized():
                    ray.init(address=self.address, log_to_driver=True)
                break
            except (ConnectionError, RuntimeError) as err:
                if time.monotonic() > deadline:
                    raise LaunchError(f"the Ray head at {self.address} did not start: {err}",
                                      "see the job log for the head's errors") from None
                time.sleep(2)
        missing = list(self.alloc.nodes)
        while missing:
            alive = {key for n in ray.nodes() if n.get("Alive") for key in n["Resources"]}
            missing = [n for n in self.alloc.nodes if node_resource(n) not in alive]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"Ray nodes missing after {timeout:.0f} s: {', '.join(missing)} "
                    f"(head {self.address})",
                    "check the job log for the srun step on those nodes, their network "
                    "(slurm.port_base, firewalls) and slurm.node_timeout")
            for proc in self.processes:
                if proc.poll() is not None:
                    raise LaunchError(f"a Ray start-up process ended with exit code "
                                      f"{proc.returncode} before all nodes joined "
                                      f"(missing: {', '.join(missing)})",
                                      "see the job log for its error")
            time.sleep(1)
        describe_cluster()

    def stop(self) -> None:
        """Stop the driver's connection, then exactly the processes this job started."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.token_path.unlink(missing_ok=True)


def describe_cluster() -> None:
    """Pre-flight report: the Ray nodes with their CPUs and GPUs, and the network choices."""
    import ray

    for node in sorted(ray.nodes(), key=lambda n: n["NodeManagerAddress"]):
        if not node.get("Alive"):
            continue
        names = [k.removeprefix("slurm_node_") for k in node["Resources"]
                 if k.startswith("slurm_node_")]
        log.info("node %s at %s: %d CPUs, %d GPUs", ",".join(names) or "?",
                 node["NodeManagerAddress"], int(node["Resources"].get("CPU", 0)),
                 int(node["Resources"].get("GPU", 0)))
    for var in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_HCA"):
        log.info("%s=%s", var, os.environ.get(var, "(unset: the library chooses)"))


# --------------------------------------------------------------------------- training


def resources_overrides(cfg: Config, alloc: Allocation) -> Config:
    """Workers and GPU use from the allocation: one worker per GPU, else per node. With
    GPUs and ``train.loader_workers: auto``, each worker's readers come from its share of
    the node's CPUs (``config.auto_gpu_readers``)."""
    gpus = alloc.gpus_per_node
    per_node = gpus if gpus > 0 else max(1, alloc.cpus_per_task // cfg.train.cpus_per_worker)
    update: dict[str, Any] = {"workers": per_node * len(alloc.nodes), "use_gpu": gpus > 0}
    if gpus > 0 and cfg.train.loader_workers == "auto":
        update["loader_workers"] = auto_gpu_readers(alloc.cpus_per_task // gpus)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


def requeue(alloc: Allocation) -> None:
    """Put this job back in the queue; the requeued job resumes from the checkpoint."""
    out = subprocess.run(["scontrol", "requeue", alloc.job_id], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0:
        log.error("scontrol requeue %s failed: %s", alloc.job_id, out.stderr.strip())
    else:
        log.info("job %s requeued; it will resume from the checkpoint", alloc.job_id)


def launch_train(cfg: Config, address: str | None = None) -> Any:
    """Train where this process runs (see the module docstring); return the TrainResult."""
    from pipeline.train.trainer import TrainResult, train

    # SIGUSR1 means "checkpoint and stop" while training runs (train() handles it); before
    # and after, e.g. a time-limit warning that comes once training has finished, there is
    # nothing to stop, and its default action would kill a job that succeeded.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    alloc = detect()
    if alloc is None or address is not None or not alloc.multi_node:
        where = (f"Ray cluster at {address}" if address else "local Ray") + (
            f", Slurm job {alloc.job_id} on {alloc.this_node}" if alloc else ", no Slurm job")
        log.info("%s: %d Ray Train workers, %d CPUs, GPUs: %s", where, cfg.train.workers,
                 os.cpu_count() or 1, "yes" if cfg.train.use_gpu else "no")
        result = train(cfg, address=address)
        if result.preempted and alloc is not None and not alloc.in_step:
            requeue(alloc)
        return result
    if alloc.in_step and alloc.proc_id > 0:
        # a Ray worker node until the head goes away; task 0 reports the training
        run_worker(alloc, cfg.slurm.port_base, head_address(alloc, cfg.slurm.port_base),
                   replace=False, token=token_file(cfg.run_dir(), alloc.job_id))
        return TrainResult(run_dir=cfg.run_dir(), metrics={}, preempted=False)
    cfg = resources_overrides(cfg, alloc)
    log.info("Slurm job %s: %d nodes (%s), %d CPUs and %d GPUs per node -> %d Ray Train "
             "workers, loader workers %s", alloc.job_id, len(alloc.nodes), ",".join(alloc.nodes),
             alloc.cpus_per_task, alloc.gpus_per_node, cfg.train.workers,
             cfg.train.loader_workers)
    early: list[int] = []  # a signal before training starts: stop right after start-up

    def note(signum: int, _frame: Any) -> None:
        early.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    cluster = RayCluster(alloc, cfg, srun_workers=not alloc.in_step)
    try:
        cluster.start()
        for sig in previous:  # ray.init replaced the SIGTERM handler
            signal.signal(sig, note)
        if early:
            log.warning("signal %d during start-up: not training, requeueing", early[0])
            result = TrainResult(run_dir=cfg.run_dir(), metrics={}, preempted=True)
        else:
            result = train(cfg, address=cluster.address)
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result.preempted and not alloc.in_step:
        requeue(alloc)
    return result


def head_address(alloc: Allocation, port_base: int) -> str:
    """The Ray head's address: the job's first node, its first port."""
    port = ray_ports(port_base, alloc.job_id, 0)["port"]
    return f"{node_address(alloc.nodes[0])}:{port}"


def run_worker(alloc: Allocation, port_base: int, head: str, replace: bool = True,
               token: Path | None = None) -> None:
    """Run the Ray worker node of this Slurm node until the cluster stops: in place of
    this process (``replace``; an srun step the head ends), or as a child whose exit,
    when the head has gone, is the normal end of an srun task."""
    env = job_environment(token, create=False)
    cmd = ray_start_command(alloc, alloc.this_node, port_base, head,
                            node_address(alloc.this_node))
    deadline = time.monotonic() + 120
    while True:  # the head may still be starting: retry until it answers
        host, port = head.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise LaunchError(f"no Ray head answers at {head}",
                                  "see the job log for the head's errors") from None
            time.sleep(1)
    if replace:
        os.execvpe(cmd[0], cmd, env)
    # this node lives only as long as the head: notice its end in 15 s rather than 60
    env.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "15")
    code = subprocess.run(cmd, env=env).returncode
    log.info("Ray worker node on %s ended (exit code %d)", alloc.this_node, code)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.launch worker --head ADDR --port-base N``: used by srun."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.launch")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="start this node's Ray worker (inside srun)")
    worker.add_argument("--head", required=True)
    worker.add_argument("--port-base", type=int, required=True)
    args = parser.parse_args(argv)
    alloc = detect()
    if alloc is None:
        print("error: not inside a Slurm job (run through srun)", file=sys.stderr)
        return 2
    run_worker(alloc, args.port_base, args.head)
    return 0


if __name__ == "__main__":
    sys.exit(main())

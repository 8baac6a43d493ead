"""Where training runs: a laptop, an existing Ray cluster, or a Slurm allocation.

``launch_train(cfg)`` is what ``pipeline train`` calls. It resolves the execution plan
(``pipeline.plan``: workers, devices, Ray resources, ports) once, logs it, and carries
it out, so the same command works on a laptop, under ``sbatch`` and under ``srun``:

- no Slurm job: a local Ray instance (``ray.init``) with the plan's CPUs;
- ``--address``: join that Ray cluster;
- a Slurm job, on one node or N: this process starts the Ray head here with the
  allocation's CPUs and GPUs, and one Ray worker node on each other node through
  ``srun``, waits until every node has joined, prints what it found, and drives the
  training; one node is the case N = 1;
- an ``srun`` step with one task per node: task 0 does the same without ``srun``ing
  workers, the other tasks become the Ray worker nodes.

Each Slurm job gets a free block of ports (tried from the job id on) and a node-local
Ray temp dir, so several jobs and users can share nodes; a random per-job token
authenticates the Ray nodes to each other, and a one-node job's Ray listens on loopback
only (``pipeline.ray_security``). A SIGUSR1 (``--signal`` before the time
limit) or SIGTERM makes training checkpoint and stop; under Slurm the job is then
requeued and the requeued job resumes the same run. Imports no ray or torch at module
level.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.files import atomic_write
from pipeline.plan import (
    Allocation,
    ExecutionPlan,
    detect,
    free_block,
    ray_ports,
    ray_temp_dir,
    resolve_plan,
)
from pipeline.ray_security import LOOPBACK, new_token, secure_environment

log = logging.getLogger(__name__)

HEAD_ONLY_PORTS = ("port", "ray-client-server-port", "dashboard-port")


class LaunchError(PipelineError):
    """The Ray cluster of a Slurm job could not be started."""


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


def node_ip(alloc: Allocation) -> str:
    """The address this node's Ray binds: loopback in a one-node job, which nothing
    outside the node needs to reach, else the node's own address (:func:`node_address`)."""
    return node_address(alloc.this_node) if alloc.multi_node else LOOPBACK


def ray_executable() -> list[str]:
    """The ``ray`` CLI of this Python environment (jobs may not have it on PATH)."""
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ray")
    return [found] if found else [sys.executable, "-m", "ray.scripts.scripts"]


def ray_start_command(alloc: Allocation, node: str, ports: dict[str, int],
                      head_address: str | None, node_ip: str) -> list[str]:
    """``ray start --block`` for the Ray node on Slurm node ``node`` (the head if no
    ``head_address``), with the allocation's CPUs and GPUs, not the machine's."""
    head = head_address is None
    keep = ports if head else {k: v for k, v in ports.items() if k not in HEAD_ONLY_PORTS}
    cmd = [*ray_executable(), "start", "--block", "--disable-usage-stats",
           f"--node-ip-address={node_ip}", f"--num-cpus={alloc.cpus_per_node}",
           f"--num-gpus={alloc.gpus_per_node}",
           f'--resources={{"{node_resource(node)}": 1}}',
           f"--temp-dir={ray_temp_dir(alloc, node)}"]
    cmd += ["--head"] if head else [f"--address={head_address}"]
    cmd += [f"--{name}={port}" for name, port in keep.items()]
    return cmd


def rendezvous_file(run_dir: Path, alloc: Allocation, environ: dict[str, str]) -> Path:
    """Where task 0 of an srun step tells the other tasks the head's address and the
    job's Ray token (a 0600 file on the shared run directory): one per job, step and
    restart, so that no task reads a file an earlier step left behind."""
    step = environ.get("SLURM_STEP_ID", "0")
    restart = environ.get("SLURM_RESTART_COUNT", "0")
    return run_dir / f".ray-{alloc.job_id}.{step}.{restart}.json"


def share_rendezvous(path: Path, token: str, head: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"token": token, "head": head}), mode=0o600)


def wait_for_rendezvous(path: Path, timeout: float = 120) -> tuple[str, str]:
    """(token, head address) from task 0's :func:`share_rendezvous`."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise LaunchError(f"no Ray head address from task 0 at {path} after {timeout:.0f} s",
                              "the run directory must be on storage shared by all nodes")
        time.sleep(0.5)
    data = json.loads(path.read_text())
    return data["token"], data["head"]


def with_token(token: str, head: str, one_node: bool = False) -> dict[str, str]:
    """This process's environment for the job's Ray processes: token authentication
    with the job's own token, and ``RAY_ADDRESS`` set to the job's head. Ray's own
    helpers that find "the" cluster by themselves (Ray Train's placement-group cleaner
    through the State API) otherwise fail with "Found multiple active Ray instances"
    when another job's Ray runs on the same node."""
    env = {**os.environ, "RAY_AUTH_TOKEN": token, "RAY_ADDRESS": head}
    secure_environment(env, one_node)  # a one-node job's Ray: on loopback only
    return env


class RayCluster:
    """The Ray head on this node plus worker nodes on the others (``srun`` when asked),
    as the plan says: its ports, the allocation's CPUs and GPUs, its temp dir."""

    def __init__(self, plan: ExecutionPlan, cfg: Config, srun_workers: bool):
        assert plan.allocation is not None and plan.ports is not None
        self.alloc, self.plan, self.cfg, self.srun_workers = plan.allocation, plan, cfg, srun_workers
        self.head_ip = node_ip(self.alloc)
        self.address = f"{self.head_ip}:{plan.ports['port']}"
        self.processes: list[subprocess.Popen] = []
        self.rendezvous = rendezvous_file(cfg.run_dir(), self.alloc, dict(os.environ)) \
            if self.alloc.in_step else None

    def start(self) -> None:
        token = new_token()  # this job's own, never one inherited from the environment
        # the driver, the srun steps and every Ray process of the job inherit these
        os.environ.update(with_token(token, self.address, one_node=not self.alloc.multi_node))
        head = ray_start_command(self.alloc, self.alloc.this_node, self.plan.ports or {},
                                 None, self.head_ip)
        log.info("starting the Ray head on %s (%s)", self.alloc.this_node, self.address)
        self.processes.append(subprocess.Popen(head, start_new_session=True))
        if self.rendezvous is not None:
            share_rendezvous(self.rendezvous, token, self.address)
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
        os.environ.pop("RAY_ADDRESS", None)  # this job's head is gone
        for proc in reversed(self.processes):  # the srun workers first, then the head
            stop_process(proc)
        if self.rendezvous is not None:
            self.rendezvous.unlink(missing_ok=True)


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Stop a ``ray start --block`` (or the ``srun`` of them): SIGTERM to it alone, so
    that it drains its node while Ray's own processes still run (a signal to the whole
    group kills Ray's GCS under it and the drain fails with an error line), then
    SIGKILL to whatever of its process group is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


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


def requeue(alloc: Allocation) -> None:
    """Put this job back in the queue; the requeued job resumes from the checkpoint."""
    out = subprocess.run(["scontrol", "requeue", alloc.job_id], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0:
        log.error("scontrol requeue %s failed: %s", alloc.job_id, out.stderr.strip())
    else:
        log.info("job %s requeued; it will resume from the checkpoint", alloc.job_id)


def log_plan(plan: ExecutionPlan) -> None:
    """The plan, once, as one block of lines; a warning line for each disagreement."""
    for line in plan.lines():
        log.info("%s", line)
    for warning in plan.warnings:
        log.warning("%s", warning)


def launch_train(cfg: Config, address: str | None = None) -> Any:
    """Train where this process runs (see the module docstring); return the TrainResult."""
    from pipeline.train.trainer import TrainResult, train

    # SIGUSR1 means "checkpoint and stop" while training runs (train() handles it); before
    # and after, e.g. a time-limit warning that comes once training has finished, there is
    # nothing to stop, and its default action would kill a job that succeeded.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    plan = resolve_plan(cfg, address=address)
    alloc = plan.allocation
    if alloc is not None and alloc.in_step and alloc.proc_id > 0:
        # a Ray worker node until the head goes away; task 0 logs the plan and trains
        token, head = wait_for_rendezvous(rendezvous_file(cfg.run_dir(), alloc,
                                                          dict(os.environ)))
        run_worker(alloc, plan.ports or {}, head, token, replace=False)
        return TrainResult(run_dir=cfg.run_dir(), metrics={}, preempted=False, worker_only=True)
    log_plan(plan)
    if plan.ray_start != "cluster":
        result = train(cfg, plan, address=address)
        if result.preempted and alloc is not None and not alloc.in_step:
            requeue(alloc)
        return result
    assert alloc is not None
    early: list[int] = []  # a signal before training starts: stop right after start-up

    def note(signum: int, _frame: Any) -> None:
        early.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    cluster = RayCluster(plan, cfg, srun_workers=not alloc.in_step)
    try:
        cluster.start()
        for sig in previous:  # ray.init replaced the SIGTERM handler
            signal.signal(sig, note)
        if early:
            log.warning("signal %d during start-up: not training, requeueing", early[0])
            result = TrainResult(run_dir=cfg.run_dir(), metrics={}, preempted=True)
        else:
            result = train(cfg, plan, address=cluster.address)
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result.preempted and not alloc.in_step:
        requeue(alloc)
    return result


def worker_ports(alloc: Allocation, port_base: int) -> dict[str, int]:
    """This node's Ray ports: the first free block on it, from the job's own on (only
    the head's must be known to the other nodes)."""
    slot = alloc.slot(alloc.this_node)
    return ray_ports(port_base, free_block(port_base, alloc.job_id, slot), slot)


def run_worker(alloc: Allocation, ports: dict[str, int], head: str, token: str,
               replace: bool = True) -> None:
    """Run the Ray worker node of this Slurm node, on ``ports``, until the cluster
    stops: in place of this process (``replace``; an srun step the head ends), or as a
    child whose exit, when the head has gone, is the normal end of an srun task."""
    env = with_token(token, head)
    cmd = ray_start_command(alloc, alloc.this_node, ports, head, node_ip(alloc))
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
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        print("error: no RAY_AUTH_TOKEN (start workers through the job's pipeline train)",
              file=sys.stderr)
        return 2
    run_worker(alloc, worker_ports(alloc, args.port_base), args.head, token)
    return 0


if __name__ == "__main__":
    sys.exit(main())

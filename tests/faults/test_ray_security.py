"""The Ray instances of the pipeline are reachable only from this machine when they are
one node, and only with the run's token.

A real ``pipeline train`` runs (two Ray Train workers, far more steps than the test
waits for) with an inherited ``RAY_AUTH_MODE=disabled`` and a temporary HOME; while it
trains, every socket in its process tree (Ray's, and the workers' DDP: their rendezvous
is a private file, their gloo pairs on loopback) must listen on loopback, nothing may
answer on the GCS port at the node's network address, a client without
the token must not get in, a client with the run's token must (so that the refusal is
the token's doing), the token file must be 0600 and Ray's ``~/.ray/auth_token`` must
not exist. The ``ray start --head`` of a one-node Slurm job, as the launcher builds it,
must likewise open every port of its block on loopback only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from pipeline.ray_security import ONE_NODE
from pipeline.train.rundir import RunFiles
from tests.conftest import train_config, write_config

pytestmark = pytest.mark.integration


# a driver that joins the cluster at argv[1] and runs one task there
CLIENT = """
import sys
import ray

@ray.remote(num_cpus=0)
def where():
    return "ran"

ray.init(address=sys.argv[1], log_to_driver=False)
print("CONNECTED", ray.get(where.remote(), timeout=30), flush=True)
"""


def on_loopback(ip: str) -> bool:
    """Whether a listening address takes connections from this machine only."""
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on an IPv6 socket
    return (mapped or address).is_loopback


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def listening(pid: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of ``pid``'s tree."""
    found = set()
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, proc.name()))
    return found


def gcs_port(sockets: set[tuple[str, int, str]]) -> int:
    """The port of the GCS server among ``sockets`` (:func:`listening`)."""
    ports = {port for _, port, name in sockets if name == "gcs_server"}
    assert len(ports) == 1, f"not one GCS port: {sorted(sockets)}"
    return ports.pop()


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any Ray setting, with its own HOME."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), **extra}


def network_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.Error):
        procs = process_tree(pid)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=30)


def test_local_training_ray_listens_on_loopback_and_needs_the_runs_token(
        tiny_store: Path, tmp_path: Path) -> None:
    cfg = train_config(tiny_store, tmp_path / "runs", max_steps=100_000, val_every=5,
                       checkpoint_every=5, batch_size=4, workers=2)
    config = write_config(tmp_path / "train.yaml", cfg)
    run = tmp_path / "runs" / cfg["name"]
    home = tmp_path / "home"
    env = clean_env(home, RAY_AUTH_MODE="disabled")  # as Ray's own warning suggests
    log = tmp_path / "train.log"
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "pipeline", "train", str(config)],
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
            assert driver.poll() is None, f"training ended early: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "training did not reach its first validation"
            time.sleep(1)

        sockets = listening(driver.pid)
        port = gcs_port(sockets)
        exposed = sorted(s for s in sockets if not on_loopback(s[0]))
        assert not exposed, f"listening beyond loopback: {exposed}"
        workers = [p for p in process_tree(driver.pid) if p.name() == "ray::RayTrainWorker"]
        assert len(workers) == 2, f"not two training workers: {workers}"
        pairs = {c.raddr for w in workers for c in w.net_connections(kind="inet")
                 if c.status == psutil.CONN_ESTABLISHED and c.raddr
                 and c.raddr.port in {c2.laddr.port for w2 in workers
                                      for c2 in w2.net_connections(kind="inet")}}
        assert pairs, "the two workers hold no connection to each other (no gloo pair?)"
        assert all(on_loopback(address.ip) for address in pairs), pairs
        for address in network_addresses():  # the node's network address: nothing there
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=5).close()

        token = RunFiles(run).ray_token
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        assert not (home / ".ray" / "auth_token").exists()

        gcs = f"127.0.0.1:{port}"
        local = ONE_NODE  # else Ray turns 127.0.0.1 into the node's network address
        stranger = subprocess.Popen(
            [sys.executable, "-c", CLIENT, gcs], text=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=clean_env(tmp_path / "stranger", RAY_AUTH_MODE="disabled", **local))
        owner = subprocess.Popen(
            [sys.executable, "-c", CLIENT, gcs], text=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=clean_env(tmp_path / "owner", RAY_AUTH_MODE="token",
                                                    RAY_AUTH_TOKEN_PATH=str(token), **local))
        outputs = {}
        for name, client in (("owner", owner), ("stranger", stranger)):
            try:
                outputs[name] = client.communicate(timeout=45)[0]
            except subprocess.TimeoutExpired:  # still trying to get in: not in
                client.kill()
                outputs[name] = client.communicate()[0] + "\n(timed out)"
        assert "CONNECTED ran" in outputs["owner"], outputs["owner"][-2000:]
        assert "CONNECTED" not in outputs["stranger"], outputs["stranger"][-2000:]
        assert driver.poll() is None, "the training died during the scan"
    finally:
        kill_tree(driver.pid)
        driver.wait(timeout=30)


def test_one_node_slurm_head_listens_on_loopback_with_the_jobs_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``ray start --head`` of a one-node Slurm job, as the launcher builds it, opens
    every port of its block on loopback only, under an inherited RAY_AUTH_MODE=disabled."""
    from pipeline.launch import node_ip, ray_start_command, stop_process, with_token
    from pipeline.plan import PORT_NAMES, Allocation, free_block, ray_ports
    from pipeline.ray_security import new_token

    short = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # Ray's socket paths stay short
    alloc = Allocation("77", ("node1",), "node1", 1, 0, False, 0, 1, str(short))
    ports = ray_ports(23000, free_block(23000, alloc.job_id, 0), 0)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert node_ip(alloc) == "127.0.0.1"
    env = with_token(new_token(), f"{node_ip(alloc)}:{ports['port']}",
                     one_node=not alloc.multi_node)  # as RayCluster.start
    assert env["RAY_AUTH_MODE"] == "token"
    with (tmp_path / "head.log").open("w") as out:
        head = subprocess.Popen(ray_start_command(alloc, "node1", ports, None, node_ip(alloc)),
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wanted = {ports[name] for name in PORT_NAMES}
        deadline = time.monotonic() + 90
        while not wanted <= {p for _, p, _ in listening(head.pid)}:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            assert time.monotonic() < deadline, (
                f"ports not open after 90 s: {sorted(wanted - {p for _, p, _ in listening(head.pid)})}")
            time.sleep(1)
        exposed = sorted(s for s in listening(head.pid) if not on_loopback(s[0]))
        assert not exposed, f"listening beyond loopback: {exposed}"
        assert not (tmp_path / "home" / ".ray" / "auth_token").exists()
    finally:
        stop_process(head, timeout=30)
        shutil.rmtree(short, ignore_errors=True)

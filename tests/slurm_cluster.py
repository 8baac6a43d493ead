"""A real two-node Slurm cluster on this host, for tests (docs/cluster.md says how the jobs use one).

Debian's slurm-wlm 22.05 and munge: ``munged`` as the munge user, one ``slurmctld``
and two ``slurmd`` (nodes ``n1``, ``n2``, both on 127.0.0.1 with their own ports), a
minimal ``slurm.conf`` without cgroup plugins (these machines have no real cgroups),
job completion records in a text file. Ports are chosen free at start, so several
test runs on one host do not collide. ``stop()`` ends exactly the processes that
``start()`` began; a ``start()`` that fails stops them itself before raising.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

PACKAGES = ("slurm-wlm", "munge")
CONF = """\
ClusterName=pipelinetest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
# requeued jobs wait until the old job credential expires (default 120 s): shorten it
AuthInfo=cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
ReturnToService=2
MpiDefault=none
KillWait=5
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=localhost Port={n1_port} CPUs={cpus} RealMemory=8000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=localhost Port={n2_port} CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def available() -> bool:
    """Whether the Slurm and munge daemons are installed."""
    return all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged"))


def apt_install(*packages: str) -> None:
    """Install Debian packages (root only): what a test set-up needs and lacks."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env,
                   stdout=subprocess.DEVNULL, timeout=600)


def install() -> None:
    """Install Debian's slurm-wlm and munge (root only)."""
    apt_install(*PACKAGES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """Start and stop the test cluster; ``env`` carries ``SLURM_CONF`` for clients."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: dict[str, subprocess.Popen] = {}  # daemon name -> its process
        self._logs: list[Any] = []

    def start(self, timeout: float = 60) -> None:
        """Start munged (unless one serves this host), slurmctld and both slurmd, then
        wait until both nodes are idle. If any step fails (or is interrupted), the daemons
        started so far are stopped before the error propagates; ``root`` (a pytest temp
        folder) keeps the logs that the error points at."""
        try:
            for sub in ("state", "log", "spool/n1", "spool/n2"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self.conf.write_text(CONF.format(root=self.root, ctld_port=_free_port(),
                                             n1_port=_free_port(), n2_port=_free_port(),
                                             cpus=os.cpu_count() or 2))
            self._start_munge()
            self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
            time.sleep(1)
            for node in ("n1", "n2"):
                self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)],
                            f"slurmd-{node}")
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already serving this host
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        self._spawn(["runuser", "-u", "munge", "--", "munged", "--foreground"], "munged")
        for _ in range(50):
            if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("munged did not start")

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115 - closed by stop()
        self._logs.append(log)
        self.processes[name] = subprocess.Popen(cmd, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True,
                              check=check, timeout=60)

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            exited = [f"{name} (exit {proc.returncode})" for name, proc in self.processes.items()
                      if proc.poll() is not None]
            if exited:  # a daemon that died will not come back: say so now, not at the deadline
                raise RuntimeError(f"Slurm daemons exited while starting: {', '.join(exited)}; "
                                   f"logs in {self.root / 'log'}")
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = out.stdout.strip()
            lines = states.splitlines()
            if len(lines) == 2 and all(line.split()[1] == "idle" for line in lines):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after {timeout:.0f} s: {states!r}; logs in "
                           f"{self.root / 'log'}")

    def job_state(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict of its Key=Value fields."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_job(self, job_id: str, timeout: float = 120) -> dict[str, str]:
        """Wait until a job has ended; return its final state fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                         "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id).get('JobState')}")

    def cancel_all(self, timeout: float = 120) -> None:
        """Cancel every job and wait until none is left: a test that failed with its
        job still running must not leave it training beside the next tests."""
        self.run("scancel", "--user", "root", check=False)
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", check=False).stdout.strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm jobs left {timeout:.0f} s after scancel; logs in "
                                   f"{self.root / 'log'}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel jobs, then end each started daemon's process group (runuser's child too).
        Safe after a partial or failed ``start()`` and when called twice."""
        ctld = self.processes.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            # a scancel that fails or times out must not keep the daemons running
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.run("scancel", "--user", "root", check=False)
        try:
            started = list(reversed(self.processes.values()))
            for proc in started:
                _signal_group(proc, signal.SIGTERM)
            for proc in started:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
        finally:
            self.processes.clear()
            for log in self._logs:
                log.close()
            self._logs.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)

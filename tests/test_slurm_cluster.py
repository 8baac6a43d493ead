"""The Slurm test cluster itself: two real nodes, dependencies that stop a chain.

Groundwork for the Slurm stage (templates and submission come with it); these tests
prove that the fixture gives the later tests a real multi-node Slurm.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm


def test_a_two_node_job_runs_one_task_per_node(slurm_cluster, tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    job = slurm_cluster.run("sbatch", "--parsable", "-N", "2", "--ntasks-per-node", "1",
                            "-o", str(out), "--wrap",
                            "srun bash -c 'echo $SLURMD_NODENAME $SLURM_PROCID'").stdout.strip()
    state = slurm_cluster.wait_job(job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0"
    assert sorted(out.read_text().split()) == sorted(["n1", "0", "n2", "1"])
    assert sorted(out.read_text().strip().splitlines()) == ["n1 0", "n2 1"]


def test_a_failed_job_cancels_its_afterok_dependent(slurm_cluster) -> None:
    failing = slurm_cluster.run("sbatch", "--parsable", "--wrap", "exit 3").stdout.strip()
    dependent = slurm_cluster.run("sbatch", "--parsable", f"--dependency=afterok:{failing}",
                                  "--kill-on-invalid-dep=yes", "--wrap", "true").stdout.strip()
    assert slurm_cluster.wait_job(failing)["ExitCode"] == "3:0"
    assert slurm_cluster.wait_job(dependent)["JobState"] == "CANCELLED"


def _processes_naming(conf: Path) -> list[int]:
    """Live processes whose command line names ``conf``: that cluster's daemons."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # ended while we looked
                if str(conf).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def test_a_start_that_fails_stops_the_daemons_it_started(slurm_cluster, tmp_path: Path) -> None:
    """A second cluster's slurmctld and slurmd start, but it gets no time to become idle:
    start() raises and leaves none of its daemons running. (``slurm_cluster`` only makes
    sure Slurm is installed and munged serves this host.)"""
    cluster = SlurmCluster(tmp_path)
    try:
        with pytest.raises(RuntimeError, match="not idle after 0 s"):
            cluster.start(timeout=0)
        assert (tmp_path / "log" / "slurmd-n2.out").is_file()  # all three were started
        assert cluster.processes == {}
        assert _processes_naming(cluster.conf) == []
    finally:
        for pid in _processes_naming(cluster.conf):  # only if the test failed
            os.kill(pid, signal.SIGKILL)

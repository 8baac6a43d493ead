"""Peak memory of a command and all its child processes (benchmarks, memory tests).

Dask workers and Ray workers are child processes, so a process's own peak RSS says
little; this samples the whole process tree.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class PeakMemory:
    """Result of :func:`run_measured`: exit code, wall time and peak RSS in bytes."""

    returncode: int
    seconds: float
    peak_total: int = 0
    peak_per_process: dict[int, int] = field(default_factory=dict)
    stderr: str = ""

    @property
    def peak_largest_process(self) -> int:
        return max(self.peak_per_process.values(), default=0)


def run_measured(cmd: list[str], interval: float = 0.05, timeout: float = 3600,
                 **popen: object) -> PeakMemory:
    """Run ``cmd``, sampling the RSS of it and its descendants every ``interval`` s."""
    start = time.perf_counter()
    result = PeakMemory(returncode=-1, seconds=0.0)
    # stderr goes to a file, not a pipe: a full pipe would block the measured command
    with tempfile.TemporaryFile(mode="w+") as err_file:
        proc = subprocess.Popen(cmd, stderr=err_file, text=True, **popen)  # type: ignore[call-overload]
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            if time.perf_counter() - start > timeout:
                proc.kill()
                break
            _sample(root, result)
            time.sleep(interval)
        result.returncode = proc.wait()
        err_file.seek(0)
        result.stderr = err_file.read()
    result.seconds = time.perf_counter() - start
    return result


def _sample(root: psutil.Process, result: PeakMemory) -> None:
    """Add one RSS sample of ``root`` and its descendants to ``result``."""
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    total = 0
    for p in tree:
        try:
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        total += rss
        result.peak_per_process[p.pid] = max(result.peak_per_process.get(p.pid, 0), rss)
    result.peak_total = max(result.peak_total, total)

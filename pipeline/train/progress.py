"""Training progress on a terminal: rank 0 writes ``<run>/progress.json`` about once a
second; the driver shows it as a progress bar while the workers train.

The file is also what to ``watch cat`` on a cluster: step, planned steps, the latest
loss and throughput. Writing it is cheap (a few hundred bytes, at most once a second)
and atomic (temp file, rename), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, SupportsFloat

from pipeline.files import atomic_write
from pipeline.train.rundir import RunFiles


class ProgressWriter:
    """Rank 0's side: ``update`` after each step, written at most every ``interval`` s."""

    def __init__(self, run_dir: Path, max_steps: int, interval: float = 1.0):
        self.path = RunFiles(run_dir).progress
        self.max_steps, self.interval = max_steps, interval
        self._last = 0.0

    def update(self, step: int, loss: SupportsFloat, samples_per_s: float,
               force: bool = False) -> None:
        """Write the file if ``interval`` has passed (or ``force``). ``loss`` may be a
        tensor on a GPU: it is read, which waits for its step, only when written."""
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        atomic_write(self.path, json.dumps({"step": step, "max_steps": self.max_steps,
                                            "loss": float(loss), "samples_per_s": samples_per_s,
                                            "time": time.time()}))


def read(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads(RunFiles(run_dir).progress.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def progress_bar(run_dir: Path, max_steps: int, console: Any = None,
                 poll: float = 0.5) -> Iterator[None]:
    """Show the run's progress as a rich bar while the block runs (on a terminal only,
    unless a ``console`` is given)."""
    import sys

    if console is None and not sys.stderr.isatty():
        yield
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    stop = threading.Event()
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console, transient=console is None) as bar:
        task = bar.add_task("training", total=max_steps, status="starting")

        def follow() -> None:
            while not stop.wait(poll):
                state = read(run_dir)
                if state is not None:
                    bar.update(task, completed=state["step"],
                               status=f"loss {state['loss']:.4f}, "
                                      f"{state['samples_per_s']:.1f} samples/s")
            state = read(run_dir)
            if state is not None:
                bar.update(task, completed=state["step"])

        thread = threading.Thread(target=follow, name="pipeline-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

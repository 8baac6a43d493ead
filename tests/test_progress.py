"""Training progress: the file rank 0 writes and the bar the driver draws from it."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from rich.console import Console

from pipeline.train.progress import ProgressWriter, progress_bar
from pipeline.train.rundir import RunFiles

pytestmark = pytest.mark.unit


def test_the_writer_throttles_and_always_writes_the_last_step(tmp_path: Path) -> None:
    writer = ProgressWriter(tmp_path, max_steps=100, interval=60)
    writer.update(1, 0.5, 10.0)
    writer.update(2, 0.4, 10.0)  # within the interval: skipped
    assert json.loads(RunFiles(tmp_path).progress.read_text())["step"] == 1
    writer.update(3, 0.3, 10.0, force=True)
    state = json.loads(RunFiles(tmp_path).progress.read_text())
    assert state["step"] == 3 and state["max_steps"] == 100 and state["loss"] == 0.3
    assert not list(tmp_path.glob("*.tmp"))


def test_the_bar_follows_the_file_while_training_runs(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    writer = ProgressWriter(tmp_path, max_steps=40, interval=0)
    with progress_bar(tmp_path, 40, console=console, poll=0.05):
        for step in (10, 25, 40):
            writer.update(step, 1.0 / step, 123.4)
            time.sleep(0.3)
    text = out.getvalue()
    assert "25/40" in text and "40/40" in text and "123.4 samples/s" in text


def test_no_terminal_no_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(tmp_path, 10):
        ProgressWriter(tmp_path, 10).update(5, 0.1, 1.0)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""

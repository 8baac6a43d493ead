"""A run's evaluation folder, ``<run>/eval/``: when it counts as whole and current.

``evaluate`` builds the folder under a private temporary name and renames it into
place, writing ``metrics.json`` last with the list of the other files (``files``), so
an ``eval/`` that exists was finished: a killed evaluation leaves only a temporary. A
folder from before that rule, or one with a listed file gone, is not whole. Both the
stage chains (``pipeline.workflows``) and the registry ask :func:`current_metrics`.

Light: no torch, numpy or zarr (the registry imports it to read metrics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.train.rundir import RunFiles


def current_metrics(run_dir: Path, dataset_version: int,
                    config_hash: str | None = None) -> dict[str, Any] | None:
    """The metrics of ``run_dir``'s evaluation if it is whole and scores the run's
    current best checkpoint on store version ``dataset_version`` (and, when given, with
    the config of hash ``config_hash``); None when it must be evaluated again."""
    run = RunFiles(run_dir)
    try:
        metrics = json.loads(run.eval_metrics.read_text())
        meta = json.loads((run.best / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    listed = metrics.get("files")
    whole = isinstance(listed, list) and all((run.eval / name).is_file() for name in listed)
    if (whole and Path(metrics.get("checkpoint", "")).resolve() == run.best.resolve()
            and metrics.get("checkpoint_step") == meta.get("step")
            and metrics.get("store_version") == dataset_version
            and (config_hash is None or metrics.get("config_hash") == config_hash)):
        return metrics
    return None

"""A run's evaluation folder, ``<run>/eval/``: its ``metrics.json`` contract, and when
it counts as whole and current.

``evaluate`` builds the folder under a private temporary name and renames it into
place, writing ``metrics.json`` last with the list of the other files (``files``), so
an ``eval/`` that exists was finished: a killed evaluation leaves only a temporary. A
folder from before that rule, or one with a listed file gone, is not whole. Whether an
evaluation is current is decided once, by :func:`current_metrics`: the stage chains
(``pipeline.workflows``) and the registry ask it. :func:`read_metrics` validates a
``metrics.json`` (:class:`EvalMetrics`) wherever one is read.

Light: pydantic only, no torch, numpy or zarr (the CLI and the registry import it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import PipelineError
from pipeline.train.meta import first_problem, read_meta
from pipeline.train.rundir import RunFiles


class EvalMetrics(BaseModel):
    """``eval/metrics.json``: what was scored, on which data, and the per-lead records.

    The fields named here are those read by the CLI, the stage chains and the registry;
    the rest of the file (plots, units, provenance) is kept as it is (``extra``)."""

    model_config = ConfigDict(extra="allow")

    checkpoint: str
    checkpoint_step: int | None
    store_version: int
    config_hash: str | None
    split: str
    leads: list[int]
    init_times: int
    first_init: str
    last_init: str
    climatology: dict[str, Any] | None = None
    records: list[dict[str, Any]]
    files: list[str] | None = None  # the other files of eval/, listed last (whole folder)

    def as_dict(self) -> dict[str, Any]:
        """The file's content as a plain dict (what the verdict and plot helpers take)."""
        return self.model_dump()


def parse_metrics(data: Any, where: Path) -> EvalMetrics:
    """Validate a decoded ``metrics.json``; one-line error naming the field."""
    try:
        return EvalMetrics.model_validate(data)
    except ValidationError as err:
        raise PipelineError(f"{where} is not a valid evaluation ({first_problem(err)})",
                            "it is damaged or from an older version: run `pipeline evaluate` "
                            "again") from None


def read_metrics(path: Path) -> EvalMetrics:
    """Read and validate a ``metrics.json``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot read {path}: {type(err).__name__}: "
                            f"{' '.join(str(err).split())[:160]}",
                            "run `pipeline evaluate` again") from None
    return parse_metrics(data, Path(path))


def current_metrics(run_dir: Path, dataset_version: int,
                    config_hash: str | None = None) -> EvalMetrics | None:
    """The metrics of ``run_dir``'s evaluation if it is whole and scores the run's
    current best checkpoint on store version ``dataset_version`` (and, when given, with
    the config of hash ``config_hash``); None when it must be evaluated again (also
    when either file is missing or invalid)."""
    run = RunFiles(run_dir)
    try:
        metrics = read_metrics(run.eval_metrics)
        meta = read_meta(run.best)
    except PipelineError:  # a CheckpointError too
        return None
    listed = metrics.files
    whole = listed is not None and all((run.eval / name).is_file() for name in listed)
    if (whole and Path(metrics.checkpoint).resolve() == run.best.resolve()
            and metrics.checkpoint_step == meta.step
            and metrics.store_version == dataset_version
            and (config_hash is None or metrics.config_hash == config_hash)):
        return metrics
    return None

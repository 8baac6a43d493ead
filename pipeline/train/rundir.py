"""A run directory has one writer, and a resume trains the run it resumes.

``pipeline train`` (its driver process, locally, on Ray or in a Slurm job) and the
in-process loop (:func:`pipeline.train.runtime.local_runtime`) hold ``<run>/.lock`` for the
whole training: a second writer is refused at once, naming the holder, instead of
resuming the same checkpoint and writing over the first one's checkpoints, ``best/`` and
``metrics.jsonl``. Ray Train workers never take it: their driver holds it. The kernel
releases the lock when its holder dies, so a killed run can be resumed at once.

A run with checkpoints resumes only with the config it was trained with
(``<run>/config.yaml``), except for :data:`MAY_CHANGE_ON_RESUME`: how long to train,
how often to validate and checkpoint, where and how fast it runs, where metrics go.
Anything else (``train.lr``, ``train.seed``, ``model.*``, ``data.*`` ...) would make one
run out of two trainings; it is refused with the differing keys named. Keys the stored
config lacks (written by an older version) are not compared.

No torch, ray or dask: the Ray driver imports it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import files
from pipeline.config import Config, resolved_dict
from pipeline.errors import ConfigError, PipelineError

EVAL_METRICS_FILE = "metrics.json"  # in eval/, written last: the evaluation is whole
REPORT_FILE = "report.html"  # in eval/


@dataclass(frozen=True)
class RunFiles:
    """Where each file of a run directory lives: the one place their names are written
    (``docs/design.md``, "The run directory"). A registered model version holds the same
    ``config.yaml``, ``best/`` and ``eval/metrics.json``."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_metrics(self) -> Path:
        return self.eval / EVAL_METRICS_FILE

    @property
    def report(self) -> Path:
        return self.eval / REPORT_FILE

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def ray_token(self) -> Path:
        return self.root / ".ray_token"

    @property
    def stop_request(self) -> Path:
        """The driver asks the workers."""
        return self.root / "STOP"

    @property
    def user_error(self) -> Path:
        """A worker's, for the driver."""
        return self.root / ".user-error.json"

    @property
    def slurm_logs(self) -> Path:
        return self.root / "slurm"

# The one list of config keys a resume may change (a key, or a section ending in ".").
MAY_CHANGE_ON_RESUME = (
    "train.max_steps", "train.early_stopping_patience",  # how long to train
    "train.val_every", "train.val_batch_size", "train.checkpoint_every",
    "train.keep_checkpoints", "train.max_failures",  # validation and checkpoints
    "train.workers", "train.use_gpu", "train.cpus_per_worker", "train.precision",
    "train.loader", "train.loader_workers", "train.prefetch_factor",
    "train.assemble_on_device", "train.resident",  # where and how fast it runs
    "train.tensorboard", "train.mlflow_uri", "train.mlflow_experiment",  # metric sinks
    "train.init_from",  # ignored once the run has checkpoints of its own
    "runs_dir",  # the same run directory, however it is spelled
    "evaluate.", "registry.", "slurm.",  # not training
)


class RunBusy(PipelineError, RuntimeError):
    """Another process is training (writing) this run directory."""


def absolute_config(cfg: Config) -> Config:
    """Paths made absolute: Ray workers run in another working directory, and the stored
    config names the same files wherever the next resume starts."""
    data = cfg.data.model_copy(update={"store": os.path.abspath(cfg.data.store)})
    init = cfg.train.init_from
    train = cfg.train.model_copy(update={"init_from": os.path.abspath(init) if init else None})
    return cfg.model_copy(update={"data": data, "train": train,
                                  "runs_dir": os.path.abspath(cfg.runs_dir)})


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE_ON_RESUME)


def config_changes(stored: dict[str, Any], cfg: Config) -> list[str]:
    """Keys whose value in ``cfg`` differs from the ``stored`` config and that a resume
    must not change (both sides compared as YAML gives them back)."""
    old = _flat(stored)
    new = _flat(yaml.safe_load(yaml.safe_dump(resolved_dict(cfg), sort_keys=False)))
    return sorted(k for k in old.keys() & new.keys() if old[k] != new[k] and not _may_change(k))


def has_checkpoints(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(p.name.startswith("step-") for p in root.iterdir())


def check_resume(cfg: Config, run_dir: Path) -> None:
    """Refuse to resume a run that has checkpoints with a config that differs from its
    ``config.yaml`` in a key outside :data:`MAY_CHANGE_ON_RESUME`."""
    path = RunFiles(run_dir).config
    if not has_checkpoints(run_dir) or not path.is_file():
        return
    stored = yaml.safe_load(path.read_text()) or {}
    changed = config_changes(stored, cfg)
    if not changed:
        return
    old, new = _flat(stored), _flat(resolved_dict(cfg))
    shown = "; ".join(f"{k}: {old[k]!r} in the run, {new[k]!r} now" for k in changed[:4])
    raise ConfigError(f"run {run_dir} was trained with other {', '.join(changed)} ({shown})",
                      f"train under a new run name (--set name=...), or --set "
                      f"{' '.join(f'{k}=...' for k in changed)} back to {path}")


@contextlib.contextmanager
def run_writer(cfg: Config) -> Iterator[Path]:
    """Be the one writer of ``cfg``'s run directory for the block: hold its lock, refuse
    a resume with another config, store the (absolute) config; yields the run dir."""
    cfg = absolute_config(cfg)
    run_dir = cfg.run_dir()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(files.file_lock(RunFiles(run_dir).lock, wait=False))
        except files.Locked as err:
            raise RunBusy(f"run {run_dir} is being trained by another process "
                          f"({err.holder or 'holder unknown'})",
                          "wait for it to finish, or train under another run name "
                          "(--set name=...)") from None
        check_resume(cfg, run_dir)
        files.atomic_write(RunFiles(run_dir).config,
                           yaml.safe_dump(resolved_dict(cfg), sort_keys=False))
        yield run_dir

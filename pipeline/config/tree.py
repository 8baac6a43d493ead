"""The whole config tree: ``name``, ``runs_dir`` and one section per stage."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from pipeline.config.base import Section
from pipeline.config.data import Data
from pipeline.config.evaluate import Evaluate, Registry
from pipeline.config.slurm import Slurm
from pipeline.config.train import Model, Train


class Config(Section):
    """The whole run configuration."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    runs_dir: str = "runs"
    data: Data
    model: Model = Field(default_factory=Model)
    train: Train = Field(default_factory=Train)
    evaluate: Evaluate = Field(default_factory=Evaluate)
    registry: Registry = Field(default_factory=Registry)
    slurm: Slurm = Field(default_factory=Slurm)

    def run_dir(self) -> Path:
        """Where this run's checkpoints, metrics and evaluation go."""
        return Path(self.runs_dir) / self.name

"""The ``slurm`` section: cluster resources, site set-up and schedule of the job scripts
(``pipeline slurm render``, ``submit`` and ``schedule``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from pipeline.config.base import Section

SINGLE_LINE = r"^[^\x00-\x1f\x7f]*$"  # no newlines or other control characters
DIRECTIVE_VALUE = r"^[^\x00-\x1f\x7f\"\s]+$"  # one word: it lands on an #SBATCH line


class Slurm(Section):
    """Cluster resources and site set-up for the sbatch templates (``pipeline slurm``).

    Values that land on ``#SBATCH`` lines must be single words without quotes or control
    characters; shell set-up goes in ``modules`` and ``setup``. Paths and names in the
    job scripts are shell-quoted by the renderer.
    """

    partition: str | None = Field(None, pattern=DIRECTIVE_VALUE)
    account: str | None = Field(None, pattern=DIRECTIVE_VALUE)
    nodes: int = Field(1, ge=1, description="Nodes of the training job (one Ray node each).")
    gpus_per_node: int = Field(0, ge=0, description="0 trains on CPUs (gloo), else one worker per GPU.")
    cpus_per_task: int = Field(2, ge=1, description="CPUs per node task (Dask workers, Ray CPUs).")
    time: str = Field("01:00:00", pattern=r"^[0-9][0-9:-]*$",
                      description="Time limit of each job, in Slurm's format.")
    mem: str | None = Field(None, pattern=r"^[0-9]+[KMGT]?$")
    modules: list[Annotated[str, Field(pattern=DIRECTIVE_VALUE)]] = Field(
        default_factory=list, description="Environment modules loaded before each job.")
    setup: list[Annotated[str, Field(pattern=SINGLE_LINE)]] = Field(
        default_factory=list,
        description="Shell lines run after the modules, verbatim (e.g. activating a venv).")
    extra_directives: list[Annotated[str, Field(pattern=r"^--[A-Za-z][A-Za-z-]*(=[^\x00-\x1f\x7f\"\s]+)?$")]] = Field(
        default_factory=list, description="More #SBATCH options, e.g. --qos=normal.")
    command: str = Field("pipeline", pattern=SINGLE_LINE,
                         description="How jobs call this tool, e.g. '/opt/venv/bin/pipeline' "
                         "or 'python -m pipeline'.")
    log_dir: str | None = Field(None, pattern=SINGLE_LINE,
                                description="Job logs and scripts; default <run dir>/slurm.")
    preprocess_parts: int = Field(2, ge=1, description="Array tasks of the preprocess job.")
    signal_seconds: int = Field(
        180, ge=0, description="SIGUSR1 this long before the time limit: checkpoint, requeue.")
    port_base: int = Field(20000, ge=1024, le=60000,
                           description="Start of the per-job Ray port blocks.")
    node_timeout: int = Field(300, ge=1, description="Seconds to wait for all Ray nodes to join.")
    retrain_every: str = Field("7d", pattern=r"^[0-9]+[smhdw]$",
                               description="Period of scheduled retraining, e.g. 7d, 12h.")

    def log_path(self, run_dir: Path) -> Path:
        """Where the jobs' logs and scripts go: ``log_dir``, else the run directory's."""
        from pipeline.train.rundir import RunFiles  # here: rundir imports pipeline.config

        return Path(self.log_dir) if self.log_dir else RunFiles(run_dir).slurm_logs

"""The ``model`` and ``train`` sections: the architecture, and the training loop with its
scaling, loader and checkpoint settings (``pipeline train``).

The ``auto`` values here (``precision``, ``loader``, ``loader_workers``, ``resident``)
are resolved by the execution plan (:func:`pipeline.plan.resolve_plan`) and nowhere else.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from pipeline.config.base import Section


class Model(Section):
    """Architecture and sizes."""

    arch: Literal["unet", "fno"] = "unet"
    width: int = Field(32, ge=1, description="Channels of the first layer (unet) or lifting width (fno).")
    depth: int = Field(2, ge=1, description="Down/up levels (unet) or Fourier layers (fno).")
    modes: int = Field(8, ge=1, description="Fourier modes per dimension (fno).")
    predict_tendency: bool = Field(True, description="Predict the normalised change, not the state.")


class Train(Section):
    """Training loop, Ray scaling and checkpointing."""

    history: int = Field(1, ge=1, description="Input time steps.")
    lead: int = Field(1, ge=1, description="Steps ahead of the last input step.")
    rollout: int = Field(1, ge=1, description="Autoregressive steps in the loss.")
    batch_size: int = Field(8, ge=1, description="Samples per worker per step.")
    max_steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    workers: int = Field(2, ge=1, description="Ray Train workers without a Slurm job; in "
                         "one, the allocation decides (pipeline.plan, `pipeline plan`).")
    use_gpu: bool = Field(False, description="A GPU per worker without a Slurm job; in one, "
                          "the allocation's GPUs decide.")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs per worker (on CPUs); a Slurm "
                                 "GPU job gives each GPU worker its share of the node's CPUs.")
    val_every: int = Field(50, ge=1, description="Validate (and checkpoint) every N steps.")
    val_batch_size: int | None = Field(
        None, ge=1, description="Samples per validation batch on each worker (default: "
        "batch_size); 1 can be faster for large grids on a CPU.")
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    max_failures: int = Field(2, ge=0)
    early_stopping_patience: int | None = Field(
        5, ge=1, description="Stop after this many validations in a row without improvement "
        "(null: never). The default 5 is 250 steps at val_every 50: small data with a "
        "seasonal cycle (a few hundred monthly samples) overfits within a few hundred steps, "
        "and best/ keeps the checkpoint with the lowest val loss either way.")
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="Relative decrease of val loss that counts as improvement.")
    seed: int = 0
    loader: Literal["auto", "threads", "processes"] = Field(
        "auto", description="How batches are streamed: by reader 'threads' in the training "
        "process or reader 'processes', both filling reused (pinned) batch buffers; "
        "'auto': processes (pipeline.plan; pipeline.data.loading says why).")
    loader_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="Reader threads or processes, as train.loader says; 0 reads in "
        "the training thread. auto: on a GPU the worker's CPUs less one (at least 1, at "
        "most 8), on the CPU 0 (the step uses the cores).")
    prefetch_factor: int = Field(2, ge=1, description="Batches read ahead.")
    assemble_on_device: bool = Field(
        True, description="With 'threads' or 'processes' on a GPU: copy each batch's raw "
        "steps to the GPU and normalise and gather the samples there (half the "
        "host-to-device bytes, no CPU copies); false makes the samples in pinned host "
        "buffers instead.")
    resident: Literal["auto", True, False] = Field(
        "auto", description="Keep the train and val splits' normalised steps in the "
        "training device's memory, read once, and make each batch by indexing them (no "
        "reads after the first pass; the loader settings then only set the threads of that "
        "pass). auto: on a GPU when they take at most half of its free memory, never on "
        "the CPU (pipeline.data.loading.resident).")
    shuffle_block: int = Field(8, ge=1, description="Time steps per shuffle block.")
    tensorboard: bool = Field(False, description="Also write metrics to <run>/tensorboard/.")
    mlflow_uri: str | None = Field(
        None, description="Also log the config and metrics to MLflow at this tracking URI "
        "(http://host:5000, databricks, sqlite:///path/mlflow.db with full mlflow; file:///path "
        "needs MLFLOW_ALLOW_FILE_STORE=true on MLflow 3); needs the 'mlflow' extra.")
    mlflow_experiment: str = Field("pipeline", min_length=1,
                                   description="MLflow experiment of the runs (mlflow_uri).")
    init_from: str | None = Field(
        None, description="Warm start: a checkpoint folder (e.g. runs/NAME/best or a registry "
        "version's best/) whose model weights initialise a new run (fresh optimiser, step 0). "
        "Ignored once the run has checkpoints of its own: it then resumes from them.")

    def stops_early(self, evals_without_improvement: int) -> bool:
        """Whether early stopping ends a run after this many validations in a row without
        improvement: the loop's rule, and how `pipeline run` knows a run is finished."""
        patience = self.early_stopping_patience
        return patience is not None and evals_without_improvement >= patience

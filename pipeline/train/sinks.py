"""Optional metric sinks beside ``metrics.jsonl``: TensorBoard and MLflow (rank 0 only).

Each sink takes the loop's metrics dict (scalars, plus per-channel dicts such as
``val_rmse``) once per logged step. A resumed run writes into the same TensorBoard
folder and the same MLflow run (its id is kept in ``<run>/mlflow_run_id``); steps
redone after a restart are logged again, as in ``metrics.jsonl``.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import Config, resolved_dict
from pipeline.errors import ConfigError

MLFLOW_RUN_ID_FILE = "mlflow_run_id"


class MetricSink(Protocol):
    def write(self, metrics: dict[str, Any]) -> None: ...

    def close(self, failed: bool) -> None: ...


def scalars(metrics: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(name, value) pairs: per-channel dicts become ``name/channel``; the step is left out."""
    for name, value in metrics.items():
        if isinstance(value, dict):
            for channel, v in value.items():
                yield f"{name}/{channel}", float(v)
        elif name != "step":
            yield name, float(value)


class TensorBoardSink:
    """Scalars to ``<run>/tensorboard/`` (tensorboardX ships with ray[train])."""

    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, metrics: dict[str, Any]) -> None:
        for name, value in scalars(metrics):
            self.writer.add_scalar(name, value, metrics["step"])
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


def check_mlflow(cfg: Config) -> None:
    """Exit code 2 in the driver, before any worker starts, if MLflow is asked for but
    not installed."""
    if cfg.train.mlflow_uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError("train.mlflow_uri is set but MLflow is not installed",
                          "pip install 'pipeline[mlflow]' (mlflow-skinny), or unset it")


class MLflowSink:
    """Parameters (the resolved config, flattened) once, then metrics per logged step, to
    ``train.mlflow_uri`` in experiment ``train.mlflow_experiment``, run name = run name."""

    def __init__(self, cfg: Config, run_dir: Path):
        import mlflow

        self.entities = mlflow.entities  # Param and Metric, for every write
        self.client = mlflow.MlflowClient(tracking_uri=cfg.train.mlflow_uri)
        id_file = run_dir / MLFLOW_RUN_ID_FILE
        if id_file.exists():  # a resumed run logs on in its MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = cfg.train.mlflow_experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                     tags={"run_dir": str(run_dir)})
        self.run_id = run.info.run_id
        params = [self.entities.Param(k, str(v)[:6000]) for k, v in _flatten(resolved_dict(cfg))]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        id_file.write_text(self.run_id + "\n")

    def write(self, metrics: dict[str, Any]) -> None:
        step, stamp = int(metrics["step"]), int(time.time() * 1000)
        batch = [self.entities.Metric(_key(name), value, stamp, step)
                 for name, value in scalars(metrics)]
        for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def close(self, failed: bool) -> None:
        """FAILED after an error in the loop; FINISHED otherwise, also when the run stops
        early to be resumed (it is RUNNING again then)."""
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _key(name: str) -> str:
    """MLflow keys allow letters, digits, ``_-./`` and spaces; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def open_sinks(cfg: Config, run_dir: Path) -> list[MetricSink]:
    """The sinks the train section asks for (call on rank 0 only)."""
    sinks: list[MetricSink] = []
    if cfg.train.tensorboard:
        sinks.append(TensorBoardSink(run_dir))
    if cfg.train.mlflow_uri:
        sinks.append(MLflowSink(cfg, run_dir))
    return sinks

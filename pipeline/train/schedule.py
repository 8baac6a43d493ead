"""Where training is and when it ends: the learning-rate schedule, the progress kept in
checkpoints, and the early-stopping rule.

The rule is written once here: the loop counts validations without improvement with
:func:`record_validation`, and both the loop and ``pipeline run`` (which must know
whether a run is finished without training it) ask :func:`finished`.

Light: no torch (``pipeline.workflows`` imports it on login nodes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 10 % of the peak at ``max_steps``."""
    warmup, total = cfg.train.warmup_steps, cfg.train.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class Progress:
    """Where training is: restored from and saved into checkpoints."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val: float = math.inf
    evals_without_improvement: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def record_validation(progress: Progress, val_loss: float, min_delta: float) -> bool:
    """Count a validation for early stopping (an improvement by less than ``min_delta``,
    relative, counts as none); keep the best loss. Returns whether it is a new best."""
    if val_loss < progress.best_val * (1.0 - min_delta):
        progress.evals_without_improvement = 0
    else:
        progress.evals_without_improvement += 1
    improved = val_loss < progress.best_val
    if improved:
        progress.best_val = val_loss
    return improved


def finished(progress: Progress, cfg: Config) -> bool:
    """Whether a run at ``progress`` is done: at ``train.max_steps`` or stopped early."""
    return (progress.step >= cfg.train.max_steps
            or cfg.train.stops_early(progress.evals_without_improvement))

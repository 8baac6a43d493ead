"""The ``evaluate`` and ``registry`` sections: scoring a run on a held-out split, and the
rule that promotes a model version (``pipeline evaluate``, ``pipeline retrain``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from pipeline.config.base import Section


class Evaluate(Section):
    """Evaluation on a held-out split."""

    split: Literal["val", "test"] = "test"
    leads: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4], min_length=1,
                                     description="Lead times in model steps (of train.lead).")
    channels_to_plot: list[str] = Field(
        default_factory=list, description="Channels with maps in the report (default: the first two).")
    max_samples: int | None = Field(None, ge=1, description="Cap on init times (spread evenly).")
    chunk_size: int = Field(16, ge=1, description="Init times per chunk (bounds memory).")
    climatology_window: int = Field(
        1, ge=1, description="Days averaged around each day of year (odd; 1: no smoothing).")


class Registry(Section):
    """Model registry and promotion rule."""

    path: str = Field("registry", description="Registry directory; this config's models go "
                      "to <path>/<name>/.")
    metric: Literal["rmse", "acc"] = Field(
        "rmse", description="Metric used to compare challenger and champion (rmse: lower is "
        "better; acc: higher is better).")
    lead: int = Field(1, ge=1, description="Lead (model steps) compared; must be in evaluate.leads.")
    min_improvement: float = Field(
        0.0, ge=0, description="Relative improvement needed to promote (0.01: 1 %), averaged "
        "over channels.")

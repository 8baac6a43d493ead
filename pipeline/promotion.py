"""The promotion rule of the registry and what makes two evaluations comparable.

The challenger replaces the champion only if, on ``registry.metric`` at
``registry.lead``, its per-channel relative improvement over the champion, averaged
over channels, is positive and at least ``registry.min_improvement``. Relative per
channel, then averaged, so that a channel in Pa does not outweigh one in K. Both must
have been scored on the same evaluation data (:func:`eval_data`).

Light: pure Python on :class:`~pipeline.evaluate.results.EvalMetrics`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from pipeline.errors import RegistryError
from pipeline.evaluate.results import EvalMetrics

HIGHER_IS_BETTER = {"rmse": False, "acc": True}


def eval_data(metrics: EvalMetrics, data_hash: str) -> dict[str, Any]:
    """What makes two evaluations comparable: the same store content and version, split,
    init times and climatology (ACC is taken against it)."""
    clim = metrics.climatology or {}
    return {"data_hash": data_hash, "store_version": metrics.store_version,
            "split": metrics.split, "first_init": metrics.first_init,
            "last_init": metrics.last_init, "init_times": metrics.init_times,
            "climatology": {k: clim.get(k) for k in ("by", "window_days", "samples")}}


def eval_key(data: dict[str, Any]) -> str:
    """A short name for :func:`eval_data` (file names under ``evals/``)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]



@dataclass
class Comparison:
    """The promotion rule applied to two sets of records."""

    metric: str
    lead: int
    challenger: dict[str, float]  # channel -> value at the lead
    champion: dict[str, float]
    improvement: float  # mean over channels of the relative improvement
    promote: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
        return {"metric": self.metric, "lead": self.lead,
                "challenger_value": mean(self.challenger), "champion_value": mean(self.champion),
                "challenger_by_channel": self.challenger, "champion_by_channel": self.champion,
                "improvement": self.improvement}


def values_at(records: list[dict[str, Any]], metric: str, lead: int) -> dict[str, float]:
    """Channel -> ``metric`` at ``lead`` (channels whose value is null are left out)."""
    rows = [r for r in records if r["lead"] == lead]
    if not rows:
        leads = sorted({r["lead"] for r in records})
        raise RegistryError(f"registry.lead {lead} is not among the evaluated leads {leads}",
                            "add it to evaluate.leads or change registry.lead")
    return {r["channel"]: float(r[metric]) for r in rows
            if r.get(metric) is not None and math.isfinite(r[metric])}


def compare(challenger: list[dict[str, Any]], champion: list[dict[str, Any]], metric: str,
            lead: int, min_improvement: float) -> Comparison:
    """Apply the promotion rule (module docstring) to two metrics.json ``records`` lists."""
    if metric not in HIGHER_IS_BETTER:
        raise RegistryError(f"registry.metric '{metric}' is not comparable",
                            f"use one of {', '.join(HIGHER_IS_BETTER)}")
    new, old = values_at(challenger, metric, lead), values_at(champion, metric, lead)
    if set(new) != set(old):
        raise RegistryError(f"challenger and champion were scored on other channels "
                            f"({sorted(new)} vs {sorted(old)})",
                            "models of one registry must predict the same channels")
    channels = [c for c in sorted(new) if old[c] != 0.0]
    if not channels:
        raise RegistryError(f"no channel has a usable {metric} at lead {lead}",
                            "check the evaluation's metrics.json")
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    gains = [sign * (new[c] - old[c]) / abs(old[c]) for c in channels]
    improvement = sum(gains) / len(gains)
    promote = improvement > 0.0 and improvement >= min_improvement
    better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
    verdict = (f"{improvement:+.2%} mean relative improvement of {metric} ({better} is better) "
               f"at lead {lead} over {len(channels)} channels; needed > 0 and >= "
               f"{min_improvement:.2%}")
    reason = ("better: " if promote else "not better enough: ") + verdict
    return Comparison(metric, lead, {c: new[c] for c in channels}, {c: old[c] for c in channels},
                      improvement, promote, reason)

"""Plain statements, per lead, of whether the model beats persistence and climatology.

Made from the ``records`` of ``eval/metrics.json`` for the report, ``pipeline evaluate``
and ``pipeline run``: the model beats a reference on a channel when its RMSE is below
the reference's. A null or NaN RMSE (a channel with no valid points) cannot be
compared: such channels are left out of the counts and named.
"""

from __future__ import annotations

import math
import re
from typing import Any

REFERENCES = ("persistence", "climatology")
MONTHS_PER_STEP = {"M": 1, "MS": 1, "ME": 1, "Q": 3, "QS": 3, "QE": 3,
                   "A": 12, "AS": 12, "Y": 12, "YS": 12, "YE": 12}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def lead_time(record: dict[str, Any], frequency: str | None) -> str | None:
    """A record's lead as a duration ('6 h', '2 d', '3 months'), None if unknown."""
    hours = record.get("lead_hours")
    if hours is not None:
        return f"{hours / 24:g} d" if hours >= 48 and hours % 24 == 0 else f"{hours:g} h"
    # calendar frequencies (monthly data) have no fixed hours: count months
    match = re.fullmatch(r"(\d*)([A-Z]+)(-[A-Z]+)?", frequency or "")
    if match is None or match[2] not in MONTHS_PER_STEP:
        return None
    months = int(match[1] or 1) * MONTHS_PER_STEP[match[2]] * int(record["lead_steps"])
    return f"{months} month{'' if months == 1 else 's'}"


def lead_verdict(metrics: dict[str, Any], lead: int) -> str:
    """E.g. 'lead 1 (6 h): beats persistence on 7 of 8 channels, beats climatology on
    5 of 8'; channels without a valid RMSE are named as not compared."""
    rows = [r for r in metrics["records"] if r["lead"] == lead]
    if not rows:
        return f"lead {lead}: no scores"
    when = lead_time(rows[0], metrics.get("frequency"))
    steps = rows[0].get("lead_steps", lead)
    about = [f"{steps} store step{'' if steps == 1 else 's'}"] \
        if steps != lead or when is None else []
    about += [when] if when else []
    counts: list[str] = []
    skipped: dict[str, list[str]] = {}  # channel -> references it was not compared with
    for ref in REFERENCES:
        compared = [r for r in rows if _number(r["rmse"]) and _number(r[f"rmse_{ref}"])]
        beaten = sum(r["rmse"] < r[f"rmse_{ref}"] for r in compared)
        counts.append(f"beats {ref} on {beaten} of {len(compared)}")
        for r in rows:
            if r not in compared:
                skipped.setdefault(r["channel"], []).append(ref)
    text = f"lead {lead} ({', '.join(about)}): {counts[0]} channels, {', '.join(counts[1:])}"
    if skipped:
        names = [c if len(refs) == len(REFERENCES) else f"{c} (vs {', '.join(refs)})"
                 for c, refs in skipped.items()]
        text += (f"; {len(names)} channel{'' if len(names) == 1 else 's'} not compared "
                 f"(no valid RMSE): {', '.join(names)}")
    return text


def lead_verdicts(metrics: dict[str, Any]) -> list[str]:
    """One :func:`lead_verdict` per evaluated lead, shortest first."""
    return [lead_verdict(metrics, lead) for lead in sorted(metrics["leads"])]

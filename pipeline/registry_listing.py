"""The registry for humans: one line per version, the champion marked, then the latest
decision (``pipeline registry``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.registry import ModelRegistry


def summary(registry: ModelRegistry) -> str:
    """One line per version, champion marked, then the latest decision, for humans."""
    champion = registry.champion()
    lines = []
    for v in registry.versions():
        mark = "*" if champion and champion.name == v.name else " "
        s = v.info["store"]
        lines.append(f"{mark} {v.name}  run {v.info['run']} step {v.info['checkpoint_step']}  "
                     f"store v{s['dataset_version']} {s['time_start']} .. {s['time_end']}  "
                     f"created {v.info['created']}")
    if not lines:
        return f"{registry.root}: no versions"
    decisions = registry.decisions()
    if decisions:
        last = decisions[-1]
        lines.append(f"latest decision: {last['challenger']} "
                     f"{'promoted' if last['promoted'] else 'not promoted'} ({last['reason']})")
    return "\n".join(lines)

"""A static HTML report of an evaluation: ``eval/report.html``.

Rendered from the Jinja2 template shipped in the package
(``pipeline/evaluate/templates/report.html.j2``) with autoescaping; images are
referenced by paths relative to ``eval/``, so the folder can be copied or served as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from pipeline import files
from pipeline.evaluate.plots import Plot
from pipeline.evaluate.verdict import lead_verdicts
from pipeline.train.rundir import REPORT_FILE

TEMPLATE = "report.html.j2"


def _fmt(value: Any, digits: int = 4) -> str:
    """Numbers for the table: 4 significant digits, '-' where undefined."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render(metrics: dict[str, Any], plots: list[Plot], run_name: str) -> str:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.evaluate", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    return env.get_template(TEMPLATE).render(m=metrics, plots=plots, run_name=run_name,
                                             verdicts=lead_verdicts(metrics))


def write(eval_dir: Path, metrics: dict[str, Any], plots: list[Plot], run_name: str) -> Path:
    """Write ``report.html`` into ``eval_dir`` atomically; every plot must exist there."""
    missing = [p.file for p in plots if not (eval_dir / p.file).is_file()]
    if missing:
        raise FileNotFoundError(f"report images missing in {eval_dir}: {missing}")
    path = eval_dir / REPORT_FILE
    files.atomic_write(path, render(metrics, plots, run_name).encode("utf-8"))
    return path

"""The stage chains that the CLI and the Slurm jobs call.

``run(cfg)``: demo data (when the config reads the demo directory), preprocess, train,
evaluate. ``retrain(cfg)``: append new data, train a run warm-started from the
champion, evaluate, register, promote only if better (see ``pipeline.registry``).

Every stage is skipped when its result is already there and current, and every name is
deterministic, so running either again - after a crash, a preemption, or just twice -
repeats no finished work: a complete store is kept, a run at ``train.max_steps`` (or
stopped early) is not trained again, an evaluation of the current best checkpoint on
the current store version with the same config is kept, and a store version the
registry has already decided on is a no-op.

``train_fn`` is how a run is trained: ``launch_train`` (Ray Train, locally or across a
Slurm allocation) by default; tests pass the plain loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline.config import Config, config_hash
from pipeline.errors import ConfigError
from pipeline.evaluate.results import EvalMetrics, parse_metrics
from pipeline.evaluate.verdict import lead_verdict
from pipeline.train.meta import META_FILE, read_meta
from pipeline.train.rundir import RunFiles

if TYPE_CHECKING:
    from pipeline.registry import ModelRegistry

log = logging.getLogger(__name__)

DEMO_RAW = Path("data/demo/raw")
DEMO_SIZE = "small"  # what configs/demo.yaml is written for (33 x 64, three levels)

TrainFn = Callable[[Config], Any]


@dataclass
class Outcome:
    """What a workflow did, as lines for the user."""

    lines: list[str] = field(default_factory=list)
    preempted: bool = False
    report: Path | None = None

    def say(self, line: str) -> None:
        log.info("%s", line)
        self.lines.append(line)

    @property
    def message(self) -> str:
        return "\n".join(self.lines)


# --------------------------------------------------------------------------- stages


def demo_months(cfg: Config) -> int:
    """Months of demo data (from January 2000) that the config's time range needs."""
    ends = [cfg.data.end] if cfg.data.end else [s[1] for s in cfg.data.splits.model_dump().values()]
    last = max(pd.Timestamp(e) for e in ends)
    return max(1, (last.year - 2000) * 12 + last.month)


def reads_demo(cfg: Config) -> bool:
    """Whether a source of the config reads the demo directory (``data/demo/raw``)."""
    demo = os.path.abspath(DEMO_RAW)
    return any(os.path.abspath(os.path.dirname(s.path)) == demo for s in cfg.data.sources)


def ensure_demo(cfg: Config) -> str | None:
    """Write the demo data when a source reads ``data/demo/raw`` and it holds no files.

    Files already there are never rewritten, even when they are not the ones the config
    is written for: the user made them (``pipeline demo-data --size tiny``, say) and the
    stores built from them record them, so rewriting would break those stores. They are
    used as they are, with one line that says how they differ; a config they cannot
    serve then fails in preprocessing with the error that names what is missing."""
    if not reads_demo(cfg):
        return None
    from pipeline.demo.files import demo_differences, ensure_demo_data
    from pipeline.demo.spec import demo_spec

    spec = demo_spec(DEMO_SIZE, months=demo_months(cfg))
    differences = demo_differences(DEMO_RAW, spec)
    if differences:
        return (f"demo data: using the files in {DEMO_RAW} as they are, not rewritten; they "
                f"differ from size {DEMO_SIZE}, {spec.months} months: {'; '.join(differences)} "
                f"(`pipeline demo-data {DEMO_RAW} --size {DEMO_SIZE} --months {spec.months}` "
                "writes those)")
    paths, written = ensure_demo_data(DEMO_RAW, spec)
    return (f"demo data: {'wrote' if written else 'kept'} {len(paths)} files in {DEMO_RAW} "
            f"(size {DEMO_SIZE})")


def update_store(cfg: Config, append: bool) -> str:
    """Build the store, resume a broken build, or (``append``) add new source steps."""
    from pipeline.data import store
    from pipeline.data.build import preprocess

    path = Path(cfg.data.store)
    if append and path.exists():
        attrs = store.open_group(path).attrs.asdict()
        append = bool(attrs.get("complete") or attrs.get("appending"))  # else: finish the build
    else:
        append = False
    return preprocess(cfg, append=append)


def store_facts(cfg: Config) -> dict[str, Any]:
    from pipeline.registry import store_facts as facts

    return facts(cfg.data.store)


def training_done(cfg: Config) -> int | None:
    """The step a finished run stopped at (max_steps, or early stopping), else None."""
    from pipeline.train import checkpoint
    from pipeline.train.schedule import Progress, finished

    run = RunFiles(cfg.run_dir())
    found = checkpoint.latest_valid(checkpoint.list_steps(run.checkpoints))
    if found is None or not (run.best / checkpoint.META_FILE).exists():
        return None
    progress = Progress(**found[1]["progress"])
    return progress.step if finished(progress, cfg) else None


def current_evaluation(cfg: Config, run_dir: Path) -> EvalMetrics | None:
    """The metrics of the run's evaluation if it is whole and scores the current best
    checkpoint on the current store version with this config, else None."""
    from pipeline.evaluate.results import current_metrics  # "current" is decided there

    return current_metrics(run_dir, store_facts(cfg)["dataset_version"], config_hash(cfg))


def train_stage(cfg: Config, train_fn: TrainFn | None, out: Outcome) -> bool:
    """Train unless done. False when the caller must stop here: training was preempted
    (run the same command again), or this process was only a Ray worker node."""
    done = training_done(cfg)
    if done is not None:
        out.say(f"train: {cfg.run_dir()} already trained (step {done}); skipped")
        return True
    if train_fn is None:
        from pipeline.launch import launch_train

        train_fn = launch_train
    result = train_fn(cfg)
    if getattr(result, "preempted", False):
        out.preempted = True
        out.say(f"train: preempted; checkpoint in {cfg.run_dir() / 'checkpoints'} "
                "(run the same command again to continue)")
        return False
    if getattr(result, "worker_only", False):  # an srun task > 0: a Ray worker node only
        out.say(f"train: this task served as a Ray worker node of {cfg.run_dir()}; task 0 "
                "goes on")
        return False
    out.say(f"train: {cfg.run_dir()} trained to step {training_done(cfg) or '?'}")
    return True


def evaluate_stage(cfg: Config, out: Outcome) -> EvalMetrics:
    """Evaluate unless the evaluation is current; return the metrics."""
    from pipeline.evaluate.evaluate import evaluate

    run_dir = cfg.run_dir()
    metrics = current_evaluation(cfg, run_dir)
    if metrics is not None:
        out.say(f"evaluate: {run_dir / 'eval'} is current; skipped")
    else:
        metrics = parse_metrics(evaluate(cfg, run_dir), RunFiles(run_dir).eval_metrics)
        out.say(f"evaluate: wrote {RunFiles(run_dir).eval_metrics}")
    out.report = RunFiles(run_dir).report
    return metrics


def lead_summary(metrics: EvalMetrics, lead: int) -> str:
    """One line: on how many channels the model beats persistence and climatology."""
    return f"{metrics.split} split, {lead_verdict(metrics.as_dict(), lead)}"


# --------------------------------------------------------------------------- run


def run(cfg: Config, train_fn: TrainFn | None = None) -> Outcome:
    """Preprocess, train and evaluate ``cfg``'s run; stages already done are skipped."""
    out = Outcome()
    demo = ensure_demo(cfg)
    if demo:
        out.say(demo)
    out.say(f"preprocess: {update_store(cfg, append=False)}")
    if not train_stage(cfg, train_fn, out):
        return out
    metrics = evaluate_stage(cfg, out)
    out.say(lead_summary(metrics, min(metrics.leads)))
    out.say(f"report: {out.report}")
    return out


# --------------------------------------------------------------------------- retrain


def retrain_config(cfg: Config, dataset_version: int, init_from: Path | None) -> Config:
    """The retraining run of a dataset version: ``<name>-v<version>``, warm-started."""
    train = cfg.train.model_copy(update={"init_from": str(init_from.resolve()) if init_from
                                         else cfg.train.init_from})
    return cfg.model_copy(update={"name": f"{cfg.name}-v{dataset_version}", "train": train})


def retrain(cfg: Config, train_fn: TrainFn | None = None) -> Outcome:
    """Append new data, warm-start from the champion, evaluate, register, promote if
    better. Without a store it is built; without a champion the first version trains
    from scratch (or from ``train.init_from``) - or is the config's own run, when
    ``pipeline run`` has trained and evaluated it on the current store version - and
    becomes the champion."""
    from pipeline.registry import ModelRegistry

    registry = ModelRegistry.from_config(cfg)  # a bad registry.path fails before any work
    if cfg.registry.lead not in cfg.evaluate.leads:
        raise ConfigError(f"registry.lead {cfg.registry.lead} is not in evaluate.leads "
                          f"{cfg.evaluate.leads}", "add it to evaluate.leads")
    with registry.retraining():  # one retrain of a registry at a time: a second is refused
        registry.recover()  # a promotion a crash interrupted is completed first
        return _retrain(cfg, registry, train_fn)


def _retrain(cfg: Config, registry: ModelRegistry, train_fn: TrainFn | None) -> Outcome:
    out = Outcome()
    demo = ensure_demo(cfg)
    if demo:
        out.say(demo)
    out.say(f"preprocess: {update_store(cfg, append=True)}")
    facts = store_facts(cfg)
    version = facts["dataset_version"]
    handled = registry.handled(facts)
    champion = registry.champion()
    if handled is not None:
        out.say(f"nothing to do: dataset version {version} is already registered as "
                f"{handled.name} and decided on (champion: "
                f"{champion.name if champion else 'none'})")
        return out
    run_cfg = retrain_config(cfg, version, champion.weights if champion else None)
    if champion is None and own_run_current(cfg, version):
        run_cfg = cfg
        out.say(f"no champion yet: registering {cfg.run_dir()} (trained on dataset version "
                f"{version})")
    elif champion is not None:
        out.say(f"warm start of {run_cfg.run_dir()} from champion {champion.name}")
    else:
        out.say(f"no champion yet: training {run_cfg.run_dir()} as the first version")
    if not train_stage(run_cfg, train_fn, out):
        return out
    metrics = evaluate_stage(run_cfg, out)
    out.say(lead_summary(metrics, cfg.registry.lead))
    registered, created = registry.register(run_cfg.run_dir(), cfg.data.store)
    out.say(f"registry: {'registered' if created else 'already registered as'} "
            f"{registered.name} in {registry.root}")
    decision = registry.challenge(registered, run_cfg)
    verdict = "promoted to champion" if decision["promoted"] else "not promoted"
    champion = registry.champion()
    out.say(f"decision: {registered.name} {verdict} ({decision['reason']}); champion: "
            f"{champion.name if champion else 'none'}")
    out.say(f"report: {out.report}")
    return out


def own_run_current(cfg: Config, dataset_version: int) -> bool:
    """Has ``pipeline run`` trained and evaluated the config's own run on this version?"""
    best = RunFiles(cfg.run_dir()).best
    if training_done(cfg) is None or not (best / META_FILE).exists():
        return False
    trained_on = read_meta(best).store.dataset_version
    return trained_on == dataset_version and current_evaluation(cfg, cfg.run_dir()) is not None

"""The ``pipeline`` command's arguments: its sub-commands, their options and help.

Each sub-command stores its name in ``args.handler`` (``"preprocess"``, ``"slurm
submit"``); :mod:`pipeline.cli` maps the name to the function that runs it, so the
parser knows no command's code. Light, like the CLI: argparse and nothing heavy.
"""

from __future__ import annotations

import argparse

from pipeline import __version__


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not i/N (e.g. 2/4)") from None
    if n < 1 or not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"part '{text}': need 1 <= i <= N")
    return i, n


def _leads(text: str) -> list[int]:
    try:
        leads = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of steps like 1,2,4") from None
    if not leads or min(leads) < 1:
        raise argparse.ArgumentTypeError(f"leads '{text}' must be positive steps, e.g. 1,2,4")
    return leads


def _add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help=f"override a config value, e.g. {example}")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (see configs/)")
    _add_overrides(parser, "train.max_steps=50")


def _command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str,
             description: str | None = None, *, config: bool = True) -> argparse.ArgumentParser:
    """The sub-command ``name`` (its last word: ``slurm submit`` is ``submit`` under
    ``slurm``), run by the handler of that name; with ``config`` it takes CONFIG and
    ``--set`` first."""
    parser = sub.add_parser(name.rpartition(" ")[2], help=help, description=description)
    if config:
        _add_config(parser)
    parser.set_defaults(handler=name)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Gridded climate data to trained, evaluated models.")
    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "demo-data", "write synthetic ERA5-like NetCDF files", config=False)
    p.add_argument("dir", help="output directory")
    p.add_argument("--size", default="tiny", help="tiny (tests), small (demo), large (benchmarks)")
    p.add_argument("--months", type=int, default=None, help="number of monthly files")

    p = _command(sub, "preprocess", "build or extend the Zarr training store")
    p.add_argument("--part", type=_part, default=None, metavar="i/N",
                   help="build only part i of N (Slurm arrays); finalise by running without --part")
    p.add_argument("--append", action="store_true", help="add the sources' new time steps")
    p.add_argument("--workers", type=int, default=None, help="Dask worker processes (local)")
    p.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    p.add_argument("--memory-limit", default=None, help="memory limit per local Dask worker")

    p = _command(sub, "train", "train with Ray Train; resumes the run if it exists",
                 "Train data-parallel with Ray Train. "
                 "Running it again resumes from the latest valid checkpoint, with the "
                 "run's config except train.max_steps and the other settings that "
                 "pipeline.train.rundir lists; one run is trained by one process at a "
                 "time. SIGTERM or "
                 "SIGUSR1 checkpoints and exits with code 75 (requeue). Inside a Slurm job "
                 "(one node or several) it starts one Ray node per Slurm node with the "
                 "allocation's CPUs and GPUs (head here, the others through srun), one "
                 "worker per GPU or per cpus_per_worker CPUs, and requeues the job after "
                 "a preemption signal; `pipeline plan` shows what it will do "
                 "(docs/cluster.md).")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (e.g. auto)")

    p = _command(sub, "plan", "print the execution plan of `pipeline train` here, "
                 "starting nothing",
                 "Resolve the execution plan for where this runs (no Slurm "
                 "job, or the Slurm allocation in the environment: run it inside salloc or "
                 "a job to see what the job will do): nodes, Ray Train workers, CPUs and "
                 "GPUs per worker, precision, loader and readers, resident splits, the "
                 "Ray resources, ports and temp dir. Imports no torch or Ray.")
    p.add_argument("--address", default=None, help="plan for joining this Ray cluster")
    p.add_argument("--json", action="store_true", help="the plan as JSON (as in <run>/plan.json)")

    p = _command(sub, "inspect", "summarise a training store", config=False)
    p.add_argument("store")
    p.add_argument("--verify", action="store_true",
                   help="read every shard and check every checksum (exit 2 if one is damaged)")

    p = _command(sub, "evaluate", "score a run against persistence and climatology; "
                 "plots and an HTML report in <run>/eval/", config=False)
    p.add_argument("config", metavar="CONFIG|RUN_DIR",
                   help="the run's YAML config, or its run directory (with config.yaml)")
    _add_overrides(p, "evaluate.max_samples=20")
    p.add_argument("--split", choices=("val", "test"), default=None,
                   help="split to score (default: evaluate.split)")
    p.add_argument("--leads", type=_leads, default=None, metavar="1,2,4",
                   help="lead times in model steps (default: evaluate.leads)")

    p = _command(sub, "predict", "autoregressive forecast written as a CF-style Zarr dataset",
                 config=False)
    p.add_argument("checkpoint", help="a checkpoint folder (e.g. runs/NAME/best) or a run directory")
    p.add_argument("--init", required=True, help="initial time, e.g. 2000-03-10T06:00")
    p.add_argument("--steps", type=int, required=True, help="model steps to forecast")
    p.add_argument("--out", required=True, help="output Zarr path (e.g. forecast.zarr)")
    p.add_argument("--config", default=None,
                   help="config whose data.store to use (default: the checkpoint's own)")
    _add_overrides(p, "data.store=other.zarr")

    _command(sub, "run", "the whole chain locally: (demo data,) preprocess, train, "
             "evaluate; finished stages are skipped",
             "Preprocess, train and evaluate CONFIG, creating the demo data "
             "first when the sources are in data/demo/raw. Stages already done (a "
             "complete store, a run at train.max_steps, a current evaluation) are "
             "skipped, so running it again is cheap. The report is "
             "<runs_dir>/<name>/eval/report.html.")
    _command(sub, "retrain", "append new data, warm-start from the champion, "
             "evaluate, register, promote only if better",
             "Scheduled retraining: append the sources' new time steps to "
             "the store, train <name>-v<dataset version> from the champion's weights, "
             "evaluate it, register it in <registry.path>/<name>/ and promote it if it "
             "beats the champion on registry.metric at registry.lead by "
             "registry.min_improvement. Without new data it does nothing.")
    _command(sub, "registry", "list the config's registered model versions",
             "One line per version in <registry.path>/<name>/ (run, "
             "checkpoint step, store version and period; the champion marked *), "
             "then the latest promotion decision.")

    slurm = sub.add_parser("slurm", help="render, submit and schedule Slurm jobs").add_subparsers(
        dest="slurm_command", required=True, metavar="ACTION")
    p = _command(slurm, "slurm render", "print a job script (demo_data, preprocess, finalise, "
                 "train, evaluate, retrain)", config=False)
    p.add_argument("template")
    _add_config(p)
    p = _command(slurm, "slurm submit", "submit the chain preprocess -> finalise -> train -> "
                 "evaluate with afterok dependencies")
    p.add_argument("--stages", default="preprocess,train,evaluate",
                   help="comma-separated subset of preprocess,train,evaluate")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted")
    p.add_argument("--wait", action="store_true",
                   help="wait for the chain and report each stage (exit 1 if one failed)")
    p = _command(slurm, "slurm schedule", "scheduled retraining: a scrontab entry, or a job "
                 "that re-submits itself each period (slurm.retrain_every)")
    p.add_argument("--now", action="store_true", help="run the first retraining now")
    p.add_argument("--self-submit", action="store_true",
                   help="use the self-submitting job even where scrontab exists")
    return parser

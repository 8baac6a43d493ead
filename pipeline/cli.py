"""The ``pipeline`` command: parse arguments, load the config, call one function.

Exit codes: 0 success, 2 bad input (one line ``error: ...`` on stderr), 1 internal
failure. ``--debug`` shows tracebacks. Heavy libraries are imported inside the command
functions so that ``pipeline --help`` and the Slurm commands stay light on login nodes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline import __version__
from pipeline.errors import PREEMPTED_EXIT_CODE, PipelineError, disk_full

log = logging.getLogger("pipeline")

SIGPIPE_EXIT_CODE = 141  # 128 + SIGPIPE: the shell's code for a writer whose reader left


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. train.max_steps=50")


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not i/N (e.g. 2/4)") from None
    if n < 1 or not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"part '{text}': need 1 <= i <= N")
    return i, n


def cmd_demo_data(args: argparse.Namespace) -> int:
    from pipeline.demo.files import ensure_demo_data
    from pipeline.demo.spec import SIZES, demo_spec

    if args.size not in SIZES:
        raise PipelineError(f"unknown demo size '{args.size}'", f"choose one of {', '.join(SIZES)}")
    overrides = {"months": args.months} if args.months else {}
    paths, written = ensure_demo_data(Path(args.dir), demo_spec(args.size, **overrides))
    size = sum(p.stat().st_size for p in paths) / 1e6
    verb = "wrote" if written else "kept (already there)"
    print(f"{verb} {len(paths)} files ({size:.1f} MB) in {args.dir}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.data.build import preprocess

    cfg = load_config(args.config, args.overrides)
    print(preprocess(cfg, part=args.part, append=args.append, workers=args.workers,
                     scheduler=args.scheduler, memory_limit=args.memory_limit))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.launch import launch_train

    cfg = load_config(args.config, args.overrides)
    result = launch_train(cfg, address=args.address)
    if result.preempted:
        print(f"preempted at step {result.metrics.get('step')}; checkpoint saved in "
              f"{result.run_dir / 'checkpoints'} (run the same command to continue)")
        return PREEMPTED_EXIT_CODE
    if not result.metrics:
        print(f"this task served as a Ray worker node of {result.run_dir}")
        return 0
    val = result.metrics.get("val_loss")
    print(f"trained {result.run_dir} to step {result.metrics.get('step')}"
          + (f", val loss {val:.4f} (persistence {result.metrics['val_loss_persistence']:.4f})"
             if val is not None else ""))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.plan import resolve_plan

    plan = resolve_plan(load_config(args.config, args.overrides), address=args.address)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
        return 0
    print("\n".join(plan.lines() + [f"warning: {w}" for w in plan.warnings]))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.data.store import summary, verify

    print(summary(args.store))
    if not args.verify:
        return 0
    problems, checksums = verify(args.store)
    what = "every checksum matches" if checksums else \
        "checksums absent (a format 1 store): every step decodes"
    print("\n".join([f"verify     {what}"] if not problems else
                    [f"verify     {len(problems)} damaged:", *(f"  {p}" for p in problems)]))
    if problems:
        print(f"error: {args.store} has {len(problems)} damaged shard(s) (delete their files, "
              "then rerun `pipeline preprocess CONFIG`: it rebuilds them)", file=sys.stderr)
        return 2
    return 0


def _leads(text: str) -> list[int]:
    try:
        leads = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of steps like 1,2,4") from None
    if not leads or min(leads) < 1:
        raise argparse.ArgumentTypeError(f"leads '{text}' must be positive steps, e.g. 1,2,4")
    return leads


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate.evaluate import evaluate_target
    from pipeline.evaluate.verdict import lead_verdicts

    overrides = list(args.overrides)
    if args.split:
        overrides.append(f"evaluate.split={args.split}")
    if args.leads:
        overrides.append(f"evaluate.leads={args.leads}")
    eval_dir = evaluate_target(args.config, overrides)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    print(f"{metrics['split']} split, {metrics['init_times']} init times:")
    print("\n".join(f"  {line}" for line in lead_verdicts(metrics)))
    print(f"wrote {eval_dir / 'metrics.json'} and {eval_dir / 'report.html'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.evaluate.forecast import predict

    out = predict(args.checkpoint, args.init, args.steps, args.out, args.config, args.overrides)
    print(f"wrote a {args.steps}-step forecast from {args.init} to {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.workflows import run

    outcome = run(load_config(args.config, args.overrides))
    print(outcome.message)
    return PREEMPTED_EXIT_CODE if outcome.preempted else 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.workflows import retrain

    outcome = retrain(load_config(args.config, args.overrides))
    print(outcome.message)
    return PREEMPTED_EXIT_CODE if outcome.preempted else 0


def cmd_registry(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.registry import ModelRegistry, summary

    registry = ModelRegistry.from_config(load_config(args.config, args.overrides))
    registry.recover()  # a promotion a crash interrupted is completed, then listed
    print(summary(registry))
    return 0


def cmd_slurm_render(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.slurm import render

    cfg = load_config(args.config, args.overrides)
    print(render(args.template, cfg, args.config, args.overrides), end="")
    return 0


def cmd_slurm_submit(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.slurm import chain_report, prepare, submit, wait

    cfg = load_config(args.config, args.overrides)
    jobs = prepare(cfg, args.config, args.overrides, args.stages.split(","))
    submitted = submit(jobs, dry_run=args.dry_run)
    for job, job_id, cmd in submitted:
        if args.dry_run:
            print(f"would submit {job.stage}: {' '.join(cmd)}")
        else:
            print(f"{job.stage:<10} job {job_id:<8} log {job.log}")
    if args.dry_run:
        for job, _, _ in submitted:
            print(f"\n# ---- {job.path}\n{job.script}", end="")
        return 0
    print(f"scripts and jobs.json in {jobs[0].path.parent}; a failed stage cancels the rest")
    if not args.wait:
        return 0
    ok, lines = chain_report(wait(submitted))
    print("\n".join(lines))
    return 0 if ok else 1


def cmd_slurm_schedule(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.slurm import has_scrontab, schedule_entry, schedule_job

    cfg = load_config(args.config, args.overrides)
    if has_scrontab() and not args.self_submit:
        print(schedule_entry(cfg, args.config, args.overrides), end="")
        print("# install: (scrontab -l 2>/dev/null; pipeline slurm schedule ...) | scrontab -",
              file=sys.stderr)
        return 0
    print(schedule_job(cfg, args.config, args.overrides, now=args.now))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Gridded climate data to trained, evaluated models.")
    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-data", help="write synthetic ERA5-like NetCDF files")
    p.add_argument("dir", help="output directory")
    p.add_argument("--size", default="tiny", help="tiny (tests), small (demo), large (benchmarks)")
    p.add_argument("--months", type=int, default=None, help="number of monthly files")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("preprocess", help="build or extend the Zarr training store")
    _add_config(p)
    p.add_argument("--part", type=_part, default=None, metavar="i/N",
                   help="build only part i of N (Slurm arrays); finalise by running without --part")
    p.add_argument("--append", action="store_true", help="add the sources' new time steps")
    p.add_argument("--workers", type=int, default=None, help="Dask worker processes (local)")
    p.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    p.add_argument("--memory-limit", default=None, help="memory limit per local Dask worker")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train", help="train with Ray Train; resumes the run if it exists",
                       description="Train data-parallel with Ray Train. "
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
    _add_config(p)
    p.add_argument("--address", default=None, help="join an existing Ray cluster (e.g. auto)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="print the execution plan of `pipeline train` here, "
                       "starting nothing",
                       description="Resolve the execution plan for where this runs (no Slurm "
                       "job, or the Slurm allocation in the environment: run it inside salloc or "
                       "a job to see what the job will do): nodes, Ray Train workers, CPUs and "
                       "GPUs per worker, precision, loader and readers, resident splits, the "
                       "Ray resources, ports and temp dir. Imports no torch or Ray.")
    _add_config(p)
    p.add_argument("--address", default=None, help="plan for joining this Ray cluster")
    p.add_argument("--json", action="store_true", help="the plan as JSON (as in <run>/plan.json)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("inspect", help="summarise a training store")
    p.add_argument("store")
    p.add_argument("--verify", action="store_true",
                   help="read every shard and check every checksum (exit 2 if one is damaged)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("evaluate", help="score a run against persistence and climatology; "
                       "plots and an HTML report in <run>/eval/")
    p.add_argument("config", metavar="CONFIG|RUN_DIR",
                   help="the run's YAML config, or its run directory (with config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config value, e.g. evaluate.max_samples=20")
    p.add_argument("--split", choices=("val", "test"), default=None,
                   help="split to score (default: evaluate.split)")
    p.add_argument("--leads", type=_leads, default=None, metavar="1,2,4",
                   help="lead times in model steps (default: evaluate.leads)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="autoregressive forecast written as a CF-style Zarr dataset")
    p.add_argument("checkpoint", help="a checkpoint folder (e.g. runs/NAME/best) or a run directory")
    p.add_argument("--init", required=True, help="initial time, e.g. 2000-03-10T06:00")
    p.add_argument("--steps", type=int, required=True, help="model steps to forecast")
    p.add_argument("--out", required=True, help="output Zarr path (e.g. forecast.zarr)")
    p.add_argument("--config", default=None,
                   help="config whose data.store to use (default: the checkpoint's own)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config value, e.g. data.store=other.zarr")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("run", help="the whole chain locally: (demo data,) preprocess, train, "
                       "evaluate; finished stages are skipped",
                       description="Preprocess, train and evaluate CONFIG, creating the demo data "
                       "first when the sources are in data/demo/raw. Stages already done (a "
                       "complete store, a run at train.max_steps, a current evaluation) are "
                       "skipped, so running it again is cheap. The report is "
                       "<runs_dir>/<name>/eval/report.html.")
    _add_config(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("retrain", help="append new data, warm-start from the champion, "
                       "evaluate, register, promote only if better",
                       description="Scheduled retraining: append the sources' new time steps to "
                       "the store, train <name>-v<dataset version> from the champion's weights, "
                       "evaluate it, register it in <registry.path>/<name>/ and promote it if it "
                       "beats the champion on registry.metric at registry.lead by "
                       "registry.min_improvement. Without new data it does nothing.")
    _add_config(p)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("registry", help="list the config's registered model versions",
                       description="One line per version in <registry.path>/<name>/ (run, "
                       "checkpoint step, store version and period; the champion marked *), "
                       "then the latest promotion decision.")
    _add_config(p)
    p.set_defaults(func=cmd_registry)

    slurm = sub.add_parser("slurm", help="render, submit and schedule Slurm jobs").add_subparsers(
        dest="slurm_command", required=True, metavar="ACTION")
    p = slurm.add_parser("render", help="print a job script (demo_data, preprocess, finalise, "
                         "train, evaluate, retrain)")
    p.add_argument("template")
    _add_config(p)
    p.set_defaults(func=cmd_slurm_render)
    p = slurm.add_parser("submit", help="submit the chain preprocess -> finalise -> train -> "
                         "evaluate with afterok dependencies")
    _add_config(p)
    p.add_argument("--stages", default="preprocess,train,evaluate",
                   help="comma-separated subset of preprocess,train,evaluate")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted")
    p.add_argument("--wait", action="store_true",
                   help="wait for the chain and report each stage (exit 1 if one failed)")
    p.set_defaults(func=cmd_slurm_submit)
    p = slurm.add_parser("schedule", help="scheduled retraining: a scrontab entry, or a job "
                         "that re-submits itself each period (slurm.retrain_every)")
    _add_config(p)
    p.add_argument("--now", action="store_true", help="run the first retraining now")
    p.add_argument("--self-submit", action="store_true",
                   help="use the self-submitting job even where scrontab exists")
    p.set_defaults(func=cmd_slurm_schedule)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A reader that closes stdout early (``pipeline inspect S | head``)
    ends it quietly, with the shell's exit code for a writer stopped by SIGPIPE."""
    try:
        try:
            code = _run(argv)
        except SystemExit:
            sys.stdout.flush()  # argparse printed --help or --version, then exited
            raise
        sys.stdout.flush()  # a closed stdout fails here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe broke (a worker's): a real failure
        # the interpreter flushes stdout again on exit: let that write go nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_EXIT_CODE


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll, or stdout is not a file
        return False


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.logs import configure

    configure(args.debug)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PipelineError as err:
        if args.debug:
            raise
        print(f"error: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        full = disk_full(err)
        if full is None or args.debug:
            raise
        print(f"error: {full.one_line()}", file=sys.stderr)
        return full.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

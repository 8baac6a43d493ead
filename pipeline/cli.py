"""The ``pipeline`` command: parse arguments (:mod:`pipeline.cli_args`), load the config,
call one function.

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

from pipeline.cli_args import build_parser
from pipeline.errors import PREEMPTED_EXIT_CODE, PipelineError, disk_full

log = logging.getLogger("pipeline")

SIGPIPE_EXIT_CODE = 141  # 128 + SIGPIPE: the shell's code for a writer whose reader left


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
    if result.worker_only:
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
    from pipeline.data.inspection import summary, verify

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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate.evaluate import evaluate_target
    from pipeline.evaluate.results import read_metrics
    from pipeline.evaluate.verdict import lead_verdicts

    overrides = list(args.overrides)
    if args.split:
        overrides.append(f"evaluate.split={args.split}")
    if args.leads:
        overrides.append(f"evaluate.leads={args.leads}")
    eval_dir = evaluate_target(args.config, overrides)
    metrics = read_metrics(eval_dir / "metrics.json")
    print(f"{metrics.split} split, {metrics.init_times} init times:")
    print("\n".join(f"  {line}" for line in lead_verdicts(metrics.as_dict())))
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
    from pipeline.registry import ModelRegistry
    from pipeline.registry_listing import summary

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


def handler(name: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs the sub-command ``name`` (``args.handler``)."""
    return {
        "demo-data": cmd_demo_data, "preprocess": cmd_preprocess, "train": cmd_train,
        "plan": cmd_plan, "inspect": cmd_inspect, "evaluate": cmd_evaluate,
        "predict": cmd_predict, "run": cmd_run, "retrain": cmd_retrain,
        "registry": cmd_registry, "slurm render": cmd_slurm_render,
        "slurm submit": cmd_slurm_submit, "slurm schedule": cmd_slurm_schedule,
    }[name]


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
    args = build_parser().parse_args(argv)
    from pipeline.logs import configure

    configure(args.debug)
    try:
        return handler(args.handler)(args)
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

"""The ``pipeline`` command: parse arguments, load the config, call one function.

Exit codes: 0 success, 2 bad input (one line ``error: ...`` on stderr), 1 internal
failure. ``--debug`` shows tracebacks. Heavy libraries are imported inside the command
functions so that ``pipeline --help`` and the Slurm commands stay light on login nodes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline import __version__
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


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
    from pipeline.data.synthetic import SIZES, demo_spec, ensure_demo_data

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
    from pipeline.train.loop import PREEMPTED_EXIT_CODE
    from pipeline.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, address=args.address)
    if result.preempted:
        print(f"preempted at step {result.metrics.get('step')}; checkpoint saved in "
              f"{result.run_dir / 'checkpoints'} (run the same command to continue)")
        return PREEMPTED_EXIT_CODE
    val = result.metrics.get("val_loss")
    print(f"trained {result.run_dir} to step {result.metrics.get('step')}"
          + (f", val loss {val:.4f} (persistence {result.metrics['val_loss_persistence']:.4f})"
             if val is not None else ""))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.data.store import summary

    print(summary(args.store))
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
                       description="Train data-parallel with Ray Train on train.workers workers. "
                       "Running it again resumes from the latest valid checkpoint. SIGTERM or "
                       "SIGUSR1 checkpoints and exits with code 75 (requeue).")
    _add_config(p)
    p.add_argument("--resume", action="store_true",
                   help="resume explicitly (the default whenever the run has a checkpoint)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (e.g. auto)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("inspect", help="summarise a training store")
    p.add_argument("store")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
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
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

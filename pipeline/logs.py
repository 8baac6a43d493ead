"""Logging set-up, done once by the CLI: plain lines to stderr, rank 0 speaks."""

from __future__ import annotations

import logging
import os


class _Handler(logging.StreamHandler):
    """The CLI's stderr handler, marked so that configuring again adds no second one."""

    _pipeline = True


def configure(debug: bool = False) -> None:
    """Configure the root logger for the command line (idempotent)."""
    level = logging.DEBUG if debug else logging.INFO
    rank = os.environ.get("RANK", "0")
    if rank != "0" and not debug:
        level = logging.WARNING
    root = logging.getLogger()
    if not any(getattr(h, "_pipeline", False) for h in root.handlers):
        handler = _Handler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("distributed", "asyncio", "numcodecs", "zarr", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not debug else logging.INFO)

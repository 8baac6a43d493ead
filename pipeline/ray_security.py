"""Who can reach a Ray instance this project starts: its own token, loopback on one node.

A client that reaches a Ray instance's GCS runs code in it, so every instance started
here (the local ``ray.init`` of ``pipeline train``, the ``ray start`` nodes of a Slurm
job) gets token authentication (``RAY_AUTH_MODE=token``, whatever the environment
says) with a fresh random token per run. One that is one node listens on loopback only:
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's switch for a one-machine Ray (its default
on macOS and Windows), makes 127.0.0.1 its node address, to which Ray binds its GCS,
raylet, worker and agent ports, and refuses worker nodes. A multi-node Slurm job must
listen on each node's address, which the other nodes reach; there the token is the
guard. The local run keeps its token in ``<run>/.ray_token`` (mode 0600) and points Ray
at it with ``RAY_AUTH_TOKEN_PATH``, so Ray never writes or reads its own
``~/.ray/auth_token`` (created world-readable by ``ray.init``). The DDP rendezvous
of the training workers is ``pipeline.train.rendezvous``'s. Imports no ray at module
level.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from collections.abc import MutableMapping
from pathlib import Path

from pipeline.files import atomic_write
from pipeline.train.rundir import RunFiles

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ONE_NODE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def new_token() -> str:
    """A random token for one run's Ray instance."""
    return secrets.token_hex(32)


def secure_environment(environ: MutableMapping[str, str], one_node: bool) -> None:
    """Token authentication on in ``environ`` (an inherited ``RAY_AUTH_MODE`` that says
    otherwise, e.g. ``disabled`` as Ray's start-up warning suggests, is overridden), and
    loopback only for a Ray of ``one_node``."""
    mode = environ.get("RAY_AUTH_MODE", "token")
    if mode.lower() != "token":
        log.warning("RAY_AUTH_MODE=%s ignored: the Ray instances of pipeline train always "
                    "use a token of their own", mode)
    environ["RAY_AUTH_MODE"] = "token"
    if one_node:
        environ.update(ONE_NODE)


def secure_local_ray(run_dir: Path) -> Path:
    """Set up this process to start a one-node Ray on loopback with a fresh token in
    ``<run>/.ray_token`` (mode 0600); an inherited ``RAY_AUTH_TOKEN``, which Ray would
    prefer to the file, is dropped. Returns the token file."""
    path = RunFiles(run_dir).ray_token
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, new_token(), mode=0o600)
    secure_environment(os.environ, one_node=True)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    if "ray" in sys.modules:  # Ray read both settings at import: make it read them again
        from ray._private import ray_constants
        from ray._raylet import Config  # type: ignore[attr-defined]  # not in _raylet.pyi

        Config.initialize("")  # RAY_AUTH_MODE, as Ray's own token set-up re-reads it
        ray_constants.ENABLE_RAY_CLUSTER = False
    return path

"""How the Ray Train workers of one node find each other: through a private file, with
no socket that anyone else on the machine or the network could reach.

Ray Train's own set-up of the torch process group (``TorchConfig``) starts torch's c10d
``TCPStore`` on rank 0, which torch binds to every interface of the machine and which
answers anyone without a token; the collectives' own sockets (gloo, NCCL's bootstrap)
bind the node's network address. When every worker runs on one node (a laptop, one
node of a Slurm job, the usual several-GPU machine), :class:`OneNodeTorchConfig` makes
the workers meet in a ``FileStore`` in a fresh folder of mode 0700 instead, and points
gloo and NCCL at the loopback interface (unless the user chose an interface with
``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``). Workers on several nodes must talk
over the network: there Ray Train's TCP rendezvous is kept, and the Slurm allocation
(the job's nodes) is the guard; ``docs/reliability.md`` says so.

The only module besides ``trainer`` that imports ``ray.train``; imported by it lazily.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

log = logging.getLogger(__name__)

STORE_FILE = "c10d-store"
INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def loopback_interface() -> str:
    """The name of this machine's loopback interface (``lo`` on Linux, ``lo0`` on macOS)."""
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    return "lo"


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _private_folder() -> str:
    """A new folder only this user can enter (``mkdtemp`` makes it 0700), on the node."""
    return tempfile.mkdtemp(prefix="pipeline-rendezvous-")


def _join_by_file(store_path: str, backend: str, world_size: int, timeout_s: int) -> None:
    """Join the process group through the ``FileStore`` at ``store_path``, with the
    collectives on loopback."""
    interface = loopback_interface()
    for variable in INTERFACE_VARIABLES:
        os.environ.setdefault(variable, interface)
    rank = ray.train.get_context().get_world_rank()
    dist.init_process_group(backend=backend, init_method=f"file://{store_path}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))


class OneNodeTorchBackend(_TorchBackend):
    """Ray Train's torch backend, with the file rendezvous when all workers share a node."""

    def __init__(self) -> None:
        super().__init__()
        self._folder: str | None = None

    # Ray's _TorchBackend narrows Backend's BackendConfig argument to TorchConfig itself
    def on_start(self, worker_group: Any,  # type: ignore[override]
                 backend_config: TorchConfig) -> None:
        if len(set(worker_group.execute(_node_id))) > 1:
            super().on_start(worker_group, backend_config)
            return
        self._folder = worker_group.execute_single(0, _private_folder)
        store = os.path.join(self._folder, STORE_FILE)
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK & co., as Ray's
        size = len(worker_group)
        ray.get([worker_group.execute_single_async(
            rank, _join_by_file, store_path=store, backend=backend_config.backend,
            world_size=size, timeout_s=backend_config.timeout_s) for rank in range(size)])

    def on_shutdown(self, worker_group: Any,  # type: ignore[override]
                    backend_config: TorchConfig) -> None:
        try:
            super().on_shutdown(worker_group, backend_config)
        finally:
            if self._folder is not None:
                worker_group.execute_single(0, shutil.rmtree, self._folder, ignore_errors=True)
                self._folder = None


@dataclass
class OneNodeTorchConfig(TorchConfig):
    """``TorchConfig`` whose backend meets by file on one node (:class:`OneNodeTorchBackend`);
    ``backend`` must be given (``nccl`` or ``gloo``: the plan decides)."""

    @property
    def backend_cls(self) -> type[OneNodeTorchBackend]:
        return OneNodeTorchBackend

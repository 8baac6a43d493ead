"""Where the training loop runs: one process, or one rank of several (a Ray Train
worker, ``trainer.py``). The :class:`Runtime` holds the rank, the device, how to save
and what to resume from, and the host collectives the ranks agree through; a user
error met on the way to one stops every rank together (:meth:`Runtime.stop_together`).
"""

from __future__ import annotations

import logging
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import Config
from pipeline.errors import ConfigError, PipelineError, RanksStopped
from pipeline.plan import ExecutionPlan, local_plan
from pipeline.train import checkpoint
from pipeline.train.meta import CheckpointMeta
from pipeline.train.rundir import RunFiles

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """How the loop talks to where it runs (one process, or one Ray Train worker), and
    the execution plan it follows (readers, loader, precision, resident splits)."""

    run_dir: Path
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m
    # save(step, state, meta, metrics): every rank calls it at the same steps; state is
    # None except on rank 0. Returns the saved folder on rank 0.
    save: Callable[[int, dict[str, Any] | None, CheckpointMeta, dict[str, Any]], Path | None] = None  # type: ignore[assignment]
    resume_candidates: Callable[[], list[Path]] = lambda: []
    stop_requested: Callable[[], bool] = lambda: False
    plan: ExecutionPlan | None = None  # None: the config's own settings (local_plan)
    # whether train_loop takes the run's lock (rundir.run_writer): a Ray Train worker
    # does not, its driver holds it
    owns_run: bool = False

    # a gloo group for the host values (all_reduce), whatever the default group's backend
    _host_group: Any = field(default=None, init=False, repr=False)

    @property
    def in_group(self) -> bool:
        """Whether this process is one rank of several in a torch.distributed group."""
        return self.world_size > 1 and dist.is_initialized()

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) floats over ranks; identity in one process. The values live on
        the host, so they go through gloo: with NCCL they would be copied to the GPU and
        back, and the copy back waits for every kernel queued before it (the stop flag
        is reduced after every step)."""
        if not self.in_group:
            return values
        if self._host_group is None:  # every rank gets here first, at the same call
            self._host_group = dist.new_group(backend="gloo")
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM,
                        group=self._host_group)
        return tensor.tolist()

    def on_every_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a collective: every rank calls it)."""
        return self.all_reduce([float(not flag)], op="max")[0] == 0.0

    def failed_ranks(self, failed: bool, values: list[float] | None = None) -> tuple[list[int], list[float]]:
        """A collective: the ranks that say ``failed``, and the sums of ``values`` (which
        ride along in the same reduction)."""
        flags = [0.0] * self.world_size
        flags[self.rank] = float(failed)
        reduced = self.all_reduce(flags + list(values or []))
        return [k for k, f in enumerate(reduced[:self.world_size]) if f], reduced[self.world_size:]

    def stop_together(self, error: PipelineError | None,
                      values: list[float] | None = None) -> list[float]:
        """A collective at a point every rank reaches: raise :class:`RanksStopped` on
        every rank if any rank met the user error ``error`` on its way there, else return
        the sums of ``values``. In one process, ``error`` itself is raised."""
        if not self.in_group:
            if error is not None:
                raise error
            return list(values or [])
        failed, sums = self.failed_ranks(error is not None, values)
        if failed:
            raise RanksStopped(error, failed)
        return sums


def local_runtime(cfg: Config, plan: ExecutionPlan | None = None) -> Runtime:
    """Run in this process: checkpoints go straight to ``<run>/checkpoints/``; SIGTERM or
    SIGUSR1 asks for a checkpoint and a clean stop. ``plan``: by default the config's own
    settings (:func:`pipeline.plan.local_plan`)."""
    plan = plan or local_plan(cfg)
    run_dir = cfg.run_dir().resolve()
    root = RunFiles(run_dir).checkpoints
    stop = {"flag": False}

    def handler(signum: int, _frame: Any) -> None:
        log.warning("signal %d: checkpointing and stopping", signum)
        stop["flag"] = True

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)

    def save(step: int, state: dict | None, meta: CheckpointMeta, _metrics: dict) -> Path | None:
        folder = checkpoint.save(root, step, state or {}, meta)
        checkpoint.prune(root, cfg.train.keep_checkpoints)
        return folder

    check_device(plan)
    device = torch.device("cuda" if plan.use_gpu else "cpu")
    return Runtime(run_dir=run_dir, plan=plan, device=device, save=save,
                   resume_candidates=lambda: checkpoint.list_steps(root),
                   stop_requested=lambda: stop["flag"], owns_run=True)


def check_device(plan: ExecutionPlan) -> None:
    """A plan that trains on GPUs needs torch to find one here: without, the loop ran on
    the CPU without a word and Ray waited for GPUs that never come."""
    if plan.use_gpu and not torch.cuda.is_available():
        raise ConfigError(f"the plan trains on a GPU, but torch {torch.__version__} finds no "
                          "CUDA device", "install torch's CUDA build, check "
                          "CUDA_VISIBLE_DEVICES, or set train.use_gpu: false")


def rank_share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous range ``[lo, hi)`` of ``n`` items that ``rank`` takes: the ranks'
    shares tile ``0 .. n`` and differ in size by at most one."""
    return rank * n // world_size, (rank + 1) * n // world_size


def use_bf16(plan: ExecutionPlan) -> bool:
    """bf16 autocast: the plan's precision (``resolve_plan`` gives bf16 on GPUs only)."""
    return plan.precision == "bf16"


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

"""Ray Train around the plain loop: with ``rendezvous``, the only module that imports
``ray.train``.

``train(cfg, plan)`` validates everything it can in the driver (store, splits, model,
an existing run's checkpoint), then runs ``train_loop`` on the plan's Ray workers with
``TorchTrainer`` (DDP over gloo on CPU, NCCL on GPUs; the workers of one node meet
through a private file, ``rendezvous``); the plan travels to every
worker and is stored as ``<run>/plan.json`` beside ``config.yaml``. Checkpoints are reported
to Ray, which stores them in ``<run>/checkpoints/step-N`` and keeps the newest
``train.keep_checkpoints``; ``FailureConfig`` restarts failed workers from the latest
one. Running ``train`` again with the same config resumes the run; the driver holds the
run's lock throughout and refuses a resume with another config (``rundir``). SIGTERM/SIGUSR1 to
the driver ask the workers to checkpoint and stop; ``train`` then returns
``preempted=True`` and the CLI exits with :data:`pipeline.errors.PREEMPTED_EXIT_CODE`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import files
from pipeline.config import Config, config_from_dict
from pipeline.errors import ConfigError, PipelineError, RanksStopped, disk_full
from pipeline.plan import ExecutionPlan, free_local_port, resolve_plan
from pipeline.ray_security import secure_local_ray
from pipeline.train.meta import CheckpointMeta
from pipeline.train.progress import progress_bar
from pipeline.train.rundir import RunFiles, absolute_config, run_writer

log = logging.getLogger(__name__)



@dataclass
class TrainResult:
    """What a call to train did: the last reported metrics (empty when nothing was
    trained), whether it was preempted, and whether this process only served as a Ray
    worker node of another task's training (an srun task > 0)."""

    run_dir: Path
    metrics: dict[str, Any]
    preempted: bool
    worker_only: bool = False


def preflight(cfg: Config, plan: ExecutionPlan) -> None:
    """Fail fast in the driver on what would fail in every worker (exit code 2)."""
    from pipeline.data.dataset import ForecastDataset
    from pipeline.data.sampler import BlockShuffleSampler
    from pipeline.data.store import StoreInfo
    from pipeline.train import checkpoint
    from pipeline.train.runtime import check_device
    from pipeline.train.sinks import check_mlflow
    from pipeline.train.stepper import build_stepper

    if plan.ray_start != "connect":  # workers on this machine (a Slurm job: node 0 too)
        check_device(plan)
    t = cfg.train
    info = StoreInfo(cfg.data.store)
    train_set = ForecastDataset(info, "train", t.history, t.lead, t.rollout)
    ForecastDataset(info, "val", t.history, t.lead, 1)
    BlockShuffleSampler(len(train_set), t.batch_size, plan.workers)
    build_stepper(cfg, info)
    check_mlflow(cfg)
    found = checkpoint.latest_valid(checkpoint.list_steps(RunFiles(cfg.run_dir()).checkpoints))
    if found is not None:
        checkpoint.check_compatible(found[2], info, found[0])
    elif t.init_from:  # a warm start: the channels must match, the statistics may differ
        _, meta = checkpoint.load_init(Path(t.init_from))
        checkpoint.check_compatible(meta, info, Path(t.init_from), statistics=False)


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory below a file (``runs_dir`` naming a file, say) up front,
    rather than as a traceback from the first write into it."""
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"the run directory {run_dir} cannot be made: {folder} is a "
                                  "file", "point runs_dir at a folder (or move the file away)")
            return


def quiet_report_lines() -> None:
    """Drop Ray Train V2's INFO line for every report of every rank ("Reporting training
    result N: TrainingReport(...)"): rank 0 logs one line per report of its own. Ray
    names that logger by its file's path, outside ``ray.train``, so RunConfig's
    LoggingConfig does not reach it; only that logger is raised to WARNING, so Ray's
    warnings and the users' own output still show."""
    with contextlib.suppress(ImportError, AttributeError):  # a Ray without that module
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_ray_train_environment() -> None:
    """Ray Train V2's preemption watcher polls Ray's node-drain state (cloud autoscalers)
    and logs errors about its actor in runs that succeed; here a preemption is a Slurm
    signal (``--signal``, SIGTERM), which the launcher handles. Off unless the user set
    ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` (Ray's own switch, passed to its actors)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _worker(loop_config: dict[str, Any]) -> None:
    """The function each Ray Train worker runs."""
    import ray.train
    import ray.train.torch

    from pipeline.train import checkpoint
    from pipeline.train.loop import train_loop
    from pipeline.train.runtime import Runtime

    cfg = config_from_dict(loop_config["config"])
    plan = ExecutionPlan.from_json(loop_config["plan"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # Ray forwards worker output to the driver; rank 0 speaks, the others warn only.
    logging.getLogger("pipeline").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    quiet_report_lines()
    run_dir = cfg.run_dir()
    root = RunFiles(run_dir).checkpoints

    def save(step: int, state: dict | None, meta: CheckpointMeta, metrics: dict) -> Path | None:
        name = checkpoint.step_dir_name(step)
        report = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
        if state is None:
            ray.train.report(report, checkpoint=None, checkpoint_dir_name=name)
            return None
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.write_into(Path(tmp), state, meta)
            try:  # Ray copies the checkpoint into the run directory
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=name)
            except OSError as err:
                full = disk_full(err)
                if full is None:
                    raise
                raise full from err
        return root / name

    def candidates() -> list[Path]:
        latest = ray.train.get_checkpoint()
        first = [Path(latest.path)] if latest is not None else []
        return first + checkpoint.list_steps(root)

    runtime = Runtime(run_dir=run_dir, rank=rank, world_size=context.get_world_size(),
                      device=ray.train.torch.get_device(),
                      prepare_model=ray.train.torch.prepare_model, save=save,
                      resume_candidates=candidates,
                      stop_requested=lambda: RunFiles(run_dir).stop_request.exists(), plan=plan)
    if RunFiles(run_dir).user_error.exists():
        return  # an earlier attempt of this fit met a user error: retrying cannot fix it
    try:
        train_loop(cfg, runtime, stop_at=loop_config.get("stop_at"))
    except RanksStopped as err:
        # every rank stops here together (a damaged shard, a diverged loss): each ends
        # its attempt normally, the ranks that met the error recording it for the driver
        if err.own is not None:
            _record_user_error(run_dir, err.own)
    except PipelineError as err:
        # Ray retries every worker failure: a user error ends the attempt normally instead,
        # recorded for the driver. With several ranks, an error met where the others do
        # not wait for it in a collective (RanksStopped) still fails this worker, as the
        # others may wait for it; the retry that Ray starts ends at once.
        _record_user_error(run_dir, err)
        if context.get_world_size() > 1:
            raise


def _record_user_error(run_dir: Path, err: PipelineError) -> None:
    """Leave a worker's user error for the driver (:func:`_recorded_user_error`); with no
    room to (a full disk), the error itself fails the worker, and the driver finds it
    among Ray's worker failures (:func:`_user_error`)."""
    try:
        files.atomic_write(RunFiles(run_dir).user_error, json.dumps(
            {"type": type(err).__name__, "message": err.message, "hint": err.hint}))
    except OSError:
        raise err from None


def _recorded_user_error(run_dir: Path) -> PipelineError | None:
    """The user error a worker recorded in this fit (then removed), if any."""
    path = RunFiles(run_dir).user_error
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    path.unlink()
    kinds, todo = {}, [PipelineError]
    while todo:
        kind = todo.pop()
        kinds[kind.__name__] = kind
        todo.extend(kind.__subclasses__())
    return kinds.get(record["type"], PipelineError)(record["message"], record["hint"])


def _user_error(err: BaseException) -> PipelineError | None:
    """A PipelineError anywhere in an exception's chain, or among the worker failures Ray
    wraps (``WorkerGroupError.worker_failures``, each holding the worker's exception)."""
    todo: list[BaseException | None] = [err]
    seen: set[int] = set()
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, PipelineError):
            return current
        todo += [current.__cause__, current.__context__, getattr(current, "_base_exc", None),
                 *getattr(current, "worker_failures", {}).values()]
    return None


def train(cfg: Config, plan: ExecutionPlan | None = None, address: str | None = None,
          stop_at: int | None = None) -> TrainResult:
    """Train (or resume) the run with Ray Train as ``plan`` says (by default the plan for
    where this process runs); see the module docstring."""
    plan = plan or resolve_plan(cfg, address=address)
    cfg = absolute_config(cfg)
    check_run_dir(cfg.run_dir())
    with run_writer(cfg):  # this driver is the run's one writer until training ends
        return _train_locked(cfg, plan, address, stop_at)


def _train_locked(cfg: Config, plan: ExecutionPlan, address: str | None,
                  stop_at: int | None) -> TrainResult:
    run_dir = cfg.run_dir()
    stop_file = RunFiles(run_dir).stop_request
    stop_file.unlink(missing_ok=True)  # a stop request of an earlier, preempted run
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def request_stop(signum: int, _frame: Any) -> None:
        log.warning("signal %d: asking the workers to checkpoint and stop", signum)
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.touch()

    def install() -> None:
        for sig in previous:
            signal.signal(sig, request_stop)

    install()  # first: a preemption signal may come at any time
    try:
        return _fit(cfg, plan, address, stop_at, stop_file, install)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start_local_ray(run_dir: Path, num_cpus: int | None, log_to_driver: bool = True) -> None:
    """Start this process's own one-node Ray as ``pipeline train`` does (the tests'
    ``ray_session`` too): a token of its own in ``run_dir`` and servers on loopback only
    (:func:`pipeline.ray_security.secure_local_ray`). Ray's helpers (Ray Train's
    placement-group cleaner) find the State API by themselves and fail when another Ray
    runs on this machine: every process of this instance is told its dashboard's
    address, on a port chosen here."""
    import ray

    port = free_local_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    secure_local_ray(run_dir)
    ray.init(num_cpus=num_cpus, dashboard_port=port, log_to_driver=log_to_driver)


def _fit(cfg: Config, plan: ExecutionPlan, address: str | None, stop_at: int | None,
         stop_file: Path, install_handlers: Callable[[], None]) -> TrainResult:
    preflight(cfg, plan)
    run_dir = cfg.run_dir()
    plan.write(RunFiles(run_dir).plan)  # beside config.yaml, which run_writer stored

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.rendezvous import OneNodeTorchConfig

    if not ray.is_initialized():  # a Slurm job's launcher has connected already
        if plan.ray_start == "init":
            start_local_ray(run_dir, plan.ray_cpus_per_node)
        else:
            ray.init(address=address or plan.ray_address, log_to_driver=True)
        install_handlers()  # again: ray.init installs its own SIGTERM handler in the driver
    t = cfg.train
    quiet_ray_train_environment()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "plan": plan.to_json(),
                           "stop_at": stop_at},
        torch_config=OneNodeTorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                     resources_per_worker={"CPU": plan.cpus_per_worker}),
        run_config=RunConfig(
            name=RunFiles(run_dir).checkpoints.name, storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints)),
    )
    RunFiles(run_dir).user_error.unlink(missing_ok=True)  # an earlier fit's
    try:
        with progress_bar(run_dir, t.max_steps):
            result = trainer.fit()
    except Exception as err:
        user = _recorded_user_error(run_dir) or _user_error(err)
        if user is not None:
            raise user from None
        raise
    user = _recorded_user_error(run_dir)
    if user is not None:
        raise user
    preempted = stop_file.exists()
    stop_file.unlink(missing_ok=True)
    return TrainResult(run_dir=run_dir, metrics=dict(result.metrics or {}), preempted=preempted)

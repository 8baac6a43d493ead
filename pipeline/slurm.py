"""Slurm job scripts from the run config, and their submission as one chain.

``render`` fills the Jinja2 templates of the top-level ``slurm/`` folder, which the
wheel ships as the package ``pipeline.slurm_templates`` (one per stage:
preprocess array, finalise, train, evaluate, and the scheduled retraining). Rendering
is deterministic (sorted directives) and every path, name and argument in the shell
body is quoted with ``shlex.quote``; values that land on ``#SBATCH`` lines are checked
to be single words (the config's patterns, and :func:`directive_path` for paths), so no
config value can run anything. ``submit`` writes the scripts to the run's Slurm folder
(a config that reads the demo data gets a demo-data job first) and chains them with ``sbatch --parsable --dependency=afterok:<id>`` and
``--kill-on-invalid-dep=yes`` (a failed stage cancels the ones after it).
``schedule`` prints a scrontab entry where Slurm has scrontab, and otherwise queues a
retraining job that re-submits itself with ``--begin`` one period later.

Runs on login nodes: imports no torch, ray or dask.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import jinja2

from pipeline import __version__
from pipeline.config import Config
from pipeline.errors import ConfigError, PipelineError
from pipeline.workflows import DEMO_RAW, DEMO_SIZE, demo_months, reads_demo

TEMPLATES = ("demo_data", "preprocess", "finalise", "train", "evaluate", "retrain")
STAGES = ("preprocess", "train", "evaluate")  # what --stages takes; preprocess = array + finalise
SUMMARIES = {
    "demo_data": "Write the demo data the config reads.",
    "preprocess": "Preprocess: one array task per part of the training store.",
    "finalise": "Finalise the training store: verify, merge statistics, mark complete.",
    "train": "Train with Ray Train on every node of the allocation.",
    "evaluate": "Evaluate the run: metrics, baselines, plots, report.",
    "retrain": "Scheduled retraining; re-submits itself for the next period.",
}
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "PREEMPTED", "DEADLINE", "BOOT_FAIL")
PERIOD_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class SlurmError(PipelineError):
    """sbatch or another Slurm command refused or failed."""


@dataclass(frozen=True)
class Job:
    """One rendered stage: its script, where it is written, and its log pattern."""

    stage: str
    script: str
    path: Path
    log: Path


def period_seconds(period: str) -> int:
    """``7d`` -> 604800 (units s, m, h, d, w)."""
    return int(period[:-1]) * PERIOD_UNITS[period[-1]]


def directive_path(path: Path, what: str) -> str:
    """A path for an ``#SBATCH`` line: refused if it has a newline, control character or
    double quote (it could end the line); double-quoted when it has spaces."""
    text = str(path)
    if re.search(r'[\x00-\x1f\x7f"]', text):
        raise ConfigError(f"{what} {text!r} contains a newline, control character or double "
                          "quote, which cannot go on an #SBATCH line",
                          "set slurm.log_dir (and runs_dir) to a plain path")
    return f'"{text}"' if re.search(r"\s", text) else text


def template_dir() -> Path:
    """The folder of the sbatch templates: ``slurm/`` of the checkout (an editable
    install maps it), or its copy in an installed wheel."""
    return Path(str(importlib.resources.files("pipeline.slurm_templates")))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(template_dir()),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env


def job_name(cfg: Config, stage: str) -> str:
    return f"{cfg.name}-{stage}"


def log_pattern(stage: str) -> str:
    """Slurm's output file pattern of a stage (array tasks get their task id)."""
    return "%x-%A_%a.out" if stage == "preprocess" else "%x-%j.out"


def _paths(cfg: Config, workdir: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    """The jobs' working directory (default: here) and their log folder, absolute."""
    workdir = Path(workdir or os.getcwd()).absolute()
    return workdir, (workdir / cfg.slurm.log_path(cfg.run_dir())).absolute()


def _config_args(config_path: str | os.PathLike[str], overrides: list[str] | None,
                 workdir: Path) -> str:
    """The config path and ``--set`` overrides, quoted for the shell."""
    return " ".join([shlex.quote(str((workdir / config_path).absolute()))]
                    + [f"--set {shlex.quote(item)}" for item in overrides or []])


def directives(cfg: Config, stage: str, workdir: Path, log_dir: Path) -> list[str]:
    """The ``#SBATCH`` options of a stage, sorted so that rendering is deterministic."""
    s = cfg.slurm
    opts = {
        "--job-name": job_name(cfg, stage),
        "--chdir": directive_path(workdir, "working directory"),
        "--output": directive_path(log_dir / log_pattern(stage), "log path"),
        "--time": s.time,
        "--cpus-per-task": str(s.cpus_per_task),
        "--nodes": "1",
        "--ntasks-per-node": "1",
    }
    if stage == "preprocess":
        opts["--array"] = f"1-{s.preprocess_parts}"
    if stage == "train":
        opts["--nodes"] = str(s.nodes)
        opts["--requeue"] = ""
        opts["--open-mode"] = "append"  # a requeued job continues its log
        if s.signal_seconds:
            opts["--signal"] = f"B:USR1@{s.signal_seconds}"
    if stage in ("train", "evaluate", "retrain") and s.gpus_per_node:
        opts["--gpus-per-node"] = str(s.gpus_per_node)
    for key, value in (("--partition", s.partition), ("--account", s.account), ("--mem", s.mem)):
        if value:
            opts[key] = value
    lines = [f"{key}={value}" if value else key for key, value in opts.items()]
    return sorted(lines + list(s.extra_directives))


def render(template: str, cfg: Config, config_path: str | os.PathLike[str],
           overrides: list[str] | None = None, workdir: str | os.PathLike[str] | None = None,
           script_path: str | os.PathLike[str] | None = None) -> str:
    """The job script of ``template`` (one of :data:`TEMPLATES`) for this config."""
    if template not in TEMPLATES:
        raise ConfigError(f"unknown Slurm template '{template}'",
                          f"choose one of {', '.join(TEMPLATES)}")
    workdir, log_dir = _paths(cfg, workdir)
    config_args = _config_args(config_path, overrides, workdir)
    return _environment().get_template(f"{template}.sh.j2").render(
        summary=SUMMARIES[template], version=__version__, stage=template,
        directives=directives(cfg, template, workdir, log_dir),
        modules=cfg.slurm.modules, setup=cfg.slurm.setup, workdir=workdir,
        pipeline=shlex.join(shlex.split(cfg.slurm.command)), config_args=config_args,
        parts=cfg.slurm.preprocess_parts, cpus=cfg.slurm.cpus_per_task,
        job_name=job_name(cfg, template), period=cfg.slurm.retrain_every,
        demo_dir=DEMO_RAW, demo_size=DEMO_SIZE, demo_months=demo_months(cfg),
        period_seconds=period_seconds(cfg.slurm.retrain_every),
        script_path=script_path or log_dir / f"{template}.sbatch")


def prepare(cfg: Config, config_path: str | os.PathLike[str], overrides: list[str],
            stages: list[str], workdir: str | os.PathLike[str] | None = None) -> list[Job]:
    """Render the jobs of the chosen stages, in chain order (not yet written)."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown) or '(none)'}",
                          f"--stages takes a comma-separated subset of {', '.join(STAGES)}")
    workdir, log_dir = _paths(cfg, workdir)
    chain = [t for stage in STAGES if stage in stages
             for t in (("preprocess", "finalise") if stage == "preprocess" else (stage,))]
    if "preprocess" in chain and reads_demo(cfg):  # as `pipeline run`: the demo data first
        chain.insert(0, "demo_data")
    jobs = []
    for template in chain:
        path = log_dir / f"{template}.sbatch"
        log_name = log_pattern(template).replace("%x", job_name(cfg, template))
        jobs.append(Job(template, render(template, cfg, config_path, overrides, workdir, path),
                        path, log_dir / log_name))
    return jobs


def sbatch_command(job: Job, after: str | None, begin: str | None = None) -> list[str]:
    cmd = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes"]
    if after:
        cmd.append(f"--dependency=afterok:{after}")
    if begin:
        cmd.append(f"--begin={begin}")
    return [*cmd, str(job.path)]


def _require_sbatch() -> None:
    """Called before anything is written: off a login node, nothing is left behind."""
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch not found", "run this on a Slurm login node, or use --dry-run")


def _sbatch(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SlurmError(f"{shlex.join(cmd)} failed: {out.stderr.strip()}",
                         "check the slurm section of the config (partition, account, time)")
    return out.stdout.strip().split(";")[0]


def submit(jobs: list[Job], dry_run: bool = False) -> list[tuple[Job, str, list[str]]]:
    """Write each script and submit the chain; returns (job, id, sbatch command) in order.

    With ``dry_run`` nothing is written or submitted; ids are placeholders.
    """
    if not dry_run:
        _require_sbatch()
    submitted: list[tuple[Job, str, list[str]]] = []
    after = None
    for job in jobs:
        cmd = sbatch_command(job, after)
        if dry_run:
            job_id = f"<{job.stage}-id>"
        else:
            job.path.parent.mkdir(parents=True, exist_ok=True)
            job.path.write_text(job.script)
            job_id = _sbatch(cmd)
        submitted.append((job, job_id, cmd))
        after = job_id
    if not dry_run and jobs:
        record = {"submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "jobs": [{"stage": j.stage, "id": i, "script": str(j.path), "log": str(j.log)}
                           for j, i, _ in submitted]}
        (jobs[0].path.parent / "jobs.json").write_text(json.dumps(record, indent=2) + "\n")
    return submitted


def job_state(job_id: str) -> dict[str, str]:
    """``scontrol show job`` fields of a job (of its first task for an array)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True, timeout=60)
    states: dict[str, str] = {}
    for line in out.stdout.splitlines():  # one line per array task: keep the worst
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if not states or fields.get("JobState") not in ("COMPLETED", None):
            states = fields
    return states


def wait(submitted: list[tuple[Job, str, list[str]]], poll: float = 2.0,
         timeout: float | None = None) -> list[tuple[Job, str, dict[str, str]]]:
    """Wait until every job of the chain has ended; their final states in order."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        states = [(job, job_id, job_state(job_id)) for job, job_id, _ in submitted]
        if all(s.get("JobState", "COMPLETED") in ENDED for _, _, s in states):
            return states
        if deadline is not None and time.monotonic() > deadline:
            raise SlurmError(f"the chain did not end within {timeout:.0f} s",
                             "see squeue for the jobs still queued or running")
        time.sleep(poll)


def chain_report(states: list[tuple[Job, str, dict[str, str]]]) -> tuple[bool, list[str]]:
    """Whether every stage completed, and one line per stage saying what happened."""
    lines, ok, failed = [], True, None
    for job, job_id, state in states:
        status = state.get("JobState", "UNKNOWN (no longer known to slurmctld)")
        line = f"{job.stage:<10} job {job_id:<8} {status}"
        if status != "COMPLETED":
            ok = False
            if failed is None:
                failed = job
                line += f" (exit {state.get('ExitCode', '?')}); log: {job.log}"
            else:
                line += f": not run because {failed.stage} did not complete"
        lines.append(line)
    return ok, lines


def schedule_entry(cfg: Config, config_path: str | os.PathLike[str], overrides: list[str],
                   workdir: str | os.PathLike[str] | None = None) -> str:
    """A scrontab entry running the retraining job script every period."""
    seconds = period_seconds(cfg.slurm.retrain_every)
    if seconds % 86400 == 0:
        cron = f"0 3 */{seconds // 86400} * *" if seconds > 86400 else "0 3 * * *"
    elif seconds % 3600 == 0:
        cron = f"0 */{seconds // 3600} * * *"
    else:
        cron = f"*/{max(1, seconds // 60)} * * * *"
    workdir, log_dir = _paths(cfg, workdir)
    s = cfg.slurm
    opts = [f"--job-name={job_name(cfg, 'retrain')}", f"--time={s.time}",
            f"--cpus-per-task={s.cpus_per_task}",
            f"--output={directive_path(log_dir / log_pattern('retrain'), 'log path')}"]
    opts += [f"--{k}={v}" for k, v in (("partition", s.partition), ("account", s.account)) if v]
    command = (f"cd {shlex.quote(str(workdir))} && {shlex.join(shlex.split(s.command))} "
               f"retrain {_config_args(config_path, overrides, workdir)}")
    return "\n".join([f"#SCRON {opt}" for opt in sorted(opts)] + [f"{cron} {command}", ""])


def has_scrontab() -> bool:
    return shutil.which("scrontab") is not None


def schedule_job(cfg: Config, config_path: str | os.PathLike[str], overrides: list[str],
                 now: bool = False, workdir: str | os.PathLike[str] | None = None) -> str:
    """Queue the self-submitting retraining job (first run one period from now, or now)."""
    workdir, log_dir = _paths(cfg, workdir)
    path = log_dir / "retrain.sbatch"
    job = Job("retrain", render("retrain", cfg, config_path, overrides, workdir, path), path,
              log_dir / log_pattern("retrain").replace("%x", job_name(cfg, "retrain")))
    begin = None if now else time.strftime(
        "%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + period_seconds(cfg.slurm.retrain_every)))
    _require_sbatch()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(job.script)
    job_id = _sbatch(sbatch_command(job, None, begin))
    return (f"retraining job {job_id} queued to start {begin or 'now'}; each run queues the "
            f"next one {cfg.slurm.retrain_every} later (script {path}, logs {job.log})")

"""Ray Train against plain PyTorch DDP: the same loop, data and model, 2 processes, gloo.

Both runs execute ``pipeline.train.loop.train_loop``; the plain run starts its two
processes with ``torch.multiprocessing`` and ``torch.distributed`` (gloo) itself. The
step rate compared is what the loop reports (Ray's start-up, a fixed cost per job, is
in the wall times). Both get the threads and the niceness of a Ray worker.
The machine is shared and its speed drifts, so the runs come in ``--rounds`` pairs, in
alternating order, and the ratio is the median of the pairs'.

    python -m bench.ddp --rounds 3 --out bench/results/ddp.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import machine, write_result
from pipeline.config import Config, load_config
from pipeline.data.build import preprocess
from pipeline.demo.files import ensure_demo_data
from pipeline.demo.spec import demo_spec

REPO = Path(__file__).resolve().parents[1]
RAY_WORKER_NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))  # noqa: SIM112 - Ray's name and default


def demo_config(workdir: Path, steps: int) -> Path:
    """configs/demo.yaml on the small demo data in ``workdir``."""
    raw = workdir / "raw-small"
    ensure_demo_data(raw, demo_spec("small"))
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["data"]["sources"][0]["path"] = str(raw / "demo_*.nc")
    cfg["data"]["sources"][1]["path"] = str(raw / "static.nc")
    cfg["data"]["store"] = str(workdir / "demo.zarr")
    cfg["runs_dir"] = str(workdir / "runs")
    cfg["train"].update(max_steps=steps, val_every=steps, checkpoint_every=steps // 4,
                        workers=2, batch_size=8)
    path = workdir / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ddp_worker(rank: int, world: int, config_json: str, port: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.train import checkpoint
    from pipeline.train.loop import train_loop
    from pipeline.train.runtime import Runtime

    cfg = Config.model_validate_json(config_json)
    # what a Ray Train worker gets. Its threads: Ray sets OMP_NUM_THREADS to its CPUs
    # (torchrun sets 1); with torch's default, one per core in each process, the two
    # processes oversubscribe the cores and run several times slower. Its niceness: Ray
    # starts workers at RAY_worker_niceness (15), below the machine's other work
    torch.set_num_threads(cfg.train.cpus_per_worker)
    os.nice(RAY_WORKER_NICENESS - os.nice(0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root = cfg.run_dir() / "checkpoints"

    def save(step, state, meta, _metrics):  # noqa: ANN001, ANN202 - Runtime.save's signature
        dist.barrier()
        return checkpoint.save(root, step, state, meta) if rank == 0 else None

    runtime = Runtime(run_dir=cfg.run_dir(), rank=rank, world_size=world,
                      prepare_model=DistributedDataParallel, save=save)
    train_loop(cfg, runtime)
    dist.destroy_process_group()


def step_rate(run: Path) -> float:
    """Mean samples/s over the reports after the first (the first holds the warm-up)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows[1:]] or [rows[0]["samples_per_s"]]
    return sum(rates) / len(rates)


def run_plain(cfg: Config) -> float:
    """A fresh plain-DDP run of ``cfg`` in two spawned processes; its wall seconds."""
    import torch.multiprocessing as tmp

    shutil.rmtree(cfg.run_dir(), ignore_errors=True)  # a fresh run, not a resume
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    tmp.spawn(_ddp_worker, args=(2, cfg.model_dump_json(), port), nprocs=2, join=True)
    return time.perf_counter() - start


def run_ray(cfg: Config) -> float:
    """A fresh Ray Train run of ``cfg`` on a local Ray instance started for it (and shut
    down after, so that it takes no CPU from the next plain run); its wall seconds."""
    import ray

    from pipeline.train.trainer import train

    shutil.rmtree(cfg.run_dir(), ignore_errors=True)
    start = time.perf_counter()
    train(cfg)
    ray.shutdown()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "pipeline-bench"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3,
                        help="pairs of runs, in alternating order; the ratio is their median")
    parser.add_argument("--out", default="bench/results/ddp.json")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = demo_config(work, args.steps)
    preprocess(load_config(path), workers=2)
    configs = {"plain_ddp": load_config(path, ["name=plain-ddp"]),
               "ray_train": load_config(path, ["name=ray-train"])}
    runners = {"plain_ddp": run_plain, "ray_train": run_ray}
    rounds = []
    for k in range(args.rounds):
        order = list(runners) if k % 2 == 0 else list(reversed(runners))  # cancels drift
        walls = {name: round(runners[name](configs[name]), 1) for name in order}
        rates = {name: round(step_rate(cfg.run_dir()), 1) for name, cfg in configs.items()}
        rounds.append({"order": order, "samples_per_s": rates, "wall_seconds": walls,
                       "ratio": round(rates["plain_ddp"] / rates["ray_train"], 3)})
    last_ray = (configs["ray_train"].run_dir() / "metrics.jsonl").read_text().splitlines()[-1]
    write_result(args.out, {
        "benchmark": "ray_train_vs_ddp",
        "machine": machine(),
        "setup": {"config": "configs/demo.yaml (small demo data)", "workers": 2, "backend": "gloo",
                  "steps": args.steps, "batch_size_per_worker": 8, "rounds": args.rounds},
        "rounds": rounds,
        "ratio_ray_step_time_over_ddp": statistics.median(r["ratio"] for r in rounds),
        "data_wait_fraction_ray": json.loads(last_ray)["data_wait_fraction"],
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

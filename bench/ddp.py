"""Ray Train against plain PyTorch DDP: the same loop, data and model, 2 processes, gloo.

Both runs execute ``pipeline.train.loop.train_loop``; the plain run starts its two
processes with ``torch.multiprocessing`` and ``torch.distributed`` (gloo) itself. The
step time compared is what the loop measures between batches (Ray's start-up, which is
a fixed cost per job, is reported separately as wall time).

    python -m bench.ddp --out bench/results/ddp.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import machine, write_result
from pipeline.config import Config, load_config
from pipeline.data.build import preprocess
from pipeline.data.synthetic import demo_spec, ensure_demo_data

REPO = Path(__file__).resolve().parents[1]


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
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.train import checkpoint
    from pipeline.train.loop import Runtime, train_loop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = Config.model_validate_json(config_json)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "pipeline-bench"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="bench/results/ddp.json")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = demo_config(work, args.steps)
    preprocess(load_config(path), workers=2)

    import torch.multiprocessing as tmp

    plain = load_config(path, ["name=plain-ddp"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    tmp.spawn(_ddp_worker, args=(2, plain.model_dump_json(), port), nprocs=2, join=True)
    plain_wall = time.perf_counter() - start

    from pipeline.train.trainer import train

    ray_cfg = load_config(path, ["name=ray-train"])
    start = time.perf_counter()
    train(ray_cfg)
    ray_wall = time.perf_counter() - start

    plain_rate, ray_rate = step_rate(plain.run_dir()), step_rate(ray_cfg.run_dir())
    write_result(args.out, {
        "benchmark": "ray_train_vs_ddp",
        "machine": machine(),
        "setup": {"config": "configs/demo.yaml (small demo data)", "workers": 2, "backend": "gloo",
                  "steps": args.steps, "batch_size_per_worker": 8},
        "samples_per_s": {"plain_ddp": round(plain_rate, 1), "ray_train": round(ray_rate, 1)},
        "ratio_ray_step_time_over_ddp": round(plain_rate / ray_rate, 3),
        "wall_seconds": {"plain_ddp": round(plain_wall, 1), "ray_train": round(ray_wall, 1)},
        "data_wait_fraction_ray": json.loads(
            (ray_cfg.run_dir() / "metrics.jsonl").read_text().splitlines()[-1])["data_wait_fraction"],
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

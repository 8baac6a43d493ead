"""Training throughput on a 1.5-degree store (121 x 240, 61 channels), bf16 on a GPU.

Runs the plain loop (``pipeline.train.loop``, no Ray: one device) and records
samples/s, the data-wait fraction and the device, once for each loader backend
(``threads``, ``processes``: the BatchLoader's readers; ``dataloader``: torch's), each
loader-worker count given and, for the BatchLoader on a GPU, each ``--assembly`` (``device``:
samples normalised and gathered on the GPU from each batch's raw steps, the default;
``host``: made in pinned host buffers). ``--resident`` adds a run with the training split
kept in the device's memory (``train.resident: true``; its readers only make the first
read). The goal on a GPU is a data-wait fraction under 5 %.
It runs on CPU too (fp32), e.g. with ``--steps 8 --loader-workers 2``.

    python -m bench.train_gpu --steps 200 --batch-size 16 --loader threads,processes \
        --loader-workers 8 --assembly device,host --out bench/results/train_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import ensure_store, machine, write_result
from pipeline.config import load_config
from pipeline.train.loop import train_loop
from pipeline.train.runtime import local_runtime


def run_one(config: Path, args: argparse.Namespace, loader: str, loader_workers: int,
            assembly: str, gpu: bool, resident: bool = False) -> dict[str, Any]:
    """Train ``args.steps`` steps with ``loader_workers`` readers of ``loader``, the
    BatchLoader's samples assembled on the device or on the host (``assembly``), or from
    the split kept in memory (``resident``); summarise."""
    every = max(1, args.steps // 4)
    kind = "resident" if resident else f"{loader}{loader_workers}-{assembly}"
    name = f"train-{'gpu' if gpu else 'cpu'}-{args.arch}-{kind}-b{args.batch_size}"
    cfg = load_config(config, [
        f"name={name}", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
        f"train.loader={loader}", f"train.loader_workers={loader_workers}",
        "train.prefetch_factor=4", f"train.assemble_on_device={str(assembly == 'device').lower()}",
        f"train.use_gpu={str(gpu).lower()}", "train.precision=auto",
        f"train.resident={str(resident).lower()}",
        f"train.val_every={args.steps}", f"train.checkpoint_every={every}",
        f"model.arch={args.arch}", f"model.width={args.width}", "train.warmup_steps=5"])
    shutil.rmtree(cfg.run_dir(), ignore_errors=True)  # a fresh run, not a resume of the last
    started = time.perf_counter()
    train_loop(cfg, local_runtime(cfg))
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows  # the first window holds start-up (workers, cuDNN autotune)
    return {
        "loader": "resident" if resident else loader,
        "loader_workers": loader_workers,
        "assembly": assembly,
        "samples_per_s": round(sum(r["samples_per_s"] for r in steady) / len(steady), 2),
        "data_wait_fraction": round(sum(r["data_wait_fraction"] for r in steady) / len(steady), 4),
        "memory_mb": rows[-1]["memory_mb"],
        "wall_s": round(wall, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "pipeline-bench"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loader", default="threads,processes,dataloader",
                        help="comma-separated train.loader backends (threads, processes, "
                        "dataloader), one run each; empty: none (with --resident)")
    parser.add_argument("--loader-workers", default="4",
                        help="comma-separated reader thread / worker process counts, one run each")
    parser.add_argument("--assembly", default="device",
                        help="comma-separated: where the threaded loader makes the samples on a "
                        "GPU (device: from the raw steps, there; host: in pinned buffers)")
    parser.add_argument("--resident", action="store_true",
                        help="first, a run with the split kept in the device's memory "
                        "(train.resident: true, read by the first --loader-workers threads)")
    parser.add_argument("--build-workers", type=int, default=min(8, os.cpu_count() or 2),
                        help="Dask processes that build the store when it is missing")
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--out", default="bench/results/train_gpu.json")
    args = parser.parse_args()

    started = time.perf_counter()
    config = ensure_store(Path(args.workdir), months=1, workers=args.build_workers)
    build_s = time.perf_counter() - started
    gpu = torch.cuda.is_available()
    first_workers = int(args.loader_workers.split(",")[0])
    runs = [run_one(config, args, "threads", first_workers, "device", gpu, resident=True)
            ] if args.resident else []
    runs += [run_one(config, args, backend, int(n), assembly, gpu)
             for backend in filter(None, args.loader.split(",")) for n in args.loader_workers.split(",")
             for assembly in (args.assembly.split(",") if backend != "dataloader" and gpu
                              else ["host"])]
    write_result(args.out, {
        "benchmark": "train_gpu",
        "machine": machine(),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "torch": torch.__version__,
        "precision": "bf16 autocast" if gpu else "fp32",
        "setup": {"grid": "121 x 240", "channels": 61, "arch": args.arch, "width": args.width,
                  "batch_size": args.batch_size, "steps": args.steps},
        "store_build_s": round(build_s, 1),
        "runs": runs,
        "best": min(runs, key=lambda r: r["data_wait_fraction"]),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training throughput on a 1.5-degree store (121 x 240, 61 channels), bf16 on a GPU.

Runs the plain loop (``pipeline.train.loop``, no Ray: one device) with DataLoader
workers, and records samples/s, the data-wait fraction and the device. The goal on a
GPU is a data-wait fraction under 5 %. It runs on CPU too (fp32), e.g. with --steps 6.

    python -m bench.train_gpu --steps 200 --out bench/results/train_gpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.common import ensure_store, machine, write_result
from pipeline.config import load_config
from pipeline.train.loop import local_runtime, train_loop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "pipeline-bench"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--loader-workers", type=int, default=4)
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--out", default="bench/results/train_gpu.json")
    args = parser.parse_args()

    config = ensure_store(Path(args.workdir), months=1)
    gpu = torch.cuda.is_available()
    every = max(1, args.steps // 4)
    cfg = load_config(config, [
        f"name=train-{'gpu' if gpu else 'cpu'}", f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"train.loader_workers={args.loader_workers}",
        "train.prefetch_factor=4", f"train.use_gpu={str(gpu).lower()}", "train.precision=auto",
        f"train.val_every={args.steps}", f"train.checkpoint_every={every}",
        f"model.arch={args.arch}", f"model.width={args.width}", "train.warmup_steps=5"])
    train_loop(cfg, local_runtime(cfg))
    rows = [json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    write_result(args.out, {
        "benchmark": "train_gpu",
        "machine": machine(),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "precision": "bf16 autocast" if gpu else "fp32",
        "setup": {"grid": "121 x 240", "channels": 61, "arch": args.arch, "width": args.width,
                  "batch_size": args.batch_size, "loader_workers": args.loader_workers,
                  "steps": args.steps},
        "samples_per_s": round(sum(r["samples_per_s"] for r in steady) / len(steady), 2),
        "data_wait_fraction": round(sum(r["data_wait_fraction"] for r in steady) / len(steady), 4),
        "memory_mb": rows[-1]["memory_mb"],
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

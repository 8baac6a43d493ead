#!/usr/bin/env bash
# The GPU checks in one go, for a short lease on a GPU machine (docs/benchmarks.md): the
# bf16 training benchmark with the split kept in GPU memory and with reader processes,
# the CUDA tests of the batch loader and the resident split, then the loaders alone
# (about 9 minutes at most). Each step has its own time limit, and a failing one does
# not stop the others. JSON and logs go to $OUT (default bench/results/gpu).
set -u
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
# the first run builds the store (about a minute on 16 cores)
timeout 150 python3 -m bench.train_gpu --steps 200 --batch-size 16 --resident --loader '' \
    --loader-workers 8 --out "$out/train_gpu_resident.json" >"$out/train_resident.log" 2>&1 \
    || tail -20 "$out/train_resident.log"
timeout 150 python3 -m bench.train_gpu --steps 200 --batch-size 16 --loader processes \
    --loader-workers 8,12 --out "$out/train_gpu_processes.json" >"$out/train_processes.log" 2>&1 \
    || tail -20 "$out/train_processes.log"
timeout 100 python3 -m pytest -q -p no:cacheprovider -p no:warnings -m gpu tests/test_loader.py 2>&1 \
    | tail -15
timeout 120 python3 -m bench.loader --history 1 --readers 8 --workers 8 --rounds 1 \
    --out "$out/loader_gpu.json" >"$out/loader.log" 2>&1 || tail -20 "$out/loader.log"
python3 - "$out" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    result = json.loads(path.read_text())
    for run in result.get("runs", []):
        print(path.name, run)
    for name, rates in result.get("batch_loader_samples_per_s", {}).items():
        print(path.name, name, rates)
EOF

#!/usr/bin/env bash
# The wheels that bench/gpu.sh needs and the GPU machine's image lacks (zarr, dask,
# pydantic, netCDF4, ...; it has torch, xarray, numpy, pandas, h5py), downloaded into
# .whl/ (kept out of git) at the versions this machine's .venv runs, for the GPU
# machine's Python 3.12. Then, on the GPU machine, carrying .whl:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
for name in zarr numcodecs donfig google-crc32c dask distributed tblib zict locket partd \
            tornado pydantic pydantic-core annotated-types typing-inspection typing-extensions \
            netCDF4 cftime h5netcdf; do
    version=$(.venv/bin/python -m pip show "$name" | awk '/^Version:/ {print $2}')
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d .whl "$name==$version"
done
du -sh .whl

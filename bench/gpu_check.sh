#!/usr/bin/env bash
# GPU checks for oobspec.transports (cuda_ipc, nccl): needs cupy and a CUDA GPU.
# Prints the 1 GiB cuda_ipc push vs device-copy bandwidth; finishes in under 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c "import cupy; print('cupy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())"
exec timeout 175 "$PY" -m pytest tests/test_transports_gpu.py -v -s -p no:cacheprovider

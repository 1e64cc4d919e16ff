#!/usr/bin/env bash
# Every GPU check in one run (under 3 minutes): transports between two processes
# (cuda_ipc checksum, 1 GiB push vs device-to-device copy, NCCL refusal) and GPU links
# on a real local Ray. Needs cupy (pip install -e '.[gpu,test]') and a CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c "import cupy; print('cupy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())"
exec timeout 175 "$PY" -m pytest tests/test_transports_gpu.py tests/test_gpu_links.py -v -s -p no:cacheprovider

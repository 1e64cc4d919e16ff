#!/usr/bin/env bash
# Every GPU check in one run (a few minutes): transports between two processes (cuda_ipc
# checksums, the source-writes push of links v2 vs a device copy, NCCL refusal), GPU links on
# a real local Ray, then bench_link_push.py --device gpu (in-actor push vs a device copy, from
# the driver vs Ray Direct Transport), which writes gpu-<device>.json into $OUT (or
# bench/results). Needs cupy (pip install -e '.[gpu,test]'), torch for RDT, and a CUDA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
RESULTS=${OUT:-bench/results}
"$PY" -c "import cupy; print('cupy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())"
timeout 240 "$PY" -m pytest tests/test_transports_gpu.py tests/test_gpu_links.py -v -s -p no:cacheprovider
tests=$?
name=$("$PY" -c "import cupy; print(cupy.cuda.runtime.getDeviceProperties(0)['name'].decode().lower().replace(' ', '-'))")
timeout 300 "$PY" bench/bench_link_push.py --device gpu --rounds 100 --json "$RESULTS/gpu-$name.json"
bench=$?
echo "tests exit $tests, bench exit $bench"
exit $(( tests || bench ))

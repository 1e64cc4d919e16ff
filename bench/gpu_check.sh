#!/usr/bin/env bash
# Every GPU check in one run (a few minutes): transports between two processes (cuda_ipc
# checksums behind a long kernel, NCCL refusal and a deadline), GPU links on a real local Ray
# (a distinct seed per push queued behind a long kernel on the cupy or a torch side stream and
# checked by the target on wake, a snapshot lapped by the source, a target restarted during
# pushes, nccl with a killed rank when there are two GPUs), then bench_link_push.py --device gpu
# (in-actor push vs a device copy, from the driver vs Ray Direct Transport). Writes
# gpu-tests-<device>.json (each test's outcome) and gpu-<device>.json into $OUT (or
# bench/results). Needs cupy (pip install -e '.[gpu,test]'), torch for RDT, and a CUDA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
RESULTS=${OUT:-bench/results}
"$PY" -c "import cupy; print('cupy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())"
name=$("$PY" -c "import cupy; print(cupy.cuda.runtime.getDeviceProperties(0)['name'].decode().lower().replace(' ', '-'))")
timeout 420 "$PY" -m pytest tests/test_transports_gpu.py tests/test_gpu_links.py tests/test_links_gpu.py -v -s \
    -p no:cacheprovider --junitxml="$RESULTS/gpu-tests.xml"
tests=$?
"$PY" - "$RESULTS/gpu-tests.xml" "$RESULTS/gpu-tests-$name.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
cases = []
for case in ET.parse(sys.argv[1]).iter("testcase"):
    outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                  "seconds": float(case.get("time", 0))})
json.dump({"tests": cases}, open(sys.argv[2], "w"), indent=1)
print(sum(c["outcome"] == "passed" for c in cases), "of", len(cases), "GPU tests passed")
EOF
timeout 300 "$PY" bench/bench_link_push.py --device gpu --rounds 100 --json "$RESULTS/gpu-$name.json"
bench=$?
echo "tests exit $tests, bench exit $bench"
exit $(( tests || bench ))

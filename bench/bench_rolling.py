"""Replacing a running 4-replica HTTP actor under load: rolling (surge-first, SO_REUSEPORT
hand-over) vs stop-first, same change, same Ray, in one run.

A client process sends ~100 requests a second, each on a new connection, round-robin over the
4 replicas' fixed ports, and counts what fails. Each round deploys version k, starts the
client, applies version k+1 (a kwargs change: every replica is replaced) and times that apply;
the strategy alternates over the rounds. Printed: client errors per side (goal for rolling:
0), apply time per side (median, spread) and rolling / stop-first.

    .venv/bin/python bench/bench_rolling.py [--replicas 4] [--rounds 3] [--drain 2]
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from oobspec.replica.ports import port_free

MODULE = '''
class Versioned:
    def __init__(self, version: int = 0):
        self.version = version

    async def get(self) -> int:
        return self.version
'''

SPEC = """
version: 1
name: bench-rolling
actors:
  web:
    class: versioned:Versioned
    replicas: {replicas}
    update: {strategy}
    drain: {drain}
    kwargs: {{version: {version}}}
    servers: [{{name: http, port: {port}, routes: [{{path: /, call: get}}]}}]
"""

CLIENT = r'''
import json, os, sys, time, requests
port, n, stop, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ok = errors = 0
i = 0
while not os.path.exists(stop):
    try:
        r = requests.get(f"http://127.0.0.1:{port + i % n}/", timeout=10, headers={"Connection": "close"})
        ok += r.status_code == 200
        errors += r.status_code != 200
    except requests.RequestException:
        errors += 1
    i += 1
    time.sleep(0.01)
json.dump({"ok": ok, "errors": errors}, open(out, "w"))
'''


def free_run(n: int) -> int:
    """A port p with p .. p+n-1 all free."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65000 and all(port_free(base + i) for i in range(n)):
            return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--drain", type=float, default=2.0)
    args = parser.parse_args()

    import ray

    import oobspec
    from oobspec.control import cluster
    from oobspec.control.apply import Applier, start_embedded

    folder = Path(tempfile.mkdtemp(prefix="bench-rolling-"))
    (folder / "versioned.py").write_text(MODULE)
    port = free_run(args.replicas)
    start_embedded("oob-bench-rolling", log_to_driver=False)
    times: dict[str, list[float]] = {"rolling": [], "stop-first": []}
    errors: dict[str, list[int]] = {"rolling": [], "stop-first": []}
    served: dict[str, list[int]] = {"rolling": [], "stop-first": []}
    version = 0
    try:
        for r in range(args.rounds):
            for strategy in (("rolling", "stop-first") if r % 2 == 0 else ("stop-first", "rolling")):
                def spec(v: int):
                    path = folder / "spec.yaml"
                    path.write_text(textwrap.dedent(SPEC.format(replicas=args.replicas, strategy=strategy,
                                                                drain=args.drain, version=v, port=port)))
                    return oobspec.load(path)
                Applier(spec(version), detached=True).run(120)
                stop, out = folder / "stop", folder / "seen.json"
                stop.unlink(missing_ok=True)
                client = subprocess.Popen([sys.executable, "-c", CLIENT, str(port), str(args.replicas), str(stop),
                                           str(out)])
                time.sleep(2)
                version += 1
                t0 = time.perf_counter()
                Applier(spec(version), detached=True).run(120)
                times[strategy].append(time.perf_counter() - t0)
                time.sleep(1)
                stop.touch()
                client.wait(timeout=60)
                seen = json.loads(out.read_text())
                errors[strategy].append(seen["errors"])
                served[strategy].append(seen["ok"])
                cluster.delete_all("bench-rolling")
                print(f"round {r + 1} {strategy:<10} apply {times[strategy][-1]:5.1f} s, client: {seen['ok']} ok, "
                      f"{seen['errors']} failed", flush=True)
    finally:
        cluster.delete_all("bench-rolling")
        ray.shutdown()

    print()
    for side in ("rolling", "stop-first"):
        t = times[side]
        print(f"{side:<10} apply median {statistics.median(t):5.1f} s ({min(t):.1f}-{max(t):.1f}); "
              f"client errors per update {errors[side]} of {[a + b for a, b in zip(served[side], errors[side])]}")
    ratios = sorted(a / b for a, b in zip(times["rolling"], times["stop-first"]))
    print(f"rolling / stop-first apply time: median {statistics.median(ratios):.2f}x "
          f"({ratios[0]:.2f}x-{ratios[-1]:.2f}x over {len(ratios)} rounds)")


if __name__ == "__main__":
    main()

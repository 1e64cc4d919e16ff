"""Memory per replica: an oobspec replica vs a bare Ray actor doing the same work, same Ray.

  http    oobspec: a class actor with one HTTP server (aiohttp, oob's servers, metrics);
          bare: a plain @ray.remote class with the same method, no server
  buffer  oobspec: a class actor with a 64 MiB cpu buffer (np.zeros, allocated by oob);
          bare: a plain actor that allocates the same numpy array the same way

Each side starts --replicas actors, waits until they answer, reads VmRSS of each worker
process from /proc, then removes them; sides alternate over --rounds. Printed: median RSS per
replica and oobspec / bare (goal <= 1.3x).

    .venv/bin/python bench/bench_rss.py [--replicas 4] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

MODULE = '''
import os
import numpy as np


class Plain:
    def __init__(self, mib: int = 0):
        self.array = np.zeros(mib * 2**20 // 4, dtype="float32") if mib else None  # as oob allocates it

    async def get(self) -> int:
        return os.getpid()
'''

SPEC = """
version: 1
name: bench-rss
actors:
  http:
    class: rssapp:Plain
    replicas: {n}
    servers: [{{name: http, port: 0, routes: [{{path: /, call: get}}]}}]
  buffer:
    class: rssapp:Plain
    replicas: {n}
    buffers: {{data: {{shape: [{floats}], dtype: float32}}}}
"""
MIB = 64


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import sys

    import ray

    import oobspec
    from oobspec.control.apply import start_embedded

    folder = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    (folder / "rssapp.py").write_text(MODULE)
    (folder / "spec.yaml").write_text(textwrap.dedent(SPEC.format(n=args.replicas, floats=MIB * 2**20 // 4)))
    sys.path.insert(0, str(folder))
    import rssapp

    start_embedded("oob-bench-rss", log_to_driver=False)
    sizes: dict[str, list[float]] = {k: [] for k in ("oob http", "bare http", "oob buffer", "bare buffer")}
    try:
        for r in range(args.rounds):
            for side in (("oob", "bare") if r % 2 == 0 else ("bare", "oob")):
                if side == "oob":
                    spec = oobspec.load(folder / "spec.yaml")
                    with oobspec.deploy(spec) as dep:
                        time.sleep(1)
                        for actor in ("http", "buffer"):
                            pids = ray.get([dep.handle(actor, i).get.remote() for i in range(args.replicas)])
                            sizes[f"oob {actor}"] += [rss_mib(p) for p in pids]
                else:
                    plain = ray.remote(rssapp.Plain)
                    for actor, mib in (("http", 0), ("buffer", MIB)):
                        handles = [plain.remote(mib) for _ in range(args.replicas)]
                        pids = ray.get([h.get.remote() for h in handles])
                        time.sleep(1)
                        sizes[f"bare {actor}"] += [rss_mib(p) for p in pids]
                        for h in handles:
                            ray.kill(h)
                time.sleep(2)
                print(f"round {r + 1} {side}: " + ", ".join(f"{k} {statistics.median(v):.0f} MiB"
                                                           for k, v in sizes.items() if v and k.startswith(side)),
                      flush=True)
    finally:
        ray.shutdown()
    print()
    for actor in ("http", "buffer"):
        oob, bare = statistics.median(sizes[f"oob {actor}"]), statistics.median(sizes[f"bare {actor}"])
        print(f"{actor:<7} oobspec {oob:6.1f} MiB ({min(sizes[f'oob {actor}']):.0f}-{max(sizes[f'oob {actor}']):.0f}) "
              f"vs bare {bare:6.1f} MiB ({min(sizes[f'bare {actor}']):.0f}-{max(sizes[f'bare {actor}']):.0f}) "
              f"per replica: {oob / bare:.2f}x (goal <= 1.3)")


if __name__ == "__main__":
    main()

"""Unary calls/s of a gRPC server inside a Ray actor: oobspec's JSON mode vs a hand-written
grpc.aio server, same Ray, same client.

  a. oobspec       one actor, `protocol: grpc`, `service: bench.Hits`, `methods: [hit]`: the
                   request is a JSON object of keyword arguments, the reply the JSON result
  b. hand-written  a plain @ray.remote class that starts grpc.aio with one generic unary
                   handler doing the same (json.loads the request, call, json.dumps the reply)

The client is its own process: --concurrency callers on one grpc.aio channel for --duration
seconds after a 1 s warm-up, reporting calls/s and p50/p99 latency. Sides alternate over
--rounds; the headline is the median of the per-round ratios (goal >= 0.9x).

    .venv/bin/python bench/bench_grpc.py [--rounds 6] [--duration 3] [--concurrency 32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from bench_http import Hits  # the same user class as the HTTP benchmark

HERE = Path(__file__).resolve().parent

SPEC = """
version: 1
name: bench-grpc
actors:
  hits:
    class: bench_http:Hits
    servers: [{name: rpc, protocol: grpc, port: 0, service: bench.Hits, methods: [hit]}]
"""


class HandServer(Hits):
    """b: the pattern oobspec replaces: an actor that starts its own grpc.aio server."""

    async def serve(self) -> int:
        import grpc

        async def handle(request: bytes, _context) -> bytes:
            kwargs = json.loads(request) if request else {}
            return json.dumps(await self.hit(**kwargs)).encode()

        self._server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler("bench.Hits", {"hit": grpc.unary_unary_rpc_method_handler(handle)})
        self._server.add_generic_rpc_handlers((handler,))
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port


CLIENT = r'''
import asyncio, json, sys, time, grpc
target, concurrency, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
async def main():
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary("/bench.Hits/hit")
        async def run(until, latencies):
            while time.perf_counter() < until:
                t = time.perf_counter()
                await call(b"", timeout=10)
                latencies.append(time.perf_counter() - t)
        warm = []
        await asyncio.gather(*(run(time.perf_counter() + 1.0, warm) for _ in range(concurrency)))
        latencies = []
        start = time.perf_counter()
        await asyncio.gather(*(run(start + seconds, latencies) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        latencies.sort()
        print(json.dumps({"rps": len(latencies) / elapsed, "p50": latencies[len(latencies) // 2] * 1e3,
                          "p99": latencies[int(len(latencies) * 0.99)] * 1e3}))
asyncio.run(main())
'''


def load(target: str, args) -> dict:
    out = subprocess.run([sys.executable, "-c", CLIENT, target, str(args.concurrency), str(args.duration)],
                         capture_output=True, text=True, timeout=args.duration + 60)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    import ray

    import oobspec
    from oobspec.runtime.apply import start_embedded

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    start_embedded("oob-bench-grpc", log_to_driver=False)
    results: dict[str, list[dict]] = {"oobspec": [], "hand-written": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench-grpc.yaml"
            path.write_text(textwrap.dedent(SPEC))
            sys.path.insert(0, str(HERE))
            with oobspec.deploy(oobspec.load(path)) as dep:
                hand = ray.remote(HandServer).remote()
                targets = {"oobspec": dep.endpoints["hits"]["rpc"][0],
                           "hand-written": f"127.0.0.1:{ray.get(hand.serve.remote())}"}
                for r in range(args.rounds):
                    for side in (("oobspec", "hand-written") if r % 2 == 0 else ("hand-written", "oobspec")):
                        got = load(targets[side], args)
                        results[side].append(got)
                        print(f"  round {r + 1}  {side:<13} {got['rps']:8.0f} calls/s  p50 {got['p50']:.2f} ms  "
                              f"p99 {got['p99']:.2f} ms", flush=True)
                ray.kill(hand)
    finally:
        ray.shutdown()
    print("\nmedian over rounds (min-max):")
    for side, runs in results.items():
        rps = [x["rps"] for x in runs]
        print(f"  {side:<13} {statistics.median(rps):8.0f} calls/s ({min(rps):.0f}-{max(rps):.0f})  "
              f"p50 {statistics.median(x['p50'] for x in runs):.2f} ms  p99 {statistics.median(x['p99'] for x in runs):.2f} ms")
    pairs = sorted(a["rps"] / b["rps"] for a, b in zip(results["oobspec"], results["hand-written"]))
    print(f"  oobspec / hand-written  {statistics.median(pairs):.2f}x calls/s (goal >= 0.9)  per-round pairs "
          + " ".join(f"{x:.2f}" for x in pairs))


if __name__ == "__main__":
    main()

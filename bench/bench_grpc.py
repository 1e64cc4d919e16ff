"""Unary calls/s of a gRPC server inside a Ray actor: oobspec's JSON mode vs a hand-written
grpc.aio server, same Ray, same client.

  a. oobspec       one actor, `protocol: grpc`, `service: bench.Hits`, `methods: [hit]`: the
                   request is a JSON object of keyword arguments, the reply the JSON result
  b. hand-written  a plain @ray.remote class that starts grpc.aio with one generic unary
                   handler doing the same (json.loads the request, call, json.dumps the reply)
  c. Ray Serve     (with --serve) a deployment behind Serve's gRPC proxy: a proto service
                   (generated here with grpc_tools) whose Hit method calls the same hit()

The client is its own process: --concurrency callers on one grpc.aio channel for --duration
seconds after a 1 s warm-up, reporting calls/s and p50/p99 latency. Sides alternate over
--rounds; the headline is the median of the per-round ratios (goal >= 0.9x).

    .venv/bin/python bench/bench_grpc.py [--rounds 6] [--duration 3] [--concurrency 32] [--serve]
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
method, app = sys.argv[4], sys.argv[5]
metadata = (("application", app),) if app else None
async def main():
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)
        async def run(until, latencies):
            while time.perf_counter() < until:
                t = time.perf_counter()
                await call(b"", timeout=10, metadata=metadata)
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


PROTO = """
syntax = "proto3";
package bench;
message HitRequest {}
message HitReply { int64 count = 1; }
service Hits { rpc Hit (HitRequest) returns (HitReply); }
"""


def serve_proto(folder: Path) -> None:
    """bench_pb2 / bench_pb2_grpc in `folder` (on every worker's PYTHONPATH)."""
    from grpc_tools import protoc
    (folder / "bench.proto").write_text(PROTO)
    if protoc.main(["protoc", f"-I{folder}", f"--python_out={folder}", f"--grpc_python_out={folder}",
                    str(folder / "bench.proto")]):
        raise RuntimeError("protoc failed")


def run_serve(args, results: dict) -> None:
    import socket

    from ray import serve
    from ray.serve.config import gRPCOptions

    import bench_pb2

    quiet = {"log_level": "WARNING", "enable_access_log": False}

    @serve.deployment(max_ongoing_requests=1000, logging_config=quiet)
    class ServeHits(Hits):
        async def Hit(self, _request):
            return bench_pb2.HitReply(count=(await self.hit())["count"])

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(grpc_options=gRPCOptions(port=port, grpc_servicer_functions=["bench_pb2_grpc.add_HitsServicer_to_server"]),
                logging_config=quiet)
    try:
        serve.run(ServeHits.bind(), name="hits", route_prefix="/hits", logging_config=quiet)
        for r in range(args.serve_rounds):
            got = load(f"127.0.0.1:{port}", args, "/bench.Hits/Hit", "hits")
            results["Ray Serve"].append(got)
            print(f"  round {r + 1}  {'Ray Serve':<13} {got['rps']:8.0f} calls/s  p50 {got['p50']:.2f} ms  "
                  f"p99 {got['p99']:.2f} ms", flush=True)
    finally:
        serve.shutdown()


def load(target: str, args, method: str = "/bench.Hits/hit", app: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", CLIENT, target, str(args.concurrency), str(args.duration), method, app],
                         capture_output=True, text=True, timeout=args.duration + 60)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--serve", action="store_true", help="also Ray Serve's gRPC proxy (pip install -e '.[bench]')")
    parser.add_argument("--serve-rounds", type=int, default=3)
    args = parser.parse_args()

    import ray

    import oobspec
    from oobspec.control.apply import start_embedded

    protos = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    if args.serve:
        serve_proto(protos)
        sys.path.insert(0, str(protos))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(protos), os.environ.get("PYTHONPATH")]))
    start_embedded("oob-bench-grpc", log_to_driver=False)
    results: dict[str, list[dict]] = {"oobspec": [], "hand-written": [], "Ray Serve": []}
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
        if args.serve:
            run_serve(args, results)
    finally:
        ray.shutdown()
    print("\nmedian over rounds (min-max):")
    for side, runs in results.items():
        if not runs:
            continue
        rps = [x["rps"] for x in runs]
        print(f"  {side:<13} {statistics.median(rps):8.0f} calls/s ({min(rps):.0f}-{max(rps):.0f})  "
              f"p50 {statistics.median(x['p50'] for x in runs):.2f} ms  p99 {statistics.median(x['p99'] for x in runs):.2f} ms")
    pairs = sorted(a["rps"] / b["rps"] for a, b in zip(results["oobspec"], results["hand-written"]))
    print(f"  oobspec / hand-written  {statistics.median(pairs):.2f}x calls/s (goal >= 0.9)  per-round pairs "
          + " ".join(f"{x:.2f}" for x in pairs))

    if results["Ray Serve"]:
        serve_rps = statistics.median(x["rps"] for x in results["Ray Serve"])
        print(f"  oobspec / Ray Serve     {statistics.median(x['rps'] for x in results['oobspec']) / serve_rps:.1f}x calls/s")


if __name__ == "__main__":
    main()

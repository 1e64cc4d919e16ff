"""Requests/s of an HTTP server inside a Ray actor: oobspec vs hand-written aiohttp vs Ray Serve.

The same handler everywhere (`Hits.hit`: an async method that increments a counter and returns
`{"count": n}`), the same load generator in its own process (`wrk` when installed, otherwise
the aiohttp client built into this file), the same concurrency (32 keep-alive connections),
a warm-up, then a fixed duration:

  a. oobspec      one actor, one http route (GET / -> hit), applied with `oobspec.deploy(spec)`
  b. hand-written a plain `@ray.remote` class that starts its own aiohttp AppRunner/TCPSite in
                  an async method (`web.json_response(await self.hit())`, access log off)
  c. Ray Serve    `@serve.deployment` (max_ongoing_requests=1000, access log off, log level
                  WARNING, RAY_SERVE_THROUGHPUT_OPTIMIZED=1 unless --serve-defaults) called
                  through Serve's HTTP proxy on 127.0.0.1 (direct ingress off)

Everything runs on the bench's own local Ray. a and b are up together and measured in
alternating order (a b, b a, ...), round after round; Serve is measured after they are gone
(its controller and proxy poll in the background, which would tax a and b). The
oobspec/hand-written figure is the median of the per-round ratios (each pair back to back, so
drift in other load on the machine hits both alike); also printed: the ratio of the medians
and the server process's CPU time per request (from /proc). oobspec/Serve is the ratio of
the medians. Goals: oobspec >= 0.9x hand-written, >= 20x Serve through its proxy, >= 4.5x Serve
with direct ingress (--serve-direct-ingress).

    .venv/bin/python bench/bench_http.py [--rounds 8] [--serve-rounds 3] [--duration 3] [--warmup 1]
                                         [--connections 32] [--load auto|wrk|aiohttp] [--no-serve]
                                         [--serve-defaults] [--typed]

--typed adds a side: the oobspec actor's GET /typed?n=0&flag=yes, whose two parameters pydantic
validates and converts (the price of typed routes, against the same actor's untyped GET /).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class Hits:
    """The user's logic, identical for all three servers."""

    def __init__(self):
        self.n = 0

    async def hit(self) -> dict:
        self.n += 1
        return {"count": self.n}

    async def typed(self, n: int, flag: bool = False) -> dict:
        """oobspec only (GET /typed?n=1&flag=yes): what pydantic's checks cost per request."""
        self.n += n
        return {"count": self.n, "flag": flag}


class HandServer(Hits):
    """b: the pattern oobspec replaces — an actor that starts its own aiohttp server."""

    async def serve(self, port: int = 0) -> int:
        from aiohttp import web

        async def handle(_request):
            return web.json_response(await self.hit())

        app = web.Application()
        app.router.add_get("/", handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        await self._runner.cleanup()


SPEC = """\
version: 1
name: bench-http
actors:
  hits: &hits
    class: bench_http:Hits
    servers:
      - {name: http, protocol: http, host: 127.0.0.1, port: 0,
         routes: [{method: GET, path: /, call: hit}, {method: GET, path: /typed, call: typed}]}
  quiet:
    <<: *hits
    env: {OOB_METRICS: "0"}
"""


# --- load generator (always its own process) --------------------------------------------------


def _aiohttp_client(url: str, connections: int, seconds: float) -> None:
    """Runs in a child process: `connections` keep-alive loops for `seconds`; prints JSON."""
    import aiohttp

    async def main():
        done = errors = 0
        stop = time.perf_counter() + seconds
        connector = aiohttp.TCPConnector(limit=connections, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def worker():
                nonlocal done, errors
                while time.perf_counter() < stop:
                    async with session.get(url) as resp:
                        await resp.read()
                        if resp.status == 200:
                            done += 1
                        else:
                            errors += 1
            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            elapsed = time.perf_counter() - start
        print(json.dumps({"rps": done / elapsed, "requests": done, "errors": errors}))

    asyncio.run(main())


def load(url: str, connections: int, seconds: float, tool: str) -> dict:
    if tool == "wrk":
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "--latency", url]
    else:
        cmd = [sys.executable, __file__, "--_client", url, str(connections), str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.strip() or out.stdout.strip()}")
    if tool != "wrk":
        return json.loads(out.stdout.strip().splitlines()[-1])
    rps = float(re.search(r"Requests/sec:\s*([\d.]+)", out.stdout).group(1))
    reqs = int(re.search(r"(\d+) requests in", out.stdout).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out.stdout)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out.stdout)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return {"rps": rps, "requests": reqs, "errors": errors,
            "p50": _ms(re.search(r"^\s+50%\s+(\S+)", out.stdout, re.M)),
            "p99": _ms(re.search(r"^\s+99%\s+(\S+)", out.stdout, re.M))}


def _ms(match) -> float:
    """wrk's `1.23ms` / `456.00us` / `1.02s` in milliseconds (nan when wrk did not say)."""
    if match is None:
        return float("nan")
    value, unit = re.match(r"([\d.]+)(us|ms|s|m)", match.group(1)).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def cpu_seconds(pids) -> float:
    """user + system CPU time of these processes (all their threads), from /proc."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(url: str, pids, args) -> tuple[float, float, float, float]:
    """(requests/s, server CPU microseconds per request, p50 ms, p99 ms) for one timed run
    after a warm-up."""
    load(url, args.connections, args.warmup, args.tool)  # warm-up, discarded
    before = cpu_seconds(pids)
    result = load(url, args.connections, args.duration, args.tool)
    used = cpu_seconds(pids) - before
    if result["errors"]:
        print(f"    ! {result['errors']} errors at {url}", flush=True)
    return (result["rps"], used / max(1, result["requests"]) * 1e6, result.get("p50", float("nan")),
            result.get("p99", float("nan")))


def actor_pid(handle) -> int:
    import ray
    return ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()))


def direct_ingress_url() -> str:
    """The Serve replica's own HTTP port: the one in Serve's direct-ingress range that answers."""
    from ray.serve._private.constants import (RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT,
                                              RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT)
    import socket
    for port in range(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT):
        with socket.socket() as s:
            s.settimeout(0.05)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return f"http://127.0.0.1:{port}/"
    raise RuntimeError("no Serve replica listens in the direct-ingress port range")


def get_json(url: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return json.loads(resp.read())
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the three servers -----------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8, help="rounds of oobspec and hand-written")
    ap.add_argument("--serve-rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per timed run")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each timed run")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--load", choices=["auto", "wrk", "aiohttp"], default="auto")
    ap.add_argument("--no-serve", action="store_true", help="skip Ray Serve (a and b only)")
    ap.add_argument("--typed", action="store_true",
                    help="also GET /typed?n=0&flag=yes on the oobspec actor: two parameters pydantic converts")
    ap.add_argument("--serve-defaults", action="store_true",
                    help="run Serve with its defaults instead of RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    ap.add_argument("--serve-direct-ingress", action="store_true",
                    help="RAY_SERVE_ENABLE_DIRECT_INGRESS=1: the load goes to the Serve replica's own HTTP port")
    args = ap.parse_args()
    if args.serve_direct_ingress:
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    if not args.serve_defaults:
        # Serve's own throughput mode (user code on the replica's main loop, router on the proxy's
        # loop, less request-path logging), still through the HTTP proxy (no direct ingress).
        # Read only by Serve's processes; set before Ray starts so they inherit it.
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
        os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0")
    args.tool = ("wrk" if shutil.which("wrk") else "aiohttp") if args.load == "auto" else args.load
    if not args.no_serve and importlib.util.find_spec("fastapi") is None:  # what ray[serve] adds to ray
        print("Ray Serve is not installed (pip install -e '.[bench]'): skipping it", flush=True)
        args.no_serve = True

    # Actors import `bench_http:Hits` (oobspec) from here; the driver has this folder on sys.path.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(ROOT), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(ROOT))
    import ray

    import oobspec

    print(f"load: {args.tool} in its own process, {args.connections} keep-alive connections, {args.warmup:g} s "
          f"warm-up + {args.duration:g} s timed per run, {args.rounds} rounds, {os.cpu_count()} CPUs", flush=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rps: dict[str, list[float]] = {"oobspec": [], "oob, no metrics": [], "oob, typed": [], "hand-written": [],
                                   "Ray Serve": []}
    cpu: dict[str, list[float]] = {k: [] for k in rps}
    latency: dict[str, list[tuple[float, float]]] = {k: [] for k in rps}
    pids: dict[str, list[int]] = {}

    def run(name: str, url: str, r: int) -> None:
        x, c, p50, p99 = measure(url, pids[name], args)
        rps[name].append(x)
        cpu[name].append(c)
        latency[name].append((p50, p99))
        print(f"  round {r + 1}  {name:<15} {x:8.0f} req/s  {c:7.1f} us CPU/request  p50 {p50:.2f} ms  "
              f"p99 {p99:.2f} ms", flush=True)

    try:
        with tempfile.TemporaryDirectory() as tmp:
            spec_path = Path(tmp) / "bench-http.yaml"
            spec_path.write_text(SPEC)
            spec = oobspec.load(spec_path)
            with oobspec.deploy(spec) as dep:
                urls = {"oobspec": dep.endpoints["hits"]["http"][0] + "/",
                        "oob, no metrics": dep.endpoints["quiet"]["http"][0] + "/"}
                if args.typed:
                    urls["oob, typed"] = dep.endpoints["hits"]["http"][0] + "/typed?n=0&flag=yes"
                    pids["oob, typed"] = [actor_pid(dep.handle("hits", 0))]
                pids["oobspec"] = [actor_pid(dep.handle("hits", 0))]
                pids["oob, no metrics"] = [actor_pid(dep.handle("quiet", 0))]
                hand = ray.remote(HandServer).remote()
                urls["hand-written"] = f"http://127.0.0.1:{ray.get(hand.serve.remote())}/"
                pids["hand-written"] = [actor_pid(hand)]
                for name, url in urls.items():
                    assert get_json(url)["count"] >= 1, name
                    load(url, args.connections, 2.0, args.tool)  # first warm-up
                for r in range(args.rounds):
                    sides = ["oobspec", "hand-written", "oob, no metrics"] + (["oob, typed"] if args.typed else [])
                    for name in (sides if r % 2 == 0 else sides[::-1]):
                        run(name, urls[name], r)
                ray.get(hand.close.remote())
                ray.kill(hand)
        if not args.no_serve:
            from ray import serve

            quiet = {"log_level": "WARNING", "enable_access_log": False}

            @serve.deployment(max_ongoing_requests=1000, logging_config=quiet)
            class ServeHits(Hits):
                async def __call__(self, _request):
                    return await self.hit()

            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
            try:
                serve.run(ServeHits.bind(), route_prefix="/", logging_config=quiet)
                url = f"http://127.0.0.1:{port}/"
                assert get_json(url) == {"count": 1}
                if args.serve_direct_ingress:  # the replica serves HTTP itself, on a port of Serve's range
                    url = direct_ingress_url()
                # CPU of the request path: the HTTP proxy and the replica (not the controller)
                pids["Ray Serve"] = [actor_pid(ray.get_actor(a["name"], namespace=a["namespace"]))
                                     for a in ray.util.list_named_actors(all_namespaces=True)
                                     if a["namespace"] == "serve" and "CONTROLLER" not in a["name"]]
                load(url, args.connections, 2.0, args.tool)
                for r in range(args.serve_rounds):
                    run("Ray Serve", url, r)
            finally:
                serve.shutdown()
    finally:
        ray.shutdown()

    med = {k: statistics.median(v) for k, v in rps.items() if v}
    print("\nmedian over rounds (min-max):")
    for k, v in rps.items():
        if v:
            print(f"  {k:<15} {med[k]:8.0f} req/s ({min(v):.0f}-{max(v):.0f})   "
                  f"{statistics.median(cpu[k]):7.1f} us server CPU/request ({min(cpu[k]):.0f}-{max(cpu[k]):.0f})   "
                  f"p50 {statistics.median(p for p, _ in latency[k]):.2f} ms  "
                  f"p99 {statistics.median(q for _, q in latency[k]):.2f} ms")
    # Headline: the median of per-round ratios (each pair measured back to back, so drift in
    # the machine's other load hits both sides of a pair alike).
    paired = sorted(a / b for a, b in zip(rps["oobspec"], rps["hand-written"]))
    cpu_ratio = statistics.median(cpu["oobspec"]) / statistics.median(cpu["hand-written"])
    print(f"  oobspec / hand-written  {statistics.median(paired):6.2f}x req/s  (goal >= 0.9)  per-round pairs "
          f"{' '.join(f'{x:.2f}' for x in paired)}; ratio of medians {med['oobspec'] / med['hand-written']:.2f}; "
          f"server CPU/request {cpu_ratio:.2f}x")
    quiet = sorted(a / b for a, b in zip(rps["oobspec"], rps["oob, no metrics"]))
    print(f"  metrics on / off        {statistics.median(quiet):6.2f}x req/s  per-round pairs "
          f"{' '.join(f'{x:.2f}' for x in quiet)}")
    if rps["oob, typed"]:
        typed = sorted(a / b for a, b in zip(rps["oob, typed"], rps["oobspec"]))
        print(f"  typed / untyped route   {statistics.median(typed):6.2f}x req/s  per-round pairs "
              f"{' '.join(f'{x:.2f}' for x in typed)}")
    if "Ray Serve" in med:
        goal = 4.5 if args.serve_direct_ingress else 20
        print(f"  oobspec / Ray Serve     {med['oobspec'] / med['Ray Serve']:6.1f}x req/s  (goal >= {goal})")
    save(args, med, cpu, latency, rps)


def save(args, med: dict, cpu: dict, latency: dict, rps: dict) -> None:
    """bench/results/http[-direct].json, and a plot of req/s and p99 per side when matplotlib
    is installed (`pip install -e '.[bench]'`)."""
    name = "http-direct" if args.serve_direct_ingress else "http"
    sides = list(med)
    rows = {k: {"rps": med[k], "cpu_us": statistics.median(cpu[k]),
                "p50_ms": statistics.median(p for p, _ in latency[k]),
                "p99_ms": statistics.median(q for _, q in latency[k]),
                "rounds_rps": [round(x) for x in rps[k]], "rounds_p99_ms": [q for _, q in latency[k]]} for k in sides}
    pairs = sorted(a / b for a, b in zip(rps["oobspec"], rps["hand-written"]))
    loop = "asyncio" if os.environ.get("RAY_USE_UVLOOP", "1") in ("0", "false") or \
        importlib.util.find_spec("uvloop") is None else "uvloop"
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": args.tool, "connections": args.connections,
        "rounds": args.rounds, "cpus": os.cpu_count(), "load_average": [round(x, 1) for x in os.getloadavg()],
        "event_loop": loop, "oobspec/hand-written": {"median_of_pairs": round(statistics.median(pairs), 3),
                                                     "pairs": [round(x, 3) for x in pairs]},
        "sides": rows}, indent=2) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(sides, [rows[k]["rps"] for k in sides], color="#4477aa")
    left.set_ylabel("requests/s (median)")
    right.bar(sides, [rows[k]["p99_ms"] for k in sides], color="#cc6677")
    right.set_ylabel("p99 latency, ms (median)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"GET / -> async method, {args.connections} connections ({args.tool}), {os.cpu_count()} CPUs"
                 + (", no Ray Serve" if "Ray Serve" not in rows else
                    ", Serve with direct ingress" if args.serve_direct_ingress else ", Serve through its proxy"))
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--_client":
        _aiohttp_client(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()

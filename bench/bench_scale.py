"""Scale-out on a local 3-node Ray cluster (head and two workers, each on its own loopback
address, as tests/multinode.py starts them): N replicas (default 64) spread over the nodes.

  1. apply    a. oobspec       one actor, `replicas: N`, `max_per_node: ceil(N/3)`, an http
                               server `host: node`, `shared: true` (one port per node); timed
                               from just before the apply (Ray up, spec loaded) until apply
                               returns, i.e. every replica's server accepts connections
              b. hand-written  a plain `@ray.remote` class placed round-robin on the nodes with
                               soft node affinity; its async `start` binds aiohttp on the node's
                               address with SO_REUSEPORT on the same port; timed until every
                               `start` returned
              c. both again with an environment variable: `env: {VERSION: v1}` in the spec, the
                 same `runtime_env={"env_vars": ...}` by hand. A runtime_env costs Ray fresh
                 worker processes (no prestarted ones), for both sides alike.
              Each side is torn down fully before the next starts; the order alternates over
              the rounds; medians and the ratio of each round. Goal: oobspec <= 1.2x.
  2. status   `oob status -o json` of the N replicas, run as a user runs it (a new process,
              connecting to the cluster), interleaved with its baseline (a new process that
              imports ray, connects and lists the named actors), and the same call in this
              process (already connected). Goal: < 2 s.
  3. rolling  a rolling update of all N replicas (an env var changes) while client threads
              send requests, a new connection each, to every node's one URL. Goal: 0 failed.

Shared ports hand a draining replica's queued connections to its siblings only where
net.ipv4.tcp_migrate_req is 1: the bench sets it for the run when it may (root) and restores it.

    .venv/bin/python bench/bench_scale.py [--replicas 64] [--rounds 3] [--skip-roll]
Writes bench/results/scale.json and, with matplotlib, bench/results/scale.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # the multi-node cluster the tests use
sys.path.insert(0, str(HERE))
MIGRATE = Path("/proc/sys/net/ipv4/tcp_migrate_req")

from bench_apply import wait_gone  # noqa: E402  (one way to wait for a side's workers to go)


class Hits:
    """The user's class (oobspec serves `hit` on GET /)."""

    def __init__(self):
        self.n = 0

    async def hit(self) -> dict:
        self.n += 1
        return {"count": self.n, "pid": os.getpid()}


class HandServer(Hits):
    """b: binds aiohttp itself, on its node's address, sharing the port with its node's others."""

    async def start(self, port: int) -> int:
        import ray
        from aiohttp import web

        async def handle(_request):
            return web.json_response(await self.hit())

        app = web.Application()
        app.router.add_get("/", handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, ray.util.get_node_ip_address(), port, reuse_port=True).start()
        return os.getpid()


def make_spec(n: int, port: int, nodes: int, version: str | None = None) -> str:
    env = f"\n    env: {{VERSION: {version}}}" if version else ""
    return f"""version: 1
name: bench-scale
actors:
  srv:
    class: bench_scale:Hits
    replicas: {n}
    max_per_node: {math.ceil(n / nodes)}
    restarts: -1
    drain: 1{env}
    servers:
      - name: http
        host: node
        port: {port}
        shared: true
        routes:
          - {{method: GET, path: /, call: hit}}
"""


def run_oobspec(spec) -> float:
    import ray

    import oobspec
    t0 = time.perf_counter()
    with oobspec.deploy(spec) as dep:
        elapsed = time.perf_counter() - t0
        infos = ray.get([dep.handle("srv", i)._oob_info.remote() for i in range(spec.actors["srv"].replicas)])
    wait_gone([i.pid for i in infos])
    return elapsed


def run_hand(n: int, port: int, version: str | None = None) -> float:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    nodes = sorted((node["NodeID"] for node in ray.nodes() if node["Alive"]))
    env = {"runtime_env": {"env_vars": {"VERSION": version}}} if version else {}
    t0 = time.perf_counter()
    actors = [ray.remote(HandServer).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=True), **env).remote()
        for i in range(n)]
    pids = ray.get([a.start.remote(port) for a in actors])
    elapsed = time.perf_counter() - t0
    for a in actors:
        ray.kill(a, no_restart=True)
    wait_gone(pids)
    return elapsed


class Clients:
    """Threads sending GETs, a new connection each, to every node's URL until stopped."""

    def __init__(self, urls: list[str], threads: int = 3):
        self.urls, self.ok, self.failed, self.errors = urls, 0, 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(k,), daemon=True) for k in range(threads)]

    def _loop(self, k: int) -> None:
        i = k
        while not self._stop.is_set():
            url = self.urls[i % len(self.urls)]
            i += 1
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    resp.read()
                self.ok += 1
            except Exception as exc:  # every kind of failure counts
                self.failed += 1
                self.errors.append(f"{url}: {exc}")

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc):
        self._stop.set()
        for t in self._threads:
            t.join()


# The baseline of `oob status`: a new Python process that imports Ray, connects and lists the
# cluster's named actors, as every Ray CLI and script does before its own work.
BARE_CLIENT = ("import sys, ray\nray.init(address=sys.argv[1], log_to_driver=False)\n"
               "ray.util.list_named_actors(all_namespaces=True)")


def oob(*args: str, address: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / ".venv" / "bin" / "oob"), *args, "--address", address], cwd="/",
                          capture_output=True, text=True, timeout=900)


def bench_apply(n: int, rounds: int, port: int, nodes: int) -> dict:
    import oobspec
    path = Path(tempfile.mkdtemp(prefix="bench-scale-")) / "spec.yaml"
    path.write_text(make_spec(n, port, nodes))
    spec = oobspec.load(path)
    path.with_name("env.yaml").write_text(make_spec(n, port, nodes, version="v1"))
    spec_env = oobspec.load(path.with_name("env.yaml"))
    warm = path.with_name("warm.yaml")
    warm.write_text(make_spec(nodes, port, nodes))
    run_oobspec(oobspec.load(warm))  # warm-up, untimed: first imports, page cache, workers
    run_hand(nodes, port)
    sides = {"oobspec": lambda: run_oobspec(spec), "hand": lambda: run_hand(n, port),
             "oobspec_env": lambda: run_oobspec(spec_env), "hand_env": lambda: run_hand(n, port, "v1")}
    out = {side: [] for side in sides}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for side in order:
            out[side].append(sides[side]())
            print(f"  round {r + 1} {side}: {out[side][-1]:.2f}s", flush=True)
    out["ratios"] = [a / b for a, b in zip(out["oobspec"], out["hand"])]
    out["ratios_env"] = [a / b for a, b in zip(out["oobspec_env"], out["hand_env"])]
    return out


def bench_status_and_roll(n: int, port: int, nodes: int, address: str, roll: bool) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    for module in ("bench_scale.py", "bench_apply.py"):  # the user's class, and what its module imports
        (folder / module).write_text((HERE / module).read_text())
    spec = folder / "spec.yaml"
    spec.write_text(make_spec(n, port, nodes, version="v1"))
    out: dict = {}
    try:
        t0 = time.perf_counter()
        applied = oob("apply", str(spec), address=address)
        out["apply_cli_s"] = time.perf_counter() - t0
        assert applied.returncode == 0, applied.stderr[-2000:]
        cli, bare = [], []
        for _ in range(5):  # interleaved with the baseline: what any new Ray client pays first
            t0 = time.perf_counter()
            status = oob("status", "bench-scale", "-o", "json", address=address)
            cli.append(time.perf_counter() - t0)
            assert status.returncode == 0, status.stderr[-2000:]
            t0 = time.perf_counter()
            connected = subprocess.run([sys.executable, "-c", BARE_CLIENT, address], cwd="/", capture_output=True,
                                       text=True, timeout=300)
            bare.append(time.perf_counter() - t0)
            assert connected.returncode == 0, connected.stderr[-2000:]
        rows = json.loads(status.stdout)["replicas"]
        out["status_cli_s"], out["ray_client_s"] = cli, bare
        out["status_rows"] = len(rows)
        out["nodes"] = sorted({r.get("node_address") or "" for r in rows})
        import ray

        from oobspec.control.commands import observe_status
        ray.init(address=address, namespace="oob-bench-scale", log_to_driver=False)
        inproc = []
        for _ in range(5):  # connected already: what the call itself costs
            t0 = time.perf_counter()
            observe_status("bench-scale")
            inproc.append(time.perf_counter() - t0)
        ray.shutdown()
        out["status_in_process_s"] = inproc
        if roll:
            urls = sorted({u for r in rows for u in r["endpoints"].values()})
            spec.write_text(make_spec(n, port, nodes, version="v2"))
            with Clients(urls) as clients:
                time.sleep(1)
                t0 = time.perf_counter()
                rolled = oob("apply", str(spec), "--timeout", "900", address=address)
                out["roll_s"] = time.perf_counter() - t0
                time.sleep(1)
            assert rolled.returncode == 0, rolled.stderr[-2000:]
            out["roll_requests"], out["roll_failed"] = clients.ok + clients.failed, clients.failed
            out["roll_errors"] = clients.errors[:5]
            out["roll_urls"] = urls
    finally:
        oob("delete", "bench-scale", address=address)
    return out


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: no plot)")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    apply = result["apply"]
    a.boxplot([apply["hand"], apply["oobspec"], apply["hand_env"], apply["oobspec_env"]],
              tick_labels=["hand-written", "oobspec", "hand + env", "oobspec + env"])
    a.set_ylabel("seconds until every replica serves")
    a.set_title(f"{result['replicas']} replicas on 3 nodes: x{statistics.median(apply['ratios']):.2f}, "
                f"with env x{statistics.median(apply['ratios_env']):.2f}")
    rest = result.get("rest", {})
    if rest:
        b.boxplot([rest["status_cli_s"], rest.get("ray_client_s", []), rest["status_in_process_s"]],
                  tick_labels=["oob status (CLI)", "ray connect (CLI)", "in process"])
        b.axhline(2.0, color="red", linestyle="--", linewidth=1)
        b.set_ylabel("seconds")
        title = f"status of {rest['status_rows']} replicas"
        if "roll_s" in rest:
            title += f"; rolling: {rest['roll_failed']}/{rest['roll_requests']} failed"
        b.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-roll", action="store_true")
    parser.add_argument("--skip-apply", action="store_true", help="only 2. and 3. (results/scale.json keeps 1.)")
    args = parser.parse_args()
    from multinode import LocalCluster, free_port, node_env
    os.environ.update(node_env())  # token auth, as the nodes run (for this process and `oob`)
    import ray  # after: Ray reads the auth mode when imported
    migrate = MIGRATE.read_text().strip() if MIGRATE.exists() else None
    if migrate == "0":
        try:
            MIGRATE.write_text("1")
        except OSError:
            print("net.ipv4.tcp_migrate_req is 0 and cannot be set: draining shared replicas may reset connections")
    cluster = LocalCluster(num_cpus=max(8, args.replicas))
    try:
        cluster.start()
        port = free_port()
        ray.init(address=cluster.address, namespace="oob-bench-scale", log_to_driver=False)
        result = {"replicas": args.replicas, "nodes": 3, "cpus": os.cpu_count()}
        if args.skip_apply:
            result["apply"] = json.loads((HERE / "results" / "scale.json").read_text())["apply"]
        else:
            print(f"1. apply of {args.replicas} replicas over 3 nodes, {args.rounds} rounds")
            result["apply"] = bench_apply(args.replicas, args.rounds, port, 3)
            (HERE / "results" / "scale.json").write_text(json.dumps(result, indent=2) + "\n")  # so far
        ray.shutdown()
        print("2./3. status and a rolling update (CLI, from /)")
        result["rest"] = bench_status_and_roll(args.replicas, port, 3, cluster.address, not args.skip_roll)
    finally:
        cluster.shutdown()
        if migrate == "0":
            try:
                MIGRATE.write_text("0")
            except OSError:
                pass
    apply = result["apply"]
    rest = result["rest"]
    print(f"apply: oobspec median {statistics.median(apply['oobspec']):.2f}s, hand-written "
          f"{statistics.median(apply['hand']):.2f}s, ratio median x{statistics.median(apply['ratios']):.2f} "
          f"(rounds {', '.join(f'{r:.2f}' for r in apply['ratios'])}; goal <= 1.2)")
    if "ratios_env" in apply:
        print(f"apply with env (a runtime_env on both sides): oobspec median {statistics.median(apply['oobspec_env']):.2f}s, "
              f"hand-written {statistics.median(apply['hand_env']):.2f}s, ratio median "
              f"x{statistics.median(apply['ratios_env']):.2f} (rounds {', '.join(f'{r:.2f}' for r in apply['ratios_env'])})")
    if "ray_client_s" in rest:
        print(f"  baseline, a new process that imports ray and connects: median "
              f"{statistics.median(rest['ray_client_s']):.2f}s")
    print(f"status: CLI median {statistics.median(rest['status_cli_s']):.2f}s (min {min(rest['status_cli_s']):.2f}), "
          f"in process median {statistics.median(rest['status_in_process_s']):.2f}s, "
          f"{rest['status_rows']} replicas on {len(rest['nodes'])} nodes (goal < 2 s)")
    if "roll_s" in rest:
        print(f"rolling update of {args.replicas} shared replicas: {rest['roll_s']:.1f}s, "
              f"{rest['roll_failed']} failed of {rest['roll_requests']} requests (goal 0)")
    results = HERE / "results"
    (results / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, results / "scale.png")


if __name__ == "__main__":
    main()

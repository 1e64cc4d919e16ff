"""Wall time to bring up N actors, each with an HTTP server on a free port, until every server answers.

  a. oobspec       a spec with one actor, `replicas: N` (or N actors with --shape actors), one
                   http server on port 0, applied with `oobspec.deploy(spec)`; timed from just
                   before the apply (Ray already up, spec already loaded) until every endpoint
                   answers an HTTP GET
  b. hand-written  a plain `@ray.remote` class whose async method starts aiohttp on port 0 and
                   returns the port; N actors created, ports collected, every port GET until it
                   answers

Same local Ray for both, started once (its start-up is not timed). Each side is torn down fully
(actors killed, their worker processes gone) before the other starts; the order alternates over
the rounds; each figure is the median. Goal: oobspec <= 1.2x hand-written.

With --diagnose, more hand-written variants show what oobspec's differences cost:
  c. hand-written + runtime_env   b, created with the per-replica runtime_env oobspec gave every
                                  replica before 2817905 (env_vars OOB_REPLICA/OOB_REPLICAS/
                                  OOB_DEPLOYMENT/PYTHONPATH: one distinct runtime_env per replica)
  d. hand-written + shared env    the same env_vars minus OOB_REPLICA: one runtime_env shared
                                  by all N actors
  e. hand-written + oob imports   b, whose start method first imports oobspec.replica.actor
                                  (what every oobspec replica imports)
  f. oobspec, no runtime_env      a with Builder.runtime_env patched (in this process only) to
                                  return {}: what oobspec would take without a runtime_env
and the oobspec apply is split into its phases (observe, class import, create+ready, meta).

    .venv/bin/python bench/bench_apply.py [--actors 32] [--rounds 3] [--shape replicas|actors] [--diagnose]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class Hits:
    """The user's class (oobspec serves `hit` on GET /)."""

    def __init__(self):
        self.n = 0

    async def hit(self) -> dict:
        self.n += 1
        return {"count": self.n}


class HandServer(Hits):
    """b: an actor that starts its own aiohttp server on a free port and returns the port."""

    async def start(self, import_oob: bool = False) -> tuple[int, int]:
        if import_oob:
            import oobspec.replica.actor  # noqa: F401  (what an oobspec replica imports)
        from aiohttp import web

        async def handle(_request):
            return web.json_response(await self.hit())

        app = web.Application()
        app.router.add_get("/", handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1], os.getpid()


def make_spec(n: int, shape: str) -> str:
    server = ["    servers:", "      - name: http", "        protocol: http", "        host: 127.0.0.1",
              "        port: 0", "        routes:", "          - {method: GET, path: /, call: hit}"]
    lines = ["version: 1", f"name: bench-apply-{shape}", "actors:"]
    if shape == "replicas":
        lines += ["  srv:", "    class: bench_apply:Hits", f"    replicas: {n}"] + server
    else:
        for i in range(n):
            lines += [f"  srv{i}:", "    class: bench_apply:Hits"] + server
    return "\n".join(lines) + "\n"


def answer_all(ports: list[int], timeout: float = 60.0) -> None:
    """GET / on every port until each answers 200."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"port {port} does not answer")
            time.sleep(0.01)


def wait_gone(pids: list[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
    time.sleep(0.5)  # let the raylet settle (worker bookkeeping) before the next side starts


# --- the sides --------------------------------------------------------------------------------


def run_oobspec(spec, phases: dict | None, no_runtime_env: bool = False) -> float:
    import ray

    import oobspec
    from oobspec.control import apply as apply_mod

    if phases is not None:
        _instrument(apply_mod, phases)
    if no_runtime_env:  # what-if, in this process only: replicas get no runtime_env at all
        from oobspec.control.replicas import Builder
        _PATCHED.append((Builder, "runtime_env", Builder.runtime_env))
        Builder.runtime_env = lambda self, *args, **kwargs: {}
    try:
        t0 = time.perf_counter()
        with oobspec.deploy(spec) as dep:
            ports = [int(url.rsplit(":", 1)[1]) for servers in dep.endpoints.values() for url in servers["http"]]
            answer_all(ports)
            elapsed = time.perf_counter() - t0
            pids = ray.get([dep.handle(a, i)._oob_info.remote() for a, actor in spec.actors.items()
                            for i in range(actor.replicas)])
        wait_gone([p.pid for p in pids])
    finally:
        _uninstrument(apply_mod)
    return elapsed


def run_hand(n: int, variant: str = "plain") -> float:
    import ray

    opts = {}
    t0 = time.perf_counter()
    actors = []
    for i in range(n):
        if variant in ("runtime_env", "shared_env"):  # what oobspec's runtime_env gave each replica before 2817905
            paths = [str(HERE), os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            env = {"OOB_REPLICAS": str(n), "OOB_DEPLOYMENT": "bench", "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
            if variant == "runtime_env":
                env["OOB_REPLICA"] = str(i)  # one distinct runtime_env per replica
            opts = {"runtime_env": {"env_vars": env}}
        actors.append(ray.remote(HandServer).options(**opts).remote())
    started = ray.get([a.start.remote(variant == "import_oob") for a in actors])
    answer_all([port for port, _pid in started])
    elapsed = time.perf_counter() - t0
    for a in actors:
        ray.kill(a, no_restart=True)
    wait_gone([pid for _port, pid in started])
    return elapsed


# --- phase timing of the apply (monkeypatched in this process only; oobspec is not edited) ----

_PATCHED: list = []


def _instrument(apply_mod, phases: dict) -> None:
    from oobspec.control import cluster, executor, replicas

    def timed(owner, attr, label):
        original = getattr(owner, attr, None)
        if original is None:  # oobspec moved on: time what still exists
            return

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                phases.setdefault(label, []).append(time.perf_counter() - t)
        _PATCHED.append((owner, attr, original))
        setattr(owner, attr, wrapper)

    timed(apply_mod.Applier, "run", "apply total")
    timed(cluster, "observe", "observe (list + _oob_info of existing replicas)")
    timed(apply_mod, "make_plan", "make_plan")
    timed(replicas.Builder, "actor_class", "import class + make actor class")
    timed(executor.Executor, "_start", "start replicas, wait for _oob_ready")
    timed(cluster, "put_meta", "put_meta")


def _uninstrument(_apply_mod) -> None:
    while _PATCHED:
        owner, attr, original = _PATCHED.pop()
        setattr(owner, attr, original)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shape", choices=["replicas", "actors"], default="replicas",
                    help="replicas: one spec actor with N replicas; actors: N spec actors of 1 replica")
    ap.add_argument("--diagnose", action="store_true", help="also time variants c and d, and oobspec's phases")
    args = ap.parse_args()

    # The actors import `bench_apply:Hits` (oobspec) from this folder.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(ROOT), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(ROOT))
    import ray

    import oobspec

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        tmp = tempfile.mkdtemp(prefix="oob-bench-apply-")
        spec_path = Path(tmp) / "spec.yaml"
        spec_path.write_text(make_spec(args.actors, args.shape))
        spec = oobspec.load(spec_path)
        warm = Path(tmp) / "warm.yaml"
        warm.write_text(make_spec(2, args.shape))
        run_oobspec(oobspec.load(warm), None)  # warm-up, untimed: first imports, page cache
        run_hand(2)

        sides = ["oobspec", "hand-written"]
        if args.diagnose:
            sides += ["hand-written + runtime_env", "hand-written + shared env", "hand-written + oob imports",
                      "oobspec, no runtime_env"]
        times: dict[str, list[float]] = {s: [] for s in sides}
        phases: dict[str, list[float]] = {}
        print(f"{args.actors} actors ({args.shape}), {args.rounds} rounds, {os.cpu_count()} CPUs", flush=True)
        for r in range(args.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                if side == "oobspec":
                    t = run_oobspec(spec, phases if args.diagnose else None)
                elif side == "oobspec, no runtime_env":
                    t = run_oobspec(spec, None, no_runtime_env=True)
                elif side == "hand-written":
                    t = run_hand(args.actors)
                elif side == "hand-written + runtime_env":
                    t = run_hand(args.actors, "runtime_env")
                elif side == "hand-written + shared env":
                    t = run_hand(args.actors, "shared_env")
                else:
                    t = run_hand(args.actors, "import_oob")
                times[side].append(t)
                print(f"  round {r + 1}  {side:<28} {t:6.2f} s", flush=True)
    finally:
        ray.shutdown()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmedian of {args.rounds} rounds (min-max):")
    for k, v in times.items():
        print(f"  {k:<28} {med[k]:6.2f} s  ({min(v):.2f}-{max(v):.2f})")
    print(f"  oobspec / hand-written       {med['oobspec'] / med['hand-written']:6.2f}x  (goal <= 1.2)")
    if phases:
        print("\noobspec apply, by phase (median over rounds, seconds; summed per round where called repeatedly):")
        for label, values in phases.items():
            k = len(values) // args.rounds
            per_round = [sum(values[r * k:(r + 1) * k]) for r in range(args.rounds)]
            print(f"  {label:<40} {statistics.median(per_round):6.2f}  (calls per round: {k})")


if __name__ == "__main__":
    main()

"""A link push vs one plain copy of the same bytes, on a real local Ray; on a GPU also vs Ray
Direct Transport.

Links v2 writes a target on the source's node itself: one copy into the target's mapped
memory (a shm segment, or a cuda_ipc-opened allocation on the source's GPU), the version in its
control block, one byte to its doorbell; no Ray call per push. With one target replica:

- in the source actor, rounds alternate a push and a plain copy into a private array of the
  same size (np.copyto / cupy.copyto + sync): push / copy per round, median and p10-p90;
- a target asleep in `ctx.updated` records how long after each publish it woke;
- from the driver, `oob sync`'s path (one Ray call to the source) and, with --device gpu, Ray
  Direct Transport: a torch tensor returned with tensor_transport="cuda_ipc" and copied into
  the receiver's own tensor, rounds alternating; checksums of every side compared.

    .venv/bin/python bench/bench_link_push.py [--device cpu|gpu] [--rounds 200] [--json FILE]

Goals (Step 6). cpu: 1 MiB push <= 3x memcpy; 256 MiB >= 0.9x memcpy bandwidth.
gpu: 4 GiB push >= 0.9x one device copy; 1 MiB push <= 0.2 ms; from the driver >= 3x faster
than RDT at 1 MiB and 256 MiB. The GPU run writes bench/results/gpu-<device>.json (or --json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

MODULE = '''
import time

import oobspec


def _xp(array):
    if type(array).__module__.startswith("cupy"):
        import cupy
        return cupy, lambda: cupy.cuda.get_current_stream().synchronize()
    import numpy
    return numpy, lambda: None


class Trainer:
    async def compare(self, link: str, buffer: str, rounds: int) -> dict:
        ctx = oobspec.context()
        src = ctx.buffers[buffer]
        xp, sync = _xp(src)
        src[...] = xp.random.default_rng(0).random(src.shape, dtype=src.dtype) if xp.__name__ == "numpy" \\
            else xp.random.random(src.shape, dtype=src.dtype)
        plain = xp.zeros_like(src)
        xp.copyto(plain, src)  # faulted in / allocated, like the target's memory
        sync()
        await ctx.push(link)
        push, copy = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            xp.copyto(plain, src)
            sync()
            copy.append(time.perf_counter() - t)
            t = time.perf_counter()
            await ctx.push(link)
            push.append(time.perf_counter() - t)
        return {"push": push, "copy": copy, "checksum": float(src.sum(dtype="float64"))}

    async def checksum(self, buffer: str) -> float:
        return float(oobspec.context().buffers[buffer].sum(dtype="float64"))


class Server:
    async def follow(self, buffer: str, until: int) -> list:
        """Sleep in ctx.updated until version `until`; how long after each publish we woke (s)."""
        ctx = oobspec.context()
        inbox, version, woke = ctx._owners[buffer].inbox, ctx.versions[buffer], []
        while version < until:
            version = await ctx.updated(buffer, after=version, timeout=60)
            woke.append((time.time_ns() - inbox.pushed_ns) / 1e9)
        return woke

    async def checksum(self, buffer: str) -> float:
        return float(oobspec.context().buffers[buffer].sum(dtype="float64"))
'''

SIZES = {"cpu": {"s1m": 1 << 20, "s256m": 256 << 20}, "gpu": {"s1m": 1 << 20, "s256m": 256 << 20, "s4g": 4 << 30}}


def spec_text(device: str) -> str:
    sizes = SIZES[device]
    buffers = "{" + ", ".join(f"{n}: {{shape: [{b // 4}], device: {device}}}" for n, b in sizes.items()) + "}"
    resources = "\n    resources: {gpus: 0.25}" if device == "gpu" else ""
    links = "\n".join(f"  - {{name: {n}, from: trainer.{n}, to: server.{n}}}" for n in sizes)
    return textwrap.dedent(f"""\
        version: 1
        name: bench-push
        actors:
          trainer:
            class: pushapp:Trainer{resources}
            buffers: {buffers}
          server:
            class: pushapp:Server{resources}
            buffers: {buffers}
        links:
        """) + links + "\n"


def spread(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
    return {"median": statistics.median(values), "p10": q[0], "p90": q[-1], "n": len(values)}


def rdt_pair(sizes: dict):
    """A plain Ray sender / receiver pair on the GPU, as Ray Direct Transport is used."""
    import ray

    @ray.remote(num_gpus=0.25)
    class RdtSender:
        def __init__(self, sizes):
            import torch
            self.t = {n: torch.rand(b // 4, device="cuda") for n, b in sizes.items()}
            torch.cuda.synchronize()

        @ray.method(tensor_transport="cuda_ipc")
        def get(self, name):
            return self.t[name]

        def checksum(self, name):
            return float(self.t[name].double().sum())

    @ray.remote(num_gpus=0.25)
    class RdtReceiver:
        def __init__(self, sizes):
            import torch
            self.t = {n: torch.zeros(b // 4, device="cuda") for n, b in sizes.items()}

        def recv(self, name, tensor):
            import torch
            self.t[name].copy_(tensor)
            torch.cuda.synchronize()

        def checksum(self, name):
            return float(self.t[name].double().sum())

    return RdtSender.remote(sizes), RdtReceiver.remote(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--rounds", type=int, default=200, help="in-actor rounds at 1 MiB (fewer for bigger sizes)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    import ray

    import oobspec
    from oobspec.control.apply import start_embedded

    folder = Path(tempfile.mkdtemp(prefix="bench-push-"))
    (folder / "pushapp.py").write_text(MODULE)
    (folder / "spec.yaml").write_text(spec_text(args.device))
    sys.path.insert(0, str(folder))
    sizes = SIZES[args.device]

    start_embedded("oob-bench-push", log_to_driver=False)
    results: dict = {"device": "cpu", "sizes": sizes}
    try:
        if args.device == "gpu":
            import cupy
            results["device"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        with oobspec.deploy(oobspec.load(folder / "spec.yaml")) as d:
            trainer, server = d.handle("trainer"), d.handle("server")
            rdt = rdt_pair(sizes) if args.device == "gpu" else None
            for name, nbytes in sizes.items():
                rounds = max(5, args.rounds * (1 << 20) // nbytes) if nbytes > 1 << 20 else args.rounds
                rounds = max(rounds, 20) if nbytes <= 256 << 20 else rounds
                woke = server.follow.remote(name, rounds + 1)  # + the warm-up push (versions start at 0)
                time.sleep(0.5)
                got = ray.get(trainer.compare.remote(name, name, rounds))
                row = {"bytes": nbytes, "push_s": spread(got["push"]), "copy_s": spread(got["copy"]),
                       "push_over_copy": statistics.median(p / c for p, c in zip(got["push"], got["copy"])),
                       "wake_s": spread(ray.get(woke, timeout=300))}
                sums = {"source": got["checksum"], "target": ray.get(server.checksum.remote(name))}
                driver, direct = [], []
                for _ in range(max(5, rounds // 4)):
                    t = time.perf_counter()
                    ray.get(trainer._oob_push.remote(name))
                    driver.append(time.perf_counter() - t)
                    if rdt:
                        t = time.perf_counter()
                        ray.get(rdt[1].recv.remote(name, rdt[0].get.remote(name)))
                        direct.append(time.perf_counter() - t)
                row["driver_s"] = spread(driver)
                if rdt:
                    row["rdt_s"] = spread(direct)
                    row["rdt_over_oob"] = row["rdt_s"]["median"] / row["driver_s"]["median"]
                    sums.update(rdt_source=ray.get(rdt[0].checksum.remote(name)),
                                rdt_target=ray.get(rdt[1].checksum.remote(name)))
                row["checksums"] = sums
                row["checksums_equal"] = sums["source"] == sums["target"] and \
                    sums.get("rdt_source") == sums.get("rdt_target")
                results[name] = row
    finally:
        ray.shutdown()

    print(f"{results['device']}: one target, median (p10-p90)")
    for name in sizes:
        r = results[name]
        p, c = r["push_s"], r["copy_s"]
        ms = lambda s: f"{s['median'] * 1e3:.3f} ms ({s['p10'] * 1e3:.3f}-{s['p90'] * 1e3:.3f})"  # noqa: E731
        print(f"  {r['bytes'] / 2**20:6.0f} MiB  in the source: push {ms(p)}, copy {ms(c)}: push/copy "
              f"{r['push_over_copy']:.2f}x ({r['bytes'] / p['median'] / 1e9:.1f} vs {r['bytes'] / c['median'] / 1e9:.1f} GB/s)")
        print(f"             target woke {ms(r['wake_s'])} after the publish; from the driver {ms(r['driver_s'])}"
              + (f"; RDT {ms(r['rdt_s'])} = {r['rdt_over_oob']:.1f}x oob" if "rdt_s" in r else "")
              + f"; checksums {'equal' if r['checksums_equal'] else 'DIFFER'}")
    if args.device == "cpu":
        small, big = results["s1m"]["push_over_copy"], results["s256m"]["push_over_copy"]
        print(f"goals: 1 MiB push/memcpy {small:.2f}x (<= 3x); 256 MiB bandwidth {1 / big:.2f}x memcpy (>= 0.9x)")
    else:
        big, small = results["s4g"]["push_over_copy"], results["s1m"]["push_s"]["median"]
        print(f"goals: 4 GiB bandwidth {1 / big:.2f}x a device copy (>= 0.9x); 1 MiB push {small * 1e3:.3f} ms "
              f"(<= 0.2); from the driver vs RDT {results['s1m']['rdt_over_oob']:.1f}x at 1 MiB, "
              f"{results['s256m']['rdt_over_oob']:.1f}x at 256 MiB (>= 3x)")
    out = args.json
    if out is None and args.device == "gpu":
        out = Path(__file__).parent / "results" / f"gpu-{results['device'].lower().replace(' ', '-')}.json"
    if out:
        out.write_text(json.dumps(results, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()

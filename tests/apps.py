"""Actor classes for the runtime tests."""
import asyncio
import os
import time

import oobspec


class Echo:
    def __init__(self, greeting: str = "hello"):
        self.greeting = greeting
        self.calls = 0

    async def hello(self, name: str) -> str:
        self.calls += 1
        return f"{self.greeting} {name}"

    async def add(self, a: int, b: int = 0) -> dict:
        return {"sum": a + b}

    async def blob(self) -> bytes:
        return b"\x00\x01\x02"

    async def boom(self) -> None:
        raise ValueError("kaboom")

    def sync_count(self) -> int:
        return self.calls

    async def item(self, key: str, verbose: bool = False) -> dict:
        return {"key": key, "verbose": verbose}

    async def pid(self) -> int:
        return os.getpid()

    async def upload(self, data: str = "") -> int:
        return len(data)


class AsyncInitCounter:
    """Written as in Ray's docs: async __init__ that starts its own aiohttp server."""

    async def __init__(self, port: int):
        from aiohttp import web
        self.count = 0
        app = web.Application()
        app.router.add_get("/", self._get)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    async def _get(self, request):
        from aiohttp import web
        return web.Response(text=str(self.count))

    async def increment(self) -> int:
        self.count += 1
        return self.count

    async def get(self) -> int:
        return self.count


class Wired:
    """Reports what wiring gave it: environment and oobspec.context()."""

    def __init__(self):
        self.env_at_init = {k: v for k, v in os.environ.items() if k.startswith("OOB_")}
        self.peer_changes = []

    async def on_peers_changed(self, replicas: int, endpoints: dict) -> None:
        self.peer_changes.append([replicas, {k: len(v) for k, v in endpoints.items()}])

    async def wiring(self) -> dict:
        ctx = oobspec.context()
        return {"env": self.env_at_init, "endpoints": ctx.endpoints, "replica": ctx.replica,
                "replicas": ctx.replicas, "peer_changes": self.peer_changes}

    async def node(self) -> str:
        import ray
        return ray.get_runtime_context().get_node_id()

    async def pid(self) -> int:
        return os.getpid()

    async def get(self) -> str:
        return "ok"


class Greeter:
    """A proto-mode gRPC servicer: the instance itself implements the generated service."""

    async def SayHello(self, request, context):
        from greeter_pb2 import HelloReply
        await asyncio.sleep(0)
        return HelloReply(message=f"hello {request.name}")


class Source:
    """Fills its buffer with seeded random data and pushes it."""

    async def fill_and_push(self, seed: int) -> dict:
        import numpy as np
        ctx = oobspec.context()
        buf = ctx.buffers["data"]
        buf[...] = np.random.default_rng(seed).random(buf.shape, dtype=buf.dtype)
        result = await ctx.push("data")
        return dict(result, checksum=float(buf.sum()))

    async def pid(self) -> int:
        return os.getpid()


class Sink:
    async def checksum(self) -> dict:
        ctx = oobspec.context()
        return {"version": ctx.versions.get("data", 0), "checksum": float(ctx.buffers["data"].sum())}

    async def try_push(self) -> str:
        try:
            await oobspec.context().push("data")
        except oobspec.OobError as exc:
            return str(exc)
        return "pushed"

    async def pid(self) -> int:
        return os.getpid()


def layout_checksum(views: dict) -> float:
    return float(sum(float(v.astype("float64").sum()) for v in views.values()))


class Trainer:
    """Weight sync as RL trainers do it: fill the named parts of one bucket, push once."""

    async def step(self, seed: int) -> dict:
        import numpy as np
        ctx = oobspec.context()
        parts, rng = ctx.views("params"), np.random.default_rng(seed)
        parts["w1"][...] = rng.integers(0, 1 << 16, parts["w1"].shape, dtype=np.uint16)  # bfloat16 bits
        parts["b1"][...] = rng.random(parts["b1"].shape, dtype=np.float32)
        pushed = await ctx.push("weights")
        return dict(pushed, checksum=layout_checksum(parts))

    async def pid(self) -> int:
        return os.getpid()


class Server:
    """An inference replica: waits for the next version of its weights, without polling."""

    async def next(self, after: int) -> tuple[int, float]:
        ctx = oobspec.context()
        version = await ctx.updated("params", after=after, timeout=30)
        return version, layout_checksum(ctx.views("params"))

    async def current(self) -> tuple[int, float]:
        ctx = oobspec.context()
        return ctx.versions["params"], layout_checksum(ctx.views("params"))

    async def pid(self) -> int:
        return os.getpid()


class TorchTrainer:
    async def step(self, value: float) -> dict:
        import torch
        ctx = oobspec.context()
        parts = ctx.tensors("params")
        assert parts["w"].dtype == torch.bfloat16 and parts["w"].is_cuda
        parts["w"].fill_(value)
        parts["b"].fill_(value)
        return await ctx.push("weights")


class TorchServer:
    async def next(self, after: int) -> tuple:
        ctx = oobspec.context()
        version = await ctx.updated("params", after=after, timeout=30)
        parts = ctx.tensors("params")
        return version, float(parts["w"].double().sum()), float(parts["b"].double().sum())


class Broken:
    def __init__(self):
        print("about to fail: checking the config", flush=True)
        raise RuntimeError("config file /etc/missing.conf not found")


class Chatty:
    """Prints the way user code does: plain print, no flush."""

    def __init__(self, greeting: str = "hi", fail: bool = False, fail_replica: int = -1, broken: str = "",
                 once: str = ""):
        self.greeting = greeting
        print(f"chatty starting (pid {os.getpid()})")
        # fail_replica: that replica fails (while the file `broken` exists, when one is named)
        mine = int(os.environ.get("OOB_REPLICA", -1)) == fail_replica
        if fail or (mine and (not broken or os.path.exists(broken))):
            raise ValueError(f"cannot greet with {greeting!r}")
        if once:  # this version starts once: its second process (a successor) fails
            if os.path.exists(once):
                raise RuntimeError(f"{greeting!r} already started once")
            open(once, "w").close()

    def say(self, text: str, times: int = 1) -> str:
        for _ in range(times):
            print(f"{self.greeting}: {text}")
        return text * times

    async def pid(self) -> int:
        return os.getpid()

    async def get(self) -> str:
        return self.greeting

    async def nap(self, seconds: float = 1.0) -> str:
        """Takes its time without blocking the replica (a slow request in flight)."""
        import asyncio
        await asyncio.sleep(seconds)
        return "rested"

    def block(self, seconds: float = 30) -> str:
        """Synchronous and long: the replica answers nothing else meanwhile."""
        import time
        time.sleep(seconds)
        return "done"


class Slow:
    """An __init__ that takes its time (loading a model, say)."""

    def __init__(self, seconds: float = 120):
        import time
        print(f"warming up (pid {os.getpid()})", flush=True)
        time.sleep(seconds)

    def get(self) -> str:
        return "ok"


class Stamper:
    """A source whose every push is distinct: all of its buffer holds the version being pushed."""

    async def push_stamped(self, count: int, pause: float = 0.0) -> list:
        """Each push's version, or its error (a string)."""
        ctx, out = oobspec.context(), []
        for _ in range(count):
            self.stamp = getattr(self, "stamp", 0) + 1
            ctx.buffers["data"].fill(self.stamp)
            try:
                out.append((await ctx.push("data"))["version"])
            except oobspec.OobError as exc:
                out.append(str(exc))
            await asyncio.sleep(pause)
        return out


class Reader:
    """A target that reads through snapshots: each read is checked whole (all of it = its version)."""

    async def hold(self, seconds: float) -> dict:
        ctx = oobspec.context()
        async with ctx.reading("data") as snap:
            first = [snap.version, float(snap.array.min()), float(snap.array.max())]
            await asyncio.sleep(seconds)
            last = [snap.version, float(snap.array.min()), float(snap.array.max())]
            return {"first": first, "last": last, "intact": snap.intact, "newest": ctx.versions["data"]}

    async def read_loop(self, seconds: float) -> dict:
        ctx, reads, torn, seen = oobspec.context(), 0, 0, set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            async with ctx.reading("data") as snap:
                whole = snap.array.min() == snap.array.max() == snap.version and snap.intact
            reads, torn = reads + 1, torn + (not whole)
            seen.add(snap.version)
            await asyncio.sleep(0)
        return {"reads": reads, "torn": torn, "versions": sorted(seen)}

    async def stamp(self) -> list:
        ctx = oobspec.context()
        async with ctx.reading("data") as snap:
            return [snap.version, float(snap.array.min()), float(snap.array.max())]

    async def pid(self) -> int:
        return os.getpid()


class Relay(Reader):
    """A link's target that is the source of another: forwards the version it holds."""

    async def forward(self) -> dict:
        return await oobspec.context().push("onward")

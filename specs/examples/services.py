"""Classes used by the example specs."""
import os

import numpy as np

import oobspec


class KeyValue:
    """A small key-value store served over gRPC (JSON mode: no protos needed)."""

    def __init__(self):
        self.data = {}

    async def put(self, key: str, value) -> bool:
        self.data[key] = value
        return True

    async def get(self, key: str):
        return self.data.get(key)

    async def size(self) -> int:
        return len(self.data)


class Frontend:
    """An HTTP front end wired to a backend: it learns the backend's URL from `connect`."""

    async def backend_url(self) -> str:
        return os.environ["OOB_BACKEND_URL"]

    async def info(self) -> dict:
        ctx = oobspec.context()
        return {"replica": ctx.replica, "replicas": ctx.replicas, "backend": ctx.endpoints["backend"]}


class Trainer:
    """Writes new weights into its buffer and pushes them to the servers out-of-band."""

    async def step(self, value: float = 1.0) -> dict:
        ctx = oobspec.context()
        ctx.buffers["weights"][...] = value
        return await ctx.push("weights")


class WeightServer:
    """Serves a checksum of the weights it last received."""

    async def checksum(self) -> dict:
        ctx = oobspec.context()
        w = ctx.buffers["weights"]
        return {"version": ctx.versions.get("weights", 0), "sum": float(np.asarray(w.sum() if not hasattr(w, "get") else w.sum().get()))}


def _checksum(parts: dict) -> float:
    return float(sum(float(p.astype(np.float64).sum()) for p in parts.values()))


class PolicyTrainer:
    """Weight sync as RL trainers do it: all parameters in one bucket (`layout:`), one push per step."""

    async def step(self, seed: int = 0) -> dict:
        ctx = oobspec.context()
        parts, rng = ctx.views("params"), np.random.default_rng(seed)
        parts["w"][...] = rng.standard_normal(parts["w"].shape, dtype=np.float32)
        # bfloat16 is the top 16 bits of a float32 (numpy holds them as uint16; ctx.tensors gives torch.bfloat16)
        parts["emb"][...] = rng.standard_normal(parts["emb"].shape, dtype=np.float32).view(np.uint32) >> 16
        parts["b"][...] = rng.standard_normal(parts["b"].shape, dtype=np.float32)
        pushed = await ctx.push("params")
        return {"version": pushed["version"], "checksum": _checksum(parts), "seconds": pushed["seconds"]}


class PolicyServer:
    """An inference replica: it reads its weights in a snapshot, one complete version each time."""

    async def wait(self, after: int = 0, timeout: float = 30) -> dict:
        """Answers once a version newer than `after` has landed (a long poll; no polling inside)."""
        ctx = oobspec.context()
        await ctx.updated("params", after=after, timeout=timeout)
        return await self.weights()

    async def weights(self) -> dict:
        ctx = oobspec.context()
        async with ctx.reading("params") as snap:  # one version, whole, however long the read takes
            return {"version": snap.version, "checksum": _checksum(snap.views)}

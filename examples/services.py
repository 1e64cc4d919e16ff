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

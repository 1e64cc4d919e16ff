"""Links inside a replica, split by role: `LinkTarget` (this replica receives: its receivers,
a push by Ray call into the idle slot), `LinkSource` (replica 0 of a link's `from` actor: its
targets, the push) and `Groups` (NCCL communicators, which both ends join); `Links` is what the
actor and `oobspec.context()` hold.

Every link target's memory (one slot, or two with `buffering: double`; named shared memory on
cpu, its own cudaMalloc on gpu) and its inbox (control block + doorbell, `transports.inbox`) are
made when the replica starts (`buffers.py`), so a target that Ray restarts can receive again at
once. Targets on the source's node (shm, and cuda_ipc on its own GPU) are written directly: the
source copies into each target's mapped memory, then sets the version in the target's control
block and rings it; no Ray call per push. Other targets (object_store, nccl, cuda_ipc to another
GPU) get a Ray call per push.
"""
from __future__ import annotations

import asyncio
from typing import Any

from ..contract import Descriptor, LinkRole, ReplicaConfig, WiredTarget
from ..errors import OobError
from .link_source import LinkSource
from .link_target import LinkTarget
from .metrics import Metrics


class LinkBook:
    """This replica's links by name, and the GPU it runs on (both roles look them up)."""

    def __init__(self, ctx, cfg: ReplicaConfig):
        self.ctx, self.cfg = ctx, cfg
        self.links: dict[str, LinkRole] = cfg.links
        self._uuid: str | None = None
        self._peers: tuple[str, ...] | None | bool = False  # False: not asked yet

    def role(self, name: str) -> LinkRole:
        if name not in self.links:
            known = ", ".join(self.links) or "none"
            raise OobError(f"actor {self.cfg.actor} has no link '{name}' (links: {known})")
        return self.links[name]

    def owner(self, buffer: str):
        """The Allocation of one of this replica's buffers."""
        return self.ctx._owners[buffer]

    def gpu_uuid(self) -> str | None:
        if self._uuid is None and any(b.device == "gpu" for b in self.cfg.buffers.values()):
            from ..transports import get_transport
            self._uuid = get_transport("cuda_ipc").gpu_uuid()
        return self._uuid

    def gpu_peers(self) -> tuple[str, ...] | None:
        """The GPUs of this node that ours reaches peer-to-peer (None: no GPU buffer, or not known)."""
        if self._peers is False:  # asked once (NVML is slow to start); None when it cannot say
            from ..transports import get_transport
            self._peers = get_transport("cuda_ipc").peer_gpus(self.gpu_uuid()) if self.gpu_uuid() else None
        return self._peers


class Groups:
    """NCCL communicators by link: the source is rank 0, each target joins with its rank."""

    def __init__(self):
        self.by_link: dict[str, Any] = {}

    async def join(self, link: str, unique_id, world: int, rank: int):
        from ..transports import get_transport
        old = self.by_link.pop(link, None)
        if old is not None:  # a re-apply wires the link again: one communicator per rank, not one more each time
            old.close()
        self.by_link[link] = await asyncio.to_thread(get_transport("nccl").Group, unique_id, world, rank)
        return self.by_link[link]

    def get(self, link: str):
        return self.by_link.get(link)

    def close(self) -> None:
        for group in self.by_link.values():
            close = getattr(group, "close", None)
            if close:
                close()
        self.by_link.clear()


class Links:
    """What a replica holds of its links: both roles and the groups, behind one interface."""

    def __init__(self, ctx, cfg: ReplicaConfig, owner=None):
        self.ctx, self.cfg = ctx, cfg
        self.book = LinkBook(ctx, cfg)
        self.groups = Groups()
        self.target = LinkTarget(self.book, self.groups)
        self.source = LinkSource(self.book, self.groups)

    @property
    def metrics(self) -> Metrics:
        return self.source.metrics

    @metrics.setter
    def metrics(self, metrics: Metrics) -> None:
        self.source.metrics = metrics

    @property
    def links(self) -> dict[str, LinkRole]:
        return self.book.links

    @property
    def targets(self):
        return self.source.targets

    def gpu_uuid(self) -> str | None:
        return self.book.gpu_uuid()

    def gpu_peers(self) -> tuple[str, ...] | None:
        return self.book.gpu_peers()

    async def receiver(self, link: str, transport: str, setup: dict | None = None) -> Descriptor | None:
        return await self.target.receiver(link, transport, setup)

    async def receive(self, link: str, message: Any, version: int) -> None:
        await self.target.receive(link, message, version)

    def target_version(self, link: str) -> int:
        return self.target.version(link)

    async def connect(self, link: str, targets: list[tuple[WiredTarget, Any]]) -> None:
        await self.source.connect(link, targets)

    async def nccl_root(self, link: str, unique_id, world: int) -> None:
        await self.groups.join(link, unique_id, world, 0)

    async def push(self, link: str) -> dict:
        return await self.source.push(link)

    def stats(self) -> dict:
        return self.source.stats()

    async def aclose(self) -> None:
        """close(), once a push in progress has finished (a few seconds at most)."""
        await self.source.wait_idle(5)
        self.close()

    def close(self) -> None:
        self.source.close()
        self.target.close()
        self.groups.close()
        for owner in self.ctx._owners.values():
            owner.close()
        self.ctx._owners = {}

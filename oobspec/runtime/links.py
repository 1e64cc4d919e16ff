"""Buffers and links inside a replica: allocation at start, receivers, senders, push.

Link buffers are allocated and touched once, when the replica starts, so a push is one copy
per target and never faults fresh pages. The source is replica 0 of the link's `from` actor.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from ..contract import LinkRole, ReplicaConfig, segment_name
from ..errors import OobError
from .metrics import off


def allocate_buffers(cfg: ReplicaConfig) -> dict[str, Any]:
    """Every declared buffer (name -> its owner; `.array` is the array); cpu link targets live
    in named shared memory."""
    if not cfg.buffers:
        return {}  # no numpy (or cupy) import for actors without buffers
    from ..transports import allocate
    owners = {}
    for name, buf in cfg.buffers.items():
        shared = None
        if buf.device == "cpu" and name in cfg.link_targets:
            shared = segment_name(cfg.deployment, cfg.actor, cfg.replica, name)
            _unlink_stale(shared)
        owners[name] = allocate(buf.shape, buf.dtype, buf.device, shared_name=shared)
    return owners


def _unlink_stale(name: str) -> None:
    # A replica that crashed and was restarted by Ray left its segment behind: it is ours.
    import os
    try:
        os.unlink(f"/dev/shm/{name}")
    except FileNotFoundError:
        pass


class Links:
    def __init__(self, ctx, cfg: ReplicaConfig, owner):
        self.ctx, self.cfg = ctx, cfg
        self.links: dict[str, LinkRole] = cfg.links
        self.receivers: dict[tuple[str, str], Any] = {}  # (link, transport) -> Receiver / nccl Group
        self.senders: dict[str, list[dict]] = {}  # link -> [{handle, transport, sender, descriptor, key}]
        self.groups: dict[str, Any] = {}  # link -> nccl Group (source side)
        self.version: dict[str, int] = {}
        self.last: dict[str, dict] = {}
        self._uuid: str | None = None
        self._lock = asyncio.Lock()
        self.metrics = off()  # the replica's, once it has them

    def _link(self, name: str) -> LinkRole:
        if name not in self.links:
            known = ", ".join(self.links) or "none"
            raise OobError(f"actor {self.cfg.actor} has no link '{name}' (links: {known})")
        return self.links[name]

    def gpu_uuid(self) -> str | None:
        if self._uuid is None and any(b.device == "gpu" for b in self.cfg.buffers.values()):
            from ..transports import get_transport
            self._uuid = get_transport("cuda_ipc").gpu_uuid()
        return self._uuid

    # --- target side ---

    async def receiver(self, link: str, transport: str, setup: dict | None) -> dict:
        from ..transports import get_transport
        spec = self._link(link)
        buffer = spec.target_buffer
        key = (link, transport)
        if transport == "nccl":
            nccl = get_transport("nccl")
            self.receivers[key] = await asyncio.to_thread(nccl.Group, setup["unique_id"], setup["world"], setup["rank"])
            return {}
        if key not in self.receivers:
            owner = self.ctx._owners[buffer]
            module = get_transport(transport)
            self.receivers[key] = module.Receiver(owner if transport == "shm" else owner.array)
        return self.receivers[key].descriptor()

    async def receive(self, link: str, message: Any, version: int) -> None:
        spec = self._link(link)
        transport = message.get("transport") if isinstance(message, dict) else None
        payload = message.get("payload") if isinstance(message, dict) else None
        receiver = self.receivers.get((link, transport))
        if receiver is None:
            raise OobError(f"link '{link}' is not set up on {self.cfg.name}")
        if transport == "nccl":
            await asyncio.to_thread(receiver.broadcast, self.ctx.buffers[spec.target_buffer])
        elif transport != "shm":  # shm: the source already wrote into our segment
            await asyncio.to_thread(receiver.receive, payload)
        self.ctx.versions[spec.target_buffer] = version

    # --- source side ---

    async def connect(self, link: str, targets: list) -> None:
        """targets: [{key, handle, transport, descriptor, setup}] — called by apply, idempotent."""
        from ..transports import get_transport
        spec = self._link(link)
        source = self.ctx.buffers[spec.source_buffer]
        old = {t["key"]: t for t in self.senders.get(link, [])}
        fresh = []
        for target in targets:
            kept = old.pop(target["key"], None)
            if kept and kept["transport"] == target["transport"] and kept["descriptor"] == target["descriptor"] \
                    and target["transport"] != "nccl":
                kept["handle"] = target["handle"]
                fresh.append(kept)
                continue
            if kept and kept["sender"] is not None:
                kept["sender"].close()
            sender = None
            if target["transport"] != "nccl":
                sender = get_transport(target["transport"]).Sender(source, target["descriptor"])
            fresh.append(dict(target, sender=sender))
        for gone in old.values():
            if gone["sender"] is not None:
                gone["sender"].close()
        self.senders[link] = fresh
        self.version.setdefault(link, 0)

    async def nccl_root(self, link: str, unique_id, world: int) -> None:
        from ..transports import get_transport
        self.groups[link] = await asyncio.to_thread(get_transport("nccl").Group, unique_id, world, 0)

    async def push(self, link: str) -> dict:
        spec = self._link(link)
        if spec.role != "source" or self.cfg.replica != 0:
            raise OobError(f"link '{link}' pushes from replica 0 of {spec.source.actor}, not from {self.cfg.name}")
        if link not in self.senders:
            raise OobError(f"link '{link}' is not connected yet (apply sets it up once every replica is ready)")
        async with self._lock:  # one push of a link at a time: versions stay in order
            source = self.ctx.buffers[spec.source_buffer]
            version = self.version[link] + 1
            targets = self.senders[link]
            start = time.perf_counter()
            acks = []
            nccl_targets = [t for t in targets if t["transport"] == "nccl"]
            if nccl_targets:
                acks += [t["handle"]._oob_receive.remote(link, {"transport": "nccl"}, version) for t in nccl_targets]
                await asyncio.to_thread(self.groups[link].broadcast, source)
            others = [t for t in targets if t["transport"] != "nccl"]
            payloads = await asyncio.gather(*(asyncio.to_thread(t["sender"].send) for t in others))
            acks += [t["handle"]._oob_receive.remote(link, {"transport": t["transport"], "payload": p}, version)
                     for t, p in zip(others, payloads)]
            await asyncio.gather(*acks)
            seconds = time.perf_counter() - start
            self.version[link] = version
            nbytes = int(source.nbytes) * len(targets)
            transports = sorted({t["transport"] for t in targets})
            self.metrics.push(link, seconds, nbytes)
            self.last[link] = {"version": version, "bytes": nbytes, "seconds": seconds,
                               "gbps": nbytes / seconds / 1e9 if seconds else 0.0, "targets": len(targets),
                               "transport": "/".join(transports), "at": time.time()}
            return self.last[link]

    def stats(self) -> dict:
        return {name: {"last_push": self.last.get(name), "transports": sorted({t["transport"] for t in self.senders.get(name, [])})}
                for name, spec in self.links.items() if spec.role == "source"}

    def close(self) -> None:
        for targets in self.senders.values():
            for t in targets:
                if t["sender"] is not None:
                    t["sender"].close()
        self.senders.clear()
        for receiver in self.receivers.values():
            close = getattr(receiver, "close", None)
            if close:
                close()
        self.receivers.clear()
        for owner in self.ctx._owners.values():
            owner.close()
        self.ctx._owners = {}

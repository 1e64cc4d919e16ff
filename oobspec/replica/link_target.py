"""A link target's side inside a replica: what the source needs to reach it, and a push that
comes by Ray call (object_store, nccl, cuda_ipc from another GPU), received into a free slot
and published in the target's own inbox."""
from __future__ import annotations

import asyncio
from typing import Any

from ..contract import Descriptor
from ..errors import OobError


class LinkTarget:
    def __init__(self, book, groups):
        self.book, self.groups = book, groups
        self.receivers: dict[tuple[str, str], Any] = {}  # (link, transport) -> Receiver / nccl Group

    async def receiver(self, link: str, transport: str, setup: dict | None = None) -> Descriptor | None:
        """This target's end of `link` over `transport`: what the source needs to reach it."""
        alloc = self.book.owner(self.book.role(link).target_buffer)
        if transport == "nccl":
            self.receivers[(link, transport)] = await self.groups.join(link, setup["unique_id"], setup["world"],
                                                                       setup["rank"])
            return None
        receiver = self._receiver(link, transport)
        first = alloc.slot(0)
        return Descriptor(tuple(first.shape), first.dtype.str, alloc.segment, alloc.slots, alloc.stride,
                          receiver.descriptor()["device_uuid"] if transport == "cuda_ipc" else None)

    def _receiver(self, link: str, transport: str):
        key = (link, transport)
        if key not in self.receivers and transport in ("object_store", "cuda_ipc"):
            from ..transports import get_transport
            array = self.book.owner(self.book.role(link).target_buffer).slot(0)
            self.receivers[key] = get_transport(transport).Receiver(array)
        return self.receivers.get(key)

    async def receive(self, link: str, message: Any, version: int) -> None:
        """A push that comes by Ray call: into a free slot, then published in our own inbox."""
        alloc = self.book.owner(self.book.role(link).target_buffer)
        transport = message["transport"]
        # Made here too: a target that Ray restarted receives again without a re-apply.
        receiver = self._receiver(link, transport) if transport != "nccl" else self.receivers.get((link, transport))
        if receiver is None:
            raise OobError(f"link '{link}' is not set up on {self.book.cfg.name}"
                           + (" (nccl is wired at apply: re-apply after a restart)" if transport == "nccl" else ""))
        slot = await alloc.inbox.claim(alloc.timeout)  # a slot no reader holds, never the current one
        try:
            if transport == "nccl":
                await asyncio.to_thread(receiver.broadcast, alloc.slot(slot), alloc.timeout)
            else:
                await asyncio.to_thread(receiver.receive, message["payload"], alloc.slot(slot))
        except BaseException:
            alloc.inbox.abandon(slot)
            raise
        alloc.inbox.publish(version, slot)

    def version(self, link: str) -> int:
        """The version this target holds of `link`."""
        return self.book.owner(self.book.role(link).target_buffer).inbox.version

    def close(self) -> None:
        for (_link, transport), receiver in self.receivers.items():
            close = getattr(receiver, "close", None)
            if close and transport != "nccl":  # a group is closed with the others
                close()
        self.receivers.clear()

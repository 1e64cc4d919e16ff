"""`async with ctx.reading(b) as snap:` a complete version of a buffer that no push overwrites
until the block ends.

The reader holds a shared lock on the slot it reads (`transports.slots`); a push takes the
exclusive lock of the slot it fills, so it waits for the block to end (one slot, or the only
free one of two), or fills another (three slots). On a GPU the block ends only when the work
it queued on the current streams (cupy's, and torch's when torch is loaded) is done.
"""
from __future__ import annotations

import asyncio
from typing import Any

from ..errors import OobError


class Snapshot:
    """One version of a buffer, held: `version`, `array`, `views`, `tensor()`, `tensors()`."""

    def __init__(self, owner, slot: int, version: int, seq: int | None):
        self._owner, self.slot, self.version, self._seq = owner, slot, version, seq
        self.array = owner.slot(slot)

    @property
    def views(self) -> dict[str, Any]:
        """The named parts of a `layout:` buffer in this version (numpy / cupy, no copy)."""
        return self._owner.views(self.slot)

    def tensor(self):
        return torch_view(self.array, None if self._owner.buffer.layout else self._owner.buffer.dtype)

    def tensors(self) -> dict[str, Any]:
        return {name: torch_view(view, self._owner.buffer.layout[name].dtype) for name, view in self.views.items()}

    @property
    def intact(self) -> bool:
        """No write touched this slot since the snapshot was taken, and none was half done then
        (a source that died mid-copy leaves its slot marked): the sequence check any reader can make."""
        inbox = self._owner.inbox
        if inbox is None or self._seq is None:
            return True
        return self._seq % 2 == 0 and inbox.seq(self.slot) == self._seq


def torch_view(array, dtype: str | None):
    try:
        import torch
    except ImportError:
        raise OobError("ctx.tensor needs torch (pip install torch)") from None
    if dtype == "bfloat16":  # uint16 bits; through int16, which DLPack and any torch take
        return torch.from_dlpack(array.view("int16")).view(torch.bfloat16)
    return torch.from_dlpack(array)


class Reading:
    """The async context manager behind `ctx.reading(buffer)`."""

    def __init__(self, owner, name: str, timeout: float | None):
        self._owner, self._name = owner, name
        self._timeout = owner.timeout if timeout is None else timeout
        self._snap: Snapshot | None = None

    async def __aenter__(self) -> Snapshot:
        inbox = self._owner.inbox
        if inbox is None:  # nothing pushes into it: the buffer as it is
            self._snap = Snapshot(self._owner, 0, 0, None)
            return self._snap
        from ..transports.inbox import SlotBusy
        try:
            slot = await inbox.pin(self._timeout)
        except SlotBusy:
            raise OobError(f"buffer '{self._name}': a push held it for {self._timeout:g} s "
                           "(the link's timeout)") from None
        self._snap = Snapshot(self._owner, slot, inbox.held(slot), inbox.seq(slot))
        return self._snap

    async def __aexit__(self, *exc) -> None:
        snap, self._snap = self._snap, None
        if snap is None or snap._seq is None:
            return
        try:
            if self._owner.buffer.device == "gpu":
                await _queued_work_done(snap.array)
        finally:
            if self._owner.inbox is not None:
                self._owner.inbox.unpin(snap.slot)


async def _queued_work_done(array) -> None:
    """Until the work queued so far on the current cupy (and torch) stream is done, off the loop."""
    from ..transports.base import callers_work
    for event in callers_work(array.device):
        if not event.done:
            await asyncio.to_thread(event.synchronize)

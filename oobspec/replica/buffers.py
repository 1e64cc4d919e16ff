"""A replica's declared buffers: one allocation each, in one slot, two or three (`buffering:`);
a link target's in named shared memory (cpu) or its own cudaMalloc (gpu) with its inbox
(control block + doorbell, `transports.inbox`), made when the replica starts."""
from __future__ import annotations

from typing import Any

from ..contract import ReplicaConfig, segment_name
from ..models import PART_ALIGN, Buffer, storage_dtype


class Allocation:
    """One declared buffer: its memory in `slots` slots and, for a link target, the inbox that
    says which slot is complete and current."""

    def __init__(self, buf: Buffer, slots: int = 1, segment: str | None = None, timeout: float = 10.0):
        self.buffer, self.slots, self.segment = buf, slots, segment
        self.timeout = timeout  # how long a reader waits for a push in progress (the link's `timeout`)
        self.inbox = self._shared = None
        nbytes, (shape, dtype) = buf.nbytes, buf.storage()
        # Slots start on PART_ALIGN boundaries too, so every part of slot 1 is aligned as in slot 0.
        self.stride = stride = -(-nbytes // PART_ALIGN) * PART_ALIGN
        handle = b""
        if buf.device == "gpu":
            from ..transports import get_transport
            ipc = get_transport("cuda_ipc")
            raw = ipc.allocate_gpu((slots * stride,), "uint8")
            raw.fill(0)  # zeroed, as cpu buffers are
            raw.device.synchronize()
            if segment:
                handle = ipc.export_handle(raw)
        elif segment:
            from ..transports.shm import SharedBuffer, _unlink
            _unlink(segment)  # a replica that crashed and was restarted by Ray left it behind: it is ours
            self._shared = SharedBuffer(segment, (slots * stride,), "uint8")
            raw = self._shared.array
        else:
            import numpy as np
            raw = np.zeros(nbytes, np.uint8)
        self._raw = [raw[i * stride:i * stride + nbytes] for i in range(slots)]
        self._arrays = [r.view(dtype).reshape(shape) for r in self._raw]
        if segment:
            from ..transports.inbox import Inbox
            self.inbox = Inbox(segment, slots, stride, handle)

    @property
    def current(self) -> int:
        return self.inbox.slot if self.inbox is not None and self.slots > 1 else 0

    @property
    def array(self):
        """The complete current slot (numpy on cpu, cupy on gpu)."""
        return self._arrays[self.current]

    def slot(self, index: int):
        return self._arrays[index]

    def views(self, slot: int | None = None) -> dict[str, Any]:
        """The named parts of a `layout` buffer, as arrays over the current slot (no copy)."""
        raw = self._raw[self.current if slot is None else slot]
        return {name: raw[offset:offset + part.nbytes].view(storage_dtype(part.dtype)).reshape(part.shape)
                for name, (offset, part) in self.buffer.parts().items()}

    def close(self) -> None:
        if self.inbox is not None:
            self.inbox.close()
        if self._shared is not None:
            self._shared.close(unlink=True)
        self._raw = self._arrays = []
        self.inbox = self._shared = None


def allocate_buffers(cfg: ReplicaConfig) -> dict[str, Allocation]:
    """Every declared buffer of a replica (name -> Allocation)."""
    into = {role.target_buffer: role for role in cfg.links.values() if role.target_buffer}
    out = {}
    for name, buf in cfg.buffers.items():
        segment, role = None, into.get(name)
        if name in cfg.link_targets:
            segment = segment_name(cfg.deployment, cfg.actor, cfg.replica, name)
        out[name] = Allocation(buf, SLOTS[role.buffering] if role else 1, segment, role.timeout if role else 10.0)
    return out


SLOTS = {"single": 1, "double": 2, "triple": 3}

"""Out-of-band transports: move a buffer's bytes from a source replica into target replicas."""
from __future__ import annotations

import importlib

import numpy as np

from .auto import choose, is_gpu
from .base import LocalBuffer, Topology, TransportError

TRANSPORTS = ("shm", "object_store", "cuda_ipc", "nccl")

__all__ = ["TRANSPORTS", "Topology", "TransportError", "allocate", "choose", "get_transport"]


def get_transport(name: str):
    """The module implementing transport `name` (GPU modules import cupy only when used)."""
    if name not in TRANSPORTS:
        raise TransportError(f"unknown transport {name!r}; expected one of {', '.join(TRANSPORTS)}")
    return importlib.import_module(f"{__name__}.{name}")


def allocate(shape, dtype, device: str, shared_name: str | None = None):
    """A target or source buffer: an object with `.array` and `.close(unlink=True)`.

    cpu + shared_name -> shm.SharedBuffer (named shared memory); cpu -> zeroed
    numpy array; gpu -> cupy array in its own allocation (what cuda_ipc needs).
    """
    if is_gpu(device):
        if shared_name is not None:
            raise TransportError("shared_name applies to cpu buffers only")
        return LocalBuffer(get_transport("cuda_ipc").allocate_gpu(shape, dtype))
    if shared_name is not None:
        return get_transport("shm").allocate_shared(shared_name, shape, dtype)
    return LocalBuffer(np.zeros(shape, dtype))

"""Out-of-band transports: move a buffer's bytes from a source replica into target replicas."""
from __future__ import annotations

import importlib

from .auto import choose
from .base import Topology, TransportError

TRANSPORTS = ("shm", "object_store", "cuda_ipc", "nccl")

__all__ = ["TRANSPORTS", "Topology", "TransportError", "choose", "get_transport"]


def get_transport(name: str):
    """The module implementing transport `name` (GPU modules import cupy only when used)."""
    if name not in TRANSPORTS:
        raise TransportError(f"unknown transport {name!r}; expected one of {', '.join(TRANSPORTS)}")
    return importlib.import_module(f"{__name__}.{name}")

"""Pick a transport from where the source and target buffers live."""
from __future__ import annotations

from .base import Topology, TransportError

GPU_DEVICES = ("gpu", "cuda")


def is_gpu(device: str) -> bool:
    if device == "cpu":
        return False
    if device in GPU_DEVICES:
        return True
    raise TransportError(f"unknown device {device!r}; expected 'cpu' or 'gpu'")


def choose(device: str, source: Topology, target: Topology) -> str:
    """The one choice (oobspec.contract.choose_transport), for a device name checked here."""
    from ..contract import choose_transport
    return choose_transport("gpu" if is_gpu(device) else "cpu", source, target)

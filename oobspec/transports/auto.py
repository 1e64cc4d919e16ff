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
    same_node = source.node_id == target.node_id
    if is_gpu(device):
        # Peer GPUs on one node still use IPC: one direct copy, no communicator to set up.
        return "cuda_ipc" if same_node else "nccl"
    return "shm" if same_node else "object_store"

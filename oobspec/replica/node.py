"""Where a replica runs: its node's address, and `host: node` resolved to it."""
from __future__ import annotations

import dataclasses

from ..contract import ReplicaConfig


def node_address() -> str:
    """The address Ray knows this replica's node by ("" outside Ray)."""
    try:
        import ray
        return ray.util.get_node_ip_address() if ray.is_initialized() else ""
    except Exception:
        return ""


def on_this_node(cfg: ReplicaConfig) -> ReplicaConfig:
    """`host: node` becomes the node's own address, here where the replica runs."""
    if not any(s.host == "node" for s in cfg.servers):
        return cfg
    address = node_address() or "127.0.0.1"
    cfg.servers[:] = [dataclasses.replace(s, host=address) if s.host == "node" else s for s in cfg.servers]
    return cfg

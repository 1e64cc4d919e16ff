"""Phase 5, links: each link target's transport, as `oob plan` shows it and apply wires it.

Pure, no Ray: set in the spec, decided from where both ends run (observed, or one node for sure),
or left to `auto` until the replicas are placed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .contract import Ref, Topology, choose_transport
from .models import Spec


class LinkReason(StrEnum):
    SPEC = "set-in-spec"
    ONE_NODE = "one-node"  # every replica will share one node
    PLACED_ONE_NODE = "placed-on-one-node"
    PLACED_SEVERAL_NODES = "placed-on-several-nodes"
    NOT_PLACED = "not-placed-yet"  # `auto` decides once the replicas are placed


_LINK_REASONS = {LinkReason.SPEC: "set in the spec", LinkReason.ONE_NODE: "one node",
                 LinkReason.PLACED_ONE_NODE: "replicas on one node",
                 LinkReason.PLACED_SEVERAL_NODES: "replicas on several nodes",
                 LinkReason.NOT_PLACED: "decided when the replicas are placed"}


@dataclass
class LinkRow:
    name: str
    source: str
    target: str
    device: str
    transport: str | None  # None: not decided until the replicas are placed
    reason: LinkReason
    options: list[str] = field(default_factory=list)  # what `auto` may pick, while undecided
    nbytes: int = 0  # bytes per push and target
    buffering: str = "single"

    def describe(self) -> tuple[str, str]:
        """(transport, why) in words."""
        transport = self.transport or f"auto ({' or '.join(self.options)})"
        return transport, _LINK_REASONS[self.reason]


def link_rows(spec: Spec, topology: dict[tuple[str, int], Topology], single_node: bool | None) -> list[LinkRow]:
    """Each link target's transport: set in the spec, decided by where the ends run (topology:
    (actor, replica) -> where it runs, as far as known), or open."""
    links = []
    for link in spec.links:
        src_actor, src_buf = Ref.parse(link.from_).actor, Ref.parse(link.from_).member
        buf = spec.actors[src_actor].buffers.get(src_buf) if src_actor in spec.actors else None
        device = buf.device if buf else "cpu"
        size = {"nbytes": buf.nbytes if buf else 0, "buffering": link.buffering}
        for target in link.to:
            if link.transport != "auto":
                links.append(LinkRow(link.name, link.from_, target, device, link.transport, LinkReason.SPEC, **size))
                continue
            dst_actor = Ref.parse(target).actor
            ends = [topology.get((src_actor, 0))] + [topology.get((dst_actor, i))
                                                     for i in range(spec.actors[dst_actor].replicas)] \
                if dst_actor in spec.actors else []
            if ends and all(ends):
                picks = sorted({choose_transport(device, ends[0], t) for t in ends[1:]})
                links.append(LinkRow(link.name, link.from_, target, device, "/".join(picks),
                                     LinkReason.PLACED_ONE_NODE if len({e.node_id for e in ends}) == 1
                                     else LinkReason.PLACED_SEVERAL_NODES, **size))
            elif single_node:
                links.append(LinkRow(link.name, link.from_, target, device,
                                     choose_transport(device, Topology("local"), Topology("local")), LinkReason.ONE_NODE,
                                     **size))
            else:
                options = ["cuda_ipc", "nccl"] if device == "gpu" else ["shm", "object_store"]
                links.append(LinkRow(link.name, link.from_, target, device, None, LinkReason.NOT_PLACED, options,
                                     **size))
    return links

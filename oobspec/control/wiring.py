"""Link wiring at apply: each target exports its receiving end, the source connects to all.

Idempotent: a re-apply (a restarted target, a scaled target actor) calls it again, and the
source keeps the senders that did not change, adds the new ones and closes the rest.
"""
from __future__ import annotations

from typing import Callable

from ..contract import Ref, ReplicaInfo, Topology, WiredTarget, choose_transport, replica_name
from ..models import Spec
from . import cluster


def setup_links(spec: Spec, namespace: str, info: dict[tuple[str, int], ReplicaInfo], progress: Callable[[str], None]) -> None:
    import ray
    handle = lambda key: cluster.handle(key, namespace)  # noqa: E731
    for link in spec.links:
        source = Ref.parse(link.from_)
        src_info = info[(source.actor, 0)]
        src_topo = Topology(src_info.node_id, src_info.gpu_uuid, src_info.gpu_peers)
        device = spec.actors[source.actor].buffers[source.member].device
        peers = []  # (key, transport, its GPU)
        for target in link.to:
            t_actor = Ref.parse(target).actor
            for i in range(spec.actors[t_actor].replicas):
                peer = info[(t_actor, i)]
                transport = link.transport
                if transport == "auto":
                    transport = choose_transport(device, src_topo, Topology(peer.node_id, peer.gpu_uuid, peer.gpu_peers))
                peers.append((replica_name(t_actor, i), transport, peer.gpu_uuid))
        sender = handle(replica_name(source.actor, 0))
        nccl = [(key, uuid) for key, transport, uuid in peers if transport == "nccl"]
        if nccl:
            _nccl_group(link, sender, src_topo.gpu_uuid, nccl, handle)
        descriptors = iter(ray.get([handle(key)._oob_link_receiver.remote(link.name, transport)
                                    for key, transport, _ in peers if transport != "nccl"]))
        wired = [WiredTarget(key, transport, next(descriptors) if transport != "nccl" else None)
                 for key, transport, _ in peers]
        # Kept in the cluster's KV too: a source that Ray restarts wires itself from it.
        cluster.put_meta(namespace, f"links/{link.name}", [w.record() for w in wired])
        ray.get(sender._oob_link_sender.remote(link.name, [(w, handle(w.key)) for w in wired]))
        picked = sorted({w.transport for w in wired})
        progress(f"link {link.name}: {link.from_} -> {', '.join(link.to)} over {'/'.join(picked)}")


def _nccl_group(link, sender, source_gpu: str | None, targets: list[tuple[str, str | None]], handle) -> None:
    """One communicator: the source is rank 0 (it makes the unique id, so no rank has to reach
    the apply process), the targets 1..n (each on its own GPU). A rank that does not join within
    the link's timeout is an error naming it."""
    import ray

    from ..errors import OobError
    from ..transports import get_transport
    get_transport("nccl").check_distinct_gpus([source_gpu] + [uuid for _key, uuid in targets])
    unique_id = ray.get(sender._oob_nccl_id.remote(link.name))
    world = len(targets) + 1
    refs = [sender._oob_nccl_root.remote(link.name, unique_id, world)]
    refs += [handle(key)._oob_link_receiver.remote(link.name, "nccl", {"unique_id": unique_id, "world": world,
                                                                       "rank": r + 1})
             for r, (key, _uuid) in enumerate(targets)]
    seconds = max(30.0, link.timeout)
    _ready, pending = ray.wait(refs, num_returns=len(refs), timeout=seconds)
    if pending:
        names = ["rank 0 (the source)" if ref is refs[0] else targets[refs.index(ref) - 1][0] for ref in pending]
        raise OobError(f"link '{link.name}': nccl ranks did not join within {seconds:g} s: {', '.join(names)}")
    ray.get(refs)

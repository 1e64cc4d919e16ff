"""Link wiring at apply: each target exports its receiving end, the source connects to all.

Idempotent: a re-apply (a restarted target, a scaled target actor) calls it again, and the
source keeps the senders that did not change, adds the new ones and closes the rest.
"""
from __future__ import annotations

from typing import Callable

from ..contract import Ref, ReplicaInfo, Topology, choose_transport, replica_name
from ..models import Spec
from . import cluster


def setup_links(spec: Spec, namespace: str, info: dict[tuple[str, int], ReplicaInfo], progress: Callable[[str], None]) -> None:
    import ray
    handles = lambda a, i: cluster.handle(replica_name(a, i), namespace)  # noqa: E731
    for link in spec.links:
        source = Ref.parse(link.from_)
        src_actor = source.actor
        src_info = info[(src_actor, 0)]
        src_topo = Topology(src_info.node_id, src_info.gpu_uuid)
        device = spec.actors[src_actor].buffers[source.member].device
        targets = []
        for target in link.to:
            t_actor = Ref.parse(target).actor
            for i in range(spec.actors[t_actor].replicas):
                peer = info[(t_actor, i)]
                transport = link.transport
                if transport == "auto":
                    transport = choose_transport(device, src_topo, Topology(peer.node_id, peer.gpu_uuid))
                targets.append({"key": replica_name(t_actor, i), "handle": handles(t_actor, i), "transport": transport,
                                "uuid": peer.gpu_uuid})
        source = handles(src_actor, 0)
        nccl = [t for t in targets if t["transport"] == "nccl"]
        if nccl:
            from ..transports import get_transport
            module = get_transport("nccl")
            module.check_distinct_gpus([src_topo.gpu_uuid] + [t["uuid"] for t in nccl])
            unique_id = module.new_unique_id()
            world = len(nccl) + 1
            refs = [source._oob_nccl_root.remote(link.name, unique_id, world)]
            refs += [t["handle"]._oob_link_receiver.remote(link.name, "nccl", {"unique_id": unique_id, "world": world,
                                                                                 "rank": r + 1})
                     for r, t in enumerate(nccl)]
            ray.get(refs)
        descriptors = ray.get([t["handle"]._oob_link_receiver.remote(link.name, t["transport"])
                               for t in targets if t["transport"] != "nccl"])
        it = iter(descriptors)
        for t in targets:
            t["descriptor"] = next(it) if t["transport"] != "nccl" else None
            t.pop("uuid", None)
        # Kept in the cluster's KV too: a source that Ray restarts wires itself from it.
        cluster.put_meta(namespace, f"links/{link.name}", [{k: t[k] for k in ("key", "transport", "descriptor")}
                                                           for t in targets])
        ray.get(source._oob_link_sender.remote(link.name, targets))
        picked = sorted({t["transport"] for t in targets})
        progress(f"link {link.name}: {link.from_} -> {', '.join(link.to)} over {'/'.join(picked)}")

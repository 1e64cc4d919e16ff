"""The cluster's nodes as the planner and `oob status` see them: labels, resources, room.

Pure, no Ray: `control.cluster.nodes()` observes them; `make_plan` warns from them and decides
where a stand-in has no room; `oob status` says why a replica waits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .models import Actor, Spec, memory_bytes


@dataclass
class NodeState:
    """One Ray node as observed: where it is, its labels, what it has in all and free now."""

    node_id: str
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)  # Ray resource name -> amount
    available: dict[str, float] | None = None  # free now (a name left out: none free); None: unknown
    alive: bool = True


def node_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a node with `labels` satisfies Ray's label_selector: each value is `v` (equal),
    `!v` (not equal, or absent), `in(a,b)` (one of) or `!in(a,b)` (none of, or absent)."""
    for key, want in selector.items():
        negate = want.startswith("!")
        want = want[1:] if negate else want
        values = [v.strip() for v in want[3:-1].split(",")] if want.startswith("in(") and want.endswith(")") else [want]
        if (labels.get(key) in values) == negate:
            return False
    return True


def demand(actor: Actor) -> dict[str, float]:
    """What one replica holds while it runs, in Ray's resource names. No `cpus`: none (Ray
    holds no CPU for an actor that asks for none once it is created)."""
    res = actor.resources
    need = {"CPU": res.cpus or 0, "GPU": res.gpus, "memory": memory_bytes(res.memory) or 0, **res.custom}
    return {k: float(v) for k, v in need.items() if v}


def shortfall(need: dict[str, float], have: dict[str, float]) -> dict[str, tuple[float, float]]:
    """resource -> (needed, had) for each one `have` lacks (a name left out of `have`: none)."""
    return {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}


def size(n: float) -> str:
    """Bytes for people: `512 B`, `1.5 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def amount(resource: str, value: float, unit: bool = True) -> str:
    """`2 CPU`, `1.5 GiB memory`, `1 accelerator_h100` (unit=False: `2`, `1.5 GiB`)."""
    if resource == "memory":
        return f"{size(value)} memory" if unit else size(value)
    return f"{value:g} {resource}" if unit else f"{value:g}"


def amounts_text(need: dict[str, float]) -> str:
    return ", ".join(amount(k, v) for k, v in need.items())


def labels_text(labels: dict[str, str]) -> str:
    """`{zone: c, disk: ssd}`, as a spec writes them."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in labels.items()) + "}"


def no_room(actor: Actor, where: dict[int, str | None], nodes: list[NodeState]) -> list[tuple[list[int], dict]]:
    """The replicas (index -> node id) whose node has no free room for one more replica beside
    them, by node: ([indices], {"node": address, "short": {resource: [needed, free]}}). A node
    whose free resources are unknown is taken to have room."""
    known = {n.node_id: n for n in nodes if n.alive and n.available is not None}
    out: dict[str, tuple[list[int], dict]] = {}
    for i, node_id in sorted(where.items()):
        node = known.get(node_id or "")
        short = shortfall(demand(actor), node.available) if node else {}
        if node is not None and short:
            room = {"node": node.address, "short": {k: list(v) for k, v in short.items()}}
            out.setdefault(node.node_id, ([], room))[0].append(i)
    return list(out.values())


def no_room_text(room: dict) -> str:
    """`node 10.0.0.2 has no room for a stand-in (needs 2 CPU, 0.5 free; needs 1 GPU, 0 free)`."""
    short = "; ".join(f"needs {amount(k, need)}, {amount(k, had, unit=False)} free"
                      for k, (need, had) in room["short"].items())
    return f"node {room['node']} has no room for a stand-in ({short})"


def capacity_warnings(spec: Spec, nodes: list[NodeState]) -> list[str]:
    """What the alive nodes cannot hold, said at plan time rather than found by waiting: labels no
    node has, a replica bigger than any node, more replicas than `max_per_node` x nodes allows, more
    of a resource than all nodes have together."""
    alive = [n for n in nodes if n.alive]
    if not alive:
        return []
    out = []
    for name, actor in spec.actors.items():
        matching = [n for n in alive if node_matches(actor.labels, n.labels)]
        if not matching:
            out.append(f"actor {name}: no alive node has labels {labels_text(actor.labels)} (its replicas will wait)")
            continue
        fitting = [n for n in matching if not shortfall(demand(actor), n.total)]
        if not fitting:
            where = f" with labels {labels_text(actor.labels)}" if actor.labels else ""
            out.append(f"actor {name}: needs {amounts_text(demand(actor))} per replica, no alive node{where} has "
                       "that much (its replicas will wait)")
        elif actor.max_per_node and actor.max_per_node * len(fitting) < actor.replicas:
            waiting = actor.replicas - actor.max_per_node * len(fitting)
            out.append(f"actor {name}: {actor.replicas} replicas, max_per_node {actor.max_per_node}, "
                       f"{len(fitting)} matching node{'s' if len(fitting) != 1 else ''}: {waiting} will wait")
    asked: dict[str, float] = {}
    for actor in spec.actors.values():
        for k, v in demand(actor).items():
            asked[k] = asked.get(k, 0.0) + v * actor.replicas
    have = {k: sum(n.total.get(k, 0.0) for n in alive) for k in asked}
    return out + [f"the spec asks for {amount(k, want)} in all, the alive nodes have {amount(k, had, unit=False)} "
                  "(some replicas will wait)" for k, (want, had) in shortfall(asked, have).items()]


def migrate_warnings(spec: Spec, migrate_req: bool | None) -> list[str]:
    """A shared port's draining replica closes its listening socket: without tcp_migrate_req the
    kernel resets the connections still queued on it instead of handing them to the node's others."""
    if migrate_req is not False:
        return []
    return [f"actor {name}: server {server.name} is shared but net.ipv4.tcp_migrate_req is 0 on this machine: a "
            "draining replica resets connections queued on it (sysctl -w net.ipv4.tcp_migrate_req=1)"
            for name, actor in spec.actors.items() for server in actor.servers if server.shared]


def pending_reason(actor: Actor | None, nodes: list[NodeState], others: list[str]) -> str:
    """Why a replica Ray has not placed waits, from what it asks and what the alive nodes have.
    others: the node ids its actor's other placed replicas are on (one entry per replica)."""
    alive = [n for n in nodes if n.alive]
    if actor is None:
        return "waiting to be placed"
    matching = [n for n in alive if node_matches(actor.labels, n.labels)]
    if not matching:
        return f"needs {labels_text(actor.labels)}, no alive node has it" if actor.labels else "no alive node"
    need = demand(actor)
    fitting = [n for n in matching if not shortfall(need, n.total)]
    if not fitting:
        where = f" with {labels_text(actor.labels)}" if actor.labels else ""
        return f"needs {amounts_text(need)}, no alive node{where} has that much"
    if actor.max_per_node:
        fitting = [n for n in fitting if others.count(n.node_id) < actor.max_per_node]
        if not fitting:
            return f"every matching node has max_per_node ({actor.max_per_node}) replicas"
    if need and all(n.available is not None and shortfall(need, n.available) for n in fitting):
        return f"waiting for free resources ({amounts_text(need)})"
    return "waiting to be placed"


def wait_warnings(name: str, actor: Actor, where: dict[int, str | None], nodes: list[NodeState]) -> list[str]:
    """Rolls whose stand-in has no room on its replica's node (no_room: wait): they wait for it."""
    return [f"actor {name}: {no_room_text(room)}: the roll of replica{'s' if len(replicas) > 1 else ''} "
            f"{','.join(map(str, replicas))} waits for room (no_room: wait)"
            for replicas, room in no_room(actor, where, nodes)]

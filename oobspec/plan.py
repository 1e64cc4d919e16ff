"""Phase 5 — plan: a pure function of the desired spec and the observed cluster state.

No Ray here. The runtime gathers `Observed`, calls `make_plan`, and executes the actions;
`oob plan` prints the same Plan, so what you see is what apply does.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from .models import Spec, memory_bytes


@dataclass(frozen=True)
class Topology:
    """Where a replica runs: what `auto` transport selection needs to know."""

    node_id: str
    gpu_uuid: str | None = None


@dataclass
class ReplicaState:
    """One replica as observed in the cluster."""

    actor: str
    replica: int
    config_hash: str
    pid: int | None = None
    node_id: str | None = None
    alive: bool = True
    endpoints: dict[str, str] = field(default_factory=dict)  # server name -> URL
    gpu_uuid: str | None = None
    code_hash: str = ""  # digest of its class's source ("" when unknown)
    answering: bool = True  # False: alive by Ray's account but busy (its answer timed out)


@dataclass
class Observed:
    online: bool = False  # False: no cluster reachable, the plan is offline
    replicas: list[ReplicaState] = field(default_factory=list)

    def of(self, actor: str) -> list[ReplicaState]:
        return sorted((r for r in self.replicas if r.actor == actor), key=lambda r: r.replica)


@dataclass
class Action:
    kind: str  # create | keep | replace | delete
    actor: str
    replicas: list[int]
    reason: str


@dataclass
class ServerRow:
    actor: str
    replica: int
    server: str
    protocol: str
    url: str  # port "auto" until bound


@dataclass
class LinkRow:
    name: str
    source: str
    target: str
    device: str
    transport: str
    reason: str


@dataclass
class Plan:
    name: str
    namespace: str
    online: bool
    actions: list[Action]
    waves: list[list[str]]  # start order: actors in one wave start together, after the previous wave
    servers: list[ServerRow]
    links: list[LinkRow]
    resources: dict[str, float]
    upload: dict | None = None  # what travels to a cluster that is not this machine: folder, files, bytes

    @property
    def changes(self) -> list[Action]:
        return [a for a in self.actions if a.kind != "keep"]

    def to_dict(self) -> dict:
        return asdict(self)


def actor_config(spec: Spec, name: str) -> dict:
    """Everything that, when changed, needs the actor's replicas replaced (not the number of
    replicas, its own or its peers': that changes in place)."""
    actor = spec.actors[name]
    peers = {}
    for key, ref in actor.connect.items():
        peer, _, server = ref.partition(".")
        if peer in spec.actors:  # (not its replica count: peers' endpoints are updated in place)
            target = next((s for s in spec.actors[peer].servers if s.name == server), None)
            peers[key] = {"server": target.model_dump(mode="json") if target else None}
    links = [link.model_dump(mode="json", by_alias=True) for link in spec.links
             if link.from_.startswith(name + ".") or any(t.startswith(name + ".") for t in link.to)]
    # `replicas` is left out: scaling starts or stops only the replicas added or removed.
    config = {"actor": actor.model_dump(mode="json", by_alias=True, exclude={"when", "replicas"}),
              "ray": spec.ray.model_dump(mode="json", exclude={"address"}), "peers": peers, "links": links}
    if spec.ray.placement:  # one placement group holds every replica: its layout is everyone's config
        config["layout"] = [(n, a.replicas, a.resources.model_dump(mode="json")) for n, a in spec.actors.items()]
    return config


def config_hash(spec: Spec, name: str) -> str:
    text = json.dumps(actor_config(spec, name), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def start_waves(spec: Spec) -> list[list[str]]:
    """Topological levels of the connect graph (Kahn): peers start before those that need them."""
    deps = {a: {ref.split(".", 1)[0] for ref in actor.connect.values()} & set(spec.actors)
            for a, actor in spec.actors.items()}
    waves, done = [], set()
    while len(done) < len(deps):
        wave = sorted(a for a, d in deps.items() if a not in done and d <= done)
        if not wave:  # a cycle; lint reports it, the rest still get an order
            wave = sorted(set(deps) - done)
        waves.append(wave)
        done.update(wave)
    return waves


def choose_transport(device: str, source: Topology | None, target: Topology | None) -> str | None:
    """`auto` as a pure function of where the two ends run; None when that is not known yet."""
    if source is None or target is None:
        return None
    same_node = source.node_id == target.node_id
    if device == "gpu":
        return "cuda_ipc" if same_node else "nccl"
    return "shm" if same_node else "object_store"


def _server_url(protocol: str, host: str, port: int | str) -> str:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6 in brackets
    return f"http://{address}" if protocol == "http" else address


def make_plan(spec: Spec, observed: Observed | None = None, *, single_node: bool | None = None,
              topology: dict[tuple[str, int], Topology] | None = None, code: dict[str, str] | None = None) -> Plan:
    """Desired spec + observed state → actions with reasons, start order, servers, links, totals.

    single_node: True when every replica will share one node (embedded Ray, or a STRICT_PACK
    placement), so `auto` can be decided before anything runs. code: actor -> digest of its
    class's source (oobspec.code); a running replica with another digest is replaced.
    """
    code = code or {}
    observed = observed or Observed()
    waves = start_waves(spec)
    actions: list[Action] = []
    restarted: set[str] = set()  # actors whose replicas get new processes (new ports if dynamic)
    for wave in waves:
        for name in wave:
            actor = spec.actors[name]
            want = config_hash(spec, name)
            have = {r.replica: r for r in observed.of(name)}
            dynamic_peers = sorted(
                ref.split(".", 1)[0] for ref in actor.connect.values()
                if ref.split(".", 1)[0] in restarted and _port_of(spec, ref) == 0)
            if not have:
                actions.append(Action("create", name, list(range(actor.replicas)), "new actor"))
                restarted.add(name)
                continue
            recoded = {i for i, r in have.items() if r.code_hash and code.get(name) and r.code_hash != code[name]}
            stale = [i for i, r in sorted(have.items()) if i < actor.replicas
                     and (r.config_hash != want or not r.alive or i in recoded)]
            missing = [i for i in range(actor.replicas) if i not in have]
            extra = [i for i in sorted(have) if i >= actor.replicas]
            if dynamic_peers:
                stale = sorted(set(stale) | {i for i in have if i < actor.replicas})
            if stale:
                dead = [i for i in stale if not have[i].alive]
                reason = ("replica not alive" if dead and len(dead) == len(stale)
                          else f"peer {', '.join(dynamic_peers)} restarts on a new port" if dynamic_peers
                          and all(have[i].config_hash == want for i in stale) and not recoded
                          else "code changed" if all(have[i].config_hash == want for i in stale if have[i].alive)
                          else "spec changed")
                actions.append(Action("replace", name, stale, reason))
                restarted.add(name)
            if missing:
                actions.append(Action("create", name, missing, f"replicas {len(have)} -> {actor.replicas}"))
            if extra:
                actions.append(Action("delete", name, extra, f"replicas {len(have)} -> {actor.replicas}"))
            kept = [i for i in sorted(have) if i < actor.replicas and i not in stale]
            busy = [i for i in kept if not have[i].answering]
            if busy:  # alive by Ray's account, only slow to answer: never replaced for that
                actions.append(Action("keep", name, busy, "unchanged (busy: not answering)"))
            if len(busy) < len(kept):
                actions.append(Action("keep", name, [i for i in kept if i not in busy], "unchanged"))
    for name in sorted({r.actor for r in observed.replicas} - set(spec.actors)):
        actions.append(Action("delete", name, [r.replica for r in observed.of(name)], "no longer in the spec"))

    servers = []
    live = {(r.actor, r.replica): r for r in observed.replicas}
    for name, actor in spec.actors.items():
        for i in range(actor.replicas):
            state = live.get((name, i))
            for server in actor.servers:
                url = state.endpoints.get(server.name) if state and state.config_hash == config_hash(spec, name) else None
                port = server.port + i if server.port else "auto"
                servers.append(ServerRow(name, i, server.name, server.protocol,
                                         url or _server_url(server.protocol, server.host, port)))

    links = []
    topology = dict(topology or {})
    for r in observed.replicas:
        if r.node_id:
            topology.setdefault((r.actor, r.replica), Topology(r.node_id, r.gpu_uuid))
    for link in spec.links:
        src_actor, _, src_buf = link.from_.partition(".")
        device = spec.actors[src_actor].buffers[src_buf].device if src_actor in spec.actors and \
            src_buf in spec.actors[src_actor].buffers else "cpu"
        for target in link.to:
            if link.transport != "auto":
                links.append(LinkRow(link.name, link.from_, target, device, link.transport, "set in the spec"))
                continue
            dst_actor = target.split(".", 1)[0]
            ends = [topology.get((src_actor, 0))] + [topology.get((dst_actor, i))
                                                     for i in range(spec.actors[dst_actor].replicas)] \
                if dst_actor in spec.actors else []
            if ends and all(ends):
                picks = sorted({choose_transport(device, ends[0], t) for t in ends[1:]})
                links.append(LinkRow(link.name, link.from_, target, device, "/".join(picks),
                                     "replicas on one node" if len({e.node_id for e in ends}) == 1
                                     else "replicas on several nodes"))
            elif single_node:
                links.append(LinkRow(link.name, link.from_, target, device,
                                     choose_transport(device, Topology("local"), Topology("local")), "one node"))
            else:
                options = "cuda_ipc or nccl" if device == "gpu" else "shm or object_store"
                links.append(LinkRow(link.name, link.from_, target, device, f"auto ({options})",
                                     "decided when the replicas are placed"))

    totals = {"actors": 0, "cpus": 0.0, "gpus": 0.0, "memory_bytes": 0}
    for actor in spec.actors.values():
        totals["actors"] += actor.replicas
        totals["cpus"] += (actor.resources.cpus or 0) * actor.replicas
        totals["gpus"] += actor.resources.gpus * actor.replicas
        totals["memory_bytes"] += (memory_bytes(actor.resources.memory) or 0) * actor.replicas
    return Plan(spec.name, spec.namespace, observed.online, actions, waves, servers, links, totals)


def _port_of(spec: Spec, ref: str) -> int | None:
    peer, _, server = ref.partition(".")
    for s in spec.actors.get(peer, None).servers if peer in spec.actors else ():
        if s.name == server:
            return s.port
    return None

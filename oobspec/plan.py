"""Phase 5 — plan: a pure function of the desired spec and the observed cluster state.

No Ray here. The runtime gathers `Observed`, calls `make_plan`, and executes the actions;
`oob plan` prints the same Plan, so what you see is what apply does.
"""
from __future__ import annotations

import graphlib
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum

from .contract import Ref, Topology, server_url
from .models import Spec, memory_bytes
from .nodes import NodeState, capacity_warnings, migrate_warnings, no_room, no_room_text, wait_warnings
from .plan_links import LinkReason, LinkRow, link_rows  # noqa: F401 (LinkReason: importers know it from here)


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
    ports: dict[str, int] = field(default_factory=dict)  # server name -> the port it holds


@dataclass
class Observed:
    online: bool = False  # False: no cluster reachable, the plan is offline
    replicas: list[ReplicaState] = field(default_factory=list)
    nodes: list[NodeState] = field(default_factory=list)  # empty: not looked at (offline, or a test)

    def of(self, actor: str) -> list[ReplicaState]:
        return sorted((r for r in self.replicas if r.actor == actor), key=lambda r: r.replica)


class ActionKind(StrEnum):
    CREATE = "create"
    KEEP = "keep"
    REPLACE = "replace"
    DELETE = "delete"


class Reason(StrEnum):
    NEW = "new-actor"
    SPEC = "spec-changed"
    CODE = "code-changed"
    DEAD = "not-alive"
    SCALED = "scaled"
    REMOVED = "removed"
    UNCHANGED = "unchanged"
    BUSY = "busy"  # alive, too busy to answer: never replaced for that
    RESTART = "restart"  # unchanged, replaced because `oob restart` asks


class Strategy(StrEnum):
    ROLLING = "rolling"  # successor first, sharing the port; then the predecessor drains
    STOP_FIRST = "stop-first"


class StopFirst(StrEnum):
    """Why a replace cannot roll."""

    CONFIGURED = "configured"  # update: stop-first
    COMMAND = "command"  # a wrapped process cannot share its port
    TCP = "tcp"  # a tcp server is bound by the user's own code
    NO_SERVERS = "no-servers"  # nothing out-of-band to keep serving
    LINKS = "links"  # its buffers are wired into links
    PLACEMENT = "placement"  # its placement group has no room for a stand-in
    DEAD = "dead"  # nothing running to hand over from
    NO_ROOM = "no-room"  # its node has no room for a stand-in (no_room: stop-first)


@dataclass
class Action:
    kind: ActionKind
    actor: str
    replicas: list[int]
    reason: Reason
    strategy: Strategy | None = None  # replace only
    stop_first: StopFirst | None = None  # why a replace is stop-first
    was: int | None = None  # scaled: the replica count before
    now: int | None = None  # scaled: the replica count after
    room: dict | None = None  # no-room: {"node": its address, "short": {resource: [needed, free]}}

    def describe(self) -> str:
        """The reason in words (the fields above are for machines)."""
        text = f"replicas {self.was} -> {self.now}" if self.reason == Reason.SCALED else _REASONS[self.reason]
        if self.strategy == Strategy.ROLLING:
            text += "; rolling, no downtime"
        elif self.stop_first is not None and self.stop_first != StopFirst.DEAD:
            text += f"; stop-first: {no_room_text(self.room) if self.room else _STOP_FIRST[self.stop_first]}"
        return text


_REASONS = {Reason.NEW: "new actor", Reason.SPEC: "spec changed", Reason.CODE: "code changed",
            Reason.DEAD: "replica not alive", Reason.REMOVED: "no longer in the spec", Reason.UNCHANGED: "unchanged",
            Reason.BUSY: "unchanged (busy: not answering)", Reason.RESTART: "restart asked for"}
_STOP_FIRST = {StopFirst.CONFIGURED: "update: stop-first in the spec",
               StopFirst.COMMAND: "a wrapped process cannot share its port",
               StopFirst.TCP: "its tcp server is bound by its own code", StopFirst.NO_SERVERS: "it has no servers",
               StopFirst.LINKS: "its buffers are wired into links",
               StopFirst.PLACEMENT: "its placement group has no room for a stand-in", StopFirst.DEAD: "not running",
               StopFirst.NO_ROOM: "its node has no room for a stand-in"}


class StepKind(StrEnum):
    STOP = "stop"  # drain and stop replicas (deleted, or replaced stop-first)
    PLACE = "place"  # the placement group
    START = "start"  # start replicas; the start steps of one wave run together
    ROLL = "roll"  # replace one replica: stand-in, drain, successor, retire the stand-in
    WIRE = "wire"  # links
    UPDATE = "update"  # kept replicas learn replica counts and peers' endpoints, live


@dataclass
class Step:
    kind: StepKind
    actor: str | None = None
    replicas: list[int] = field(default_factory=list)
    wave: int | None = None


@dataclass
class ServerRow:
    actor: str
    replica: int
    server: str
    protocol: str
    url: str  # port "auto" until bound


@dataclass
class Plan:
    name: str
    namespace: str
    online: bool
    actions: list[Action]
    waves: list[list[str]]  # start order: actors in one wave start together, after the previous wave
    steps: list[Step]  # what apply carries out, in this order
    servers: list[ServerRow]
    links: list[LinkRow]
    resources: dict[str, float]
    upload: dict | None = None  # what travels to a cluster that is not this machine: folder, files, bytes
    warnings: list[str] = field(default_factory=list)  # what the cluster cannot hold, or holds badly

    @property
    def changes(self) -> list[Action]:
        return [a for a in self.actions if a.kind != ActionKind.KEEP]

    def stages(self) -> list[list[Step]]:
        """The steps as apply numbers them and `oob plan` lists them: one wave's starts together."""
        together = lambda s: (True, s.wave) if s.kind == StepKind.START else (False, id(s))  # noqa: E731
        return [list(stage) for _, stage in itertools.groupby(self.steps, together)]

    def to_dict(self) -> dict:
        return asdict(self)


def actor_config(spec: Spec, name: str) -> dict:
    """Everything that, when changed, needs the actor's replicas replaced (not the number of
    replicas, its own or its peers': that changes in place; nor how it is updated, nor how many
    share a node: `max_per_node` places new replicas, the running ones stay where they are; `labels`
    do count, a replica on a node without them must move)."""
    actor = spec.actors[name]
    peers = {}
    for key, text in actor.connect.items():
        ref = Ref.parse(text)
        if ref.actor in spec.actors:  # (not its replica count: peers' endpoints are updated in place)
            target = next((s for s in spec.actors[ref.actor].servers if s.name == ref.member), None)
            peers[key] = {"server": target.model_dump(mode="json") if target else None}
    links = [link.model_dump(mode="json", by_alias=True) for link in spec.links if name in link_actors(link)]
    exclude = {"when", "replicas", "drain", "update", "max_per_node", "no_room"}
    config = {"actor": actor.model_dump(mode="json", by_alias=True, exclude=exclude),
              "ray": spec.ray.model_dump(mode="json", exclude={"address"}), "peers": peers, "links": links}
    if spec.ray.placement:  # one placement group holds every replica: its layout is everyone's config
        config["layout"] = [(n, a.replicas, a.resources.model_dump(mode="json")) for n, a in spec.actors.items()]
    return config


def link_actors(link) -> set[str]:
    return {Ref.parse(link.from_).actor} | {Ref.parse(t).actor for t in link.to}


def config_hash(spec: Spec, name: str) -> str:
    text = json.dumps(actor_config(spec, name), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def start_waves(spec: Spec) -> list[list[str]]:
    """Levels of the connect graph: peers start before those that need them. A cycle (lint
    reports it) starts what remains together, after the rest."""
    deps = {a: {Ref.parse(ref).actor for ref in actor.connect.values()} & set(spec.actors)
            for a, actor in spec.actors.items()}
    order = graphlib.TopologicalSorter(deps)
    try:
        order.prepare()
    except graphlib.CycleError:
        done, waves = set(), []
        while len(done) < len(deps):
            wave = sorted(a for a, d in deps.items() if a not in done and d <= done) or sorted(set(deps) - done)
            waves.append(wave)
            done.update(wave)
        return waves
    waves = []
    while order.is_active():
        wave = sorted(order.get_ready())
        waves.append(wave)
        order.done(*wave)
    return waves


def strategy_of(spec: Spec, name: str) -> tuple[Strategy, StopFirst | None]:
    """How a changed, running replica of this actor is replaced."""
    actor = spec.actors[name]
    if actor.update == "stop-first":
        return Strategy.STOP_FIRST, StopFirst.CONFIGURED
    if actor.command is not None:
        return Strategy.STOP_FIRST, StopFirst.COMMAND
    if any(s.protocol == "tcp" for s in actor.servers):
        return Strategy.STOP_FIRST, StopFirst.TCP
    if not actor.servers:
        return Strategy.STOP_FIRST, StopFirst.NO_SERVERS
    if any(name in link_actors(link) for link in spec.links):
        return Strategy.STOP_FIRST, StopFirst.LINKS
    if spec.ray.placement:
        return Strategy.STOP_FIRST, StopFirst.PLACEMENT
    return Strategy.ROLLING, None


def make_plan(spec: Spec, observed: Observed | None = None, *, single_node: bool | None = None,
              topology: dict[tuple[str, int], Topology] | None = None, code: dict[str, str] | None = None,
              restart: set[str] | None = None, migrate_req: bool | None = None) -> Plan:
    """Desired spec + observed state → actions with reasons, the steps apply carries out, start
    order, servers, links, totals, warnings.

    single_node: True when every replica will share one node (embedded Ray, or a STRICT_PACK
    placement), so `auto` can be decided before anything runs. code: actor -> digest of its
    class's source (oobspec.code); a running replica with another digest is replaced. restart:
    actors whose running replicas are replaced even when unchanged (`oob restart`). migrate_req:
    this machine's net.ipv4.tcp_migrate_req (None: unknown, or the cluster is elsewhere), read by
    the caller so the planner stays pure."""
    code = code or {}
    observed = observed or Observed()
    waves = start_waves(spec)
    actions: list[Action] = []
    for wave in waves:
        for name in wave:
            actions += _actions_of(spec, name, {r.replica: r for r in observed.of(name)}, code.get(name),
                                   name in (restart or ()), observed.nodes)
    for name in sorted({r.actor for r in observed.replicas} - set(spec.actors)):
        actions.append(Action(ActionKind.DELETE, name, [r.replica for r in observed.of(name)], Reason.REMOVED))
    live = {(r.actor, r.replica): r for r in observed.replicas}
    warnings = capacity_warnings(spec, observed.nodes) if observed.online else []
    for a in actions:
        if a.kind == ActionKind.REPLACE and a.strategy == Strategy.ROLLING:
            where = {i: live[a.actor, i].node_id for i in a.replicas}
            warnings += wait_warnings(a.actor, spec.actors[a.actor], where, observed.nodes)
    warnings += migrate_warnings(spec, migrate_req)
    steps = _steps(spec, waves, actions)
    servers = []
    addresses = {n.node_id: n.address for n in observed.nodes if n.alive}
    for name, actor in spec.actors.items():
        for i in range(actor.replicas):
            state = live.get((name, i))
            for server in actor.servers:
                url = state.endpoints.get(server.name) if state and state.config_hash == config_hash(spec, name) else None
                port = (server.port if server.shared else server.port + i) if server.port else "auto"
                host = server.host if server.host != "node" else addresses.get(state.node_id, "<node>") if state else "<node>"
                servers.append(ServerRow(name, i, server.name, server.protocol,
                                         url or server_url(server.protocol, host, port,
                                                           getattr(server, "tls", None) is not None)))

    placed = {(r.actor, r.replica): Topology(r.node_id, r.gpu_uuid) for r in observed.replicas if r.node_id}
    links = link_rows(spec, placed | (topology or {}), single_node)
    totals = {"actors": 0, "cpus": 0.0, "gpus": 0.0, "memory_bytes": 0}
    for actor in spec.actors.values():
        totals["actors"] += actor.replicas
        totals["cpus"] += (actor.resources.cpus or 0) * actor.replicas
        totals["gpus"] += actor.resources.gpus * actor.replicas
        totals["memory_bytes"] += (memory_bytes(actor.resources.memory) or 0) * actor.replicas
    return Plan(spec.name, spec.namespace, observed.online, actions, waves, steps, servers, links, totals,
                warnings=warnings)


def _actions_of(spec: Spec, name: str, have: dict[int, ReplicaState], code: str | None,
                restart: bool = False, nodes: list[NodeState] | None = None) -> list[Action]:
    actor = spec.actors[name]
    if not have:
        return [Action(ActionKind.CREATE, name, list(range(actor.replicas)), Reason.NEW)]
    want = config_hash(spec, name)
    out = []
    wanted = [i for i in sorted(have) if i < actor.replicas]
    dead = [i for i in wanted if not have[i].alive]
    changed = [i for i in wanted if have[i].alive and have[i].config_hash != want]
    recoded = [i for i in wanted if have[i].alive and i not in changed and (restart or code and have[i].code_hash
                                                                            and have[i].code_hash != code)]
    if dead:
        out.append(Action(ActionKind.REPLACE, name, dead, Reason.DEAD, Strategy.STOP_FIRST, StopFirst.DEAD))
    strategy, why = strategy_of(spec, name)
    if changed or recoded:
        reason = Reason.SPEC if changed else Reason.RESTART if restart else Reason.CODE
        rolling = sorted(changed + recoded)
        if strategy == Strategy.ROLLING and actor.no_room == "stop-first":  # stand-ins start on their replica's node
            for replicas, room in no_room(actor, {i: have[i].node_id for i in rolling}, nodes or []):
                out.append(Action(ActionKind.REPLACE, name, replicas, reason, Strategy.STOP_FIRST, StopFirst.NO_ROOM,
                                  room=room))
                rolling = [i for i in rolling if i not in replicas]
        if rolling:
            out.append(Action(ActionKind.REPLACE, name, rolling, reason, strategy, why))
    missing = [i for i in range(actor.replicas) if i not in have]
    if missing:
        out.append(Action(ActionKind.CREATE, name, missing, Reason.SCALED, was=len(have), now=actor.replicas))
    extra = [i for i in sorted(have) if i >= actor.replicas]
    if extra:
        out.append(Action(ActionKind.DELETE, name, extra, Reason.SCALED, was=len(have), now=actor.replicas))
    kept = [i for i in wanted if i not in dead + changed + recoded]
    busy = [i for i in kept if not have[i].answering]
    if busy:  # alive by Ray's account, only slow to answer: never replaced for that
        out.append(Action(ActionKind.KEEP, name, busy, Reason.BUSY))
    if len(busy) < len(kept):
        out.append(Action(ActionKind.KEEP, name, [i for i in kept if i not in busy], Reason.UNCHANGED))
    return out


def _steps(spec: Spec, waves: list[list[str]], actions: list[Action]) -> list[Step]:
    """The order apply works in: stop what goes (or is replaced stop-first), place, start wave
    by wave (peers first) rolling each changed replica one at a time, wire links, update the
    replicas kept in place."""
    stops = [a for a in actions if a.kind == ActionKind.DELETE
             or (a.kind == ActionKind.REPLACE and a.strategy == Strategy.STOP_FIRST)]
    steps = [Step(StepKind.STOP, a.actor, a.replicas) for a in stops]
    if spec.ray.placement:
        steps.append(Step(StepKind.PLACE))
    for k, wave in enumerate(waves):
        for name in wave:
            starting = sorted(i for a in actions if a.actor == name for i in a.replicas
                              if a.kind == ActionKind.CREATE or (a.kind == ActionKind.REPLACE
                                                                 and a.strategy == Strategy.STOP_FIRST))
            if starting:
                steps.append(Step(StepKind.START, name, starting, k))
        for name in wave:
            for a in actions:
                if a.actor == name and a.kind == ActionKind.REPLACE and a.strategy == Strategy.ROLLING:
                    steps += [Step(StepKind.ROLL, name, [i], k) for i in a.replicas]
    if spec.links:
        steps.append(Step(StepKind.WIRE))
    if any(a.kind == ActionKind.KEEP for a in actions):
        steps.append(Step(StepKind.UPDATE))
    return steps

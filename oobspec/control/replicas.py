"""What each replica is started with: its config (the typed contract), runtime_env, Ray
options and actor class. Pure reading of the spec, plus the endpoints seen so far."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..contract import LinkRole, Ref, ReplicaConfig, ServerConfig, replica_name, surge_name
from ..errors import ApplyError
from ..models import Spec, memory_bytes
from ..nodes import NodeState, node_matches
from ..plan import config_hash
from ..replica.context import endpoint_env


NODE_ID_LABEL = "ray.io/node-id"  # every Ray node carries it


def pick_node(nodes: list[NodeState], counts: dict[str, int], limit: int) -> str | None:
    """The node with the fewest of the actor's replicas, below `limit` (ties: by address)."""
    room = [n for n in nodes if counts.get(n.node_id, 0) < limit]
    best = min(room, key=lambda n: (counts.get(n.node_id, 0), n.address), default=None)
    return best.node_id if best else None


class Builder:
    def __init__(self, spec: Spec, progress: Callable[[str], None], base_dir: Path | None = None):
        self.spec, self.progress = spec, progress
        source = spec._source
        self.base_dir = base_dir or (source.base_dir if source else Path.cwd())
        self.endpoints: dict[str, dict[str, list[str]]] = {}  # actor -> server -> urls, as known now
        self.code: dict[str, str] = {}  # actor -> digest of its class's source
        self.shipped: dict | None = None  # runtime_env of uploaded code, on a remote cluster
        self.by_reference: set[str] = set()  # actors whose module could not travel by value
        self.placement = None
        self.bundle_index: dict[tuple[str, int], int] = {}
        self._classes: dict[str, object] = {}
        # actor -> the user's class, when it does not come from importing the spec's module (a
        # revision's own class, as it ran then); None: import it
        self.class_source: Callable[[str], type | None] = lambda _name: None
        self.pickles: dict[str, bytes] = {}  # actor -> its class pickled by value (for revisions)
        # Where replicas run (or were sent): (actor, i) -> node id; the executor keeps it current.
        self.where: dict[tuple[str, int], str] = {}
        # Replicas whose stand-in and successor start on this node (a rolling hand-over).
        self.pins: dict[tuple[str, int], str] = {}
        # The cluster's alive nodes, asked for once, when an actor spreads (max_per_node).
        self.node_source: Callable[[], list[NodeState]] = lambda: []
        self._nodes: list[NodeState] | None = None

    def peer_endpoints(self, name: str) -> dict[str, list[str]]:
        """connect key -> the peers' URLs, one per replica (one per node for a shared server)."""
        out = {}
        for key, text in self.spec.actors[name].connect.items():
            ref = Ref.parse(text)
            out[key] = list(dict.fromkeys(self.endpoints.get(ref.actor, {}).get(ref.member, [])))
        return out

    def peer_replicas(self, name: str) -> dict[str, int]:
        """Each actor this one connects to -> its replica count."""
        peers = {Ref.parse(text).actor for text in self.spec.actors[name].connect.values()}
        return {peer: self.spec.actors[peer].replicas for peer in sorted(peers) if peer in self.spec.actors}

    def watchers(self, name: str) -> tuple[str, ...]:
        """The actors that connect to this one."""
        return tuple(sorted(other for other, actor in self.spec.actors.items()
                            if any(Ref.parse(text).actor == name for text in actor.connect.values())))

    def links_of(self, name: str) -> dict[str, LinkRole]:
        out = {}
        for link in self.spec.links:
            source, targets = Ref.parse(link.from_), tuple(Ref.parse(t) for t in link.to)
            mine = [t for t in targets if t.actor == name]
            if source.actor == name:
                out[link.name] = LinkRole(link.name, source, targets, link.transport, "source", source_buffer=source.member,
                                          target_buffer=mine[0].member if mine else None, buffering=link.buffering,
                                          timeout=link.timeout)
            elif mine:
                out[link.name] = LinkRole(link.name, source, targets, link.transport, "target",
                                          target_buffer=mine[0].member, buffering=link.buffering, timeout=link.timeout)
        return out

    def config(self, name: str, index: int, shared_ports: frozenset[int] = frozenset(),
               surge: bool = False) -> ReplicaConfig:
        actor = self.spec.actors[name]
        endpoints = self.peer_endpoints(name)
        targets = {t for link in self.spec.links for t in link.to}
        return ReplicaConfig(
            deployment=self.spec.name, namespace=self.spec.namespace, actor=name, replica=index,
            replicas=actor.replicas, config_hash=config_hash(self.spec, name), code_hash=self.code.get(name, ""),
            restarts=actor.restarts, command=list(actor.command) if actor.command else None,
            cwd=actor.cwd or ".", spec_dir=None if self.shipped else str(self.base_dir.resolve()),
            servers=[ServerConfig.of(s, port=s.port + index if s.port and not s.shared else s.port)
                     for s in actor.servers],
            endpoints=endpoints, buffers=dict(actor.buffers),
            # A stand-in takes no part in links: its buffers are its own, not the replica's segments.
            link_targets=frozenset() if surge else frozenset(b for b in actor.buffers if f"{name}.{b}" in targets),
            links={} if surge else self.links_of(name),
            sys_path=[str(self.base_dir), os.getcwd()],
            module=actor.class_.partition(":")[0] if actor.class_ else None,
            # Auth tokens travel as constructor arguments, not runtime_env: Ray's runtime-env
            # agent logs env_vars, and a secret must never reach a log.
            secrets={s.auth.token_env: os.environ[s.auth.token_env] for s in actor.servers
                     if s.auth and s.auth.token_env in os.environ and s.auth.token_env not in actor.env},
            tls=self.tls_of(name),
            env=self.replica_env(name, index, endpoints), shared_ports=shared_ports, surge=surge,
            connect={key: Ref.parse(text) for key, text in actor.connect.items()},
            peer_replicas=self.peer_replicas(name), watchers=() if surge else self.watchers(name))

    def tls_of(self, name: str) -> dict[str, tuple[bytes, bytes]]:
        """Certificates and keys travel as PEM in the config (like tokens): a replica on any node
        has them, and nothing is read from a path that only this machine has."""
        out = {}
        for server in self.spec.actors[name].servers:
            tls = getattr(server, "tls", None)
            if tls is not None:
                try:
                    out[server.name] = ((self.base_dir / tls.cert).read_bytes(), (self.base_dir / tls.key).read_bytes())
                except OSError as exc:
                    raise ApplyError(f"actor {name}: server {server.name}: cannot read its tls files: "
                                     f"{exc.strerror}: {exc.filename}") from None
        return out

    def replica_env(self, name: str, index: int, endpoints: dict) -> dict[str, str]:
        """OOB_* variables, set in the replica's environment before the user's __init__ runs."""
        out = {"OOB_REPLICA": str(index), "OOB_REPLICAS": str(self.spec.actors[name].replicas),
               "OOB_DEPLOYMENT": self.spec.name}
        return out | endpoint_env(endpoints)

    def runtime_env(self, name: str) -> dict:
        """The same for every replica of an actor (and for every actor without `env`), so Ray
        sets it up once and can reuse its workers; per-replica variables travel in the config."""
        actor = self.spec.actors[name]
        env = dict(self.spec.ray.runtime_env or {})
        env_vars = dict(env.get("env_vars") or {})
        env_vars.update(actor.env)
        if name in self.by_reference:  # its module did not travel by value: the workers import it
            paths = [str(self.base_dir), os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            env_vars["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        if env_vars:
            env["env_vars"] = env_vars
        if self.shipped:  # a cluster that is not this machine: the spec's folder and oobspec travel
            env.setdefault("working_dir", self.shipped["working_dir"])
            env["py_modules"] = list(env.get("py_modules") or []) + self.shipped["py_modules"]
        # No runtime_env at all when none is needed: Ray then starts the actor in a plain worker.
        return env

    def actor_class(self, name: str):
        if name not in self._classes:
            self._classes[name] = self._make_class(name)
        return self._classes[name]

    def _make_class(self, name: str):
        import ray
        from ..imports import import_object, import_path, ship_by_value
        from ..replica.actor import make_actor_class, make_command_class
        actor = self.spec.actors[name]
        if actor.command is not None:
            return ray.remote(make_command_class())
        user_cls = self.class_source(name)
        from_revision = user_cls is not None  # unpickled by value: it travels by value again
        if user_cls is None:
            with import_path(self.base_dir):
                try:
                    user_cls = import_object(actor.class_)
                except ImportError as exc:
                    raise ApplyError(f"actor {name}: class '{actor.class_}' does not import: {exc}") from None
        actor_cls = make_actor_class(user_cls)
        # The user's module travels inside the pickled class: workers need no PYTHONPATH (and
        # no runtime_env), and a handle taken in any process has the real method signatures.
        if from_revision or ship_by_value(actor_cls):
            from ray import cloudpickle
            self.pickles[name] = cloudpickle.dumps(user_cls)
        else:
            self.by_reference.add(name)
            self.progress(f"actor {name}: its module cannot be pickled by value; the workers import it "
                          "from the spec's folder (handles in other processes need it importable too)")
        return ray.remote(actor_cls)

    def options(self, name: str, index: int, surge: bool = False) -> dict:
        actor = self.spec.actors[name]
        res = actor.resources
        # Named actors that are not detached die with their last handle; the embedded mode
        # tears them down itself, and its Ray goes with the foreground process anyway.
        opts = {"name": surge_name(name, index) if surge else replica_name(name, index), "namespace": self.spec.namespace,
                "max_restarts": 0 if surge else actor.restarts, "runtime_env": self.runtime_env(name),
                "max_concurrency": 1000, "lifetime": "detached"}
        if res.cpus is not None:
            opts["num_cpus"] = res.cpus
        if res.gpus:
            opts["num_gpus"] = res.gpus
        if res.memory is not None:
            opts["memory"] = memory_bytes(res.memory)
        if res.custom:
            opts["resources"] = dict(res.custom)
        if self.placement is not None and not surge:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.placement, placement_group_bundle_index=self.bundle_index[(name, index)])
            opts.setdefault("num_cpus", 0.01)
        elif self.placement is None:
            opts.update(self.node_options(name, index, surge))
        return opts

    def node_options(self, name: str, index: int, surge: bool) -> dict:
        """Which nodes a replica may run on (Ray's label_selector) and which it goes to.

        A stand-in starts on its replica's node or not at all (SO_REUSEPORT hands a port over on
        one host only); a successor prefers that node while it lives. With `max_per_node`, the
        nodes that hold enough of the actor's other replicas are excluded by node id: the
        selector stays with the actor, so when Ray restarts it after its node died it waits for
        a node with room (a node that comes back has a new id) instead of crowding another."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        pin = self.pins.get((name, index))
        if surge:
            return {"scheduling_strategy": NodeAffinitySchedulingStrategy(pin, soft=False)} if pin else {}
        actor, opts = self.spec.actors[name], {}
        selector = dict(actor.labels)
        target = pin
        if actor.max_per_node:
            counts = self._counts(name, index)
            full = sorted(node for node, n in counts.items() if n >= actor.max_per_node and node != pin)
            if full:
                selector[NODE_ID_LABEL] = f"!in({','.join(full)})"
            if target is None:
                target = pick_node([n for n in self.nodes() if node_matches(actor.labels, n.labels)], counts, actor.max_per_node)
                if target is not None:
                    self.where[(name, index)] = target
        if selector:
            opts["label_selector"] = selector
        if target is not None:  # soft: a dead node is no reason to stay down; a pin waits for room
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(target, soft=True,
                                                                         _spill_on_unavailable=pin is None)
        return opts

    def nodes(self) -> list[NodeState]:
        if self._nodes is None:
            self._nodes = self.node_source()
        return self._nodes

    def _counts(self, name: str, index: int) -> dict[str, int]:
        """node id -> how many of the actor's other replicas run (or were sent) there."""
        counts: dict[str, int] = {}
        for (actor, i), node in self.where.items():
            if actor == name and i != index and i < self.spec.actors[name].replicas:
                counts[node] = counts.get(node, 0) + 1
        return counts

    def start(self, name: str, index: int, cfg: ReplicaConfig):
        """Create the replica (or its stand-in); returns its handle."""
        actor = self.spec.actors[name]
        return self.actor_class(name).options(**self.options(name, index, cfg.surge)).remote(
            cfg, *actor.args, **actor.kwargs)

    def bundles(self) -> list[dict]:
        out, self.bundle_index = [], {}
        for name, actor in self.spec.actors.items():
            for i in range(actor.replicas):
                res = actor.resources
                bundle = {"CPU": res.cpus or 0.01}
                if res.gpus:
                    bundle["GPU"] = res.gpus
                if res.memory is not None:
                    bundle["memory"] = memory_bytes(res.memory)
                bundle.update(res.custom)
                self.bundle_index[(name, i)] = len(out)
                out.append(bundle)
        return out

    def resources_text(self, name: str) -> str:
        res = self.spec.actors[name].resources
        parts = [f"{res.cpus:g} CPU" if res.cpus else "", f"{res.gpus:g} GPU" if res.gpus else "",
                 f"{res.memory} memory" if res.memory else ""] + [f"{v:g} {k}" for k, v in res.custom.items()]
        return ", ".join(p for p in parts if p) or "a worker slot"

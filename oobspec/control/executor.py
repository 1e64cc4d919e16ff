"""Carries out a plan's steps on a cluster, in the plan's order, and keeps one promise: whatever
fails, every replica that ran before the apply still runs afterwards, at its old or its new
version, and a port that was served is served throughout.

`Steps` walks the plan (the start steps of one wave run together); `Executor` does each kind
of step through a `Cluster` (Ray in `ray_cluster.py`, a fake in the fault-injection tests). A
replace that rolls keeps the replica's ports served throughout:

    stand-in `_oob-surge-<actor>-<i>` starts beside the replica, sharing its ports
    -> the replica drains (unhealthy, new connections steered to the stand-in, in-flight
       requests finish) and exits, which frees its Ray name
    -> the successor `<actor>-<i>` starts, sharing the ports with the stand-in (the old
       ports and, for a port move, the new ones the stand-in holds)
    -> the stand-in drains and exits.

When a step fails the executor stops walking and settles: a stand-in that failed is removed
and the replica it stood beside keeps serving; a replica that was stopped (stop-first, or
drained for its successor) and has no working successor starts again at the version it ran,
from the revision recorded in the cluster, sharing the ports with the stand-in that served
them meanwhile, which then retires. Replicas that became ready stay: starting in this apply is
never a reason to stop what holds traffic. The error then says which replica runs which version.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from ..contract import SURGE_PREFIX, ReplicaConfig, ReplicaInfo, replica_name, split_name, surge_name
from ..errors import ApplyError, first_line
from ..models import Spec
from ..plan import ActionKind, Plan, Step, StepKind, config_hash
from .replicas import Builder
from .revisions import Revision

Progress = Callable[[str], None]


class StartFailed(ApplyError):
    """One replica (or stand-in) did not become ready: `name` says which."""

    def __init__(self, name: str, message: str, log_tail: str = ""):
        self.name = name
        super().__init__(message, log_tail)


class Cluster(Protocol):
    """What the executor needs of a cluster. Every name is a Ray actor name in the namespace."""

    def start(self, builder: Builder, cfg: ReplicaConfig) -> None:
        """Create the replica (or stand-in) `cfg.name`; it becomes ready in `wait_ready`."""

    def wait_ready(self, names: list[str], deadline: float) -> Iterator[tuple[str, ReplicaInfo]]:
        """Yield each replica once it serves; raise StartFailed for the first that cannot."""

    def stop(self, names: list[str], drain: float, hand_over: bool = False) -> None:
        """Drain (`drain` seconds at most) and stop; hand_over: a successor shares the ports."""

    def reclaim(self, name: str) -> None:
        """New connections on the replica's ports come back to it (its stand-in is going)."""

    def stand_ins(self) -> dict[tuple[str, int], ReplicaInfo | None]:
        """Stand-ins running now (an earlier apply was cut short) and what they report."""

    def update(self, names: dict[str, tuple[int, dict[str, list[str]], dict[str, int]]]) -> list[str]:
        """Tell kept replicas their replica count, their peers' endpoints and replica counts;
        returns those that changed."""

    def record(self, name: str, info: ReplicaInfo) -> None:
        """Remember a ready replica (a later apply plans with it even while it is busy)."""

    def revisions(self) -> list[Revision]:
        """The revisions applied to this deployment, newest first."""

    def place(self, spec: Spec, builder: Builder, detached: bool, progress: Progress) -> None: ...

    def wire(self, spec: Spec, info: dict[tuple[str, int], ReplicaInfo], progress: Progress) -> None: ...


class Steps:
    """Walks a plan's steps in order and hands each to the method of its kind."""

    def run_steps(self, plan: Plan) -> None:
        stages = plan.stages()  # numbered as `oob plan` lists them: 1..N, none skipped
        for number, stage in enumerate(stages, 1):
            self.begin(stage, number, len(stages))
            if stage[0].kind == StepKind.START:  # one wave's starts go together
                self.start(stage)
            else:
                getattr(self, stage[0].kind.value)(stage[0])

    def begin(self, steps: list[Step], number: int, total: int) -> None:
        """Called before each stage (one wave's starts together): stage `number` of `total`."""

    def stop(self, step: Step) -> None: ...
    def place(self, step: Step) -> None: ...
    def start(self, steps: list[Step]) -> None: ...
    def roll(self, step: Step) -> None: ...
    def wire(self, step: Step) -> None: ...
    def update(self, step: Step) -> None: ...


@dataclass
class Outcome:
    """Where an apply that stopped left each replica it was to change."""

    step: str  # the step that failed, as `oob plan` names it
    cause: str
    new: list[str] = field(default_factory=list)  # at the version this apply wanted
    old: list[str] = field(default_factory=list)  # at the version they ran before
    down: list[str] = field(default_factory=list)  # ran before and could not be started again
    stand_ins: list[str] = field(default_factory=list)  # serve a replica's ports while it is down

    def message(self) -> str:
        parts = [f"apply stopped at {self.step}: {self.cause}"]
        if self.new:
            parts.append(f"at the new version: {', '.join(self.new)}")
        if self.old:
            parts.append(f"at the version they ran before: {', '.join(self.old)}")
        if self.down:
            parts.append(f"NOT running: {', '.join(self.down)}")
        if self.stand_ins:
            parts.append(f"stand-ins serve their ports: {', '.join(self.stand_ins)}")
        parts.append("fix and apply again to continue from here" if not self.down else "apply again")
        return "; ".join(parts)

    def record(self) -> dict:
        return {"ok": False, "step": self.step, "cause": self.cause, "new": self.new, "old": self.old,
                "down": self.down, "stand_ins": self.stand_ins, "time": time.time()}


class Executor(Steps):
    def __init__(self, spec: Spec, builder: Builder, cluster: Cluster, progress: Progress, detached: bool,
                 timeout: float):
        self.spec, self.builder, self.cluster, self.progress = spec, builder, cluster, progress
        self.detached, self.timeout = detached, timeout
        self.deadline = time.monotonic() + timeout
        self.info: dict[tuple[str, int], ReplicaInfo] = {}  # what runs now under a replica's name
        self.before: dict[tuple[str, int], ReplicaInfo] = {}  # what ran when the apply began
        self.replaced: set[tuple[str, int]] = set()  # the plan replaces these (they must run again)
        self.kept: set[tuple[str, int]] = set()  # the plan keeps these: told counts and peers in place
        self.pending: set[str] = set()  # started, not ready yet: removed on failure or interrupt
        self.beside: dict[tuple[str, int], str] = {}  # ready stand-ins beside a running replica
        # stand-ins holding a stopped replica's ports: their name and what they hold
        self.serving: dict[tuple[str, int], tuple[str, ReplicaInfo | None]] = {}
        self._revisions: list[Revision] | None = None
        self.outcome: Outcome | None = None
        self._step = ""

    def observed(self, replicas: dict[tuple[str, int], ReplicaInfo]) -> None:
        self.info = dict(replicas)
        self.before = dict(replicas)
        self.builder.where = {key: info.node_id for key, info in replicas.items() if info.node_id}
        for name in self.spec.actors:
            self._collect_endpoints(name)

    def execute(self, plan: Plan) -> None:
        """Run the plan; on a failure settle (see the module's doc) and raise one ApplyError
        that says where every replica stands."""
        self.replaced = {(a.actor, i) for a in plan.actions if a.kind == ActionKind.REPLACE for i in a.replicas}
        self.kept = {(a.actor, i) for a in plan.actions if a.kind == ActionKind.KEEP for i in a.replicas}
        try:
            self.run_steps(plan)
            return
        except Exception as exc:
            failure = exc if isinstance(exc, ApplyError) else ApplyError(f"{type(exc).__name__}: {exc}")
        self.outcome = self._settle(failure)
        raise ApplyError(self.outcome.message(), failure.log_tail)

    def interrupted(self) -> list[str]:
        """Ctrl-C: what this apply started goes (what has not become ready, and replicas that
        ran nowhere before: new actors, added replicas); stand-ins beside a running replica give
        its connections back and go. Replicas that already took a running one's place stay, and
        so does a stand-in serving a stopped replica's ports (the next apply hands them over).
        Returns the names removed."""
        created = [replica_name(*key) for key in sorted(self.info) if key not in self.before]
        removed = sorted(self.pending) + created
        self.cluster.stop(removed, drain=0.0)
        self.pending.clear()
        for key in created:
            self.info.pop(split_name(key), None)
        for key, stand_in in list(self.beside.items()):
            self._give_back(replica_name(*key), stand_in)
        return removed

    # --- steps ---

    def begin(self, steps: list[Step], number: int, total: int) -> None:
        what = ", ".join(f"{s.actor}[{','.join(map(str, s.replicas))}]" if s.actor else "" for s in steps)
        self._step = f"step {number}/{total} ({steps[0].kind} {what})".replace(" )", ")")
        self.progress(f"step {number}/{total}: {steps[0].kind} {what}".rstrip())

    def stop(self, step: Step) -> None:
        actor = self.spec.actors.get(step.actor)
        drain = actor.drain if actor else 1.0
        self.cluster.stop([replica_name(step.actor, i) for i in step.replicas], drain=drain)
        for i in step.replicas:  # a successor prefers its replica's node (and so keeps its URL)
            if (old := self.info.pop((step.actor, i), None)) and old.node_id and (step.actor, i) in self.replaced:
                self.builder.pins[(step.actor, i)] = old.node_id
            self.builder.where.pop((step.actor, i), None)
        if actor:
            self._collect_endpoints(step.actor)

    def place(self, step: Step) -> None:
        self.cluster.place(self.spec, self.builder, self.detached, self.progress)

    def start(self, steps: list[Step]) -> None:
        stand_ins = self.cluster.stand_ins()
        cfgs = []
        for step in steps:
            for i in step.replicas:
                # A stand-in an earlier apply left serving this replica's ports hands them over.
                if (step.actor, i) in stand_ins:
                    self.serving[(step.actor, i)] = (surge_name(step.actor, i), stand_ins[(step.actor, i)])
                shared = _ports(stand_ins.get((step.actor, i)))
                cfgs.append(self.builder.config(step.actor, i, shared_ports=shared))
        self._start(self.builder, cfgs)
        for step in steps:
            self._retire_stand_ins(step.actor, step.replicas)
            self._collect_endpoints(step.actor)

    def roll(self, step: Step) -> None:
        name, i = step.actor, step.replicas[0]
        drain = self.spec.actors[name].drain
        old = self.info.get((name, i))
        stand_in, replica = surge_name(name, i), replica_name(name, i)
        if old is not None and old.node_id:  # the hand-over happens on the replica's node
            self.builder.pins[(name, i)] = old.node_id
        self.progress(f"roll {replica}: stand-in {stand_in} starts beside it")
        self.cluster.stop([stand_in], drain=0.0)  # one an interrupted apply left
        try:
            surge = self._start(self.builder, [self.builder.config(name, i, shared_ports=_ports(old), surge=True)])
        except Exception:
            self._give_back(replica, stand_in)
            raise
        self.beside[(name, i)] = stand_in
        self.progress(f"roll {replica}: draining it (in-flight requests finish, {drain:g}s at most)")
        try:
            self.cluster.stop([replica], drain=drain, hand_over=True)
        except Exception:
            self._give_back(replica, stand_in)
            raise
        self.info.pop((name, i), None)
        self.serving[(name, i)] = (self.beside.pop((name, i)), surge[stand_in])
        # The successor shares what the replica held and what the stand-in holds: after a
        # port move, the new port is the stand-in's until the stand-in retires.
        shared = _ports(old) | _ports(surge[stand_in])
        self._start(self.builder, [self.builder.config(name, i, shared_ports=shared)])
        self._retire_stand_ins(name, [i])
        self.builder.pins.pop((name, i), None)
        self._collect_endpoints(name)

    def wire(self, step: Step) -> None:
        self.cluster.wire(self.spec, self.info, self.progress)

    def update(self, step: Step) -> None:
        """Replicas kept from before learn their actor's replica count and their peers'
        endpoints as they are now (scaling changes both without restarting anyone)."""
        todo = {replica_name(name, i): (self.spec.actors[name].replicas, self.builder.peer_endpoints(name),
                                        self.builder.peer_replicas(name))
                for name, i in sorted(self.kept) if (name, i) in self.info}
        changed = self.cluster.update(todo) if todo else []
        if changed:
            self.progress(f"updated in place: {', '.join(changed)} (replica count or peers' endpoints)")

    # --- starting, handing over, settling ---

    def _start(self, builder: Builder, cfgs: list[ReplicaConfig]) -> dict[str, ReplicaInfo]:
        """Start these together and wait until each serves. On a failure the ones not ready are
        stopped; the ready ones stay (they run and may hold traffic)."""
        names, ready = [c.name for c in cfgs], {}
        try:
            for cfg in cfgs:
                self.pending.add(cfg.name)  # before the start: an interrupt there still removes it
                self.cluster.start(builder, cfg)
            for name, info in self.cluster.wait_ready(names, self.deadline):
                self.pending.discard(name)
                ready[name] = info
                if name == replica_name(*split_name(name)):
                    self.info[split_name(name)] = info
                    if info.node_id:
                        builder.where[split_name(name)] = info.node_id
                    self.cluster.record(name, info)
                self.progress(f"ready {name} (pid {info.pid})" + "".join(f"  {s}: {u}" for s, u in info.endpoints.items()))
        except Exception as exc:
            left = [n for n in names if n not in ready]
            self.cluster.stop(left, drain=0.0)
            self.pending.difference_update(left)
            if isinstance(exc, ApplyError):
                raise
            raise StartFailed(left[0], f"{_label(left[0])} failed to start: {type(exc).__name__}: {exc}") from None
        return ready

    def _give_back(self, replica: str, stand_in: str) -> None:
        """The roll cannot go on while the replica still runs: its connections come back to it
        and the stand-in goes. The replica never stopped serving."""
        try:
            self.cluster.reclaim(replica)
        except Exception:  # busy or gone: nothing to steer back
            pass
        self.cluster.stop([stand_in], drain=0.0)
        self.beside.pop(split_name(stand_in), None)
        self.progress(f"rolled back: {replica} keeps serving, unchanged")

    def _retire_stand_ins(self, name: str, replicas: list[int]) -> None:
        """Each replica runs again under its own name: the stand-in that served its ports goes."""
        for i in replicas:
            if (name, i) not in self.serving or (name, i) not in self.info:
                continue
            stand_in, _holds = self.serving.pop((name, i))
            drain = self.spec.actors[name].drain if name in self.spec.actors else 1.0
            try:
                self.cluster.stop([stand_in], drain=drain, hand_over=True)
            except Exception:  # once more, at once: both serve the same version meanwhile
                self.cluster.stop([stand_in], drain=0.0, hand_over=True)

    def _settle(self, failure: ApplyError) -> Outcome:
        """After a failed step: every replica that ran before and was stopped by this apply
        starts again at the version it ran (sharing its ports with a stand-in that serves them),
        then the stand-ins retire. Returns where every replica stands."""
        outcome = Outcome(self._step or "start", first_line(str(failure)))
        self.pending.clear()
        for key in sorted(self.replaced & set(self.before) - set(self.info)):
            name = replica_name(*key)
            error = self._restore(key)
            if error:
                outcome.down.append(f"{name} ({error})")
                self.progress(f"{name} could not start again at its previous version: {error}")
            else:
                self.progress(f"restored {name} at the version it ran before")
            self._retire_stand_ins(key[0], [key[1]])
        outcome.stand_ins = sorted(stand_in for stand_in, _holds in self.serving.values())
        want_code = self.builder.code
        for key in sorted(self.replaced | {k for k in self.info if k not in self.before}):
            info = self.info.get(key)
            if info is None or key[0] not in self.spec.actors:
                continue
            new = (info.config_hash == config_hash(self.spec, key[0])
                   and info.code_hash == want_code.get(key[0], info.code_hash))
            (outcome.new if new else outcome.old).append(replica_name(*key))
        for name in self.spec.actors:
            self._collect_endpoints(name)
        try:  # the replicas kept learn where their peers are now
            self.update(Step(StepKind.UPDATE))
        except Exception:
            pass
        return outcome

    def _restore(self, key: tuple[str, int]) -> str | None:
        """Start the replica again at the version it ran when the apply began; None when done,
        else why not."""
        builder = self._previous_builder(self.before[key])
        if builder is None:
            return "its previous version is not recorded in the cluster"
        shared = _ports(self.serving[key][1]) if key in self.serving else frozenset()
        try:
            self._start(builder, [builder.config(key[0], key[1], shared_ports=shared)])
        except ApplyError as exc:
            return first_line(str(exc))
        return None

    def _previous_builder(self, old: ReplicaInfo) -> Builder | None:
        """A builder for the revision whose version of the actor `old` runs."""
        if self._revisions is None:  # read once, however many replicas are restored
            self._revisions = self.cluster.revisions()
        for revision in self._revisions:
            spec = revision.spec_model()
            if old.actor not in spec.actors or config_hash(spec, old.actor) != old.config_hash:
                continue
            if old.code_hash and revision.code.get(old.actor, old.code_hash) != old.code_hash:
                continue
            builder = revision.builder(self.progress)
            builder.endpoints, builder.where, builder.pins = self.builder.endpoints, self.builder.where, self.builder.pins
            builder.node_source = self.builder.node_source
            return builder
        return None

    def _collect_endpoints(self, name: str) -> None:
        actor = self.spec.actors[name]
        servers: dict[str, list[str]] = {s.name: [] for s in actor.servers}
        for i in range(actor.replicas):
            info = self.info.get((name, i))
            for s in actor.servers:
                if info and s.name in info.endpoints:
                    servers[s.name].append(info.endpoints[s.name])
        self.builder.endpoints[name] = servers


def _label(name: str, word: str = "actor ") -> str:
    if name.startswith(SURGE_PREFIX):
        return f"the new version of {name[len(SURGE_PREFIX):]} (stand-in {name})"
    return f"{word}{name}"


def _ports(info: ReplicaInfo | None) -> frozenset[int]:
    """The ports a running replica holds, which its stand-in and successor share."""
    return frozenset(info.ports.values()) if info is not None else frozenset()


__all__ = ["Cluster", "Executor", "Outcome", "StartFailed", "Steps"]

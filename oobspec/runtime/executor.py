"""Carries out a plan's steps on Ray, in the plan's order, and reports each one.

`Steps` walks the plan (the start steps of one wave run together); `Executor` does each kind
of step on the cluster. A replace that rolls keeps the replica's ports served throughout:

    stand-in `_oob-surge-<actor>-<i>` starts beside the replica, sharing its ports
    -> the replica drains (unhealthy, new connections steered to the stand-in, in-flight
       requests finish) and exits, which frees its Ray name
    -> the successor `<actor>-<i>` starts, sharing the ports with the stand-in
    -> the stand-in drains and exits.

If the stand-in cannot start, it is removed and the replica keeps serving: nothing changed.
"""
from __future__ import annotations

import time
from typing import Callable
from urllib.parse import urlsplit

from ..contract import SURGE_PREFIX, ReplicaInfo, replica_name, split_name, surge_name
from ..errors import ApplyError
from ..models import Spec
from ..plan import Observed, Plan, Step, StepKind
from . import cluster, state
from .replicas import Builder
from .wiring import setup_links

Progress = Callable[[str], None]


class Steps:
    """Walks a plan's steps in order and hands each to the method of its kind."""

    def run_steps(self, plan: Plan) -> None:
        steps, i = plan.steps, 0
        while i < len(steps):
            if steps[i].kind == StepKind.START:  # one wave's starts go together
                j = i
                while j < len(steps) and steps[j].kind == StepKind.START and steps[j].wave == steps[i].wave:
                    j += 1
                self.begin(steps[i:j], j, len(steps))
                self.start(steps[i:j])
                i = j
                continue
            self.begin([steps[i]], i + 1, len(steps))
            getattr(self, steps[i].kind.value)(steps[i])
            i += 1

    def begin(self, steps: list[Step], done: int, total: int) -> None:
        """Called before each step (one wave's starts together): `done` of `total` after it."""

    def stop(self, step: Step) -> None: ...
    def place(self, step: Step) -> None: ...
    def start(self, steps: list[Step]) -> None: ...
    def roll(self, step: Step) -> None: ...
    def wire(self, step: Step) -> None: ...
    def update(self, step: Step) -> None: ...


class Executor(Steps):
    def __init__(self, spec: Spec, builder: Builder, progress: Progress, detached: bool, timeout: float):
        self.spec, self.builder, self.progress = spec, builder, progress
        self.detached, self.timeout = detached, timeout
        self.namespace = spec.namespace
        self.deadline = time.monotonic() + timeout
        self.info: dict[tuple[str, int], ReplicaInfo] = {}
        self.started: list[str] = []  # names this apply created: removed again if it is interrupted
        self.kept: set[tuple[str, int]] = set()

    def observed(self, observed: Observed) -> None:
        for r in observed.replicas:
            if r.alive:
                self.info[(r.actor, r.replica)] = ReplicaInfo(r.actor, r.replica, r.config_hash, r.code_hash, r.pid or 0,
                                                              r.node_id or "", r.endpoints, gpu_uuid=r.gpu_uuid)
        for name in self.spec.actors:
            self._collect_endpoints(name)

    # --- steps ---

    def begin(self, steps: list[Step], done: int, total: int) -> None:
        if steps[0].kind in (StepKind.WIRE, StepKind.UPDATE):
            return  # quick, and they report what they did themselves
        what = ", ".join(f"{s.actor}[{','.join(map(str, s.replicas))}]" if s.actor else "" for s in steps)
        self.progress(f"step {done}/{total}: {steps[0].kind} {what}".rstrip())

    def stop(self, step: Step) -> None:
        actor = self.spec.actors.get(step.actor)
        drain = actor.drain if actor else 1.0
        names = [replica_name(step.actor, i) for i in step.replicas]
        cluster.kill(names, self.namespace, timeout=drain + 5.0, drain=drain)
        for i in step.replicas:
            self.info.pop((step.actor, i), None)
        if actor:
            self._collect_endpoints(step.actor)

    def place(self, step: Step) -> None:
        from ray.util.placement_group import get_placement_group, placement_group
        import hashlib
        import json
        bundles = self.builder.bundles()
        digest = hashlib.sha256(json.dumps([self.spec.ray.placement, bundles], sort_keys=True).encode()).hexdigest()[:10]
        pg_name = f"_oob-{self.spec.name}-{digest}"
        try:
            placement = get_placement_group(pg_name)
        except ValueError:
            self.progress(f"placement group {self.spec.ray.placement} for {len(bundles)} replicas")
            placement = placement_group(bundles, strategy=self.spec.ray.placement, name=pg_name,
                                        lifetime="detached" if self.detached else None)
        if not placement.wait(timeout_seconds=60):
            raise ApplyError(f"placement group {self.spec.ray.placement} for {len(bundles)} replicas cannot be "
                             "placed on this cluster (not enough nodes or resources)")
        self.builder.placement = placement
        old = cluster.get_meta(self.namespace, "placement")
        if old and old["name"] != pg_name:
            cluster.remove_placement(old["name"])
        cluster.put_meta(self.namespace, "placement", {"name": pg_name})

    def start(self, steps: list[Step]) -> None:
        refs, stand_ins = {}, self._stand_ins()
        for step in steps:
            for i in step.replicas:
                # A stand-in an earlier apply left serving this replica's ports hands them over.
                shared = _ports(stand_ins.get((step.actor, i)))
                cfg = self.builder.config(step.actor, i, shared_ports=shared)
                self.started.append(cfg.name)  # before .remote(): an interrupt there still cleans it
                refs[cfg.name] = self.builder.start(step.actor, i, cfg)._oob_ready.remote(self.timeout)
        self.info.update(self._wait_ready(refs))
        retire = [surge_name(*key) for key in stand_ins if replica_name(*key) in refs]
        if retire:
            cluster.kill(retire, self.namespace, timeout=15.0, drain=1.0, hand_over=True)
        for step in steps:
            self._collect_endpoints(step.actor)

    def _stand_ins(self) -> dict[tuple[str, int], ReplicaInfo | None]:
        """Stand-ins still running (an apply was cut short mid-roll) and what they report."""
        names = sorted(n for n in cluster.named_actors(self.namespace) if n.startswith(SURGE_PREFIX))
        if not names:
            return {}
        return {split_name(n): info for n, info in cluster.infos(self.namespace, names).items()}

    def roll(self, step: Step) -> None:
        name, i = step.actor, step.replicas[0]
        drain = self.spec.actors[name].drain
        shared = _ports(self.info.get((name, i)))
        stand_in, replica = surge_name(name, i), replica_name(name, i)
        self.progress(f"roll {replica}: stand-in {stand_in} starts beside it")
        cluster.kill([stand_in], self.namespace, timeout=5.0, drain=0.0)  # one an interrupted apply left
        self.started.append(stand_in)
        cfg = self.builder.config(name, i, shared_ports=shared, surge=True)
        try:
            self._wait_ready({stand_in: self.builder.start(name, i, cfg)._oob_ready.remote(self.timeout)})
        except BaseException:
            self._roll_back(replica, stand_in)
            raise
        self.progress(f"roll {replica}: draining it (in-flight requests finish, {drain:g}s at most)")
        cluster.kill([replica], self.namespace, timeout=drain + 5.0, drain=drain, hand_over=True)
        self.info.pop((name, i), None)
        self.started.append(replica)
        cfg = self.builder.config(name, i, shared_ports=shared)
        try:
            self.info.update(self._wait_ready({replica: self.builder.start(name, i, cfg)._oob_ready.remote(self.timeout)}))
        except ApplyError as exc:  # the stand-in has the same config and started: it keeps serving
            raise ApplyError(f"{exc}; its stand-in {stand_in} serves its ports meanwhile (apply again)", exc.log_tail)
        self.started.remove(stand_in)
        cluster.kill([stand_in], self.namespace, timeout=drain + 5.0, drain=drain, hand_over=True)
        self._collect_endpoints(name)

    def _roll_back(self, replica: str, stand_in: str) -> None:
        """The stand-in failed: connections go back to the replica, the stand-in goes. The
        replica never stopped serving."""
        import ray
        try:
            ray.get(cluster.handle(replica, self.namespace)._oob_reclaim.remote(), timeout=5)
        except Exception:  # busy or gone: nothing to steer back
            pass
        cluster.kill([stand_in], self.namespace, timeout=2.0, drain=0.0)
        self.started.remove(stand_in)
        self.progress(f"rolled back: {replica} keeps serving, unchanged")

    def wire(self, step: Step) -> None:
        setup_links(self.spec, self.namespace, self.info, self.progress)

    def update(self, step: Step) -> None:
        """Replicas kept from before learn their actor's replica count and their peers'
        endpoints as they are now (scaling changes both without restarting anyone). A busy
        replica is not waited for long."""
        import ray
        refs = {}
        started = set(self.started)
        for (name, i) in sorted(self.info):
            if replica_name(name, i) in started or name not in self.spec.actors or i >= self.spec.actors[name].replicas:
                continue
            try:
                handle = cluster.handle(replica_name(name, i), self.namespace)
            except ValueError:  # gone meanwhile
                continue
            refs[handle._oob_update.remote(self.spec.actors[name].replicas, self.builder.peer_endpoints(name))] = \
                replica_name(name, i)
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=5.0) if refs else ([], [])
        changed = [refs[r] for r in done if _answer(r)]
        if changed:
            self.progress(f"updated in place: {', '.join(changed)} (replica count or peers' endpoints)")

    # --- waiting and reporting ---

    def _wait_ready(self, refs: dict[str, object]) -> dict[tuple[str, int], ReplicaInfo]:
        """Wait for the replicas' `_oob_ready`, in short steps so Ctrl-C is seen at once."""
        import ray
        pending = {ref: name for name, ref in refs.items()}
        ready_infos = {}
        while pending:
            left = self.deadline - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(0.25, max(0.0, left)))
            if not ready:
                if time.monotonic() >= self.deadline:
                    raise self._not_ready(sorted(pending.values()))
                continue
            name = pending.pop(ready[0])
            try:
                info: ReplicaInfo = ray.get(ready[0])
            except Exception as exc:
                raise ApplyError(f"{_label(name)} failed to start: {_cause(exc)}", self._log_tail(name)) from None
            if not name.startswith("_oob"):
                # What a later apply needs of this replica even while it is too busy to answer.
                cluster.put_meta(self.namespace, f"replica/{name}", info.record())
            ready_infos[split_name(name)] = info
            self.progress(f"ready {name} (pid {info.pid})" + "".join(f"  {s}: {u}" for s, u in info.endpoints.items()))
        return ready_infos

    def _not_ready(self, names: list[str]) -> ApplyError:
        """Name every replica still pending and what it was doing, from Ray's own records."""
        records = state.actor_records(self.namespace)
        doing = []
        for name in names:
            record = records.get(name)
            if record is None or (record.state == "PENDING_CREATION" and not record.pid):
                what = f"waiting for resources ({self.builder.resources_text(split_name(name)[0])})"
            elif record.state == "PENDING_CREATION":
                what = f"still in __init__ (pid {record.pid})"
            elif record.state == "ALIVE":
                what = "servers not accepting connections yet"
            else:
                what = record.words
            doing.append(f"{_label(name, '')} {what}")
        return ApplyError(f"not ready after {self.timeout:g}s: " + "; ".join(doing), self._log_tail(names[0]))

    def _log_tail(self, name: str, lines: int = 20) -> str:
        """The replica's last output, from its worker's log files (it may be stuck in __init__
        or dead), else asked of the replica itself."""
        import ray
        record = state.actor_records(self.namespace).get(name)
        text = state.tail(record, lines) if record else ""
        if text:
            return text
        try:
            chunks = ray.get(cluster.handle(name, self.namespace)._oob_read_logs.remote([0, 0]), timeout=5)
            text = "".join(t for _o, t in chunks)
        except Exception:  # the replica is gone: nothing to show
            text = ""
        return "\n".join(text.splitlines()[-lines:])

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
    if info is None:
        return frozenset()
    return frozenset(p for p in (urlsplit(u if "//" in u else f"//{u}").port for u in info.endpoints.values()) if p)


def _answer(ref) -> bool:
    import ray
    try:
        return bool(ray.get(ref, timeout=0))
    except Exception:
        return False


def _cause(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    text = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


__all__ = ["Executor", "Steps"]

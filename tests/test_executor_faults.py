"""Fault injection into the executor, with no Ray: a fake cluster behind the executor's
`Cluster` interface fails one step of an apply at a time (a stand-in's start or readiness, a
drain, a successor's start or readiness, a stand-in's retirement, a later replica, a stop-first
actor before a rolling one) and every test asserts the promise: every replica that ran before
still runs, at its old or its new version; every port served before was served at every moment;
no stand-in is left; the error says who runs what."""
from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import pytest

from oobspec.contract import SURGE_PREFIX, ReplicaInfo, replica_name, split_name
from oobspec.errors import ApplyError
import yaml

from oobspec.models import Spec
from oobspec.plan import Observed, ReplicaState, config_hash, make_plan
from oobspec.control.executor import Executor, StartFailed
from oobspec.control.replicas import Builder
from oobspec.control.revisions import Revision

SPEC = """
version: 1
name: shop
actors:
  batch:
    class: apps:Chatty
    kwargs: {{greeting: {batch}}}
  web:
    class: apps:Chatty
    replicas: 2
    drain: 0
    kwargs: {{greeting: {greeting}}}
    servers:
      - {{name: http, port: {port}, routes: [{{path: /, call: get}}]}}
"""


def load_text(text: str) -> Spec:
    return Spec.model_validate(yaml.safe_load(text))


def spec_of(greeting="v1", batch="b1", port=18080):
    return load_text(SPEC.format(greeting=greeting, batch=batch, port=port))


class FakeCluster:
    """Replicas as dicts, ports as sets of holders; binds as the real servers do (a port held by
    somebody else is refused unless the config shares it). `faults[(op, name)]` makes the next
    op on that name fail: start (the create call), ready (it never serves), stop (drain/retire)."""

    def __init__(self, revisions: list[Revision]):
        self.running: dict[str, ReplicaInfo] = {}
        self.doomed: dict[str, str] = {}
        self.holders: dict[int, set[str]] = defaultdict(set)
        self.faults: dict[tuple[str, str], int] = {}
        self.history: list[dict[int, frozenset[str]]] = []
        self.revs = revisions
        self.pids = itertools.count(100)

    def seed(self, builder: Builder) -> None:
        for name, actor in builder.spec.actors.items():
            for i in range(actor.replicas):
                self.start(builder, builder.config(name, i))
                list(self.wait_ready([replica_name(name, i)], 0))

    def _fault(self, op: str, name: str) -> None:
        if self.faults.get((op, name), 0) > 0:
            self.faults[(op, name)] -= 1
            raise (StartFailed(name, f"{name} failed to {op} (injected)") if op != "stop"
                   else RuntimeError(f"{name} failed to stop (injected)"))

    def _snapshot(self) -> None:
        self.history.append({p: frozenset(h) for p, h in self.holders.items()})

    def start(self, builder, cfg) -> None:
        assert cfg.name not in self.running, f"{cfg.name} started twice"
        self._fault("start", cfg.name)
        ports = [s.port for s in cfg.servers if s.port]
        taken = [p for p in ports if self.holders[p] and p not in cfg.shared_ports]
        self.doomed.pop(cfg.name, None)
        if taken:
            self.doomed[cfg.name] = f"cannot bind 127.0.0.1:{taken[0]}"
        self.running[cfg.name] = ReplicaInfo(cfg.actor, cfg.replica, cfg.config_hash, cfg.code_hash, next(self.pids),
                                             "node", {s.name: f"http://127.0.0.1:{s.port}" for s in cfg.servers},
                                             ports={s.name: s.port for s in cfg.servers})
        self.ready = getattr(self, "ready", set())
        self.ready.discard(cfg.name)

    def wait_ready(self, names, deadline):
        for name in names:
            if self.faults.get(("interrupt", name)):  # Ctrl-C while waiting for this one
                raise KeyboardInterrupt
            self._fault("ready", name)
            if name in self.doomed:
                raise StartFailed(name, f"{name} failed to start: {self.doomed[name]}")
            info = self.running[name]
            for port in info.ports.values():
                self.holders[port].add(name)
            self._snapshot()
            yield name, info

    def stop(self, names, drain, hand_over=False) -> None:
        for name in names:
            if name not in self.running:
                continue
            self._fault("stop", name)
            self.running.pop(name)
            for holders in self.holders.values():
                holders.discard(name)
            self._snapshot()

    def reclaim(self, name) -> None:
        pass

    def stand_ins(self):
        return {split_name(n): info for n, info in self.running.items() if n.startswith(SURGE_PREFIX)}

    def update(self, names):
        return []

    def record(self, name, info) -> None:
        pass

    def revisions(self):
        return self.revs

    def place(self, *args) -> None:
        pass

    def wire(self, *args) -> None:
        pass

    def observed(self) -> Observed:
        return Observed(True, [ReplicaState(i.actor, i.replica, i.config_hash, i.pid, i.node_id, True, i.endpoints,
                                            ports=i.ports)
                               for n, i in self.running.items() if not n.startswith(SURGE_PREFIX)])


def apply(old, new, faults=None, fake=None):
    """Deploy `old` on a fake cluster, then apply `new` with the faults; (fake, error, messages)."""
    fake = fake or FakeCluster([Revision.of(old, "/tmp", {}, {})])
    if not fake.running:
        fake.seed(Builder(old, lambda _m: None))
    fake.faults = dict(faults or {})
    fake.history.clear()
    fake._snapshot()
    messages = []
    observed = fake.observed()
    executor = Executor(new, Builder(new, messages.append), fake, messages.append, detached=True, timeout=10)
    executor.observed({(r.actor, r.replica): fake.running[replica_name(r.actor, r.replica)]
                       for r in observed.replicas})
    error = None
    try:
        executor.execute(make_plan(new, observed))
    except ApplyError as exc:
        error = str(exc)
    return fake, error, messages


def assert_promise(fake, old, new, served=(18080, 18081)):
    """Every replica runs (old or new version), no stand-in is left, no served port ever went dark."""
    assert sorted(fake.running) == ["batch-0", "web-0", "web-1"], sorted(fake.running)
    for name, info in fake.running.items():
        actor = split_name(name)[0]
        assert info.config_hash in (config_hash(old, actor), config_hash(new, actor)), name
    for port in served:
        dark = [k for k, snap in enumerate(fake.history) if not snap.get(port)]
        assert not dark, f"port {port} had no server at moments {dark}"


def version(fake, spec, name) -> str:
    return "new" if fake.running[name].config_hash == config_hash(spec, split_name(name)[0]) else "old"


def test_a_rollout_with_no_fault_moves_every_replica_and_keeps_the_ports():
    old, new = spec_of(), spec_of("v2")
    fake, error, _ = apply(old, new)
    assert error is None
    assert_promise(fake, old, new)
    assert [version(fake, new, n) for n in ("web-0", "web-1")] == ["new", "new"]


@pytest.mark.parametrize("fault, web0", [
    (("start", "_oob-surge-web-0"), "old"),  # the stand-in cannot even be created
    (("ready", "_oob-surge-web-0"), "old"),  # the stand-in never serves
    (("stop", "web-0"), "old"),  # the drain fails: the replica still serves, the stand-in goes
    (("start", "web-0"), "old"),  # the successor cannot be created: restored at the old version
    (("ready", "web-0"), "old"),  # the successor never serves (after its stand-in did)
    (("ready", "_oob-surge-web-1"), "new"),  # a later replica: the first one stays new
    (("ready", "web-1"), "new"),  # a later replica's successor: restored, the first stays new
])
def test_each_failing_step_of_a_roll_keeps_every_replica_and_port(fault, web0):
    old, new = spec_of(), spec_of("v2")
    fake, error, messages = apply(old, new, {fault: 1})
    assert error is not None and "apply stopped at step" in error, error
    assert_promise(fake, old, new)
    assert version(fake, new, "web-0") == web0
    assert version(fake, new, "web-1") == "old"
    assert ("at the new version: web-0" in error) == (web0 == "new"), error
    assert "web-1" in error.split("at the version they ran before: ")[1], error
    assert "NOT running" not in error and "stand-ins" not in error


def test_a_stand_in_that_will_not_retire_is_stopped_without_drain_and_the_apply_succeeds():
    old, new = spec_of(), spec_of("v2")
    fake, error, _ = apply(old, new, {("stop", "_oob-surge-web-0"): 1})
    assert error is None
    assert_promise(fake, old, new)


def test_a_stop_first_actor_that_moved_stays_new_when_a_rolling_one_fails_after_it():
    old, new = spec_of(), spec_of("v2", batch="b2")
    fake, error, _ = apply(old, new, {("ready", "_oob-surge-web-0"): 1})
    assert_promise(fake, old, new)
    assert version(fake, new, "batch-0") == "new" and version(fake, new, "web-0") == "old"
    assert "at the new version: batch-0" in error, error


def test_a_stop_first_actor_whose_new_version_fails_runs_its_old_version_again():
    old, new = spec_of(), spec_of("v2", batch="b2")
    fake, error, messages = apply(old, new, {("ready", "batch-0"): 1})
    assert_promise(fake, old, new)
    assert version(fake, new, "batch-0") == "old"
    assert "restored batch-0 at the version it ran before" in messages
    assert "batch-0" in error.split("at the version they ran before: ")[1]


def test_a_port_move_rolls_and_the_old_port_closes_only_once_the_new_one_serves():
    old, new = spec_of(), spec_of("v1", port=19090)
    fake, error, _ = apply(old, new)
    assert error is None, error
    assert sorted(p for p, h in fake.holders.items() if h) == [19090, 19091]
    for old_port, new_port in ((18080, 19090), (18081, 19091)):
        closed = next(k for k, snap in enumerate(fake.history) if not snap.get(old_port))
        assert all(fake.history[k].get(new_port) for k in range(closed, len(fake.history)))


def test_a_port_move_whose_successor_fails_runs_the_old_version_on_the_old_port():
    old, new = spec_of(), spec_of("v1", port=19090)
    fake, error, _ = apply(old, new, {("ready", "web-0"): 1})
    assert error is not None
    assert fake.running["web-0"].endpoints["http"].endswith(":18080")
    assert "_oob-surge-web-0" not in fake.running


def test_when_the_old_version_cannot_start_either_the_stand_in_keeps_serving_and_the_error_says_so():
    old, new = spec_of(), spec_of("v2")
    fake, error, _ = apply(old, new, {("ready", "web-0"): 2})
    assert "NOT running: web-0" in error and "stand-ins serve their ports: _oob-surge-web-0" in error, error
    assert fake.holders[18080] == {"_oob-surge-web-0"}
    # The next apply (fault gone) continues from there: the stand-in hands the port to web-0.
    fake, error, _ = apply(old, new, fake=fake)
    assert error is None, error
    assert_promise(fake, old, new)
    assert [version(fake, new, n) for n in ("web-0", "web-1")] == ["new", "new"]


def test_the_next_apply_continues_from_where_a_failed_one_stopped():
    old, new = spec_of(), spec_of("v2")
    fake, error, _ = apply(old, new, {("ready", "_oob-surge-web-1"): 1})
    before = {n: i.pid for n, i in fake.running.items()}
    fake, error, messages = apply(old, new, fake=fake)
    assert error is None
    assert fake.running["web-0"].pid == before["web-0"]  # already new: kept
    assert fake.running["web-1"].pid != before["web-1"]
    assert_promise(fake, old, new)


def test_a_new_actor_that_fails_is_removed_and_nothing_else_is_touched():
    old = spec_of()
    new = load_text(SPEC.format(greeting="v1", batch="b1", port=18080)
                    + "  extra:\n    class: apps:Chatty\n")
    fake, error, _ = apply(old, new, {("ready", "extra-0"): 1})
    assert error is not None and "extra-0" in error
    assert_promise(fake, old, new)


@pytest.mark.parametrize("path", sorted(p.name for p in (Path(__file__).resolve().parent.parent / "specs").glob("*.yaml")
                                        if p.name != "web.values.yaml"))
def test_every_example_spec_validates_again_from_what_the_cluster_keeps(path):
    """The stored spec and a revision's spec are `Spec.record()`: read back, the same actors with the
    same config hashes (a layout buffer's defaulted dtype must not come back as set)."""
    import oobspec
    folder = Path(__file__).resolve().parent.parent / "specs"
    spec = oobspec.load(folder / path, value_files=[folder / "web.values.yaml"] if path == "web.yaml" else ())
    again = Revision.of(spec, folder, {}, {}).spec_model()
    assert {a: config_hash(again, a) for a in again.actors} == {a: config_hash(spec, a) for a in spec.actors}


def test_ctrl_c_mid_roll_removes_what_the_apply_started_and_keeps_what_replaced_a_running_replica():
    """Interrupted while the second replica's stand-in starts: the new actor's replica goes, web-0
    (already replaced) keeps the new version, web-1 keeps serving; no stand-in, no dark port."""
    old = spec_of()
    new = load_text(SPEC.format(greeting="v2", batch="b1", port=18080) + "  extra:\n    class: apps:Chatty\n")
    fake = FakeCluster([Revision.of(old, "/tmp", {}, {})])
    fake.seed(Builder(old, lambda _m: None))
    fake.faults = {("interrupt", "_oob-surge-web-1"): 1}
    fake.history.clear()
    fake._snapshot()
    observed = fake.observed()
    executor = Executor(new, Builder(new, lambda _m: None), fake, lambda _m: None, detached=True, timeout=10)
    executor.observed({(r.actor, r.replica): fake.running[replica_name(r.actor, r.replica)] for r in observed.replicas})
    with pytest.raises(KeyboardInterrupt):
        executor.execute(make_plan(new, observed))
    removed = executor.interrupted()
    assert removed == ["_oob-surge-web-1", "extra-0"]
    assert_promise(fake, old, new)
    assert version(fake, new, "web-0") == "new" and version(fake, new, "web-1") == "old"


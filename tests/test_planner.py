"""Phase 5: the pure planner — desired spec + observed state → actions, order, links, totals."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from oobspec.contract import Topology, choose_transport
from oobspec.models import Spec
from oobspec.nodes import NodeState, node_matches
from oobspec.plan import (
    Observed,
    ReplicaState,
    config_hash,
    make_plan,
    strategy_of,
    start_waves,
)
from oobspec.report import plan_text

pytestmark = pytest.mark.timeout(30)


def spec_of(actors: dict, links: list | None = None, **extra) -> Spec:
    return Spec.model_validate({"version": 1, "name": "p", "actors": actors, "links": links or [], **extra})


def base() -> dict:
    return {
        "store": {"class": "m:Store", "restarts": -1, "servers": [{"name": "http", "port": 0}]},
        "web": {"class": "m:Web", "replicas": 2, "restarts": -1, "connect": {"store": "store.http"},
                "servers": [{"name": "http", "port": 8000}]},
        "batch": {"class": "m:Batch"},
    }


def running(spec: Spec, **overrides) -> Observed:
    """What the cluster looks like right after applying `spec`."""
    replicas = []
    for name, actor in spec.actors.items():
        for i in range(actor.replicas):
            replicas.append(ReplicaState(name, i, config_hash(spec, name), pid=100 + i, node_id="n1"))
    return Observed(online=True, replicas=replicas, **overrides)


def actions(plan) -> set[tuple[str, str, tuple[int, ...]]]:
    return {(a.kind, a.actor, tuple(a.replicas)) for a in plan.actions}


def reasons(plan) -> dict[tuple[str, str], str]:
    return {(a.kind, a.actor): a.reason for a in plan.actions}


def test_offline_plan_creates_everything():
    spec = spec_of(base())
    plan = make_plan(spec)
    assert plan.online is False and plan.name == "p" and plan.namespace == "oob-p"
    assert actions(plan) == {("create", "store", (0,)), ("create", "web", (0, 1)), ("create", "batch", (0,))}
    assert all(a.reason == "new-actor" for a in plan.actions)
    assert [a.kind for a in plan.changes] == ["create"] * 3


def test_same_spec_twice_keeps_everything():
    spec = spec_of(base())
    plan = make_plan(spec, running(spec))
    assert plan.online is True
    assert {a.kind for a in plan.actions} == {"keep"}
    assert actions(plan) == {("keep", "store", (0,)), ("keep", "web", (0, 1)), ("keep", "batch", (0,))}
    assert plan.changes == []
    assert all(a.reason == "unchanged" for a in plan.actions)


def test_hash_is_stable_and_ignores_when_and_address():
    a = spec_of(base())
    data = base()
    data["batch"]["when"] = True
    b = spec_of(data, ray={"address": "ray://elsewhere:10001"})
    assert config_hash(a, "batch") == config_hash(b, "batch")
    assert config_hash(a, "web") == config_hash(spec_of(base()), "web")


def test_one_actor_changed_only_it_is_replaced():
    old = spec_of(base())
    data = base()
    data["batch"]["env"] = {"MODE": "fast"}
    new = spec_of(data)
    plan = make_plan(new, running(old))
    assert actions(plan) == {("keep", "store", (0,)), ("keep", "web", (0, 1)), ("replace", "batch", (0,))}
    assert reasons(plan)[("replace", "batch")] == "spec-changed"


def test_removed_actor_is_deleted():
    old = spec_of(base())
    data = base()
    del data["batch"]
    plan = make_plan(spec_of(data), running(old))
    assert ("delete", "batch", (0,)) in actions(plan)
    assert reasons(plan)[("delete", "batch")] == "removed"
    assert {a.kind for a in plan.actions if a.actor != "batch"} == {"keep"}


def test_new_actor_is_created_beside_kept_ones():
    old = spec_of(base())
    data = base()
    data["extra"] = {"class": "m:Extra"}
    plan = make_plan(spec_of(data), running(old))
    assert ("create", "extra", (0,)) in actions(plan)
    assert {a.kind for a in plan.actions if a.actor != "extra"} == {"keep"}


def test_dead_replica_is_replaced():
    spec = spec_of(base())
    observed = running(spec)
    observed.replicas[0].alive = False  # store-0
    plan = make_plan(spec, observed)
    assert ("replace", "store", (0,)) in actions(plan)
    assert reasons(plan)[("replace", "store")] == "not-alive"


def test_replicas_up():
    old = spec_of(base())
    data = base()
    data["web"]["replicas"] = 4
    plan = make_plan(spec_of(data), running(old))
    web = {a.kind: a for a in plan.actions if a.actor == "web"}
    assert web["create"].replicas == [2, 3]
    assert (web["create"].reason, web["create"].was, web["create"].now) == ("scaled", 2, 4)
    assert web["create"].describe() == "replicas 2 -> 4"
    # scaling in place: the existing replicas are kept and learn the new count live
    assert web["keep"].replicas == [0, 1] and "replace" not in web
    assert {a.kind for a in plan.actions if a.actor != "web"} == {"keep"}


def test_replicas_down():
    old = spec_of(base())
    data = base()
    data["web"]["replicas"] = 1
    plan = make_plan(spec_of(data), running(old))
    web = {a.kind: a for a in plan.actions if a.actor == "web"}
    assert web["delete"].replicas == [1] and (web["delete"].reason, web["delete"].describe()) == ("scaled", "replicas 2 -> 1")
    assert "create" not in web
    assert {a.kind for a in plan.actions if a.actor != "web"} == {"keep"}


def test_dependent_of_a_replaced_dynamic_port_peer_is_kept():
    old = spec_of(base())
    data = base()
    data["store"]["env"] = {"X": "1"}  # store (port 0) is replaced: its successor asks for the same port
    plan = make_plan(spec_of(data), running(old))
    assert ("replace", "store", (0,)) in actions(plan)
    assert ("keep", "web", (0, 1)) in actions(plan)  # told any new endpoint in place (the update step)
    assert ("keep", "batch", (0,)) in actions(plan)
    assert plan.steps[-1].kind == "update"


def test_dependent_of_a_replaced_fixed_port_peer_is_kept():
    data = base()
    data["store"]["servers"][0]["port"] = 9000
    old = spec_of(data)
    data = copy.deepcopy(data)
    data["store"]["env"] = {"X": "1"}
    plan = make_plan(spec_of(data), running(old))
    assert ("replace", "store", (0,)) in actions(plan)
    assert ("keep", "web", (0, 1)) in actions(plan)


def test_dynamic_port_replacement_stops_at_the_replaced_actor():
    actors = {
        "a": {"class": "m:A", "servers": [{"name": "s", "port": 0}]},
        "b": {"class": "m:B", "connect": {"a": "a.s"}, "servers": [{"name": "s", "port": 0}]},
        "c": {"class": "m:C", "connect": {"b": "b.s"}},
        "d": {"class": "m:D", "connect": {"c": "a.s"}, "servers": [{"name": "s", "port": 7000}]},
        "e": {"class": "m:E", "connect": {"d": "d.s"}},
    }
    old = spec_of(actors)
    changed = copy.deepcopy(actors)
    changed["a"]["restarts"] = 2
    plan = make_plan(spec_of(changed), running(old))
    kinds = {a.actor: a.kind for a in plan.actions}
    assert kinds == {"a": "replace", "b": "keep", "c": "keep", "d": "keep", "e": "keep"}


def test_peer_change_of_replicas_keeps_dependents():
    old = spec_of(base())
    data = base()
    data["store"]["replicas"] = 2  # web's endpoint list for store changes: updated in place
    plan = make_plan(spec_of(data), running(old))
    assert actions(plan) == {("create", "store", (1,)), ("keep", "store", (0,)), ("keep", "web", (0, 1)),
                             ("keep", "batch", (0,))}


def test_observed_actor_of_another_generation_is_replaced():
    spec = spec_of(base())
    observed = running(spec)
    observed.replicas[1].config_hash = "0" * 16  # web-0 runs an older config
    plan = make_plan(spec, observed)
    web = {a.kind: a.replicas for a in plan.actions if a.actor == "web"}
    assert web == {"replace": [0], "keep": [1]}


def test_plan_is_pure():
    spec = spec_of(base())
    observed = running(spec)
    before = copy.deepcopy(observed)
    first = make_plan(spec, observed).to_dict()
    assert make_plan(spec, observed).to_dict() == first
    assert observed == before
    json.dumps(first)  # JSON-ready for `oob plan -o json`


# --- start order ------------------------------------------------------------------------------------


def test_start_waves_are_topological():
    actors = {
        "front": {"class": "m:A", "connect": {"api": "api.http", "auth": "auth.http"}},
        "api": {"class": "m:A", "connect": {"db": "db.tcp"}, "servers": [{"name": "http"}]},
        "auth": {"class": "m:A", "connect": {"db": "db.tcp"}, "servers": [{"name": "http"}]},
        "db": {"command": ["db"], "servers": [{"name": "tcp", "protocol": "tcp"}]},
        "lone": {"class": "m:A"},
    }
    waves = start_waves(spec_of(actors))
    assert waves == [["db", "lone"], ["api", "auth"], ["front"]]
    plan = make_plan(spec_of(actors))
    assert plan.waves == waves
    position = {a: i for i, wave in enumerate(waves) for a in wave}
    for name, actor in actors.items():
        for ref in actor.get("connect", {}).values():
            assert position[ref.split(".")[0]] < position[name]


def test_start_waves_survive_a_cycle():
    actors = {"a": {"class": "m:A", "connect": {"b": "b.s"}, "servers": [{"name": "s"}]},
              "b": {"class": "m:A", "connect": {"a": "a.s"}, "servers": [{"name": "s"}]},
              "c": {"class": "m:A"}}
    waves = start_waves(spec_of(actors))
    assert waves == [["c"], ["a", "b"]]


def test_start_waves_ignore_missing_peers():
    assert start_waves(spec_of({"a": {"class": "m:A", "connect": {"x": "ghost.s"}}})) == [["a"]]


# --- servers --------------------------------------------------------------------------------------


def test_server_rows():
    actors = {"web": {"class": "m:A", "replicas": 3, "servers": [
        {"name": "http", "port": 8000}, {"name": "rpc", "protocol": "grpc", "port": 0, "host": "0.0.0.0"}]}}
    plan = make_plan(spec_of(actors))
    urls = [(s.replica, s.server, s.url) for s in plan.servers]
    assert urls == [(0, "http", "http://127.0.0.1:8000"), (0, "rpc", "0.0.0.0:auto"),
                    (1, "http", "http://127.0.0.1:8001"), (1, "rpc", "0.0.0.0:auto"),
                    (2, "http", "http://127.0.0.1:8002"), (2, "rpc", "0.0.0.0:auto")]


def test_server_rows_use_observed_endpoints_of_kept_replicas():
    spec = spec_of({"kv": {"class": "m:A", "servers": [{"name": "rpc", "protocol": "grpc", "port": 0}]}})
    observed = running(spec)
    observed.replicas[0].endpoints = {"rpc": "127.0.0.1:43121"}
    assert make_plan(spec, observed).servers[0].url == "127.0.0.1:43121"
    observed.replicas[0].config_hash = "stale"
    assert make_plan(spec, observed).servers[0].url == "127.0.0.1:auto"


# --- auto transport -------------------------------------------------------------------------------


def link_spec(device: str, replicas: int = 2, transport: str = "auto") -> Spec:
    gpus = 1 if device == "gpu" else 0
    buf = {"shape": [16], "device": device}
    return spec_of(
        {"src": {"class": "m:A", "resources": {"gpus": gpus}, "buffers": {"w": buf}},
         "dst": {"class": "m:A", "replicas": replicas, "resources": {"gpus": gpus}, "buffers": {"w": buf}}},
        [{"name": "w", "from": "src.w", "to": ["dst.w"], "transport": transport}])


def one_node(n: int = 2) -> dict:
    return {("src", 0): Topology("node-a", "gpu-0"), **{("dst", i): Topology("node-a", f"gpu-{i + 1}") for i in range(n)}}


def two_nodes(n: int = 2) -> dict:
    return {("src", 0): Topology("node-a", "gpu-0"), **{("dst", i): Topology("node-b", f"gpu-{i}") for i in range(n)}}


@pytest.mark.parametrize("device, topology, transport, reason", [
    ("cpu", one_node(), "shm", "placed-on-one-node"),
    ("gpu", one_node(), "cuda_ipc", "placed-on-one-node"),
    ("cpu", two_nodes(), "object_store", "placed-on-several-nodes"),
    ("gpu", two_nodes(), "nccl", "placed-on-several-nodes"),
])
def test_auto_transport_on_synthetic_topologies(device, topology, transport, reason):
    (row,) = make_plan(link_spec(device), topology=topology).links
    assert (row.name, row.source, row.target, row.device) == ("w", "src.w", "dst.w", device)
    assert (row.transport, row.reason) == (transport, reason)


def test_auto_transport_mixed_placement_lists_both():
    topology = {("src", 0): Topology("node-a"), ("dst", 0): Topology("node-a"), ("dst", 1): Topology("node-b")}
    (row,) = make_plan(link_spec("gpu"), topology=topology).links
    assert row.transport == "cuda_ipc/nccl" and row.reason == "placed-on-several-nodes"


@pytest.mark.parametrize("device, options", [("cpu", ["shm", "object_store"]), ("gpu", ["cuda_ipc", "nccl"])])
def test_auto_transport_unknown_placement(device, options):
    (row,) = make_plan(link_spec(device)).links
    assert (row.transport, row.options, row.reason) == (None, options, "not-placed-yet")
    assert row.describe() == (f"auto ({' or '.join(options)})", "decided when the replicas are placed")
    partial = {("src", 0): Topology("node-a")}  # not every end placed yet
    (row,) = make_plan(link_spec(device), topology=partial).links
    assert row.transport is None and row.options == options


@pytest.mark.parametrize("device, transport", [("cpu", "shm"), ("gpu", "cuda_ipc")])
def test_auto_transport_single_node(device, transport):
    (row,) = make_plan(link_spec(device), single_node=True).links
    assert (row.transport, row.reason) == (transport, "one-node")


def test_auto_transport_from_observed_nodes():
    spec = link_spec("cpu")
    observed = running(spec)
    observed.replicas[-1].node_id = "n2"
    (row,) = make_plan(spec, observed).links
    assert row.transport == "object_store/shm"


def test_explicit_transport_is_kept():
    (row,) = make_plan(link_spec("gpu", transport="nccl"), topology=one_node()).links
    assert (row.transport, row.reason) == ("nccl", "set-in-spec")


def test_choose_transport():
    a, b = Topology("n1"), Topology("n2")
    assert choose_transport("cpu", a, a) == "shm" and choose_transport("cpu", a, b) == "object_store"
    assert choose_transport("gpu", a, a) == "cuda_ipc" and choose_transport("gpu", a, b) == "nccl"
    assert choose_transport("gpu", None, a) is None


def test_link_change_replaces_both_ends_only():
    old = link_spec("cpu")
    data = old.model_dump(by_alias=True, exclude_defaults=True)
    data["links"][0]["transport"] = "object_store"
    data["actors"]["other"] = {"class": "m:O"}
    new = Spec.model_validate(data)
    observed = running(old)
    observed.replicas.append(ReplicaState("other", 0, config_hash(new, "other")))
    kinds = {a.actor: a.kind for a in make_plan(new, observed).actions}
    assert kinds == {"src": "replace", "dst": "replace", "other": "keep"}


# --- totals ---------------------------------------------------------------------------------------


def test_resource_totals():
    actors = {
        "a": {"class": "m:A", "replicas": 3, "resources": {"cpus": 0.5, "gpus": 0.25, "memory": "512MiB"}},
        "b": {"class": "m:A", "resources": {"cpus": 2, "memory": 1000}},
        "c": {"command": ["x"]},
    }
    totals = make_plan(spec_of(actors)).resources
    assert totals == {"actors": 5, "cpus": 3.5, "gpus": 0.75, "memory_bytes": 3 * 512 * 1024**2 + 1000}


# --- the spec layer never needs Ray -----------------------------------------------------------------

NO_RAY = """
import sys
from pathlib import Path
import oobspec
from oobspec.plan import make_plan
from oobspec.report import plan_text
from oobspec.render import to_yaml
specs = Path("specs")
for path in sorted(specs.glob("*.yaml")):
    if path.name.endswith(".values.yaml"):
        continue
    values = [specs / "web.values.yaml"] if path.name == "web.yaml" else []
    spec = oobspec.load(path, value_files=values)
    assert oobspec.lint(spec) == [], path
    assert oobspec.lint_file(path, value_files=values, imports=False) == [], path
    plan_text(make_plan(spec, single_node=True))
    to_yaml(spec._source.document.data)
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
print("RAY MODULES:", loaded)
assert not loaded, loaded
"""


def test_spec_layer_never_imports_ray():
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", NO_RAY], cwd=root, env=env, capture_output=True, text=True, timeout=25, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RAY MODULES: []" in proc.stdout


def test_code_changed_replaces_only_that_actor():
    spec = spec_of(base())
    observed = running(spec)
    for r in observed.replicas:
        r.code_hash = "old"
    plan = make_plan(spec, observed, code={"store": "old", "web": "new", "batch": "old"})
    assert actions(plan) == {("keep", "store", (0,)), ("replace", "web", (0, 1)), ("keep", "batch", (0,))}
    assert reasons(plan)[("replace", "web")] == "code-changed"
    # Replicas from before code versions (no digest) are not replaced for it.
    for r in observed.replicas:
        r.code_hash = ""
    assert not make_plan(spec, observed, code={"web": "new"}).changes


def test_a_busy_replica_is_kept_a_dead_one_replaced():
    spec = spec_of(base())
    observed = running(spec)
    web0, web1 = [r for r in observed.replicas if r.actor == "web"]
    web0.answering = False  # alive by Ray's account, only slow
    web1.alive = False
    plan = make_plan(spec, observed)
    assert {(a.kind, a.actor, tuple(a.replicas), a.reason) for a in plan.actions if a.actor == "web"} == {
        ("keep", "web", (0,), "busy"), ("replace", "web", (1,), "not-alive")}


def test_code_digest_follows_local_imports_not_installed_packages(tmp_path):
    from oobspec.code import code_digest
    (tmp_path / "svc.py").write_text("import json\nimport numpy\nfrom helpers import X\nfrom pkg.sub import y\n\n"
                                     "class Svc:\n    pass\n")
    (tmp_path / "helpers.py").write_text("X = 1\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub.py").write_text("from . import deep\ny = 2\n")
    (tmp_path / "pkg" / "deep.py").write_text("Z = 3\n")
    (tmp_path / "unrelated.py").write_text("W = 4\n")
    first = code_digest("svc:Svc", tmp_path)
    assert len(first) == 16 and code_digest("svc:Svc", tmp_path) == first
    (tmp_path / "unrelated.py").write_text("W = 5\n")
    assert code_digest("svc:Svc", tmp_path) == first  # not imported: does not count
    changed = []
    for name, text in (("helpers.py", "X = 2\n"), ("pkg/deep.py", "Z = 4\n"), ("svc.py", "class Svc:\n    x = 1\n")):
        (tmp_path / name).write_text(text)
        changed.append(code_digest("svc:Svc", tmp_path))
    assert len({first, *changed}) == 4  # each edit, even two imports deep, changes the digest
    assert code_digest("json:JSONDecoder", tmp_path) == code_digest("json:JSONEncoder", tmp_path)  # stdlib: no files


def test_code_digest_is_the_same_in_any_folder_and_never_covers_oobspec(tmp_path, monkeypatch):
    """Ray Jobs unpacks the spec's folder elsewhere; oobspec (an editable install here) and any
    installed package are the tool's, not the user's code."""
    import oobspec.code as code
    for folder in ("here", "elsewhere/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "svc.py").write_text("import oobspec\nimport oobspec.replica.actor\nimport helpers\n"
                                                  "class Svc:\n    pass\n")
        (tmp_path / folder / "helpers.py").write_text("X = 1\n")
    first = code.code_digest("svc:Svc", tmp_path / "here")
    assert code.code_digest("svc:Svc", tmp_path / "elsewhere/deeper") == first
    # As if oobspec's own files were edited (a `git pull` of the tool): the digest stays.
    real_find = code._find
    seen = []
    monkeypatch.setattr(code, "_find", lambda name: seen.append(name) or real_find(name))
    assert code.code_digest("svc:Svc", tmp_path / "here") == first
    assert "oobspec" in seen and all(real_find(n) is None for n in seen if n.startswith("oobspec"))


# --- how changes are carried out: strategies and steps ---------------------------------------------


def steps(plan) -> list[tuple]:
    return [(s.kind.value, s.actor, tuple(s.replicas)) for s in plan.steps]


def test_a_changed_server_actor_rolls_one_replica_at_a_time_after_its_peers():
    old = spec_of(base())
    data = base()
    data["web"]["kwargs"] = {"greeting": "new"}
    data["store"]["kwargs"] = {"size": 2}
    plan = make_plan(spec_of(data), running(old))
    replace = {a.actor: a for a in plan.actions if a.kind == "replace"}
    assert {(a.strategy, a.stop_first) for a in replace.values()} == {("rolling", None)}
    assert steps(plan) == [("roll", "store", (0,)), ("roll", "web", (0,)), ("roll", "web", (1,)),
                           ("update", None, ())]
    assert replace["web"].describe() == "spec changed; rolling, no downtime"


@pytest.mark.parametrize("change, why", [
    ({"update": "stop-first"}, "configured"),
    ({"servers": [{"name": "t", "protocol": "tcp", "port": 7000}]}, "tcp"),
    ({"servers": []}, "no-servers"),
])
def test_what_cannot_roll_is_replaced_stop_first_and_the_plan_says_why(change, why):
    old = spec_of(base())
    data = base()
    data["web"].update(change, kwargs={"v": 2})
    plan = make_plan(spec_of(data), running(old))
    (web,) = [a for a in plan.actions if a.actor == "web" and a.kind == "replace"]
    assert (web.strategy, web.stop_first) == ("stop-first", why)
    assert steps(plan)[:2] == [("stop", "web", (0, 1)), ("start", "web", (0, 1))]
    assert "stop-first: " in web.describe()


def test_command_link_and_placement_actors_are_replaced_stop_first():
    actors = {"db": {"command": ["redis-server", "--port", "{port}"],
                     "servers": [{"name": "main", "protocol": "tcp", "port": 6379}]}}
    assert strategy_of(spec_of(actors), "db") == ("stop-first", "command")
    linked = link_spec("cpu")
    linked.actors["dst"].servers = spec_of(base()).actors["web"].servers
    assert strategy_of(linked, "dst") == ("stop-first", "links")
    placed = spec_of(base(), ray={"placement": "PACK"})
    assert strategy_of(placed, "web") == ("stop-first", "placement")


def test_drain_and_update_change_nothing_that_runs():
    old = spec_of(base())
    data = base()
    data["web"].update(drain=30, update="stop-first")
    assert not make_plan(spec_of(data), running(old)).changes


def test_step_order_stop_place_start_by_wave_roll_wire_update():
    actors = {
        "a": {"class": "m:A", "servers": [{"name": "s", "port": 0}]},
        "b": {"class": "m:B", "connect": {"a": "a.s"}, "replicas": 2, "servers": [{"name": "s", "port": 0}]},
        "c": {"class": "m:C", "connect": {"b": "b.s"}},
        "gone": {"class": "m:G"},
    }
    old = spec_of(actors)
    new = copy.deepcopy(actors)
    del new["gone"]
    new["a"]["kwargs"] = {"v": 2}  # rolls
    new["c"]["kwargs"] = {"v": 2}  # no servers: stop-first
    new["b"]["replicas"] = 3
    new["d"] = {"class": "m:D", "connect": {"a": "a.s"}}
    plan = make_plan(spec_of(new), running(old))
    assert steps(plan) == [
        ("stop", "c", (0,)), ("stop", "gone", (0,)),
        ("roll", "a", (0,)),
        ("start", "b", (2,)), ("start", "d", (0,)),
        ("start", "c", (0,)),
        ("update", None, ())]
    assert [s.wave for s in plan.steps if s.kind == "start"] == [1, 1, 2]


def test_steps_run_in_order_and_one_waves_starts_together():
    """A fake executor records what the plan's walker hands it: no Ray."""
    from oobspec.control.executor import Steps

    class Recorder(Steps):
        def __init__(self):
            self.calls = []

        def one(self, step):
            self.calls.append((step.kind.value, step.actor, tuple(step.replicas)))

        stop = place = roll = wire = update = one

        def start(self, batch):
            self.calls.append(("start", [(s.actor, tuple(s.replicas)) for s in batch]))

    links = [{"name": "w", "from": "a.buf", "to": "c.buf"}]
    actors = {"a": {"class": "m:A", "buffers": {"buf": {"shape": [1]}}},
              "b": {"class": "m:B", "servers": [{"name": "s"}]},
              "c": {"class": "m:C", "connect": {"b": "b.s"}, "buffers": {"buf": {"shape": [1]}}}}
    spec = spec_of(actors, links, ray={"placement": "PACK"})
    recorder = Recorder()
    recorder.run_steps(make_plan(spec))
    assert recorder.calls == [("place", None, ()), ("start", [("a", (0,)), ("b", (0,))]), ("start", [("c", (0,))]),
                              ("wire", None, ())]


def test_plan_json_has_codes_not_prose():
    old = spec_of(base())
    data = base()
    data["web"]["replicas"] = 3
    data["store"]["kwargs"] = {"v": 1}
    plan = json.loads(json.dumps(make_plan(spec_of(data), running(old)).to_dict()))
    assert {(a["kind"], a["actor"], a["reason"], a["strategy"]) for a in plan["actions"]} == {
        ("replace", "store", "spec-changed", "rolling"), ("create", "web", "scaled", None),
        ("keep", "web", "unchanged", None), ("keep", "batch", "unchanged", None)}
    assert [s["kind"] for s in plan["steps"]] == ["roll", "start", "update"]


# --- Step 10: nodes -------------------------------------------------------------------------

def node(node_id: str, address: str, cpus: float = 4, free: float | None = 4, **labels) -> NodeState:
    return NodeState(node_id, address, labels, {"CPU": cpus, "memory": 8 * 2**30},
                     None if free is None else {"CPU": free, "memory": 8 * 2**30} if free else {"memory": 8 * 2**30})


@pytest.mark.parametrize("selector, labels, match", [
    ({}, {}, True),
    ({"zone": "a"}, {"zone": "a"}, True),
    ({"zone": "a"}, {"zone": "b"}, False),
    ({"zone": "a"}, {}, False),
    ({"zone": "!a"}, {"zone": "b"}, True),
    ({"zone": "!a"}, {}, True),
    ({"zone": "!a"}, {"zone": "a"}, False),
    ({"zone": "in(a, b)"}, {"zone": "b"}, True),
    ({"zone": "in(a,b)"}, {"zone": "c"}, False),
    ({"zone": "in(a,b)"}, {}, False),
    ({"zone": "!in(a,b)"}, {"zone": "c"}, True),
    ({"zone": "!in(a,b)"}, {"zone": "a"}, False),
    ({"zone": "!in(a,b)"}, {}, True),
    ({"zone": "a", "disk": "ssd"}, {"zone": "a", "disk": "hdd"}, False),
])
def test_node_labels_match_rays_label_selector(selector, labels, match):
    assert node_matches(selector, labels) is match


def spread(**web) -> Spec:
    return spec_of({"web": {"class": "m:Web", "servers": [{"name": "http", "port": 8000}], **web}})


def test_plan_warns_of_labels_no_alive_node_has():
    spec = spread(replicas=2, labels={"zone": "c"})
    nodes = [node("n1", "10.0.0.1", zone="a"), node("n2", "10.0.0.2", zone="b"),
             NodeState("n3", "10.0.0.3", {"zone": "c"}, alive=False)]
    plan = make_plan(spec, Observed(online=True, nodes=nodes))
    assert plan.warnings == ["actor web: no alive node has labels {zone: c} (its replicas will wait)"]
    assert "warnings:\n  ! actor web: no alive node has labels {zone: c}" in plan_text(plan)
    assert plan.to_dict()["warnings"] == plan.warnings


def test_plan_warns_when_max_per_node_times_nodes_is_below_replicas():
    nodes = [node("n1", "10.0.0.1", zone="a"), node("n2", "10.0.0.2", zone="a"), node("n3", "10.0.0.3", zone="a"),
             node("n4", "10.0.0.4", zone="b")]
    plan = make_plan(spread(replicas=4, max_per_node=1, labels={"zone": "a"}), Observed(online=True, nodes=nodes))
    assert plan.warnings == ["actor web: 4 replicas, max_per_node 1, 3 matching nodes: 1 will wait"]
    fits = make_plan(spread(replicas=4, max_per_node=2, labels={"zone": "a"}), Observed(online=True, nodes=nodes))
    assert fits.warnings == []


def test_plan_warns_of_a_replica_bigger_than_any_node_and_of_more_than_all_nodes_have():
    nodes = [node("n1", "10.0.0.1", cpus=4), node("n2", "10.0.0.2", cpus=2)]
    big = make_plan(spread(resources={"cpus": 8}), Observed(online=True, nodes=nodes))
    assert big.warnings == ["actor web: needs 8 CPU per replica, no alive node has that much (its replicas will wait)",
                            "the spec asks for 8 CPU in all, the alive nodes have 6 (some replicas will wait)"]
    gpu = make_plan(spread(resources={"gpus": 1, "memory": "1GiB"}, labels={"zone": "a"}),
                    Observed(online=True, nodes=[node("n1", "10.0.0.1", zone="a")]))
    assert gpu.warnings[0] == ("actor web: needs 1 GPU, 1.0 GiB memory per replica, no alive node with labels "
                               "{zone: a} has that much (its replicas will wait)")
    many = make_plan(spread(replicas=4, resources={"cpus": 2}), Observed(online=True, nodes=nodes))
    assert many.warnings == ["the spec asks for 8 CPU in all, the alive nodes have 6 (some replicas will wait)"]


def test_capacity_warnings_need_a_cluster_and_its_nodes():
    spec = spread(replicas=4, max_per_node=1, labels={"zone": "c"})
    assert make_plan(spec).warnings == []
    assert make_plan(spec, Observed(online=True)).warnings == []  # nodes not looked at


def test_plan_warns_of_a_shared_port_without_tcp_migrate_req():
    spec = spread(replicas=2, servers=[{"name": "http", "port": 8000, "shared": True}, {"name": "admin", "port": 9000}])
    assert make_plan(spec, migrate_req=False).warnings == [
        "actor web: server http is shared but net.ipv4.tcp_migrate_req is 0 on this machine: a draining replica "
        "resets connections queued on it (sysctl -w net.ipv4.tcp_migrate_req=1)"]
    assert make_plan(spec, migrate_req=True).warnings == make_plan(spec).warnings == []


def on_nodes(spec: Spec, where: list[str]) -> Observed:
    """`spec` running, replica i on node where[i] (an older version of it: it will be replaced)."""
    return Observed(True, [ReplicaState("web", i, "old", pid=100 + i, node_id=n) for i, n in enumerate(where)])


def test_a_stand_in_without_room_on_its_node_makes_that_replica_stop_first():
    spec = spread(replicas=3, resources={"cpus": 2})
    observed = on_nodes(spec, ["n1", "n2", "n1"])
    observed.nodes = [node("n1", "10.0.0.1", free=0.5), node("n2", "10.0.0.2", free=2)]
    plan = make_plan(spec, observed)
    replace = [a for a in plan.actions if a.kind == "replace"]
    assert [(a.replicas, a.strategy, a.stop_first) for a in replace] == [
        ([0, 2], "stop-first", "no-room"), ([1], "rolling", None)]
    assert replace[0].describe() == ("spec changed; stop-first: node 10.0.0.1 has no room for a stand-in "
                                     "(needs 2 CPU, 0.5 free)")
    assert steps(plan) == [("stop", "web", (0, 2)), ("start", "web", (0, 2)), ("roll", "web", (1,))]
    assert plan.warnings == []
    assert "~ replace  web [0,2]  (spec changed; stop-first: node 10.0.0.1 has no room" in plan_text(plan)
    assert plan.to_dict()["actions"][0]["room"] == {"node": "10.0.0.1", "short": {"CPU": [2.0, 0.5]}}


def test_a_resource_none_of_is_free_is_no_room_and_memory_reads_as_a_size():
    spec = spread(resources={"memory": "2GiB", "custom": {"tpu": 1}})
    observed = on_nodes(spec, ["n1"])
    observed.nodes = [NodeState("n1", "10.0.0.1", {}, {"memory": 2**34, "tpu": 1}, {"memory": 2**29})]
    (replace,) = [a for a in make_plan(spec, observed).actions if a.kind == "replace"]
    assert replace.describe().endswith("(needs 2.0 GiB memory, 512.0 MiB free; needs 1 tpu, 0 free)")


def test_no_room_wait_keeps_rolling_and_says_the_roll_waits():
    spec = spread(replicas=2, resources={"cpus": 2}, no_room="wait")
    observed = on_nodes(spec, ["n1", "n2"])
    observed.nodes = [node("n1", "10.0.0.1", free=0), node("n2", "10.0.0.2")]
    plan = make_plan(spec, observed)
    assert [(a.replicas, a.strategy) for a in plan.actions if a.kind == "replace"] == [([0, 1], "rolling")]
    assert plan.warnings == ["actor web: node 10.0.0.1 has no room for a stand-in (needs 2 CPU, 0 free): the roll of "
                             "replica 0 waits for room (no_room: wait)"]


@pytest.mark.parametrize("free", [None, 4])
def test_room_unknown_or_enough_rolls(free):
    spec = spread(replicas=2, resources={"cpus": 2})
    observed = on_nodes(spec, ["n1", "n1"])
    observed.nodes = [node("n1", "10.0.0.1", free=free)]
    plan = make_plan(spec, observed)
    assert [(a.replicas, a.strategy) for a in plan.actions if a.kind == "replace"] == [([0, 1], "rolling")]
    assert plan.warnings == []


def test_a_replica_asking_for_nothing_always_has_room():
    spec = spread(replicas=2)
    observed = on_nodes(spec, ["n1", "n2"])
    observed.nodes = [node("n1", "10.0.0.1", free=0), node("n2", "10.0.0.2", free=0)]
    assert {a.strategy for a in make_plan(spec, observed).actions if a.kind == "replace"} == {"rolling"}


def test_max_per_node_and_no_room_change_no_hash_labels_do():
    old = spread(replicas=2)
    assert config_hash(spread(replicas=2, max_per_node=1, no_room="wait"), "web") == config_hash(old, "web")
    assert not make_plan(spread(replicas=2, max_per_node=1, no_room="wait"), running(old)).changes
    assert config_hash(spread(replicas=2, labels={"zone": "a"}), "web") != config_hash(old, "web")


def test_a_shared_servers_rows_bind_one_port_on_every_replica():
    spec = spread(replicas=3, servers=[{"name": "http", "port": 8000, "shared": True}, {"name": "admin", "port": 9000}])
    rows = {(r.server, r.replica): r.url for r in make_plan(spec).servers}
    assert [rows["http", i] for i in range(3)] == ["http://127.0.0.1:8000"] * 3
    assert [rows["admin", i] for i in range(3)] == [f"http://127.0.0.1:{9000 + i}" for i in range(3)]


def test_a_node_host_row_names_the_replicas_node_once_known():
    spec = spread(replicas=2, servers=[{"name": "http", "port": 8000, "host": "node", "shared": True}])
    observed = on_nodes(spec, ["n1", "gone"])
    observed.nodes = [node("n1", "10.0.0.1")]
    assert [r.url for r in make_plan(spec, observed).servers] == ["http://10.0.0.1:8000", "http://<node>:8000"]

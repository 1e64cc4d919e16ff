"""`oob status` across nodes, pure (no Ray): each replica's node address, and for one Ray has yet
to place, what it waits for."""
from __future__ import annotations

import pytest

from oobspec.contract import ReplicaInfo
from oobspec.control.commands import _replica_row, explain_pending, unplaced
from oobspec.control.state import ActorRecord
from oobspec.models import Spec
from oobspec.nodes import NodeState, pending_reason
from oobspec.report import status_text

pytestmark = pytest.mark.timeout(30)


def actor(**fields):
    return Spec.model_validate({"version": 1, "name": "s", "actors": {"web": {"class": "m:W", **fields}}}).actors["web"]


def node(node_id: str, cpus: float = 4, free: float | None = 4, alive: bool = True, **labels) -> NodeState:
    return NodeState(node_id, f"10.0.0.{node_id[-1]}", labels, {"CPU": cpus},
                     None if free is None else {"CPU": free} if free else {}, alive)


def record(name: str, state: str = "ALIVE", pid: int = 7, node_id: str = "n1", worker: str = "w") -> ActorRecord:
    return ActorRecord(name, state, pid, worker, node_id, 0, 1, None)


@pytest.mark.parametrize("fields, nodes, others, reason", [
    ({"labels": {"zone": "c"}}, [node("n1", zone="a"), node("n2", zone="c", alive=False)], [],
     "needs {zone: c}, no alive node has it"),
    ({"resources": {"cpus": 8}}, [node("n1"), node("n2")], [], "needs 8 CPU, no alive node has that much"),
    ({"resources": {"cpus": 8}, "labels": {"zone": "a"}}, [node("n1", zone="a"), node("n2", cpus=16)], [],
     "needs 8 CPU, no alive node with {zone: a} has that much"),
    ({"max_per_node": 1}, [node("n1"), node("n2")], ["n1", "n2"], "every matching node has max_per_node (1) replicas"),
    ({"max_per_node": 2, "labels": {"zone": "a"}}, [node("n1", zone="a"), node("n2", zone="b")], ["n1", "n1"],
     "every matching node has max_per_node (2) replicas"),
    ({"resources": {"cpus": 2}}, [node("n1", free=1), node("n2", free=0)], [], "waiting for free resources (2 CPU)"),
    ({"resources": {"cpus": 2}, "max_per_node": 1}, [node("n1", free=4), node("n2", free=1)], ["n1"],
     "waiting for free resources (2 CPU)"),
    ({"resources": {"cpus": 2}}, [node("n1", free=None)], [], "waiting to be placed"),
    ({}, [node("n1", free=0)], [], "waiting to be placed"),
    ({}, [node("n1", alive=False)], [], "no alive node"),
])
def test_pending_reason(fields, nodes, others, reason):
    assert pending_reason(actor(**fields), nodes, others) == reason


def test_pending_reason_without_the_applied_spec():
    assert pending_reason(None, [node("n1")], []) == "waiting to be placed"


@pytest.mark.parametrize("state, pid, node_id, worker, pending", [
    ("PENDING_CREATION", 0, "", "", True),
    ("PENDING_CREATION", 7, "n1", "w", False),  # a worker runs its __init__: starting
    ("DEPENDENCIES_UNREADY", 0, "", "", True),
    ("RESTARTING", 0, "", "", True),
    ("RESTARTING", 7, "gone", "w", True),  # its process was on a node that died
    ("RESTARTING", 7, "n1", "", True),  # the dead process's pid, no worker leased (as Ray 2.60 keeps it)
    ("RESTARTING", 7, "n1", "w", False),
    ("ALIVE", 7, "n1", "w", False),
    ("DEAD", 0, "", "", False),
])
def test_unplaced(state, pid, node_id, worker, pending):
    assert unplaced(record("web-0", state, pid, node_id, worker), {"n1"}) is pending
    assert unplaced(None, {"n1"}) is False


def test_status_rows_name_node_addresses_and_why_a_replica_waits():
    spec = Spec.model_validate({"version": 1, "name": "s", "actors": {
        "web": {"class": "m:W", "replicas": 3, "max_per_node": 1, "servers": [{"name": "http", "port": 8000}]}}})
    nodes = [node("n1"), node("n2"), node("n3", alive=False)]
    addresses = {n.node_id: n.address for n in nodes}
    info = ReplicaInfo("web", 0, "c", "", pid=7, node_id="n1", endpoints={"http": "http://10.0.0.1:8000"})
    moved = ReplicaInfo("web", 1, "c", "", pid=8, node_id="n2", endpoints={"http": "http://10.0.0.2:8001"},
                        node_address="10.0.0.22")
    records = {"web-0": record("web-0"), "web-1": record("web-1", pid=8, node_id="n2"),
               "web-2": record("web-2", "RESTARTING", 9, "n3")}
    rows = [_replica_row("web-0", records["web-0"], info, addresses),
            _replica_row("web-1", records["web-1"], moved, addresses),
            _replica_row("web-2", records["web-2"], None, addresses)]
    explain_pending(rows, records, spec, nodes)
    assert [(r["state"], r["node_id"], r["node_address"], r.get("pending")) for r in rows] == [
        ("alive", "n1", "10.0.0.1", None), ("alive", "n2", "10.0.0.22", None),
        ("pending", None, None, "every matching node has max_per_node (1) replicas")]
    text = status_text({"name": "s", "namespace": "oob-s", "healthy": False, "replicas": rows, "links": [],
                        "last_apply": None})
    assert text.splitlines()[2:] == [
        "ACTOR  STATE    RESTARTS  PID  NODE       ENDPOINTS",
        "web-0  alive    0         7    10.0.0.1   http://10.0.0.1:8000",
        "web-1  alive    0         8    10.0.0.22  http://10.0.0.2:8001",
        "web-2  pending  0         -    -          pending: every matching node has max_per_node (1) replicas"]


def test_a_replica_of_an_actor_the_spec_no_longer_has_still_says_it_waits():
    rows = [_replica_row("old-0", record("old-0", "PENDING_CREATION", 0, ""), None)]
    explain_pending(rows, {"old-0": record("old-0", "PENDING_CREATION", 0, "")}, None, [node("n1")])
    assert (rows[0]["state"], rows[0]["pending"]) == ("pending", "waiting to be placed")

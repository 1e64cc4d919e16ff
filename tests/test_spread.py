"""Placing replicas node by node, without Ray: lint rules for shared servers, max_per_node and
labels, the Ray options each replica gets, and the node picked for it."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from oobspec.api import lint_file
from oobspec.contract import ReplicaInfo
from oobspec.control.executor import Executor
from oobspec.control.replicas import NODE_ID_LABEL, Builder, pick_node
from oobspec.nodes import NodeState as Node, node_matches
import yaml

from oobspec.models import Spec

N2, N3, N4 = "02" * 28, "03" * 28, "04" * 28  # node ids as Ray writes them (hex)

BASE = """
version: 1
name: spread
actors:
  shelf:
    class: shelf:Shelf
    restarts: -1
    replicas: 3
"""


def lint(extra: str, head: str = "") -> list[tuple[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(head + BASE + extra)
        return [(d.code, d.line) for d in lint_file(path, imports=False)]


def test_shared_server_claims_one_port_and_needs_one():
    assert lint("    servers: [{name: http, port: 8000, shared: true}]\n"
                "  other:\n    class: shelf:Shelf\n    restarts: -1\n    servers: [{name: http, port: 8001}]\n") == []
    assert ("OOB301", 13) in lint("    servers: [{name: http, port: 8000}]\n"
                                  "  other:\n    class: shelf:Shelf\n    restarts: -1\n"
                                  "    servers: [{name: http, port: 8001}]\n")
    assert lint("    servers: [{name: http, shared: true}]\n") == [("OOB314", 9)]


def test_shared_needs_a_server_oobspec_binds():
    found = lint("    servers: [{name: raw, protocol: tcp, port: 7000, shared: true}]\n")
    assert [c for c, _ in found] == ["OOB315"]


def test_node_by_node_placement_and_a_placement_group_exclude_each_other():
    spec = "    max_per_node: 1\n    servers: [{name: http, port: 8000, host: node}]\n"
    assert lint(spec) == []
    text = BASE.replace("name: spread", "name: spread\nray: {placement: PACK}") + spec
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(text)
        assert [d.code for d in lint_file(path, imports=False)] == ["OOB316"]


@pytest.mark.parametrize("want,have,ok", [("a", "a", True), ("a", "b", False), ("a", None, False),
                                          ("!a", "b", True), ("!a", None, True), ("!a", "a", False),
                                          ("in(a, b)", "b", True), ("in(a,b)", "c", False),
                                          ("!in(a,b)", "c", True), ("!in(a,b)", "a", False)])
def test_label_values_as_ray_reads_them(want, have, ok):
    assert node_matches({"k": want}, {} if have is None else {"k": have}) is ok


def test_pick_node_spreads_and_respects_the_limit():
    nodes = [Node("n2", "127.0.0.2", {}), Node("n3", "127.0.0.3", {}), Node("n4", "127.0.0.4", {})]
    assert pick_node(nodes, {}, 1) == "n2"
    assert pick_node(nodes, {"n2": 1}, 1) == "n3"
    assert pick_node(nodes, {"n2": 1, "n3": 1, "n4": 1}, 1) is None
    assert pick_node(nodes, {"n2": 1, "n3": 1, "n4": 1}, 2) == "n2"
    assert pick_node(nodes, {"n2": 2, "n3": 1}, 2) == "n4"


def builder(extra: str) -> Builder:
    spec = Spec.model_validate(yaml.safe_load(BASE + extra))
    b = Builder(spec, progress=lambda _m: None, base_dir=Path("."))
    b.node_source = lambda: [Node(N2, "127.0.0.2", {"zone": "a"}), Node(N3, "127.0.0.3", {"zone": "b"}),
                             Node(N4, "127.0.0.4", {"zone": "b"})]
    return b


def test_max_per_node_sends_each_replica_to_its_own_node_and_excludes_the_others():
    b = builder("    max_per_node: 1\n")
    placed = [b.node_options("shelf", i, surge=False) for i in range(3)]
    targets = [p["scheduling_strategy"].node_id for p in placed]
    assert targets == [N2, N3, N4]
    assert "label_selector" not in placed[0]
    assert placed[2]["label_selector"] == {NODE_ID_LABEL: f"!in({N2},{N3})"}
    assert all(p["scheduling_strategy"].soft for p in placed)
    # Replica 0 started again (its node died): every other node is full, it waits for a new one.
    b.where.pop(("shelf", 0))
    b._nodes = [n for n in b.nodes() if n.node_id != N2]
    again = b.node_options("shelf", 0, surge=False)
    assert again["label_selector"] == {NODE_ID_LABEL: f"!in({N3},{N4})"} and "scheduling_strategy" not in again


def test_labels_select_nodes_and_a_stand_in_stays_on_its_replicas_node():
    b = builder("    labels: {zone: b}\n    max_per_node: 2\n")
    first = b.node_options("shelf", 0, surge=False)
    assert first["label_selector"] == {"zone": "b"} and first["scheduling_strategy"].node_id == N3
    b.pins[("shelf", 0)] = N3
    stand_in = b.node_options("shelf", 0, surge=True)
    assert stand_in["scheduling_strategy"].node_id == N3 and stand_in["scheduling_strategy"].soft is False
    assert "label_selector" not in stand_in
    successor = b.node_options("shelf", 0, surge=False)
    strategy = successor["scheduling_strategy"]
    assert (strategy.node_id, strategy.soft, strategy._spill_on_unavailable) == (N3, True, False)


def test_no_spreading_asked_no_options():
    b = builder("")
    assert b.node_options("shelf", 1, surge=False) == {}


def test_shared_servers_bind_one_port_on_every_replica():
    b = builder("    servers: [{name: http, port: 8000, shared: true}, {name: admin, port: 9000}]\n")
    ports = [[s.port for s in b.config("shelf", i).servers] for i in range(3)]
    assert ports == [[8000, 9000], [8000, 9001], [8000, 9002]]


def test_the_executor_knows_which_node_each_observed_replica_runs_on():
    b = builder("    servers: [{name: http, port: 8000}]\n")
    ex = Executor(b.spec, b, cluster=None, progress=lambda _m: None, detached=True, timeout=5)
    info = ReplicaInfo("shelf", 1, "h", "", 7, N4, {"http": "http://127.0.0.1:8001"})
    ex.observed({("shelf", 1): info})
    assert b.where == {("shelf", 1): N4}

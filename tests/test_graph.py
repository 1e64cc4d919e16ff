"""`oob graph`: a spec's topology as Mermaid or DOT, from the spec alone (no cluster)."""
from __future__ import annotations

import re
import textwrap

import pytest

from conftest import ROOT, oob

SPECS = ROOT / "specs"
WEB = [SPECS / "web.yaml", "--values", SPECS / "web.values.yaml"]

NODE = re.compile(r'^    (\w+)(\["|\(\["|\[\(")(.*)("\]|"\]\)|"\)\])$')
EDGE = re.compile(r'^  (\w+) (-\.->|==>)\|"([^"]*)"\| (\w+)$')


def mermaid_parts(text: str) -> tuple[dict[str, str], list[tuple[str, str, str, str]]]:
    """Every line is a statement of a `flowchart LR` (subgraphs balanced, labels quoted and
    free of raw quotes); edges join declared nodes. Returns {node id: label} and the edges."""
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    nodes, edges, depth = {}, [], 0
    for line in lines[1:]:
        if line.startswith("  subgraph "):
            assert depth == 0 and re.fullmatch(r'  subgraph \w+\["[^"]*"\]', line), line
            depth += 1
        elif line == "  end":
            depth -= 1
        elif depth:
            match = NODE.fullmatch(line)
            assert match and '"' not in match[3], line
            nodes[match[1]] = match[3]
        else:
            match = EDGE.fullmatch(line)
            assert match, line
            edges.append((match[1], match[2], match[3], match[4]))
    assert depth == 0
    assert all(e[0] in nodes and e[3] in nodes for e in edges), edges
    return nodes, edges


def dot_parts(text: str) -> tuple[dict[str, str], list[tuple[str, str, str, str]]]:
    """DOT, checked by pydot's parser when it is installed and always line by line: balanced
    clusters, quoted labels, edges between declared nodes. {node id: label}, edges."""
    try:
        import pydot
    except ImportError:
        pydot = None
    if pydot is not None:
        graphs = pydot.graph_from_dot_data(text)
        assert graphs and len(graphs) == 1
    quoted = r'"(?:[^"\\]|\\.)*"'
    lines = text.splitlines()
    assert re.fullmatch(rf"digraph {quoted} {{", lines[0]) and lines[-1] == "}"
    nodes, edges, depth = {}, [], 0
    for line in lines[1:-1]:
        if match := re.fullmatch(r"  subgraph cluster_\w+ \{", line):
            depth += 1
        elif line == "  }":
            depth -= 1
        elif match := re.fullmatch(rf"    (\w+) \[shape=(\w+), label=({quoted})\];", line):
            nodes[match[1]] = match[3]
        elif match := re.fullmatch(rf"  (\w+) -> (\w+) \[label=({quoted}), style=(\w+)\];", line):
            edges.append((match[1], match[4], match[3], match[2]))
        else:
            assert re.fullmatch(rf"    label={quoted};|  \w+=\w+;|  (node|edge) \[.*\];", line), line
    assert depth == 0
    assert all(e[0] in nodes and e[3] in nodes for e in edges), edges
    return nodes, edges


def graph(*args) -> str:
    out = oob("graph", *args, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_web_as_mermaid_actors_servers_and_the_connect_edge():
    nodes, edges = mermaid_parts(graph(*WEB))
    assert nodes["actor_frontend"] == "frontend (2 replicas)<br/>examples.services:Frontend"
    assert nodes["actor_backend"] == "backend (2 replicas)<br/>examples.services:KeyValue"
    assert nodes["server_backend_rpc"] == "rpc<br/>grpc, any port"
    assert nodes["server_frontend_http"] == "http<br/>http, any port"
    assert edges == [("actor_frontend", "-.->", "backend", "server_backend_rpc")]


def test_web_as_dot_with_values_set_on_the_command_line():
    nodes, edges = dot_parts(graph(*WEB, "--set", "frontend.port=8000", "--set", "backend.replicas=3", "-o", "dot"))
    assert nodes["server_frontend_http"] == '"http\\nhttp, ports 8000-8001"'  # replica i binds port + i
    assert nodes["actor_backend"] == '"backend (3 replicas)\\nexamples.services:KeyValue"'
    assert edges == [("actor_frontend", "dashed", '"backend"', "server_backend_rpc")]


def test_weight_sync_link_from_the_source_buffer_to_the_target_buffer():
    label = "params: auto, 1.1 MiB x2"  # `auto` stays auto: the choice needs placement; double buffering
    nodes, edges = mermaid_parts(graph(SPECS / "weight-sync.yaml"))
    assert edges == [("buffer_trainer_params", "==>", label, "buffer_server_params")]
    assert nodes["buffer_server_params"] == "params<br/>cpu 1.1 MiB"
    nodes, edges = dot_parts(graph(SPECS / "weight-sync.yaml", "-o", "dot"))
    assert edges == [("buffer_trainer_params", "bold", f'"{label}"', "buffer_server_params")]


def test_same_topology_same_text_whatever_the_order_and_labels_are_escaped(tmp_path):
    from oobspec.api import load
    from oobspec.graph import render
    one = """
    version: 1
    name: order
    actors:
      zeta:
        command: ["sh", "-c", "echo \\"<a|b>\\" & sleep 1000", "{port}"]
        servers: [{name: main, protocol: tcp, port: 7000}]
        buffers: {w: {shape: [4], device: cpu}}
      alpha:
        class: m:A
        replicas: 3
        connect: {z: zeta.main, self: alpha.http}
        servers: [{name: http, port: 9000}, {name: b-rpc, protocol: grpc, port: 9100, service: s.S}]
        buffers: {w: {shape: [4]}}
      mid:
        class: m:M
        buffers: {w: {shape: [4]}}
    links:
      - {name: two, from: zeta.w, to: [mid.w, alpha.w], transport: shm}
      - {name: one, from: alpha.w, to: [mid.w]}
    """
    lines = textwrap.dedent(one).splitlines()
    actors, links = lines.index("actors:"), lines.index("links:")
    # the same spec, actors and links in the opposite order
    blocks = [lines[actors + 1:actors + 5], lines[actors + 5:actors + 11], lines[actors + 11:links]]
    other = lines[:actors + 1] + blocks[2] + blocks[1] + blocks[0] + ["links:"] + lines[links + 1:][::-1]
    (tmp_path / "one.yaml").write_text("\n".join(lines))
    (tmp_path / "other.yaml").write_text("\n".join(other))
    first, second = load(tmp_path / "one.yaml"), load(tmp_path / "other.yaml")
    assert list(first.actors) != list(second.actors)
    for fmt, parts in (("mermaid", mermaid_parts), ("dot", dot_parts)):
        text = render(first, fmt)
        assert text == render(second, fmt) == render(first, fmt)
        nodes, edges = parts(text)
        assert [(e[0], e[3]) for e in edges] == [
            ("actor_alpha", "server_alpha_http"), ("actor_alpha", "server_zeta_main"),
            ("buffer_alpha_w", "buffer_mid_w"), ("buffer_zeta_w", "buffer_alpha_w"), ("buffer_zeta_w", "buffer_mid_w")]
        assert "server_alpha_b_rpc" in nodes
    nodes, _ = mermaid_parts(render(first, "mermaid"))
    assert nodes["actor_zeta"] == "zeta (1 replica)<br/>sh -c echo #quot;#lt;a#124;b#gt;#quot; #amp; sleep 1000 {port}"
    assert nodes["server_alpha_http"] == "http<br/>http, ports 9000-9002"
    nodes, _ = dot_parts(render(first, "dot"))
    assert nodes["actor_zeta"] == '"zeta (1 replica)\\nsh -c echo \\"<a|b>\\" & sleep 1000 {port}"'


def test_graph_needs_no_cluster_and_refuses_an_unknown_format():
    out = oob("graph", SPECS / "counter.yaml", "-o", "png", timeout=60)
    assert out.returncode == 2 and "png" in out.stderr
    out = oob("graph", SPECS / "web.yaml", timeout=60)  # its template needs the values
    assert out.returncode == 1 and "undefined" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("spec", ["counter", "grpc", "process", "cpu-link", "gpu-link"])
def test_every_example_draws(spec):
    from oobspec.api import load
    from oobspec.graph import render
    loaded = load(SPECS / f"{spec}.yaml")
    mermaid_parts(render(loaded, "mermaid"))
    dot_parts(render(loaded, "dot"))

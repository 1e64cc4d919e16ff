"""`oob graph`: a spec's topology, from the spec alone (no cluster), as Mermaid or Graphviz DOT.

Each actor is a group holding its own node (name, replicas, class or command), its servers
(protocol, port) and its buffers; `connect` entries are edges from an actor to the server it
connects to, labelled with the key; links are bold edges from the source buffer to each target
buffer, labelled with the transport (`auto` stays `auto`: the choice depends on placement) and
the size. Everything is sorted, so one spec always gives the same text.
"""
from __future__ import annotations

import graphlib
import re
from dataclasses import dataclass, field

from .contract import Ref
from .models import Actor, Spec
from .report import size

FORMATS = ("mermaid", "dot")


@dataclass(frozen=True)
class Node:
    id: str
    label: tuple[str, ...]  # lines
    kind: str  # "actor" | "server" | "buffer"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    label: str
    kind: str  # "connect" | "link"


@dataclass
class Group:
    id: str
    title: str
    nodes: list[Node] = field(default_factory=list)


@dataclass
class Graph:
    name: str
    groups: list[Group]
    edges: list[Edge]


class _Ids:
    """Readable node ids (`server_frontend_http`) that both syntaxes take unquoted; a name that
    would clash with another once sanitized gets a number."""

    def __init__(self):
        self.by_key: dict[tuple, str] = {}
        self.used: set[str] = set()

    def __call__(self, *key: str) -> str:
        if key not in self.by_key:
            base = re.sub(r"[^A-Za-z0-9]", "_", "_".join(key))
            found, n = base, 1
            while found in self.used:
                n += 1
                found = f"{base}_{n}"
            self.used.add(found)
            self.by_key[key] = found
        return self.by_key[key]


def _ports(server, replicas: int) -> str:
    if not server.port:
        return "any port"
    if replicas > 1 and not getattr(server, "shared", False):  # replica i binds port + i
        return f"ports {server.port}-{server.port + replicas - 1}"
    return f"port {server.port}"


def _actor_group(name: str, actor: Actor, ids: _Ids) -> Group:
    what = actor.class_ if actor.class_ is not None else " ".join(actor.command or [])
    count = f"{actor.replicas} replica{'s' if actor.replicas != 1 else ''}"
    group = Group(ids("group", name), name, [Node(ids("actor", name), (f"{name} ({count})", what), "actor")])
    for server in sorted(actor.servers, key=lambda s: s.name):
        group.nodes.append(Node(ids("server", name, server.name),
                                (server.name, f"{server.protocol}, {_ports(server, actor.replicas)}"), "server"))
    for buffer_name, buffer in sorted(actor.buffers.items()):
        group.nodes.append(Node(ids("buffer", name, buffer_name),
                                (buffer_name, f"{buffer.device} {size(buffer.nbytes)}"), "buffer"))
    return group


def build(spec: Spec) -> Graph:
    """The topology of a loaded (rendered, validated) spec."""
    ids = _Ids()
    groups = [_actor_group(name, actor, ids) for name, actor in sorted(spec.actors.items())]
    edges = []
    for name, actor in sorted(spec.actors.items()):
        for key, ref in sorted(actor.connect.items()):
            peer = Ref.parse(ref)
            edges.append(Edge(ids("actor", name), ids("server", peer.actor, peer.member), key, "connect"))
    for link in sorted(spec.links, key=lambda x: x.name):
        source = Ref.parse(link.from_)
        buffer = spec.actors[source.actor].buffers.get(source.member) if source.actor in spec.actors else None
        label = f"{link.name}: {link.transport}"
        if buffer is not None:
            label += f", {size(buffer.nbytes)}" + (" x2" if link.buffering == "double" else "")
        for target in sorted(link.to):
            to = Ref.parse(target)
            edges.append(Edge(ids("buffer", source.actor, source.member), ids("buffer", to.actor, to.member),
                              label, "link"))
    return Graph(spec.name, groups, edges)


# --- Mermaid -------------------------------------------------------------------------------


def _mermaid_text(text: str) -> str:
    """Inside a quoted label: Mermaid's entity codes for what would end or break it."""
    return (text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
            .replace("|", "#124;"))


_MERMAID_SHAPES = {"actor": ('["', '"]'), "server": ('(["', '"])'), "buffer": ('[("', '")]')}


def mermaid(graph: Graph) -> str:
    out = ["flowchart LR"]
    for group in graph.groups:
        out.append(f'  subgraph {group.id}["{_mermaid_text(group.title)}"]')
        for node in group.nodes:
            left, right = _MERMAID_SHAPES[node.kind]
            out.append(f"    {node.id}{left}{'<br/>'.join(_mermaid_text(x) for x in node.label)}{right}")
        out.append("  end")
    for edge in graph.edges:
        arrow = "==>" if edge.kind == "link" else "-.->"
        out.append(f'  {edge.source} {arrow}|"{_mermaid_text(edge.label)}"| {edge.target}')
    return "\n".join(out) + "\n"


# --- Graphviz DOT --------------------------------------------------------------------------


def _dot_text(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_DOT_SHAPES = {"actor": "box", "server": "ellipse", "buffer": "cylinder"}


def dot(graph: Graph) -> str:
    out = [f"digraph {_dot_text(graph.name)} {{", "  rankdir=LR;",
           '  node [fontname="Helvetica", fontsize=11];', '  edge [fontname="Helvetica", fontsize=10];']
    for group in graph.groups:
        out.append(f"  subgraph cluster_{group.id} {{")
        out.append(f"    label={_dot_text(group.title)};")
        for node in group.nodes:
            out.append(f"    {node.id} [shape={_DOT_SHAPES[node.kind]}, label={_dot_text(chr(10).join(node.label))}];")
        out.append("  }")
    for edge in graph.edges:
        style = "bold" if edge.kind == "link" else "dashed"
        out.append(f"  {edge.source} -> {edge.target} [label={_dot_text(edge.label)}, style={style}];")
    out.append("}")
    return "\n".join(out) + "\n"


def render(spec: Spec, fmt: str = "mermaid") -> str:
    """The spec's topology as `mermaid` (a `flowchart LR`) or `dot`."""
    graph = build(spec)
    return dot(graph) if fmt == "dot" else mermaid(graph)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in a dependency graph (node -> the nodes it needs), in the graph's direction."""
    try:
        graphlib.TopologicalSorter({n: deps & graph.keys() for n, deps in graph.items()}).prepare()
    except graphlib.CycleError as exc:  # reported predecessor first: reversed, it reads "a needs b"
        return list(reversed(exc.args[1]))[:-1]
    return None

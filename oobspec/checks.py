"""Phase 3/4 — validate and check: models, then cross-references, ports, links and code.

Every rule has a stable code. All problems are collected; none stops the others.
  OOB1xx  file and schema      OOB2xx  references      OOB3xx  servers and ports
  OOB4xx  links and buffers    OOB5xx  code (imports)
"""
from __future__ import annotations

import inspect
import os
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import route_checks
from .addresses import remote_address
from .contract import Ref
from .errors import Diagnostic, SpecError
from .graph import find_cycle
from .imports import import_object, import_path, suggest
from .loader import Document
from .models import (Actor, Auth, Buffer, GrpcServer, HttpServer, Link, RayConfig, Resources, Route,
                     Spec, TcpServer)

_SERVERS = {"http": HttpServer, "grpc": GrpcServer, "tcp": TcpServer}
_TAGS = set(_SERVERS) | {"function-after", "function-before", "function-wrap"}
_PATTERN_WORDS = {
    r"^[a-z][a-z0-9-]{0,62}$": "lower-case letters, digits and '-', starting with a letter (at most 63)",
    r"^[a-z][a-z0-9-]*$": "lower-case letters, digits and '-', starting with a letter",
    r"^[a-z][a-z0-9-]*\.[A-Za-z_][A-Za-z0-9_-]*$": "of the form <actor>.<name>",
    r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$": 'of the form "module:Class"',
    r"^/": "a path starting with '/'",
    r"^[A-Za-z_]\w*$": "a class name (letters, digits and '_')",
}


def _fields(model) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_at(path: tuple, data: Any):
    """The model whose keys are valid at `path` in the raw data (for did-you-mean hints)."""
    n = len(path)
    if n == 0:
        return Spec
    head = path[0]
    if head == "ray" and n == 1:
        return RayConfig
    if head == "links" and n == 2:
        return Link
    if head != "actors" or n < 2:
        return None
    if n == 2:
        return Actor
    if n == 3 and path[2] == "resources":
        return Resources
    if n == 4 and path[2] == "buffers":
        return Buffer
    if path[2] == "servers" and n >= 4:
        try:
            server = data["actors"][path[1]]["servers"][path[3]]
            protocol = server.get("protocol", "http") if isinstance(server, dict) else "http"
        except (KeyError, IndexError, TypeError):
            protocol = "http"
        if n == 4:
            return _SERVERS.get(protocol, HttpServer)
        if n == 5 and path[4] == "auth":
            return Auth
        if n == 6 and path[4] == "routes":
            return Route
    return None


def _data_path(loc: tuple, data: Any) -> tuple[tuple, bool]:
    """Map pydantic's loc onto a path that exists in the data (union tags are not in the data)."""
    path: list = []
    node = data
    is_key = False
    for part in loc:
        if part == "[key]":
            is_key = True
            break
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        elif isinstance(part, str) and (part in _TAGS or part.startswith(("function-", "union[", "list[", "dict[", "nullable"))
                                        or part in ("int", "str", "float", "bool", "none", "list", "dict")):
            continue
        else:
            path.append(part)  # a key that is missing or unknown: keep it, it names the problem
            break
    return tuple(path), is_key


def _human(error: dict) -> str:
    msg = error["msg"]
    ctx = error.get("ctx") or {}
    if error["type"] == "string_pattern_mismatch":
        words = _PATTERN_WORDS.get(ctx.get("pattern", ""), f"match {ctx.get('pattern')}")
        return f"'{error.get('input')}' must be {words}" if words in _PATTERN_WORDS.values() else f"must {words}"
    msg = msg.replace("Value error, ", "").replace("Input should be", "must be")
    msg = msg.replace("String should", "must").replace("List should", "must").replace("Dictionary should", "must")
    msg = msg.replace(" after validation", "")
    if error["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a mapping"
    if error["type"] == "list_type":
        return "must be a list"
    return msg[0].lower() + msg[1:] if msg else msg


def schema_diagnostics(exc: ValidationError, doc: Document) -> list[Diagnostic]:
    by_path: dict[tuple, list] = {}
    order: list[tuple] = []
    for err in exc.errors(include_url=False):
        path, is_key = _data_path(tuple(err["loc"]), doc.data)
        if err["type"] == "invalid_protocol" and isinstance(err.get("input"), dict) and "protocol" in err["input"]:
            path = path + ("protocol",)  # point at the bad value, not at the whole server
            err = {**err, "msg": "must be one of http, grpc, tcp"}
        slot = (path, is_key, err["type"] == "extra_forbidden", err["type"] == "missing")
        if slot not in by_path:
            order.append(slot)
            by_path[slot] = []
        by_path[slot].append(err)
    out = []
    for slot in order:
        path, is_key, extra, missing = slot
        errors = by_path[slot]
        name = path[-1] if path else "spec"
        if extra:
            model = _model_at(path[:-1], doc.data)
            hint = suggest(name, _fields(model)) if model else None
            out.append(doc.diag("OOB120", f"unknown key '{name}'", path, key=True, hint=hint))
        elif missing:
            out.append(doc.diag("OOB122", f"missing required key '{name}'", path[:-1]))
        elif is_key:
            label = "actor name" if path[:1] == ("actors",) and len(path) == 2 else "name"
            out.append(doc.diag("OOB121", f"{label} {_human(errors[0])}", path, key=True))
        elif any(e["type"] == "value_error" and "exactly one of" in e["msg"] for e in errors):
            out.append(doc.diag("OOB123", _human(errors[0]), path))
        else:
            msgs = list(dict.fromkeys(_human(e) for e in errors))
            if len(msgs) > 1:
                msgs = ["must be " + " or ".join(m.removeprefix("must be ") for m in msgs)]
            label = name if isinstance(name, str) else f"item {name}"
            out.append(doc.diag("OOB121", f"{label}: {msgs[0]}", path))
    return sorted(out, key=lambda d: (d.line, d.col))


def validate(doc: Document) -> Spec:
    """Rendered document → Spec, or SpecError with every schema problem."""
    if not isinstance(doc.data, dict):
        raise SpecError([doc.diag("OOB121", "a spec must be a mapping with version, name and actors")])
    try:
        return Spec.model_validate(doc.data)
    except ValidationError as exc:
        raise SpecError(schema_diagnostics(exc, doc)) from None


# --- semantic checks --------------------------------------------------------------------------


class _Checker:
    def __init__(self, spec: Spec, doc: Document, base_dir: Path | None, imports: bool, remote: bool | None = None):
        self.spec, self.doc, self.base_dir, self.imports = spec, doc, base_dir, imports
        self.remote = remote_address(spec.ray.address) if remote is None else remote
        self.out: list[Diagnostic] = []

    def add(self, code, message, path=(), *, key=False, severity="error", hint=None):
        self.out.append(self.doc.diag(code, message, path, key=key, severity=severity, hint=hint))

    def run(self) -> list[Diagnostic]:
        self.servers_and_ports()
        self.spread()
        self.secrets()
        self.connect()
        self.links()
        if self.imports:
            self.code()
        self.out += getattr(self.doc, "warnings", [])  # rendering's own (OOB112: an unread --set key)
        return sorted(self.out, key=lambda d: (d.line, d.col, d.code))

    def servers_and_ports(self) -> None:
        bound: dict[int, list[tuple[str, str, tuple]]] = {}  # port -> (host, who, path)
        for aname, actor in self.spec.actors.items():
            seen: dict[str, int] = {}
            for i, server in enumerate(actor.servers):
                spath = ("actors", aname, "servers", i)
                if server.name in seen:
                    self.add("OOB206", f"duplicate server name '{server.name}' in actor '{aname}' "
                             f"(first at line {self.doc.where(spath[:-1] + (seen[server.name], 'name'))[0]})",
                             spath + ("name",))
                seen.setdefault(server.name, i)
                who = f"{aname}.{server.name}"
                if server.port:
                    self._claim(1 if server.shared else actor.replicas, server, who, spath, bound)
                if server.shared and not server.port:
                    self.add("OOB314", f"{who} is shared: its replicas on a node bind one port, so it needs a fixed "
                             "port", spath + ("port",) if "port" in server.model_fields_set else spath, hint="set port: N")
                if server.shared and (server.protocol == "tcp" or actor.command is not None):
                    self.add("OOB315", f"{who} is shared, but a tcp server or a command binds its port itself", spath + ("shared",))
                tls = getattr(server, "tls", None)
                if server.host in ("0.0.0.0", "::") and server.auth is None:
                    self.add("OOB303", f"{who} listens on {server.host} (every interface) without auth",
                             spath + ("host",), severity="warning", hint="add auth: {token_env: NAME} or bind 127.0.0.1")
                elif server.host in ("0.0.0.0", "::") and server.protocol != "tcp" and tls is None:
                    self.add("OOB310", f"{who} listens on {server.host} (every interface) without TLS: its bearer "
                             "token travels in clear text", spath + ("host",), severity="warning",
                             hint="add tls: {cert: FILE, key: FILE}")
                if tls is not None and self.base_dir is not None:
                    for part in ("cert", "key"):
                        if not (self.base_dir / getattr(tls, part)).is_file():
                            self.add("OOB311", f"{who}: tls {part} file '{getattr(tls, part)}' not found (paths are "
                                     "relative to the spec's folder)", spath + ("tls", part))
                if self.remote and server.host in ("127.0.0.1", "localhost", "::1"):
                    self.add("OOB309", f"{who} binds {server.host} on a remote cluster: reachable only from its own "
                             "node", spath + ("host",) if "host" in server.model_fields_set else spath,
                             severity="warning", hint="bind host: 0.0.0.0 (with auth) to reach it from outside")
                if isinstance(server, HttpServer):
                    for found in route_checks.repeated_routes(server, spath, lambda p: self.doc.where(p)[0]):
                        self.add(*found[:3], hint=found[3])
                if isinstance(server, GrpcServer) and server.methods and not server.service:
                    self.add("OOB307", f"{who}: 'methods' need a 'service' name (methods are /<service>/<method>)",
                             spath + ("methods",))
                if actor.command is not None and (getattr(server, "routes", None) or getattr(server, "methods", None)
                                                  or getattr(server, "proto", None)):
                    self.add("OOB308", f"{who}: a command actor has no class to call; use protocol: tcp "
                             "(the command serves the port itself)", spath + ("protocol",))
            if actor.servers and actor.restarts == 0:
                self.add("OOB306", f"actor '{aname}' serves traffic but has restarts: 0 (a crash takes it down for good)",
                         ("actors", aname), key=True, severity="warning", hint="set restarts: -1 or a count")
            if actor.cwd is not None and self.base_dir is not None and not (self.base_dir / actor.cwd).is_dir():
                self.add("OOB130", f"actor '{aname}': cwd '{actor.cwd}' is not a folder (relative to the spec's folder, "
                         "which travels with the actors)", ("actors", aname, "cwd"))
            if actor.command is not None and actor.buffers:
                self.add("OOB405", f"actor '{aname}' runs a command; buffers need a class actor",
                         ("actors", aname, "buffers"), key=True)
            for bname, buf in actor.buffers.items():
                if buf.device == "gpu" and actor.resources.gpus == 0:
                    self.add("OOB403", f"buffer '{aname}.{bname}' is on gpu but actor '{aname}' has gpus: 0",
                             ("actors", aname, "buffers", bname, "device"), hint="set resources.gpus")

    def spread(self) -> None:
        for aname in (a for a, actor in self.spec.actors.items() if actor.max_per_node or actor.labels):
            if self.spec.ray.placement:
                self.add("OOB316", f"actor '{aname}': max_per_node and labels place replicas node by node, but ray.placement "
                         "puts every replica in one placement group", ("actors", aname), key=True, hint="use one or the other")

    def secrets(self) -> None:  # OOB312: an error at apply (the replicas could not start)
        for aname, actor in self.spec.actors.items():
            for i, auth in enumerate(s.auth for s in actor.servers):
                if auth and auth.token_env not in os.environ and auth.token_env not in actor.env:
                    self.add("OOB312", f"auth.token_env {auth.token_env} is not set", ("actors", aname, "servers", i,
                             "auth", "token_env"), severity="warning", hint="apply forwards it from its environment")

    def _claim(self, replicas: int, server, who: str, spath: tuple, bound: dict) -> None:
        """The ports a server's replicas bind (port + i): in range, and nobody else's."""
        last = server.port + replicas - 1
        if last > 65535:
            self.add("OOB305", f"{who}: {replicas} replicas need ports {server.port}-{last}, "
                     "past 65535", spath + ("port",))
        if server.port < 1024:
            self.add("OOB302", f"{who}: port {server.port} is below 1024 (needs root)",
                     spath + ("port",), severity="warning")
        for port in range(server.port, min(last, 65535) + 1):
            mine = f"{who} (replica {port - server.port})" if replicas > 1 else who
            for host, other, opath in bound.get(port, ()):
                if host == server.host or "0.0.0.0" in (host, server.host) or "::" in (host, server.host):
                    self.add("OOB301", f"{mine} and {other} both claim {server.host}:{port}",
                             spath + ("port",), hint=f"{other.split(' ')[0]} is at line {self.doc.where(opath)[0]}")
                    break
            else:
                bound.setdefault(port, []).append((server.host, mine, spath + ("port",)))
                continue
            break

    def _ref(self, ref: str, path: tuple, kind: str) -> tuple[str, str] | None:
        aname, item = Ref.parse(ref).actor, Ref.parse(ref).member
        actors = self.spec.actors
        if aname not in actors:
            code = "OOB201" if kind == "server" else "OOB203"
            self.add(code, f"'{ref}' names actor '{aname}', which is not in the spec", path,
                     hint=suggest(aname, actors))
            return None
        names = [s.name for s in actors[aname].servers] if kind == "server" else list(actors[aname].buffers)
        if item not in names:
            code = "OOB202" if kind == "server" else "OOB204"
            have = ", ".join(names) or "none"
            self.add(code, f"'{ref}': actor '{aname}' has no {kind} '{item}' ({kind}s: {have})", path,
                     hint=suggest(item, names))
            return None
        return aname, item

    def connect(self) -> None:
        graph: dict[str, set[str]] = {}
        for aname, actor in self.spec.actors.items():
            graph[aname] = set()
            for key, ref in actor.connect.items():
                path = ("actors", aname, "connect", key)
                if self._ref(ref, path, "server"):
                    graph[aname].add(Ref.parse(ref).actor)
                if not re.match(r"^[A-Za-z_][A-Za-z0-9_-]*$", key):
                    self.add("OOB207", f"connect key '{key}' must be letters, digits, '_' and '-' "
                             "(it becomes OOB_<KEY>_URL)", path, key=True)
        cycle = find_cycle(graph)
        if cycle:
            first = cycle[0]
            self.add("OOB205", "connect cycle: " + " -> ".join(cycle + [first]),
                     ("actors", first, "connect"), key=True)

    def links(self) -> None:
        seen: dict[str, int] = {}
        for i, link in enumerate(self.spec.links):
            lpath = ("links", i)
            if link.name in seen:
                self.add("OOB206", f"duplicate link name '{link.name}' (first at line "
                         f"{self.doc.where(('links', seen[link.name]))[0]})", lpath + ("name",))
            seen.setdefault(link.name, i)
            src = self._ref(link.from_, lpath + ("from",), "buffer")
            src_buf = self.spec.actors[src[0]].buffers[src[1]] if src else None
            if src_buf and link.transport in ("cuda_ipc", "nccl") and src_buf.device == "cpu":
                self.add("OOB402", f"link '{link.name}': transport {link.transport} moves gpu buffers, "
                         f"'{link.from_}' is on cpu", lpath + ("transport",), hint="use shm, object_store or auto")
            if src_buf and link.transport in ("shm", "object_store") and src_buf.device == "gpu":
                self.add("OOB402", f"link '{link.name}': transport {link.transport} moves cpu buffers, "
                         f"'{link.from_}' is on gpu", lpath + ("transport",), hint="use cuda_ipc, nccl or auto")
            for j, target in enumerate(link.to):
                tpath = lpath + ("to", j)
                dst = self._ref(target, tpath, "buffer")
                if not (src and dst):
                    continue
                if target == link.from_:
                    self.add("OOB404", f"link '{link.name}' copies '{target}' onto itself", tpath)
                    continue
                dst_buf = self.spec.actors[dst[0]].buffers[dst[1]]
                if src_buf.signature() != dst_buf.signature():
                    self.add("OOB401", f"link '{link.name}': '{link.from_}' is {src_buf.signature()} but "
                             f"'{target}' is {dst_buf.signature()}", tpath)
                elif src_buf.device != dst_buf.device:
                    self.add("OOB404", f"link '{link.name}': '{link.from_}' is on {src_buf.device} but "
                             f"'{target}' is on {dst_buf.device}", tpath)

    def code(self) -> None:
        # What user modules print while importing goes to stderr: `-o json` output stays parseable.
        with import_path(self.base_dir), redirect_stdout(sys.stderr):
            for aname, actor in self.spec.actors.items():
                apath = ("actors", aname)
                cls = None
                if actor.class_:
                    try:
                        cls = import_object(actor.class_)
                    except ImportError as exc:
                        self.add("OOB501", f"class '{actor.class_}' does not import: {exc}", apath + ("class",))
                    if cls is not None and not inspect.isclass(cls):
                        self.add("OOB501", f"'{actor.class_}' is not a class", apath + ("class",))
                        cls = None
                if cls is not None:
                    self._signature(cls, actor, apath)
                for i, server in enumerate(actor.servers):
                    spath = apath + ("servers", i)
                    if cls is not None:  # OOB502, OOB313
                        for found in (*route_checks.unknown_calls(cls, server, spath),
                                      *route_checks.path_params(cls, server, spath)):
                            self.add(*found[:3], hint=found[3])
                    proto = getattr(server, "proto", None)
                    if proto:
                        try:
                            if not callable(import_object(proto)):
                                raise ImportError("not a function")
                        except ImportError as exc:
                            self.add("OOB503", f"proto '{proto}' does not import: {exc}", spath + ("proto",))

    def _signature(self, cls, actor: Actor, apath: tuple) -> None:
        try:
            sig = inspect.signature(cls)
        except (TypeError, ValueError):
            return
        try:
            sig.bind(*actor.args, **actor.kwargs)
        except TypeError as exc:
            self.add("OOB504", f"args/kwargs do not fit {cls.__name__}{sig}: {exc}",
                     apath + (("kwargs",) if actor.kwargs else ("args",)), key=True)


def check(spec: Spec, doc: Document, base_dir: Path | None = None, imports: bool = True,
          remote: bool | None = None) -> list[Diagnostic]:
    """Every cross-reference, port, link and code check. remote: the target cluster is not this
    machine (None: decide from the spec's ray.address)."""
    return _Checker(spec, doc, base_dir, imports, remote).run()

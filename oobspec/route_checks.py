"""Checks of an HTTP server's routes and of the methods that routes and gRPC `methods` call.

  OOB304  a route repeats a method + path (path params count as one shape)
  OOB313  a path param (`/items/{key}`) that is not a parameter of the route's method
  OOB502  a `call` / `methods` entry that is not a method of the class

Each check yields (code, message, tree path, hint); checks.py adds them with positions.
"""
from __future__ import annotations

import inspect
import re
from typing import Iterator

from .imports import suggest

Found = tuple[str, str, tuple, "str | None"]
PATH_PARAM = re.compile(r"\{([^}:]+)")  # `{key}` and `{key:regex}`


def repeated_routes(server, spath: tuple, line_of) -> Iterator[Found]:
    """OOB304. line_of(tree path) -> the line it starts on."""
    seen: dict[tuple, int] = {}
    for j, route in enumerate(server.routes):
        shape = (route.method, re.sub(r"\{[^}]*\}", "{}", route.path.rstrip("/") or "/"))
        if shape in seen:
            first = line_of(spath + ("routes", seen[shape]))
            yield "OOB304", f"route {route.method} {route.path} repeats the route at line {first}", \
                spath + ("routes", j), None
        seen.setdefault(shape, j)


def unknown_calls(cls, server, spath: tuple) -> Iterator[Found]:
    """OOB502: routes' `call` and gRPC `methods` that the class does not have."""
    calls = [(r.call, spath + ("routes", j, "call")) for j, r in enumerate(getattr(server, "routes", []))]
    calls += [(m, spath + ("methods", j)) for j, m in enumerate(getattr(server, "methods", []))]
    for call, cpath in calls:
        if not callable(getattr(cls, call, None)):
            methods = [m for m in dir(cls) if not m.startswith("_") and callable(getattr(cls, m, None))]
            yield "OOB502", f"'{call}' is not a method of {cls.__name__}", cpath, suggest(call, methods)


def _parameters(cls, call: str) -> list[str] | None:
    """The names a method takes by keyword, `self` left out; None: it takes **kwargs (or its
    signature cannot be read)."""
    try:
        raw = inspect.getattr_static(cls, call)
        sig = inspect.signature(getattr(cls, call))
    except (AttributeError, TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if inspect.isfunction(raw) and params:  # a plain method read from the class: `self` first
        params = params[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def path_params(cls, server, spath: tuple) -> Iterator[Found]:
    """OOB313: a path param no parameter of the method takes (every request to it would be a
    400). A required parameter that no path param fills is fine: the query or the body may."""
    for j, route in enumerate(getattr(server, "routes", [])):
        if not callable(getattr(cls, route.call, None)):
            continue  # OOB502's
        names = _parameters(cls, route.call)
        if names is None:
            continue
        for param in PATH_PARAM.findall(route.path):
            if param not in names:
                takes = ", ".join(names) or "no arguments"
                yield ("OOB313", f"route {route.method} {route.path}: path param '{param}' is not a parameter of "
                       f"{cls.__name__}.{route.call} (it takes {takes})", spath + ("routes", j, "path"),
                       suggest(param, names) or f"rename the path param or add a parameter '{param}'")

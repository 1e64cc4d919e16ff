"""GET /-/openapi.json: an OpenAPI 3.1 document of one HTTP server, built once, on its first request.

Every route is an operation: its path params, its other parameters (in the query for GET and
DELETE, in a JSON object body otherwise), the parameter that takes the whole body (a model or a
dataclass, see typed.py) as the request body, the result's schema from the return annotation,
and the answers every route may give: 400, 422 and 500 (oob's JSON errors), 401 when the server
has `auth:` (a bearer scheme, required everywhere but /-/healthz and /-/openapi.json). Schemas
are pydantic's own (`TypeAdapter.json_schema()`), their shared definitions under components.
"""
from __future__ import annotations

import inspect
import logging
import re
from typing import Any

from .servers import Signature, dumps
from .typed import adapter

log = logging.getLogger("oobspec")

_IN_QUERY = frozenset(("GET", "DELETE"))  # methods whose arguments travel in the query, not a body
_REF = "#/components/schemas/{model}"
_ERROR = {"type": "object", "required": ["error", "status"], "properties": {
    "error": {"type": "string"}, "status": {"type": "integer"},
    "id": {"type": "string", "description": "a 500's id: it leads to the traceback in `oob logs`"}}}
_INVALID = {"type": "object", "required": ["detail", "error", "status"], "properties": {
    "detail": {"type": "array", "items": {"type": "object", "required": ["loc", "msg", "type"], "properties": {
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        "msg": {"type": "string"}, "type": {"type": "string"}}}},
    "error": {"type": "string"}, "status": {"type": "integer", "const": 422}}}
_ANY_RESULT = {"application/json": {"schema": {}}, "text/plain": {"schema": {"type": "string"}},
               "application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}


def _answer(description: str, schema: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _schema(hint: Any, defs: dict, mode: str = "validation") -> dict:
    """pydantic's JSON Schema of an annotation ({}: anything), its definitions moved to `defs`."""
    if hint is str:
        return {"type": "string"}
    check = adapter(hint)
    if check is None:
        return {}
    try:
        schema = check.json_schema(ref_template=_REF, mode=mode)
    except Exception:  # a type pydantic validates but cannot describe (a plain callable...)
        return {}
    defs.update(schema.pop("$defs", {}))
    return schema


def _result(returns: Any, defs: dict) -> dict:
    if returns is inspect.Parameter.empty or returns is None:
        return _ANY_RESULT
    if returns is str:
        return {"text/plain": {"schema": {"type": "string"}}}
    if returns in (bytes, bytearray):
        return {"application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}
    return {"application/json": {"schema": _schema(returns, defs, "serialization")}}


def _parameters(method, sig: Signature, route, defs: dict) -> tuple[list, dict | None]:
    """(the route's parameters, its request body or None)."""
    params = [p for p in inspect.signature(method).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "_ray_trace_ctx"]
    in_path = set(re.findall(r"\{([^}:]+)", route.path))
    whole = sig.typed.whole if sig.typed is not None else None
    listed, fields, required = [], {}, []
    for p in params:
        if p.name in sig.hints:
            schema = _schema(sig.hints[p.name], defs)
        else:  # unannotated: text from the path and the query, anything from a body
            schema = {"type": "string"} if p.name in in_path or route.method in _IN_QUERY or whole else {}
        if p.default is not p.empty and p.default is not None:
            try:
                schema = {**schema, "default": _plain(p.default)}
            except TypeError:
                pass
        if p.name in in_path:
            listed.append({"name": p.name, "in": "path", "required": True, "schema": schema})
        elif p.name == whole:
            continue
        elif route.method in _IN_QUERY or whole is not None:
            listed.append({"name": p.name, "in": "query", "required": p.name in sig.required, "schema": schema})
        else:
            fields[p.name] = schema
            if p.name in sig.required:
                required.append(p.name)
    if whole is not None:
        body = {"required": whole in sig.required,
                "content": {"application/json": {"schema": _schema(sig.hints[whole], defs)}}}
    elif fields or sig.allowed is None and route.method not in _IN_QUERY:
        shape = {"type": "object", "properties": fields, "additionalProperties": sig.allowed is None}
        body = {"required": bool(required), "content": {"application/json": {"schema": {
            **shape, **({"required": required} if required else {})}}}}
    else:
        body = None
    return listed, body


def _plain(value: Any) -> Any:
    """A default as JSON (TypeError: it has none)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise TypeError(value)


def _operation(instance, route, defs: dict, op_ids: set, auth: bool) -> dict:
    method = getattr(instance, route.call)
    sig = Signature.of(method)
    parameters, body = _parameters(method, sig, route, defs)
    op_id = route.call if route.call not in op_ids else f"{route.call}_{route.method.lower()}_{len(op_ids)}"
    op_ids.add(op_id)
    doc = (inspect.getdoc(method) or "").strip()
    operation: dict[str, Any] = {"operationId": op_id, "summary": doc.splitlines()[0] if doc else route.call,
                                 "parameters": parameters}
    if body is not None:
        operation["requestBody"] = body
    operation["responses"] = {
        "200": {"description": f"what {route.call} returned", "content": _result(sig.returns, defs)},
        "400": _answer("a request the server refuses (its body, a missing or unexpected argument)", "Error"),
        **({"401": _answer("a missing or wrong bearer token", "Error")} if auth else {}),
        "422": _answer("arguments that do not fit the method's annotations", "ValidationError"),
        "500": _answer("the method raised: the id leads to the traceback", "Error"),
        "default": _answer("any other error (404, 405, 413, 503, 504, a status the method chose)", "Error"),
    }
    return operation


def document(instance, server, title: str) -> dict:
    """The whole document; `instance`: the object whose methods the routes call."""
    defs: dict[str, Any] = {"Error": _ERROR, "ValidationError": _INVALID}
    auth, op_ids = server.token_env is not None, set()
    paths: dict[str, dict] = {}
    for route in server.routes:
        path = re.sub(r"\{([^}:]+):[^}]*\}", r"{\1}", route.path)  # `{key:regex}` -> `{key}`
        paths.setdefault(path, {})[route.method.lower()] = _operation(instance, route, defs, op_ids, auth)
    for path, what, schema in (("/-/healthz", "200 ready, 503 draining", {"type": "object"}),
                               ("/-/openapi.json", "this document", {"type": "object"})):
        paths[path] = {"get": {"operationId": path.strip("/-").replace(".", "_"), "summary": what, "security": [],
                               "responses": {"200": {"description": what, "content": {
                                   "application/json": {"schema": schema}}},
                                   "default": _answer("draining (503), or an error", "Error")}}}
    components: dict[str, Any] = {"schemas": defs}
    out = {"openapi": "3.1.0", "info": {"title": title, "version": "1"}, "paths": paths, "components": components}
    if auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        out["security"] = [{"bearer": []}]
    return out


def document_bytes(instance, server, labels: dict | None) -> bytes:
    """The document as the server sends it. Its title: deployment/actor/server inside a replica
    (labels: the replica's metric labels), the server's name alone outside one. A document that
    cannot be built costs the server nothing but its routes' descriptions."""
    title = f"{labels['deployment']}/{labels['actor']}/{server.name}" if labels else server.name
    try:
        return dumps(document(instance, server, title))
    except Exception:
        log.warning("no OpenAPI description of server %s's routes", server.name, exc_info=True)
        return dumps({"openapi": "3.1.0", "info": {"title": title, "version": "1"}, "paths": {}})

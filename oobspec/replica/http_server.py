"""The HTTP server inside an actor's event loop: routes that call the actor's own methods with
typed arguments (typed.py), bearer auth, TLS, load shedding, timeouts, metrics, /-/healthz and
/-/openapi.json (openapi.py). The protocol itself (parsing, keep-alive, bodies, limits,
draining) is http_wire.py's.

Every answer that is not the method's own result is JSON `{"error": ..., "status": N}`,
whatever the request's bytes: a request the parser refuses (a malformed request line, a header
too long), one the handler refuses (4xx), and a method that raised (a status the user chose, or
a 500 with an id).
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import re
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote

from .http_wire import Answer, Connection, Request, Wire, error, too_large
from .metrics import Metrics, off
from .openapi import document_bytes
from .ports import listening_socket
from .servers import Running, Signature, _ssl_context, dumps, failures, token_bytes, token_from_env
from .typed import summary

log = logging.getLogger("oobspec")

_TIMED_OUT = object()
_NO_BODY: dict = {}  # (read only)
_JSON_TYPES = frozenset((dict, list, int, float, bool))
_TEXT, _BYTES = b"text/plain; charset=utf-8", b"application/octet-stream"
_OWN_HEADERS = frozenset(("content-length", "content-type", "transfer-encoding", "connection", "date"))
_QUERY_FIELDS = 1000  # keys in one query string at most
_UNSAFE = re.compile(r"[\r\n\0]")
_KEPT = re.compile(r"(%2[fF5])")  # what stays encoded in the path routes match: "/" and "%"


def _response(result: Any) -> Answer:
    """A method's result as an answer: JSON, text, bytes, or the user's own aiohttp Response."""
    if result is None or type(result) in _JSON_TYPES:  # the common case first: no ABC checks
        return Answer(200, dumps(result))
    if isinstance(result, str):
        return Answer(200, result.encode("utf-8", "surrogatepass"), _TEXT)
    if isinstance(result, (bytes, bytearray, memoryview)):
        return Answer(200, bytes(result), _BYTES)
    web = sys.modules.get("aiohttp.web")  # a user who returns a web.Response has imported it
    if web is not None and isinstance(result, web.StreamResponse):
        return _users_response(web, result)
    return Answer(200, dumps(result))


def _users_response(web, result) -> Answer:
    """An aiohttp `web.Response` the method made: its status, headers and body, as they are."""
    body = result.body
    if not isinstance(result, web.Response) or not isinstance(body, (bytes, bytearray, type(None))):
        raise TypeError("a method may return an aiohttp web.Response with a bytes body, not a stream")
    headers = [(k, v) for k, v in result.headers.items() if k.lower() not in _OWN_HEADERS]
    headers += [("Set-Cookie", cookie.OutputString()) for cookie in result.cookies.values()]
    kind = result.headers.get("Content-Type", "application/octet-stream")
    if any(_UNSAFE.search(text) for text in (kind, *(part for pair in headers for part in pair))):
        raise ValueError("a header of the method's Response holds CR, LF or NUL (header injection)")
    return Answer(result.status, bytes(body or b""), kind.encode("latin-1"), tuple(headers))


def _invalid(errors: list[dict]) -> Answer:
    """422 in FastAPI's shape (`detail`: loc, msg, type of each error), with the "error" and
    "status" every oob error has."""
    return Answer(422, dumps({"detail": errors, "error": summary(errors), "status": 422}))


def _busy(most: int) -> Answer:
    return error(503, f"busy: {most} requests in flight", headers=(("Retry-After", "1"),))


# --- routing --------------------------------------------------------------------------------


def _pattern(path: str) -> re.Pattern | None:
    """The regex of a path with `{name}` / `{name:regex}` segments (None: a fixed path)."""
    parts, at = [], 0
    for match in re.finditer(r"\{([^}:]+)(?::([^}]+))?\}", path):
        parts += (re.escape(path[at:match.start()]), f"(?P<{match[1]}>{match[2] or '[^{}/]+'})")
        at = match.end()
    return None if not parts else re.compile("".join(parts) + re.escape(path[at:]) + r"\Z")


class _Routes:
    """method + path -> handler: a dict for fixed paths, regexes (in order) for the others. A
    GET route answers HEAD too (its body left out), unless a HEAD route of its own is declared."""

    def __init__(self) -> None:
        self.fixed: dict[str, dict[bytes, Callable]] = {}
        self.patterns: list[tuple[re.Pattern, dict[bytes, Callable]]] = []

    def add(self, method: str, path: str, handler: Callable) -> None:
        pattern = _pattern(path)
        if pattern is None:
            table = self.fixed.setdefault(path, {})
        else:
            table = next((t for p, t in self.patterns if p.pattern == pattern.pattern), None)
            if table is None:
                table = {}
                self.patterns.append((pattern, table))
        table[method.encode()] = handler
        if method == "GET":
            table.setdefault(b"HEAD", handler)

    def find(self, method: bytes, path: str) -> tuple[Callable | None, dict]:
        """(the handler, path params); (None, {}) when no route takes this method and path."""
        table = self.fixed.get(path)
        if table is not None and method in table:
            return table[method], {}
        for pattern, table in self.patterns:
            if method in table:
                match = pattern.match(path)
                if match is not None:
                    return table[method], {k: unquote(v) for k, v in match.groupdict().items()}
        return None, {}

    def allowed(self, path: str) -> set[bytes]:
        """The methods some route takes on this path (for a 405's Allow)."""
        tables = [self.fixed.get(path, {})] + [t for p, t in self.patterns if p.match(path)]
        return {method for table in tables for method in table}


def _split(target: bytes) -> tuple[str, str]:
    """(the path routes match, the raw query) of a request target. The path is percent-decoded
    except for "%2F" and "%25", so that an encoded "/" stays inside its segment and a path
    param is decoded once (when it is matched). An absolute target ("http://host/path", which
    a proxy sends) is its path."""
    text = target.decode("latin-1")
    if text[:1] != "/" and text[:4].lower() == "http" and "://" in text:
        text = "/" + text.split("://", 1)[1].partition("/")[2]
    path, _, query = text.partition("?")
    path = path.partition("#")[0]
    if "%" in path:
        path = "".join(part if i % 2 else unquote(part) for i, part in enumerate(_KEPT.split(path)))
    return path, query


# --- one route ------------------------------------------------------------------------------


class _Limit:
    """Requests in flight on one server: the one past `max_inflight` is refused at once."""

    __slots__ = ("inflight", "most")

    def __init__(self, most: int):
        self.inflight, self.most = 0, most


@dataclass(frozen=True)
class _Shared:
    """What every route of one server shares; a route's handler copies it into its closure
    once, so the request path reads no attribute."""

    server: Any
    limit: _Limit
    metrics: Metrics
    answer: Callable  # servers.failures(server)
    expected: bytes | None  # the Authorization header that auth expects


def _arguments(sig: Signature, expected: bytes | None):
    many = sig.typed.many if sig.typed is not None else ()

    def arguments(request: Request, params: dict, query: str) -> dict | Answer:
        """Path and query arguments (text); or the refusal."""
        if expected is not None and not hmac.compare_digest(request.headers.get(b"authorization", b""), expected):
            return error(401, "missing or wrong bearer token")
        if not query:
            return params
        try:
            pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=_QUERY_FIELDS)
        except ValueError:
            return error(400, f"Bad Request: more than {_QUERY_FIELDS} query fields")
        values: dict[str, Any] = {}
        for key, value in pairs:
            values.setdefault(key, value)  # a repeated key: its first value
        for name in many:  # list[int] & co.: every value of a repeated key
            if name in values:
                values[name] = [v for k, v in pairs if k == name]
        params.update(values)
        return params

    return arguments


def _checker(sig: Signature, path: str):
    """The arguments of one request, complete: the body's merged in, the names checked (400),
    the typed ones validated and converted (422)."""
    typed, problem = sig.typed, sig.problem
    names = frozenset(re.findall(r"\{([^}:]+)", path))  # the path's params: `{key}`, `{key:regex}`

    def checked(kwargs: dict, body) -> dict | Answer:
        if type(body) is not dict:
            return body  # the body's refusal
        if body:
            kwargs.update(body)
        said = problem(kwargs)
        if said:
            return error(400, said)
        if typed is not None:
            errors = typed.convert(kwargs, names, body)
            if errors:
                return _invalid(errors)
        return kwargs

    return checked


def _decoded(raw: bytes, encoding: bytes, most: int) -> bytes | Answer:
    """A body sent with Content-Encoding gzip or deflate, inflated (`most` bytes at most)."""
    encoding = encoding.strip().lower()
    if encoding in (b"", b"identity"):
        return raw
    if encoding not in (b"gzip", b"x-gzip", b"deflate"):
        return error(400, f"request body could not be read: Content-Encoding {encoding.decode('latin-1')!r} "
                          "is not supported (gzip, deflate)")
    inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, by their header
    try:
        body = inflate.decompress(raw, most + 1)
    except zlib.error:
        return error(400, "request body could not be read")
    if len(body) > most:
        return too_large(most, "bytes inflated")
    if not inflate.eof:
        return error(400, "request body could not be read")
    return body


def _body_of(request: Request, whole: str | None, most: int) -> dict | Answer:
    """The body's keyword arguments (whole: the name of the one parameter that takes the whole
    body); or the refusal (4xx), whatever its bytes or depth."""
    raw = request.body
    encoding = request.headers.get(b"content-encoding")
    if encoding is not None:
        raw = _decoded(raw, encoding, most)
        if type(raw) is not bytes:
            return raw
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        return error(400, "request body is not valid JSON")
    except RecursionError:
        return error(400, "request body nests too deeply")
    if whole is not None:
        return {whole: body}
    if not isinstance(body, dict):
        return error(400, "request body must be a JSON object of keyword arguments")
    return body


def _route_handler(instance, route, shared: _Shared):
    method = getattr(instance, route.call)
    sig = Signature.of(method)
    arguments, checked = _arguments(sig, shared.expected), _checker(sig, route.path)
    answer, whole, most = shared.answer, sig.typed and sig.typed.whole, shared.server.max_body
    limit, metrics, name, timeout = shared.limit, shared.metrics, shared.server.name, shared.server.timeout
    label, where = route.path, f"{route.call} ({route.method} {route.path})"

    async def handle(request: Request, params: dict, query: str) -> Answer:
        # One coroutine on the common path (a GET without a body): no frame per step.
        if limit.inflight >= limit.most:
            metrics.request(name, label, 503, 0.0)
            return _busy(limit.most)
        limit.inflight += 1
        start = time.perf_counter()
        try:
            kwargs = arguments(request, params, query)
            if type(kwargs) is dict:
                kwargs = checked(kwargs, _body_of(request, whole, most) if request.body else _NO_BODY)
            if type(kwargs) is not dict:
                response = kwargs
            else:
                try:
                    result = method(**kwargs)
                    if sig.is_async:
                        if timeout is None:
                            result = await result
                        else:
                            scope = asyncio.timeout(timeout)
                            try:
                                async with scope:
                                    result = await result
                            except TimeoutError:
                                if not scope.expired():
                                    raise  # the method's own TimeoutError: its error like any other
                                result = _TIMED_OUT
                    response = (error(504, f"no answer within the server's timeout ({timeout:g}s)")
                                if result is _TIMED_OUT else _response(result))
                except Exception as exc:  # the method's, or its result's encoding
                    failure = answer(exc, where)
                    response = error(failure.status, failure.message, failure.id)
        finally:
            limit.inflight -= 1
        metrics.request(name, label, response.status, time.perf_counter() - start)
        return response

    return handle


# --- the server -----------------------------------------------------------------------------


def _app(instance, server, draining: Callable[[], bool], metrics: Metrics):
    """The server's application: Request -> Answer."""
    token = token_from_env(server.token_env)
    shared = _Shared(server, _Limit(server.max_inflight), metrics, failures(server),
                     token_bytes(f"Bearer {token}") if token else None)
    routes = _Routes()

    async def healthz(request: Request, params: dict, query: str) -> Answer:
        # No auth: load balancers and oob's own hand-over probe it.
        if draining():
            return Answer(503, dumps({"status": "draining"}))
        return Answer(200, dumps({"status": "ok"}))

    # Built on the first request, not at start: pydantic's schema generation costs each replica
    # a tenth of a second of CPU that few of them ever need.
    described = functools.cache(lambda: document_bytes(instance, server, getattr(metrics, "base", None)))

    async def openapi(request: Request, params: dict, query: str) -> Answer:  # no auth: it describes only
        return Answer(200, described())

    routes.add("GET", "/-/healthz", healthz)
    routes.add("GET", "/-/openapi.json", openapi)
    for route in server.routes:
        routes.add(route.method, route.path, _route_handler(instance, route, shared))

    async def app(request: Request) -> Answer:
        path, query = _split(request.target)
        handler, params = routes.find(request.method, path)
        if handler is not None:
            return await handler(request, params, query)
        allowed = routes.allowed(path)
        if allowed:
            return error(405, "Method Not Allowed", headers=(("Allow", ",".join(sorted(m.decode() for m in allowed))),))
        return error(404, "Not Found")

    return app


async def start_http(instance, server, exclusive: bool = True, *, tls: tuple[bytes, bytes] | None = None,
                     metrics: Metrics | None = None) -> Running:
    """tls: (certificate, key) PEM. The header timeout counts from a connection's start and
    from each answer: a connection whose next request's head is not complete by then closes."""
    holder: list[Running] = []
    app = _app(instance, server, lambda: bool(holder) and holder[0].draining, metrics or off())
    wire = Wire(app, server.max_body, server.header_timeout)
    sock = listening_socket(server.host, server.port, exclusive)
    try:
        listener = await wire.loop.create_server(lambda: Connection(wire), sock=sock,
                                                 ssl=_ssl_context(*tls) if tls else None, backlog=1024)
    except BaseException:
        sock.close()
        raise

    async def stop(seconds: float, settle: float = 0.0) -> None:
        listener.close()  # no new connections (a shared port's queue moves to the node's others)
        await asyncio.sleep(settle)  # connections accepted just before the close send their requests
        await wire.drain(seconds)  # in-flight requests finish, `seconds` at most

    running = Running(server.name, "http", server.host, sock.getsockname()[1], stop, sock=sock)
    holder.append(running)
    return running

"""The HTTP server inside an actor's event loop (aiohttp): routes that call the actor's own
methods with typed arguments (typed.py), bearer auth, TLS, load shedding, timeouts, metrics,
/-/healthz and /-/openapi.json (openapi.py).

Every answer that is not the method's own result is JSON `{"error": ..., "status": N}`,
whatever the request's bytes: a request the handler refuses (4xx), a method that raised (a
status the user chose, or a 500 with an id), and what aiohttp's own parser refuses before any
handler runs (a malformed request line, a header too long: `JsonErrors`).

aiohttp is imported when a server starts, not with this module: a replica without HTTP
servers never loads it.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import first_line, status_phrase
from .metrics import Metrics, off
from .openapi import document_bytes
from .ports import listening_socket
from .servers import Running, Signature, _ssl_context, dumps, error_id, failures, token_bytes, token_from_env
from .typed import summary

log = logging.getLogger("oobspec")

_TIMED_OUT = object()
_NO_BODY: dict = {}  # (read only)
_JSON_TYPES = frozenset((dict, list, int, float, bool))


def _response(web, result: Any):
    """A method's result as an HTTP response (`web`: aiohttp.web): JSON, text, bytes, or the
    user's own Response."""
    if result is None or type(result) in _JSON_TYPES:  # the common case first: no ABC checks
        return web.Response(body=dumps(result), content_type="application/json")
    if isinstance(result, web.StreamResponse):
        return result
    if isinstance(result, str):
        return web.Response(text=result, content_type="text/plain")
    if isinstance(result, (bytes, bytearray, memoryview)):
        return web.Response(body=bytes(result), content_type="application/octet-stream")
    return web.Response(body=dumps(result), content_type="application/json")


def _error(web, status: int, message: str, ident: str | None = None):
    body = {"error": message, "status": status} if ident is None else {"error": message, "status": status, "id": ident}
    return web.Response(status=status, body=dumps(body), content_type="application/json")


def _invalid(web, errors: list[dict]):
    """422 in FastAPI's shape (`detail`: loc, msg, type of each error), with the "error" and
    "status" every oob error has."""
    body = {"detail": errors, "error": summary(errors), "status": 422}
    return web.Response(status=422, body=dumps(body), content_type="application/json")


def _refused(message: str | None) -> str:
    """What aiohttp's parser said (its first line: "Invalid header token"), without the
    request's own bytes it quotes; "" where it is only those bytes (an invalid URL's message)."""
    line = first_line(message or "")
    for quote in (": b'", ': b"', ": bytearray("):
        line = line.split(quote)[0]
    line = line.rstrip(":. ")
    return line if " " in line else ""


@functools.cache
def _json_errors():
    """aiohttp's connection handler, answering in JSON what it answers itself: a request its
    parser refuses (a malformed request line or header, one too long: 400 with plain text) and a
    handler that raised (500 "Server got itself in trouble"). aiohttp has no hook for these
    (aio-libs/aiohttp#3287): `handle_error` of its RequestHandler is the one place they pass."""
    from aiohttp import web

    class JsonErrors(web.RequestHandler):
        __slots__ = ()

        def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                         message: str | None = None):
            if request.writer.output_size > 0:  # as aiohttp: part of a response went out
                raise ConnectionError("response already started: no error response can follow")
            if status == 500:  # a handler raised (ours do not: what else did?)
                ident = error_id()
                log.error("error id %s: %s %s failed", ident, request.method, request.path, exc_info=exc)
                response = _error(web, 500, "internal error", ident)
            else:
                log.debug("refused a request: %s", message, exc_info=exc)
                detail = _refused(message)
                response = _error(web, status, f"{status_phrase(status)}: {detail}" if detail else status_phrase(status))
            response.force_close()
            return response

    return JsonErrors


@functools.cache
def _every_target():
    """The resource of the fallback route: every request target, after the user's routes. A
    catch-all path ("/{tail:.*}") matches only targets that start with "/", so `OPTIONS *` and
    `CONNECT host:443` would get aiohttp's own plain-text 404 (a custom resource is aiohttp's
    documented extension: `router.register_resource`)."""
    from aiohttp import web

    class EveryTarget(web.AbstractResource):
        def __init__(self, handler, expect_handler):
            super().__init__()
            self.route = web.ResourceRoute("*", handler, self, expect_handler=expect_handler)

        @property
        def canonical(self) -> str:
            return "/"  # the router's walk up a path's parts ends at "/", whatever the path

        def url_for(self, **kwargs: str):
            raise ValueError("no URL leads to the fallback route")

        async def resolve(self, request):
            return web.UrlMappingMatchInfo({}, self.route), set()

        def add_prefix(self, prefix: str) -> None:
            pass

        def get_info(self) -> dict:
            return {}

        def raw_match(self, path: str) -> bool:
            return False

        def __len__(self) -> int:
            return 1

        def __iter__(self):
            return iter((self.route,))

    return EveryTarget


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
    body_of: Callable  # (request) -> kwargs or the refusal


def _arguments(web, sig: Signature, expected: bytes | None):
    many = sig.typed.many if sig.typed is not None else ()

    def arguments(request) -> dict | Any:
        """Path and query arguments (text); or the refusal."""
        if expected is not None:
            got = request.headers.get("Authorization", "").encode("utf-8", "surrogatepass")  # token_bytes
            if not hmac.compare_digest(got, expected):
                return _error(web, 401, "missing or wrong bearer token")
        kwargs: dict[str, Any] = dict(request.match_info)
        if request.query_string:
            query = request.query
            kwargs.update(query)
            for name in many:  # list[int] & co.: every value of a repeated key
                if name in query:
                    kwargs[name] = query.getall(name)
        return kwargs

    return arguments


def _checker(web, sig: Signature, path: str):
    """The arguments of one request, complete: the body's merged in, the names checked (400),
    the typed ones validated and converted (422)."""
    typed, problem = sig.typed, sig.problem
    names = frozenset(re.findall(r"\{([^}:]+)", path))  # the path's params: `{key}`, `{key:regex}`

    def checked(kwargs: dict, body) -> dict | Any:
        if type(body) is not dict:
            return body  # the body's refusal
        if body:
            kwargs.update(body)
        said = problem(kwargs)
        if said:
            return _error(web, 400, said)
        if typed is not None:
            errors = typed.convert(kwargs, names, body)
            if errors:
                return _invalid(web, errors)
        return kwargs

    return checked


def _body_reader(web):
    async def body_of(request, whole: str | None) -> dict | Any:
        """The body's keyword arguments (whole: the name of the one parameter that takes the
        whole body); or the refusal (4xx), whatever its bytes or depth."""
        try:
            raw = await request.read()
        except web.HTTPException as exc:  # 413: body larger than max_body
            return _error(web, exc.status, exc.reason)
        except Exception:  # a body its own encoding refuses (chunks, gzip): the client's fault
            log.debug("request body unreadable", exc_info=True)
            return _error(web, 400, "request body could not be read")
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(web, 400, "request body is not valid JSON")
        except RecursionError:
            return _error(web, 400, "request body nests too deeply")
        if whole is not None:
            return {whole: body}
        if not isinstance(body, dict):
            return _error(web, 400, "request body must be a JSON object of keyword arguments")
        return body

    return body_of


def _route_handler(web, instance, route, shared: _Shared):
    method = getattr(instance, route.call)
    sig = Signature.of(method)
    arguments, checked = _arguments(web, sig, shared.expected), _checker(web, sig, route.path)
    body_of, answer, whole = shared.body_of, shared.answer, sig.typed and sig.typed.whole
    limit, metrics, name, timeout = shared.limit, shared.metrics, shared.server.name, shared.server.timeout
    label, where = route.path, f"{route.call} ({route.method} {route.path})"

    async def handle(request):
        # One coroutine on the common path (a GET without a body): no frame per step.
        if limit.inflight >= limit.most:
            metrics.request(name, label, 503, 0.0)
            return _busy(web, limit.most)
        limit.inflight += 1
        start = time.perf_counter()
        try:
            kwargs = arguments(request)
            if type(kwargs) is dict:
                kwargs = checked(kwargs, await body_of(request, whole) if request.can_read_body else _NO_BODY)
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
                    response = (_error(web, 504, f"no answer within the server's timeout ({timeout:g}s)")
                                if result is _TIMED_OUT else _response(web, result))
                except Exception as exc:  # the method's, or its result's encoding
                    failure = answer(exc, where)
                    response = _error(web, failure.status, failure.message, failure.id)
        finally:
            limit.inflight -= 1
        metrics.request(name, label, response.status, time.perf_counter() - start)
        return response

    return handle


def _busy(web, most: int):
    response = _error(web, 503, f"busy: {most} requests in flight")
    response.headers["Retry-After"] = "1"
    return response


def _expect_handler(web):
    from aiohttp import HttpVersion11

    async def expect(request):
        # Only requests with an Expect header come here. aiohttp's own handler answers an
        # Expect it does not know with a plain-text 417; otherwise it does the same as this.
        if request.version != HttpVersion11:
            return None
        if request.headers.get("Expect", "").lower() != "100-continue":
            return _error(web, 417, "Expectation Failed: only 100-continue is understood")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response
        return None

    return expect


def _http_app(instance, server, draining: Callable[[], bool], metrics: Metrics):
    from aiohttp import web

    token = token_from_env(server.token_env)
    shared = _Shared(server, _Limit(server.max_inflight), metrics, failures(server),
                     token_bytes(f"Bearer {token}") if token else None, _body_reader(web))

    async def fallback(request: web.Request) -> web.Response:
        # Registered last, so the happy path pays nothing (no middleware): only requests
        # that match no route get here, and learn whether the path exists for other methods.
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not catch_all:
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            response = _error(web, 405, "Method Not Allowed")
            response.headers["Allow"] = ",".join(sorted(allowed))
            return response
        return _error(web, 404, "Not Found")

    async def healthz(request: web.Request) -> web.Response:
        # No auth: load balancers and oob's own hand-over probe it.
        if draining():
            return web.Response(status=503, body=dumps({"status": "draining"}), content_type="application/json")
        return web.Response(body=dumps({"status": "ok"}), content_type="application/json")

    # Built on the first request, not at start: pydantic's schema generation costs each replica
    # a tenth of a second of CPU that few of them ever need.
    described = functools.cache(lambda: document_bytes(instance, server, getattr(metrics, "base", None)))

    async def openapi(request: web.Request) -> web.Response:  # no auth: it describes, it serves nothing
        return web.Response(body=described(), content_type="application/json")

    expect = _expect_handler(web)
    app = web.Application(client_max_size=server.max_body)
    app.router.add_get("/-/healthz", healthz, expect_handler=expect)
    app.router.add_get("/-/openapi.json", openapi, expect_handler=expect)
    for route in server.routes:
        app.router.add_route(route.method, route.path, _route_handler(web, instance, route, shared),
                             expect_handler=expect)
    catch_all = _every_target()(fallback, expect)
    app.router.register_resource(catch_all)
    return app


async def start_http(instance, server, exclusive: bool = True, *, tls: tuple[bytes, bytes] | None = None,
                     metrics: Metrics | None = None) -> Running:
    """tls: (certificate, key) PEM. The keep-alive timeout is the header timeout too: aiohttp
    closes a connection whose request headers are not complete by then (a slow client cannot
    hold it), counting from its start and from each response."""
    from aiohttp import web

    holder: list[Running] = []
    app = _http_app(instance, server, lambda: bool(holder) and holder[0].draining, metrics or off())
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    manager, loop, protocol = runner.server, asyncio.get_running_loop(), _json_errors()
    sock = listening_socket(server.host, server.port, exclusive)
    try:  # what web.SockSite does, with aiohttp's connection handler answering its own errors in JSON
        listener = await loop.create_server(
            lambda: protocol(manager, loop=loop, keepalive_timeout=server.header_timeout, access_log=None),
            sock=sock, ssl=_ssl_context(*tls) if tls else None, backlog=1024)
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise

    async def stop(seconds: float, settle: float = 0.0) -> None:
        listener.close()  # no new connections (a shared port's queue moves to the node's others)
        await asyncio.sleep(settle)  # connections accepted just before the close send their requests
        manager.pre_shutdown()
        await manager.shutdown(seconds)  # in-flight requests finish, `seconds` at most
        await runner.cleanup()

    running = Running(server.name, "http", server.host, sock.getsockname()[1], stop, sock=sock)
    holder.append(running)
    return running

"""Servers that run inside an actor's event loop and call the actor's own methods.

Everything that can be decided once (signatures, converters, the expected auth header) is
decided when the server starts, so a request costs one dict build and one method call:
no Ray call, no reflection.
"""
from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import os
import socket
import time
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from .metrics import Metrics, off
from .ports import SETTLE, free_port, listening_socket, steer, wait_connectable  # noqa: F401 (re-exported)

log = logging.getLogger("oobspec")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return str(value)


_JSON_TYPES = frozenset((dict, list, int, float, bool))
_encoder = json.JSONEncoder(default=_json_default, separators=(",", ":"))  # built once, not per response


def dumps(value: Any) -> bytes:
    return _encoder.encode(value).encode()


def token_from_env(auth) -> str | None:
    """The bearer token an auth block asks for, read from this process's environment."""
    if auth is None:
        return None
    token = os.environ.get(auth.token_env)
    if not token:
        raise RuntimeError(f"auth needs the environment variable {auth.token_env}, which is not set "
                           "in the actor (set it where you run `oob apply`)")
    return token


@dataclass
class Signature:
    """What a method accepts, worked out once."""

    required: frozenset
    allowed: frozenset | None  # None: takes **kwargs
    converters: dict[str, Callable[[str], Any]]
    is_async: bool

    @classmethod
    def of(cls, method) -> "Signature":
        sig = inspect.signature(method)
        required, allowed, converters, var_kw = set(), set(), {}, False
        for p in sig.parameters.values():
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "_ray_trace_ctx":
                # (Ray adds _ray_trace_ctx to the signature of every actor method it wraps.)
                allowed.add(p.name)
                if p.default is p.empty:
                    required.add(p.name)
                convert = _converter(_annotation(method, p.annotation))
                if convert is not None:
                    converters[p.name] = convert
        return cls(frozenset(required), None if var_kw else frozenset(allowed), converters,
                   inspect.iscoroutinefunction(method))

    def problem(self, kwargs: dict) -> str | None:
        missing = self.required - kwargs.keys()
        if missing:
            return f"missing argument{'s' if len(missing) > 1 else ''}: {', '.join(sorted(missing))}"
        if self.allowed is not None:
            extra = kwargs.keys() - self.allowed
            if extra:
                return f"unexpected argument{'s' if len(extra) > 1 else ''}: {', '.join(sorted(extra))}"
        return None


def _annotation(method, annotation: Any) -> Any:
    """One parameter's annotation, resolved on its own: a name that does not resolve (an import
    under TYPE_CHECKING) costs only that parameter its converter, not every parameter."""
    if not isinstance(annotation, str):
        return annotation
    # typing's names too: a class that travelled by value keeps only the globals its code uses,
    # not those its annotations name (`Optional` under `from __future__ import annotations`).
    names = {**vars(typing), **getattr(getattr(method, "__func__", method), "__globals__", {})}
    try:
        return eval(annotation, names)  # noqa: S307 (the user's own annotation)
    except Exception:
        return None


def _converter(annotation: Any) -> Callable[[str], Any] | None:
    """int, float and bool (also `X | None` / Optional[X]) are converted from text."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and len(args) == 1 and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]
    if annotation in (int, float):
        return annotation
    if annotation is bool:
        return _to_bool
    return None


def _to_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"'{text}' is not a boolean")


# --- HTTP ---------------------------------------------------------------------------------


_TIMED_OUT = object()


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


class _Limit:
    """Requests in flight on one server: the one past `max_inflight` is refused at once."""

    __slots__ = ("inflight", "most")

    def __init__(self, most: int):
        self.inflight, self.most = 0, most


def _http_app(instance, server, draining: Callable[[], bool], metrics: Metrics):
    from aiohttp import web

    limit, timeout = _Limit(server.max_inflight), server.timeout

    def error(status: int, message: str) -> web.Response:
        return web.Response(status=status, body=dumps({"error": message, "status": status}),
                            content_type="application/json")

    async def fallback(request: web.Request) -> web.Response:
        # Registered last, so the happy path pays nothing (no middleware): only requests
        # that match no route get here, and learn whether the path exists for other methods.
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not catch_all:
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            response = error(405, "Method Not Allowed")
            response.headers["Allow"] = ",".join(sorted(allowed))
            return response
        return error(404, "Not Found")

    token = token_from_env(server.auth)
    expected = f"Bearer {token}".encode() if token else None

    def busy() -> web.Response:
        response = error(503, f"busy: {limit.most} requests in flight")
        response.headers["Retry-After"] = "1"
        return response

    def make_handler(route):
        method = getattr(instance, route.call)
        sig = Signature.of(method)
        converters = tuple(sig.converters.items())
        label = route.path

        def arguments(request: web.Request) -> dict | web.Response:
            """Path and query arguments, converted; or the refusal."""
            if expected is not None:
                got = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(got, expected):
                    return error(401, "missing or wrong bearer token")
            kwargs: dict[str, Any] = dict(request.match_info)
            if request.query_string:
                kwargs.update(request.query)
            if converters:
                try:
                    for name, convert in converters:
                        if isinstance(kwargs.get(name), str):
                            kwargs[name] = convert(kwargs[name])
                except ValueError as exc:
                    return error(400, str(exc))
            return kwargs

        async def body_of(request: web.Request) -> dict | web.Response:
            try:
                raw = await request.read()
            except web.HTTPException as exc:  # 413: body larger than max_body
                return error(exc.status, exc.reason)
            if not raw.strip():
                return {}
            try:
                body = json.loads(raw)
            except ValueError:
                return error(400, "request body is not valid JSON")
            if not isinstance(body, dict):
                return error(400, "request body must be a JSON object of keyword arguments")
            return body

        async def handle(request: web.Request) -> web.StreamResponse:
            # One coroutine on the common path (a GET without a body): no frame per step.
            if limit.inflight >= limit.most:
                metrics.request(server.name, label, 503, 0.0)
                return busy()
            limit.inflight += 1
            start = time.perf_counter()
            try:
                kwargs = arguments(request)
                if type(kwargs) is dict and request.can_read_body:
                    body = await body_of(request)
                    if type(body) is dict:
                        kwargs.update(body)
                    else:
                        kwargs = body
                if type(kwargs) is not dict:
                    response = kwargs
                elif problem := sig.problem(kwargs):
                    response = error(400, problem)
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
                                        raise  # the method's own TimeoutError: a 500 like any other
                                    result = _TIMED_OUT
                    except Exception as exc:
                        log.exception("%s raised", route.call)
                        response = error(500, f"{type(exc).__name__}: {exc}")
                    else:
                        response = (error(504, f"no answer within the server's timeout ({timeout:g}s)")
                                    if result is _TIMED_OUT else _response(web, result))
            finally:
                limit.inflight -= 1
            metrics.request(server.name, label, response.status, time.perf_counter() - start)
            return response

        return handle

    async def healthz(request: web.Request) -> web.Response:
        # No auth: load balancers and oob's own hand-over probe it.
        if draining():
            return web.Response(status=503, body=dumps({"status": "draining"}), content_type="application/json")
        return web.Response(body=dumps({"status": "ok"}), content_type="application/json")

    app = web.Application(client_max_size=server.max_body)
    app.router.add_get("/-/healthz", healthz)
    for route in server.routes:
        app.router.add_route(route.method, route.path, make_handler(route))
    catch_all = app.router.add_route("*", "/{_oob_path:.*}", fallback).resource
    return app


def _ssl_context(cert: bytes, key: bytes):
    """A server TLS context from PEM bytes (`load_cert_chain` reads files: private ones, briefly)."""
    import ssl
    import tempfile
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as folder:  # mode 0700: nobody else reads the key
        paths = [os.path.join(folder, name) for name in ("cert.pem", "key.pem")]
        for path, data in zip(paths, (cert, key)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(data)
        context.load_cert_chain(*paths)
    return context


class Running:
    """A started server: its bound port, how it hands its port over and how it stops."""

    def __init__(self, name: str, protocol: str, host: str, port: int, stop, *, sock: socket.socket | None = None):
        self.name, self.protocol, self.host, self.port = name, protocol, host, port
        self._stop, self._sock = stop, sock
        self.draining = False

    def steer(self, index: int) -> None:
        """Send new connections on this port to the `index`-th socket bound to it (0: the one
        bound first, 1: its successor). Without it, a socket that closes resets connections the
        kernel had just queued on it; with it, the queue empties before the close."""
        if self._sock is not None:
            steer(self._sock, index)

    async def drain(self, seconds: float, hand_over: bool = True) -> None:
        """Hand new connections over (to the successor sharing the port), turn unhealthy, stop
        accepting, finish what is in flight (`seconds` at most)."""
        if hand_over and self._sock is not None:  # (gRPC's sockets are gRPC core's: not steerable)
            self.steer(1)
            await asyncio.sleep(SETTLE)  # what the kernel queued here before the steering is accepted
        self.draining = True  # /-/healthz: 503 from here on, for whoever still talks to this one
        await self.stop(seconds)

    async def stop(self, seconds: float = 1.0) -> None:
        if self._stop is not None:
            stop, self._stop = self._stop, None
            await stop(seconds)


async def start_http(instance, server, exclusive: bool = True, *, tls: tuple[bytes, bytes] | None = None,
                     metrics: Metrics | None = None) -> Running:
    """tls: (certificate, key) PEM. The keep-alive timeout is the header timeout too: aiohttp
    closes a connection whose request headers are not complete by then (a slow client cannot
    hold it), counting from its start and from each response."""
    from aiohttp import web

    holder: list[Running] = []
    app = _http_app(instance, server, lambda: bool(holder) and holder[0].draining, metrics or off())
    runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=server.header_timeout)
    await runner.setup()
    sock = listening_socket(server.host, server.port, exclusive)
    site = web.SockSite(runner, sock, backlog=1024, ssl_context=_ssl_context(*tls) if tls else None)
    try:
        await site.start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise

    async def stop(seconds: float) -> None:
        await site.stop()  # no new connections
        if runner.server is not None:
            runner.server.pre_shutdown()
            await runner.server.shutdown(seconds)  # in-flight requests finish, `seconds` at most
        await runner.cleanup()

    running = Running(server.name, "http", server.host, sock.getsockname()[1], stop, sock=sock)
    holder.append(running)
    return running

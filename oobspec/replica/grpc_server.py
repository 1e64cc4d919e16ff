"""gRPC servers inside an actor's event loop: the JSON mode (a request is a JSON object of
keyword arguments), the user's own servicer (`proto:`), the standard health service, bearer
auth, TLS, load shedding, per-call timeouts and metrics."""
from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import time
from typing import Any

from ..contract import host_port
from .metrics import Metrics, off
from .ports import listening_socket
from .servers import Running, Signature, dumps, failures, token_bytes, token_from_env
from .typed import summary

# An HTTP status (HTTPError, error_status) as the gRPC code that means the same (google.rpc.Code's
# own table); any other 4xx is INVALID_ARGUMENT, any other 5xx INTERNAL.
_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
          409: "ALREADY_EXISTS", 412: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
          501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def grpc_code(status: int):
    import grpc
    return grpc.StatusCode[_CODES.get(status) or ("INVALID_ARGUMENT" if status < 500 else "INTERNAL")]


def _auth_interceptor(token: str):
    import grpc

    expected = token_bytes(f"Bearer {token}")

    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    class Auth(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            if details.method.startswith("/grpc.health.v1.Health/"):
                return await continuation(details)  # probes carry no token
            got = dict(details.invocation_metadata or ()).get("authorization", "")
            if isinstance(got, str) and hmac.compare_digest(token_bytes(got), expected):
                return await continuation(details)

            async def abort(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            return grpc.unary_unary_rpc_method_handler(abort)

    return Auth()


def _json_method(instance, call: str, where: str, answer):
    """`where`: the method's gRPC path; `answer`: the server's `failures`."""
    import grpc

    method = getattr(instance, call)
    sig = Signature.of(method)

    async def handle(request: bytes, context):
        try:
            kwargs = json.loads(request) if request else {}
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request is not valid JSON")
        except RecursionError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request nests too deeply")
        if not isinstance(kwargs, dict):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request must be a JSON object of keyword arguments")
        problem = sig.problem(kwargs)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if sig.typed is not None:  # as HTTP's JSON bodies: every key is its own argument
            errors = sig.typed.convert(kwargs, body=kwargs, whole=False)
            if errors:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, summary(
                    [{**e, "loc": e["loc"][1:]} for e in errors]))  # (no "body": a request is all body)
        try:
            result = method(**kwargs)
            if sig.is_async:
                result = await result
            return dumps(result)
        except Exception as exc:  # the method's, or its result's encoding
            failure = answer(exc, where)
        details = failure.message if failure.id is None else f"{failure.message} (id {failure.id})"
        await context.abort(grpc_code(failure.status), details)

    return grpc.unary_unary_rpc_method_handler(handle)


def _observing_interceptor(name: str, metrics: Metrics, timeout: float | None):
    """Times every unary call but health checks (and ends it with DEADLINE_EXCEEDED past
    `timeout`), whether the JSON mode or the user's own servicer answers it."""
    import grpc

    wrapped: dict[str, Any] = {}  # method -> its observed handler, built once

    class Observe(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            known = wrapped.get(details.method)
            if known is not None:
                return known
            handler = await continuation(details)
            if handler is None or handler.unary_unary is None or details.method.startswith("/grpc.health.v1."):
                return handler
            wrapped[details.method] = observe(handler, details.method)
            return wrapped[details.method]

    def observe(handler, route: str):
        inner = handler.unary_unary

        async def observed(request, context):
            start, code = time.perf_counter(), "OK"
            try:
                async with asyncio.timeout(timeout):
                    result = inner(request, context)
                    return await result if inspect.isawaitable(result) else result
            except TimeoutError:
                code = "DEADLINE_EXCEEDED"
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"no answer within the server's timeout ({timeout:g}s)")
            except BaseException:
                status = context.code() if hasattr(context, "code") else None
                code = status.name if status is not None else "UNKNOWN"
                raise
            finally:
                metrics.request(name, route, code, time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(observed, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    return Observe()


async def start_grpc(instance, server, import_object, exclusive: bool = True, *,
                     tls: tuple[bytes, bytes] | None = None, metrics: Metrics | None = None) -> Running:
    """tls: (certificate, key) PEM. Past `max_inflight` calls at once gRPC itself answers
    RESOURCE_EXHAUSTED."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    token = token_from_env(server.token_env)
    metrics = metrics or off()
    if exclusive and server.port:  # gRPC binds with SO_REUSEPORT: make sure nobody else holds the port
        listening_socket(server.host, server.port, exclusive=True).close()
    interceptors = [_auth_interceptor(token)] if token else []
    if metrics.enabled or server.timeout is not None:
        interceptors.append(_observing_interceptor(server.name, metrics, server.timeout))
    grpc_server = grpc.aio.server(interceptors=interceptors or None, maximum_concurrent_rpcs=server.max_inflight,
                                  options=[("grpc.so_reuseport", 1)])
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    if server.service and server.methods:
        answer = failures(server)
        handlers = {m: _json_method(instance, m, f"/{server.service}/{m}", answer) for m in server.methods}
        grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(server.service, handlers),))
    if server.proto:
        import_object(server.proto)(instance, grpc_server)
    address = host_port(server.host, server.port)
    if tls:
        cert, key = tls
        port = grpc_server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        port = grpc_server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {server.host}:{server.port}")
    await grpc_server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    if server.service:
        await health.set(server.service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(seconds: float, settle: float = 0.0) -> None:  # (GOAWAY needs no settling)
        # First the listener closes and clients get GOAWAY (their next call goes, on a new
        # connection, to whoever else holds the port); then health turns NOT_SERVING for the
        # calls still in flight here, which finish, `seconds` at most.
        stopping = asyncio.ensure_future(grpc_server.stop(grace=seconds))
        await asyncio.sleep(0.05)
        await health.enter_graceful_shutdown()
        await stopping

    return Running(server.name, "grpc", server.host, port, stop)

"""Fast tests of the runtime's parts that need no Ray cluster.

Everything here is real: the aiohttp and grpc.aio servers listen on 127.0.0.1 and are
called over sockets, the supervised programs are real child processes, the links copy
through real POSIX shared memory. Nothing starts or joins Ray.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import inspect
import json
import os
import signal
import socket
import sys
import time
import types
import typing
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pydantic
import pytest
from aiohttp import web
from apps import Echo  # tests/apps.py
from conftest import self_signed
from grpc_health.v1 import health_pb2, health_pb2_grpc

import oobspec
from oobspec.contract import (Descriptor, LinkRole, Ref, ReplicaConfig, ReplicaInfo, ServerConfig, WiredTarget,
                              host_port, segment_name, split_name)
from oobspec.errors import ClusterError, OobError
from oobspec.imports import import_object
from oobspec.models import Buffer, GrpcServer, HttpServer
from oobspec.plan import (Action, ActionKind, LinkReason, LinkRow, Plan, Reason, ServerRow, Step, StepKind, StopFirst,
                          Strategy, config_hash)
from oobspec.report import endpoints_text, plan_text, size, status_text
from oobspec.replica import supervised as supervised_module
from oobspec.control import cluster, state
from oobspec.replica.actor import CommandActor, OobMixin, Supervised, make_actor_class, make_command_class
from oobspec.control.ray_cluster import _cause
from oobspec.control.replicas import Builder
from oobspec.replica.context import env_key as _env_key
from oobspec.replica.context import Context, current, set_current
from oobspec.replica.buffers import Allocation
from oobspec.replica.links import Links
from oobspec.replica.grpc_server import start_grpc
from oobspec.replica.http_server import start_http
from oobspec.replica.servers import Signature, dumps, free_port, token_from_env, wait_connectable
from oobspec.control.state import ActorRecord
from oobspec.transports import TransportError, Topology, choose, get_transport, object_store, shm
from oobspec.transports.auto import is_gpu
from oobspec.transports.base import import_cupy

pytestmark = pytest.mark.timeout(60)

PY = [sys.executable, "-S", "-c"]  # -S: no site import, the children start faster
TOKEN_ENV = "OOBSPEC_UNIT_TOKEN"


class Point(pydantic.BaseModel):
    x: int
    y: int = 0


class Svc(Echo):
    """tests/apps.py's Echo (str, dict, bytes, raising and sync methods) plus the other shapes a
    user's method has: float and bool conversions, **kwargs, non-JSON results, its own Response."""

    def __init__(self, greeting: str = "hi"):
        super().__init__(greeting)
        self.env_at_init = {k: v for k, v in os.environ.items() if k.startswith("OOB_")}

    def scale(self, x: float, twice: bool = False) -> float:
        return x * (2 if twice else 1)

    async def echo(self, **kwargs) -> dict:
        return kwargs

    async def numbers(self):
        return {"array": np.arange(3), "pair": (1, 2), "point": Point(x=1)}

    async def made(self) -> web.Response:
        return web.Response(status=201, text="made")

    async def nap(self, seconds: float = 1.0) -> str:
        await asyncio.sleep(seconds)
        return "rested"

    async def give_up(self) -> str:
        raise TimeoutError("the upstream did not answer")


ROUTES = [("GET", "/hello/{name}", "hello"), ("POST", "/add", "add"), ("GET", "/scale", "scale"),
          ("GET", "/blob", "blob"), ("GET", "/boom", "boom"), ("GET", "/count", "sync_count"),
          ("POST", "/echo/{first}", "echo"), ("GET", "/numbers", "numbers"), ("POST", "/made", "made"),
          ("GET", "/nap", "nap"), ("GET", "/give-up", "give_up")]


# --- helpers --------------------------------------------------------------------------------


def http_entry(**fields) -> ServerConfig:
    routes = [{"method": m, "path": p, "call": c} for m, p, c in ROUTES]
    return ServerConfig.of(HttpServer(name="http", routes=routes, **fields))


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: dict

    def json(self):
        return json.loads(self.body)


def call_http(requests: list[tuple], instance=None, **fields) -> list[Reply]:
    """Start the real HTTP app for `instance`, send each (method, path, kwargs), return the replies."""
    async def go():
        running = await start_http(instance or Svc(), http_entry(**fields))
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{running.port}") as session:
                out = []
                for method, path, kwargs in requests:
                    async with session.request(method, path, **kwargs) as r:
                        out.append(Reply(r.status, r.content_type, await r.read(), dict(r.headers)))
                return out
        finally:
            await running.stop()
    return asyncio.run(go())


@asynccontextmanager
async def grpc_channel(instance, model: GrpcServer, importer=import_object):
    running = await start_grpc(instance, ServerConfig.of(model), importer)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield channel
    finally:
        await running.stop()


async def grpc_code(call, payload: bytes, **kwargs) -> tuple:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(payload, timeout=5, **kwargs)
    return err.value.code(), err.value.details()


async def serving_health(channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


def until(condition):
    """Poll (no wall-time assertion: the test timeout is the only limit) until condition() holds."""
    async def wait():
        while not condition():
            await asyncio.sleep(0.01)
    return wait()


@pytest.fixture
def sandbox():
    """A replica's start-up writes os.environ, sys.path and the current context: undo all three."""
    env, path = dict(os.environ), list(sys.path)
    yield
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)
    sys.path[:] = path
    set_current(None)


@pytest.fixture
def deployment():
    """A unique deployment name; every shm segment it left behind is removed (and reported)."""
    name = f"u{uuid.uuid4().hex[:12]}"
    yield name
    leaked = shm.cleanup(f"oob-{name}-")
    assert not leaked, f"shared memory left behind: {leaked}"


@pytest.fixture
def load_spec(tmp_path):
    def write(doc: dict) -> oobspec.Spec:
        path = tmp_path / "spec.yaml"
        path.write_text(json.dumps(doc))  # JSON is YAML
        return oobspec.load(path)
    return write


def in_shm(name: str) -> bool:
    return os.path.exists(shm.path_of(name))


# --- servers.py: signatures, encoding, tokens -------------------------------------------------


def typed_names(sig: Signature) -> list[str]:
    return [name for name, _ in sig.typed.adapters] if sig.typed is not None else []


def test_signature_of_reads_required_allowed_typed_parameters_and_asyncness():
    add, scale, echo = Signature.of(Svc().add), Signature.of(Svc().scale), Signature.of(Svc().echo)
    assert (add.required, add.allowed, typed_names(add), add.is_async) == ({"a"}, {"a", "b"}, ["a", "b"], True)
    assert (scale.required, scale.allowed, scale.is_async) == ({"x"}, {"x", "twice"}, False)
    assert scale.hints == {"x": float, "twice": bool}  # string annotations are resolved
    assert (echo.required, echo.allowed, echo.typed) == (frozenset(), None, None)  # **kwargs: anything goes

    def keyword_only(*, k: int, unknown: NoSuchType = None):  # noqa: F821 - an annotation that does not resolve
        pass
    fallback = Signature.of(keyword_only)
    assert (fallback.required, fallback.allowed) == ({"k"}, {"k", "unknown"})
    assert typed_names(fallback) == ["k"]  # one unresolved annotation costs only its own parameter


def test_optional_numbers_and_booleans_are_converted_too():
    def price(qty: int | None = None, rate: typing.Optional[float] = None, cheap: bool | None = None):
        pass
    kwargs = {"qty": "3", "rate": "2.5", "cheap": "yes"}
    assert Signature.of(price).typed.convert(kwargs) is None
    assert kwargs == {"qty": 3, "rate": 2.5, "cheap": True}


def test_signature_problem_names_missing_then_unexpected_arguments():
    add = Signature.of(Svc().add)
    assert add.problem({"a": 1}) is None
    assert add.problem({"b": 1}) == "missing argument: a"
    assert add.problem({"a": 1, "c": 2}) == "unexpected argument: c"
    assert add.problem({"a": 1, "d": 2, "c": 3}) == "unexpected arguments: c, d"
    assert Signature.of(lambda y, x: None).problem({"z": 1}) == "missing arguments: x, y"
    assert Signature.of(Svc().echo).problem({"anything": 1}) is None


@pytest.mark.parametrize("text,value", [("1", True), ("TRUE", True), ("yes", True), ("On", True),
                                        ("0", False), ("false", False), ("No", False), ("off", False)])
def test_bool_from_text(text, value):
    kwargs = {"twice": text}
    assert Signature.of(Svc().scale).typed.convert(kwargs) is None and kwargs["twice"] is value


def test_bool_from_text_refuses_anything_else():
    assert Signature.of(Svc().scale).typed.convert({"twice": "maybe"}) == [
        {"loc": ["query", "twice"], "msg": "Input should be a valid boolean, unable to interpret input",
         "type": "bool_parsing"}]


def test_dumps_is_compact_json_of_numpy_sets_tuples_and_models():
    assert dumps({"a": 1, "b": [True, None]}) == b'{"a":1,"b":[true,null]}'
    value = {"arr": np.arange(3, dtype=np.int64), "f": np.float32(1.5), "i": np.int64(7), "s": {4},
             "fs": frozenset({5}), "t": (1, "x"), "m": Point(x=2), "p": Path("/tmp/x")}
    assert json.loads(dumps(value)) == {"arr": [0, 1, 2], "f": 1.5, "i": 7, "s": [4], "fs": [5], "t": [1, "x"],
                                        "m": {"x": 2, "y": 0}, "p": "/tmp/x"}


def test_token_from_env(monkeypatch):
    auth = TOKEN_ENV
    assert token_from_env(None) is None
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    assert token_from_env(auth) == "s3cret"
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(RuntimeError, match=f"environment variable {TOKEN_ENV}, which is not set") as err:
        token_from_env(auth)
    monkeypatch.setenv(TOKEN_ENV, "")  # empty counts as unset
    with pytest.raises(RuntimeError):
        token_from_env(auth)
    assert "s3cret" not in str(err.value)


# --- servers.py: the HTTP app ---------------------------------------------------------------


def test_http_arguments_conversions_and_result_types():
    svc = Svc("yo")
    hello, added, both, scaled, blob, echo, numbers, made, count = call_http([
        ("GET", "/hello/ada", {}),
        ("POST", "/add", {"json": {"a": 2, "b": 3}}),
        ("POST", "/add?a=4", {"json": {"b": 3}}),  # query (converted by annotation) and body together
        ("GET", "/scale?x=2.5&twice=yes", {}),
        ("GET", "/blob", {}),
        ("POST", "/echo/p1?q=2", {"json": {"n": [1, 2]}}),
        ("GET", "/numbers", {}),
        ("POST", "/made", {}),
        ("GET", "/count", {}),  # a sync method
    ], svc)
    assert (hello.status, hello.content_type, hello.body) == (200, "text/plain", b"yo ada")
    assert (added.status, added.content_type, added.json()) == (200, "application/json", {"sum": 5})
    assert both.json() == {"sum": 7}
    assert scaled.json() == 5.0
    assert (blob.content_type, blob.body) == ("application/octet-stream", b"\x00\x01\x02")
    assert echo.json() == {"first": "p1", "q": "2", "n": [1, 2]}  # no annotations: strings stay strings
    assert numbers.json() == {"array": [0, 1, 2], "pair": [1, 2], "point": {"x": 1, "y": 0}}
    assert (made.status, made.body) == (201, b"made")  # a Response from the method is sent as is
    assert count.json() == 1 == svc.calls


@pytest.mark.parametrize("method,path,kwargs,status,error", [
    ("POST", "/add", {"data": "{not json"}, 400, "request body is not valid JSON"),
    ("POST", "/add", {"json": [1, 2]}, 400, "request body must be a JSON object of keyword arguments"),
    ("POST", "/add", {"json": {"b": 1}}, 400, "missing argument: a"),
    ("POST", "/add", {"json": {"a": 1, "c": 2}}, 400, "unexpected argument: c"),
    ("POST", "/add?a=x", {}, 422, "invalid arguments: query a: Input should be a valid integer, unable to parse "
                                  "string as an integer"),
    ("GET", "/scale?x=1&twice=maybe", {}, 422, "invalid arguments: query twice: Input should be a valid boolean, "
                                               "unable to interpret input"),
    ("GET", "/nowhere", {}, 404, "Not Found"),
    ("GET", "/", {}, 404, "Not Found"),
    ("GET", "/boom", {}, 500, "internal error"),
])
def test_http_errors_are_json(method, path, kwargs, status, error):
    [reply] = call_http([(method, path, kwargs)])
    assert (reply.status, reply.content_type) == (status, "application/json")
    body = reply.json()
    assert {k: v for k, v in body.items() if k not in ("id", "detail")} == {"error": error, "status": status}
    assert ("id" in body) == (status == 500)  # a 500's id leads to its traceback in the log
    assert ("detail" in body) == (status == 422)  # FastAPI's list of what did not validate


def test_http_405_names_the_allowed_methods():
    wrong_verb, wrong_on_param_path = call_http([("DELETE", "/add", {}), ("PUT", "/hello/x", {})])
    assert (wrong_verb.status, wrong_verb.headers["Allow"]) == (405, "POST")
    assert (wrong_on_param_path.status, wrong_on_param_path.headers["Allow"]) == (405, "GET,HEAD")  # HEAD: as GET
    assert wrong_verb.json() == {"error": "Method Not Allowed", "status": 405}


def test_http_413_over_max_body_and_fine_under_it():
    big, small = call_http([("POST", "/echo/x", {"json": {"data": "x" * 500}}),
                            ("POST", "/echo/x", {"json": {"data": "x" * 10}})], max_body=100)
    assert (big.status, big.json()["status"]) == (413, 413)
    assert "Too Large" in big.json()["error"]
    assert small.json() == {"first": "x", "data": "x" * 10}


def test_http_500_leaves_the_server_serving():
    svc = Svc()
    replies = call_http([("GET", path, {}) for path in ("/boom", "/hello/a", "/boom", "/hello/b")], svc)
    assert [r.status for r in replies] == [500, 200, 500, 200]
    assert replies[3].body == b"hi b" and svc.calls == 2


def test_http_bearer_token(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    none, wrong, prefix, right = call_http([
        ("GET", "/hello/x", {}),
        ("GET", "/hello/x", {"headers": {"Authorization": "Bearer wrong"}}),
        ("GET", "/hello/x", {"headers": {"Authorization": "s3cret"}}),
        ("GET", "/hello/x", {"headers": {"Authorization": "Bearer s3cret"}}),
    ], auth={"token_env": TOKEN_ENV})
    assert [none.status, wrong.status, prefix.status] == [401, 401, 401]
    assert none.json() == {"error": "missing or wrong bearer token", "status": 401}
    assert (right.status, right.body) == (200, b"hi x")


def test_http_with_auth_refuses_to_start_without_the_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(RuntimeError, match=TOKEN_ENV):
        call_http([], auth={"token_env": TOKEN_ENV})


def test_http_healthz_answers_without_auth_and_turns_503_while_draining(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")

    async def go():
        running = await start_http(Svc(), http_entry(auth={"token_env": TOKEN_ENV}))
        url = f"http://127.0.0.1:{running.port}/-/healthz"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as r:
                assert (r.status, await r.json()) == (200, {"status": "ok"})
            running.draining = True  # what drain() sets first, before the port closes
            async with session.get(url) as r:
                assert (r.status, await r.json()) == (503, {"status": "draining"})
        await running.stop()
    asyncio.run(go())


async def _hammer(port: int, path: str, stop: asyncio.Event, replies: list) -> None:
    """A client that opens a new connection for every request until told to stop."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        while not stop.is_set():
            try:
                async with session.get(f"http://127.0.0.1:{port}{path}") as r:
                    replies.append((r.status, await r.text()))
            except aiohttp.ClientError as exc:
                replies.append((0, type(exc).__name__))
            await asyncio.sleep(0.002)


def test_http_hand_over_on_one_port_loses_no_request():
    async def go():
        old = await start_http(Svc("old"), http_entry())
        port = old.port
        with pytest.raises(OSError):  # a fresh start never shares a port somebody holds
            await start_http(Svc("new"), http_entry(port=port))
        stop, replies = asyncio.Event(), []
        client = asyncio.create_task(_hammer(port, "/hello/x", stop, replies))
        await asyncio.sleep(0.3)
        new = await start_http(Svc("new"), http_entry(port=port), exclusive=False)  # the successor joins
        await asyncio.sleep(0.3)
        await old.drain(5)  # steers new connections to the successor, then closes
        await asyncio.sleep(0.3)
        stop.set()
        await client
        await new.stop()
        return replies
    replies = asyncio.run(go())
    assert len(replies) > 50 and [r for r in replies if r[0] != 200] == []
    assert replies[0] == (200, "old x") and replies[-1] == (200, "new x")


def test_a_draining_server_finishes_requests_in_flight():
    class SlowSvc(Svc):
        async def slow(self) -> str:
            await asyncio.sleep(0.5)
            return "done"

    async def go():
        running = await start_http(SlowSvc(), ServerConfig.of(HttpServer(name="http", routes=[{"path": "/slow", "call": "slow"}])))
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(session.get(f"http://127.0.0.1:{running.port}/slow"))
            await asyncio.sleep(0.1)
            await running.drain(5, hand_over=False)
            r = await request
            assert (r.status, await r.text()) == (200, "done")
        with pytest.raises(TimeoutError):
            await wait_connectable("127.0.0.1", running.port, 0.1)
    asyncio.run(go())


def test_grpc_hand_over_keeps_health_serving_on_the_port():
    async def go():
        model = ServerConfig.of(GrpcServer(name="rpc", protocol="grpc", service="demo.Svc", methods=["add"]))
        old = await start_grpc(Svc(), model, import_object)
        shared = dataclasses.replace(model, port=old.port)
        with pytest.raises(OSError):
            await start_grpc(Svc(), shared, import_object)
        new = await start_grpc(Svc(), shared, import_object, exclusive=False)
        statuses = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{old.port}") as ch:
            statuses.append(await serving_health(ch, "demo.Svc"))
            await old.drain(2)
            for _ in range(20):
                statuses.append(await serving_health(ch, "demo.Svc"))
        await new.stop()
        return statuses
    assert set(asyncio.run(go())) == {health_pb2.HealthCheckResponse.SERVING}


# --- servers.py: operations (load shedding, timeouts, slow clients, TLS) -----------------------


def nap_server(**fields) -> ServerConfig:
    return ServerConfig.of(HttpServer(name="http", routes=[{"path": "/nap", "call": "nap"}], **fields))


def test_http_max_inflight_refuses_exactly_the_overflow_at_once():
    async def go():
        running = await start_http(Svc(), nap_server())  # max_inflight: 1024, the default
        url = f"http://127.0.0.1:{running.port}/nap?seconds=2"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one():
                t = time.monotonic()
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r:
                    return r.status, r.headers.get("Retry-After"), time.monotonic() - t
            replies = await asyncio.gather(*(one() for _ in range(1100)))
        await running.stop()
        return replies
    replies = asyncio.run(go())
    refused = [r for r in replies if r[0] == 503]
    assert len(refused) == 76 and all(r[1] == "1" and r[2] < 1.5 for r in refused)  # at once, not after a wait
    assert sum(r[0] == 200 for r in replies) == 1024


def test_http_timeout_answers_504_and_keeps_serving():
    replies = call_http([("GET", "/nap?seconds=5", {}), ("GET", "/hello/x", {}), ("GET", "/give-up", {})],
                        timeout=0.3)
    assert (replies[0].status, replies[0].json()["error"]) == (504, "no answer within the server's timeout (0.3s)")
    assert (replies[1].status, replies[1].body) == (200, b"hi x")
    # The method's own TimeoutError is its error (500), not the server's timeout.
    assert (replies[2].status, replies[2].json()["error"]) == (500, "internal error")


def test_a_slow_client_is_cut_off_after_the_header_timeout_while_others_are_served():
    async def go():
        running = await start_http(Svc(), http_entry(header_timeout=1))
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"GET /hello/x HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never finished
        t = time.monotonic()
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(f"http://127.0.0.1:{running.port}/hello/y") as r:
                    assert (r.status, await r.text()) == (200, "hi y")
        closed = await asyncio.wait_for(reader.read(), 10)  # EOF once the server gives up on it
        took = time.monotonic() - t
        writer.close()
        await running.stop()
        return closed, took
    closed, took = asyncio.run(go())
    assert closed == b"" and 0.5 < took < 5


def test_https_with_the_ca_and_plain_http_refused(tmp_path):
    import ssl
    cert, key = self_signed(tmp_path)

    async def go():
        running = await start_http(Svc(), http_entry(), tls=(cert.read_bytes(), key.read_bytes()))
        trusted = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{running.port}/hello/x", ssl=trusted) as r:
                assert (r.status, await r.text()) == (200, "hi x")
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{running.port}/hello/x") as r:
                    await r.read()
            with pytest.raises(aiohttp.ClientConnectorCertificateError):  # not trusted without the CA
                async with session.get(f"https://127.0.0.1:{running.port}/hello/x") as r:
                    await r.read()
        await running.stop()
    asyncio.run(go())


def test_grpc_tls_load_shedding_and_timeout(tmp_path):
    cert, key = self_signed(tmp_path)

    async def go():
        model = GrpcServer(name="rpc", protocol="grpc", service="demo.Svc", methods=["nap", "add"], max_inflight=2,
                           timeout=1.0)
        running = await start_grpc(Svc(), ServerConfig.of(model), import_object, tls=(cert.read_bytes(), key.read_bytes()))
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{running.port}", credentials) as ch:
            add, nap = ch.unary_unary("/demo.Svc/add"), ch.unary_unary("/demo.Svc/nap")
            assert json.loads(await add(b'{"a": 1, "b": 2}', timeout=5)) == {"sum": 3}
            slow = [asyncio.ensure_future(nap(b'{"seconds": 0.5}', timeout=5)) for _ in range(2)]
            await asyncio.sleep(0.2)
            assert await grpc_code(add, b'{"a": 1}') == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                         "Concurrent RPC limit exceeded!")
            assert [json.loads(r) for r in await asyncio.gather(*slow)] == ["rested", "rested"]
            assert await grpc_code(nap, b'{"seconds": 3}') == (grpc.StatusCode.DEADLINE_EXCEEDED,
                                                               "no answer within the server's timeout (1s)")
            assert json.loads(await add(b'{"a": 2}', timeout=5)) == {"sum": 2}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await plain.unary_unary("/demo.Svc/add")(b'{"a": 1}', timeout=3)
        await running.stop()
    asyncio.run(go())


def test_metrics_are_counted_here_and_reach_ray_as_prometheus_histograms(monkeypatch):
    """The counting and the flush, with Ray's Counter replaced by a recorder (no Ray here)."""
    import ray
    import ray.util.metrics
    from oobspec.replica import metrics as metrics_module
    recorded = []

    class Recorder:
        def __init__(self, name, description="", tag_keys=()):
            self.name = name

        def inc(self, value, tags):
            recorded.append((self.name, value, tags.get("le"), tags.get("code")))

        set = inc  # a Gauge: the running total

    monkeypatch.setattr(ray.util.metrics, "Counter", Recorder)
    monkeypatch.setattr(ray.util.metrics, "Gauge", Recorder)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    m = metrics_module.Metrics("d", "web", 0)
    assert m.enabled
    async def serve():  # on a replica's loop: counted here, handed over a second later at most
        for seconds in (0.0002, 0.003, 0.003, 7.0):
            m.request("http", "/get", 200, seconds)
        m.request("http", "/get", 503, 0.0)
        assert recorded == []
        await asyncio.sleep(metrics_module.FLUSH_SECONDS + 0.2)
    asyncio.run(serve())
    ok = {(le, v) for name, v, le, code in recorded if name == "oob_request_seconds_bucket" and code == "200"}
    assert ("0.0005", 1) in ok and ("0.005", 3) in ok and ("10", 4) in ok and ("+Inf", 4) in ok
    assert ("0.001", 1) in ok and ("0.0025", 1) in ok and ("5", 3) in ok  # cumulative, as Prometheus wants
    assert ("oob_requests_total", 4, None, "200") in recorded and ("oob_requests_total", 1, None, "503") in recorded
    assert ("oob_request_seconds_count", 4, None, "200") in recorded
    recorded.clear()
    m.flush()  # nothing new: nothing sent
    assert recorded == []
    m.request("http", "/get", 200, 0.003)
    m.flush()  # the buckets show running totals
    assert ("oob_request_seconds_bucket", 4, "0.005", "200") in recorded
    assert ("oob_request_seconds_count", 5, None, "200") in recorded
    monkeypatch.setenv("OOB_METRICS", "0")
    assert not metrics_module.Metrics("d", "web", 0).enabled


# --- servers.py: gRPC -------------------------------------------------------------------------


def test_grpc_json_mode_errors_and_health():
    async def go():
        model = GrpcServer(name="rpc", protocol="grpc", service="demo.Svc",
                           methods=["add", "boom", "sync_count", "echo"])
        async with grpc_channel(Svc(), model) as ch:
            add = ch.unary_unary("/demo.Svc/add")
            assert json.loads(await add(b'{"a": 2, "b": 5}', timeout=5)) == {"sum": 7}
            assert json.loads(await ch.unary_unary("/demo.Svc/sync_count")(b"", timeout=5)) == 0  # empty: no arguments
            assert json.loads(await ch.unary_unary("/demo.Svc/echo")(b'{"k": [1]}', timeout=5)) == {"k": [1]}
            errors = [await grpc_code(add, b"{nope"), await grpc_code(add, b"[1]"), await grpc_code(add, b"{}"),
                      await grpc_code(ch.unary_unary("/demo.Svc/boom"), b"")]
            assert errors[:3] == [
                (grpc.StatusCode.INVALID_ARGUMENT, "request is not valid JSON"),
                (grpc.StatusCode.INVALID_ARGUMENT, "request must be a JSON object of keyword arguments"),
                (grpc.StatusCode.INVALID_ARGUMENT, "missing argument: a"),
            ]
            assert errors[3][0] == grpc.StatusCode.INTERNAL  # the message only in the log, beside this id
            assert errors[3][1].startswith("internal error (id ") and "kaboom" not in errors[3][1]
            assert json.loads(await add(b'{"a": 1}', timeout=5)) == {"sum": 1}  # still serving
            assert await serving_health(ch) == health_pb2.HealthCheckResponse.SERVING
            assert await serving_health(ch, "demo.Svc") == health_pb2.HealthCheckResponse.SERVING
    asyncio.run(go())


def test_grpc_bearer_token_spares_the_health_service(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")

    async def go():
        model = GrpcServer(name="rpc", protocol="grpc", service="demo.Svc", methods=["add"],
                           auth={"token_env": TOKEN_ENV})
        async with grpc_channel(Svc(), model) as ch:
            add = ch.unary_unary("/demo.Svc/add")
            denied = [await grpc_code(add, b'{"a": 1}'),
                      await grpc_code(add, b'{"a": 1}', metadata=(("authorization", "Bearer wrong"),))]
            assert denied == [(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")] * 2
            ok = await add(b'{"a": 1}', timeout=5, metadata=(("authorization", "Bearer s3cret"),))
            assert json.loads(ok) == {"sum": 1}
            assert await serving_health(ch) == health_pb2.HealthCheckResponse.SERVING
    asyncio.run(go())


def test_grpc_proto_mode_registers_the_instance_as_servicer():
    registered = []

    def add_PingServicer_to_server(servicer, server):
        async def ping(request: bytes, context) -> bytes:
            return (await servicer.hello(request.decode())).encode()
        registered.append(servicer)
        handler = grpc.method_handlers_generic_handler("demo.Ping", {"Ping": grpc.unary_unary_rpc_method_handler(ping)})
        server.add_generic_rpc_handlers((handler,))

    refs = {"unit_pb2_grpc:add_PingServicer_to_server": add_PingServicer_to_server}
    svc = Svc()

    async def go():
        model = GrpcServer(name="rpc", protocol="grpc", proto="unit_pb2_grpc:add_PingServicer_to_server")
        async with grpc_channel(svc, model, refs.__getitem__) as ch:
            assert await ch.unary_unary("/demo.Ping/Ping")(b"ada", timeout=5) == b"hi ada"
            assert await serving_health(ch) == health_pb2.HealthCheckResponse.SERVING
    asyncio.run(go())
    assert registered == [svc]


# --- servers.py: health checks and ports ------------------------------------------------------


def test_wait_connectable_returns_once_something_listens():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert asyncio.run(wait_connectable("127.0.0.1", port, 5)) is None
        assert asyncio.run(wait_connectable("0.0.0.0", port, 5)) is None  # a wildcard host is accepted


def test_wait_connectable_times_out_or_gives_up_on_a_dead_process():
    port = free_port()
    with pytest.raises(TimeoutError, match=f"nothing accepts connections on 127.0.0.1:{port}"):
        asyncio.run(wait_connectable("127.0.0.1", port, 0.1))
    with pytest.raises(RuntimeError, match=f"the process serving port {port} exited"):
        asyncio.run(wait_connectable("127.0.0.1", port, 30, alive=lambda: False))


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "localhost"])
def test_free_port_is_bindable(host):
    port = free_port(host)
    assert 0 < port < 65536
    with socket.create_server((host, port)):
        pass


def test_host_port_brackets_ipv6():
    assert [host_port(h, 80) for h in ("127.0.0.1", "::1", "example.org")] == \
        ["127.0.0.1:80", "[::1]:80", "example.org:80"]


# --- actor.py: Supervised -----------------------------------------------------------------------


def supervise(code: str, restarts: int, until_done=None, grace: float = 5.0) -> Supervised:
    """Run `code` under Supervised until it gives up (or until_done(sup) holds, then stop it)."""
    sup = Supervised(PY + [code], restarts, {})

    async def go():
        await sup.start()
        if until_done is None:
            await sup._task
        else:
            await until(lambda: until_done(sup))
            await sup.stop(grace)
    asyncio.run(go())
    return sup


def test_supervised_restarts_up_to_the_limit_then_stops():
    sup = supervise("print('hi'); import sys; sys.exit(3)", restarts=2)
    assert (sup.starts, sup.last_exit, sup.alive) == (3, 3, False)
    assert list(sup.tail) == ["hi"] * 3
    assert sup.describe() == {"argv": sup.argv, "pid": sup.proc.pid, "alive": False, "starts": 3, "last_exit": 3}


def test_supervised_without_restarts_runs_once():
    sup = supervise("print('once')", restarts=0)
    assert (sup.starts, sup.last_exit, list(sup.tail)) == (1, 0, ["once"])


def test_supervised_backoff_doubles_up_to_30s_and_restarts_forever(monkeypatch):
    delays = []
    real_sleep = asyncio.sleep

    async def record(delay, *args, **kwargs):
        delays.append(delay)
        await real_sleep(0)
    # Only the supervisor's module sees the recording sleep: the test's own polling sleeps for real.
    monkeypatch.setattr(supervised_module, "asyncio", types.SimpleNamespace(**dict(vars(asyncio), sleep=record)))
    sup = supervise("pass", restarts=-1, until_done=lambda s: s.starts >= 9)
    assert sup.starts >= 9
    assert delays[:8] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_supervised_stop_terminates_a_running_child():
    sup = supervise("print('up', flush=True); import time; time.sleep(60)", restarts=-1,
                    until_done=lambda s: "up" in s.tail)
    assert (sup.alive, sup.proc.returncode, sup.starts) == (False, -signal.SIGTERM, 1)


def test_supervised_stop_kills_a_child_that_ignores_sigterm():
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('armed', flush=True); "
            "time.sleep(60)")
    sup = supervise(code, restarts=-1, until_done=lambda s: "armed" in s.tail, grace=0.2)
    assert (sup.alive, sup.proc.returncode, sup.starts) == (False, -signal.SIGKILL, 1)


def test_supervised_missing_program_raises():
    sup = Supervised(["/nonexistent/oobspec-unit-program"], 0, {})
    with pytest.raises(FileNotFoundError):
        asyncio.run(sup.start())
    assert sup.describe() == {"argv": ["/nonexistent/oobspec-unit-program"], "pid": None, "alive": False,
                              "starts": 1, "last_exit": None}


# --- actor.py: the actor classes ----------------------------------------------------------------

OOB_METHODS = ("_oob_start", "_oob_ready", "_oob_stop", "_oob_info", "_oob_endpoints", "_oob_port",
               "_oob_read_logs", "_oob_link_receiver", "_oob_link_sender", "_oob_receive", "_oob_push")


def test_make_actor_class_is_the_users_class_with_oob_methods():
    class Local(Svc):
        """A class whose qualified name is not its name."""
    cls = make_actor_class(Local)
    assert issubclass(cls, Local) and issubclass(cls, OobMixin) and cls is not Local
    assert (cls.__name__, cls.__qualname__, cls.__module__, cls.__doc__) == \
        ("Local", Local.__qualname__, __name__, "A class whose qualified name is not its name.")
    assert cls.__qualname__.endswith("<locals>.Local")
    for name in ("hello", "add", "scale", "sync_count", "echo"):
        assert getattr(cls, name) is getattr(Svc, name)
    assert all(callable(getattr(cls, name)) for name in OOB_METHODS)
    assert inspect.iscoroutinefunction(cls.__init__)
    assert not [n for n in vars(Svc) if n.startswith("_oob")]  # the user's class itself is untouched


def test_make_command_class():
    cls = make_command_class()
    assert cls.__name__ == "CommandActor" and issubclass(cls, CommandActor) and issubclass(cls, OobMixin)
    assert all(callable(getattr(cls, name)) for name in OOB_METHODS + ("pid",))
    assert inspect.iscoroutinefunction(cls.__init__)


SERVE = ("import socket, sys; s = socket.create_server(('127.0.0.1', int(sys.argv[1]))); "
         "[s.accept()[0].close() for _ in iter(int, 1)]")


@pytest.fixture
def applier(load_spec):
    name = f"u{uuid.uuid4().hex[:12]}"
    route = {"method": "GET", "path": "/hello/{name}", "call": "hello"}
    store = {"class": "unit:Store", "replicas": 2, "restarts": 3,
             "resources": {"cpus": 0.5, "gpus": 1, "memory": "512MiB", "custom": {"accel": 1}},
             "servers": [{"name": "http", "port": free_port(), "auth": {"token_env": TOKEN_ENV}, "routes": [route]},
                         {"name": "rpc", "protocol": "grpc", "port": free_port(), "service": "demo.Store",
                          "methods": ["add"]}]}
    web = {"class": "unit:Web", "connect": {"kv-store": "store.http", "rpc": "store.rpc"}}
    db = {"command": [sys.executable, "-S", "-c", SERVE, "{port}"], "restarts": -1,
          "servers": [{"name": "main", "protocol": "tcp", "port": free_port()}]}
    return Builder(load_spec({"version": 1, "name": name, "actors": {"store": store, "web": web, "db": db}}), print)


def new_replica(cls: type, cfg, *args, **kwargs):
    """What Ray does for an actor with an async __init__: build, then await __init__ on the actor's loop."""
    obj = cls.__new__(cls)
    return obj, obj.__init__(cfg, *args, **kwargs)


def test_class_replica_starts_its_servers_and_stops_them(applier, sandbox, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    cfg = applier.config("store", 0)
    port = cfg.servers[0].port
    monkeypatch.delenv(TOKEN_ENV)  # the replica gets it from its config's secrets, as from a fresh worker

    async def go():
        replica, init = new_replica(make_actor_class(Svc), cfg, greeting="yo")
        await init
        assert replica._oob_failed is None
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as session, \
                session.get(f"{url}/hello/ada") as r:
            assert (r.status, await r.text()) == (200, "yo ada")
        rpc_port = replica._oob_port("rpc")
        assert replica._oob_port("http") == port and rpc_port
        assert replica._oob_endpoints() == {"http": url, "rpc": f"127.0.0.1:{rpc_port}"}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rpc_port}") as ch:
            assert json.loads(await ch.unary_unary("/demo.Store/add")(b'{"a": 1}', timeout=5)) == {"sum": 1}
        await replica._oob_stop()
        assert replica._oob_servers == []
        with pytest.raises(TimeoutError):
            await wait_connectable("127.0.0.1", port, 0.1)
        return replica
    replica = asyncio.run(go())
    assert replica.greeting == "yo"
    assert replica.env_at_init == {k: v for k, v in cfg.env.items() if k.startswith("OOB_")}  # set before __init__
    ctx = oobspec.context()
    assert (ctx.deployment, ctx.actor, ctx.replica, ctx.replicas) == (applier.spec.name, "store", 0, 2)


def test_class_replica_that_fails_keeps_only_the_users_frames(applier, sandbox, capsys):
    class Broken:
        async def __init__(self):
            await asyncio.sleep(0)
            raise RuntimeError("config file /etc/missing.conf not found")

    async def go():
        replica, init = new_replica(make_actor_class(Broken), applier.config("web", 0))
        await init  # a failed start does not raise: apply reads the error and the log
        assert isinstance(replica._oob_failed, RuntimeError)
        with pytest.raises(RuntimeError, match="missing.conf"):
            await replica._oob_ready(1)
    asyncio.run(go())
    err = capsys.readouterr().err
    assert "RuntimeError: config file /etc/missing.conf not found" in err
    assert "test_runtime_unit.py" in err and "/oobspec/" not in err


def test_command_replica_supervises_the_program_on_its_port(applier, sandbox):
    cfg = applier.config("db", 0)
    port = cfg.servers[0].port

    async def go():
        replica, init = new_replica(make_command_class(), cfg)
        await init
        assert replica._oob_failed is None
        process = replica._oob_process
        assert process.argv[-1] == str(port) and process.restarts == -1
        await wait_connectable("127.0.0.1", replica._oob_port("main"), 20, alive=lambda: process.alive)
        assert replica.pid() == process.proc.pid
        assert replica._oob_endpoints() == {"main": f"127.0.0.1:{port}"}
        await replica._oob_stop()
        assert (process.alive, process.starts) == (False, 1)
    asyncio.run(go())


def test_command_replica_that_cannot_start_reports_why(applier, sandbox):
    cfg = dataclasses.replace(applier.config("db", 0), command=["/nonexistent/oobspec-unit-db"], servers=[])

    async def go():
        replica, init = new_replica(make_command_class(), cfg)
        await init
        with pytest.raises(RuntimeError, match="cannot start /nonexistent/oobspec-unit-db"):
            await replica._oob_ready(1)
    asyncio.run(go())


def test_read_logs_returns_new_output_without_ray_markers(tmp_path):
    paths = [tmp_path / "out.log", tmp_path / "err.log"]
    out, err, more = b":job_id:01\nhello from the actor\n", b":actor_name:svc-0\n:task_name:x\nan error\n", b"more\n"
    saved = [os.dup(1), os.dup(2)]
    try:  # what a Ray worker does: stdout and stderr are files
        for fd, path in zip((1, 2), paths):
            f = os.open(path, os.O_WRONLY | os.O_CREAT)
            os.dup2(f, fd)
            os.close(f)
        os.write(1, out)
        os.write(2, err)
        mixin = OobMixin()
        files = asyncio.run(mixin._oob_log_files())
        first = asyncio.run(mixin._oob_read_logs([0, 0]))
        os.write(1, more)
        second = asyncio.run(mixin._oob_read_logs([offset for offset, _ in first]))
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
    assert files == [os.path.realpath(p) for p in paths]
    assert first == [(len(out), "hello from the actor\n"), (len(err), "an error\n")]
    assert second == [(len(out) + len(more), "more\n"), (len(err), "")]


# --- context.py -----------------------------------------------------------------------------------


def test_context_outside_an_actor_and_without_links(sandbox):
    set_current(None)
    with pytest.raises(OobError, match="only available inside an actor"):
        oobspec.context()
    ctx = Context("d", "a", 1, 2)
    set_current(ctx)
    assert current() is ctx and oobspec.context() is ctx
    with pytest.raises(OobError, match="this actor has no links"):
        asyncio.run(ctx.push("weights"))


# --- links.py ------------------------------------------------------------------------------------


def source_links(buffer, links: dict) -> Links:
    alloc = Allocation(Buffer(shape=list(buffer.shape), dtype=str(buffer.dtype)))
    alloc.array[...] = buffer
    ctx = Context("d", "src", 0, 1, _owners={"data": alloc})
    return Links(ctx, ReplicaConfig("d", "oob-d", "src", 0, 1, "digest", links=links), owner=None)


def test_links_connect_keeps_unchanged_targets_and_closes_the_rest(deployment):
    owners = [Allocation(Buffer(shape=[4]), 1, f"oob-{deployment}-{i}") for i in range(3)]
    links = source_links(np.arange(4, dtype=np.float32),
                         {"sync": LinkRole("sync", Ref("src", "data"), (Ref("dst", "data"),), "shm", "source",
                                           source_buffer="data")})

    def connect(*targets):
        asyncio.run(links.connect("sync", [(WiredTarget(k, "shm", Descriptor((4,), "<f4", owners[i].segment)), h)
                                           for k, i, h in targets]))
        return {t.key: t for t in links.targets["sync"]}

    first = connect(("dst-0", 0, "h1"), ("dst-1", 1, "h1"))
    assert all(t.direct and t.outbox is not None for t in first.values())
    again = connect(("dst-0", 0, "h2"), ("dst-1", 1, "h2"))
    assert all(again[k].sender is first[k].sender for k in first)  # same descriptor: same mapping
    assert [t.handle for t in again.values()] == ["h2", "h2"]  # a restarted target's new handle is taken
    old_1 = first["dst-1"].sender
    moved = connect(("dst-0", 0, "h2"), ("dst-1", 2, "h2"))  # dst-1 now has another segment
    assert moved["dst-0"].sender is first["dst-0"].sender
    assert moved["dst-1"].sender is not old_1 and old_1._shm is None
    dropped = connect(("dst-0", 0, "h2"))
    assert list(dropped) == ["dst-0"] and moved["dst-1"].sender is None
    assert asyncio.run(links.push("sync"))["targets"] == 1
    assert owners[0].array.tolist() == [0, 1, 2, 3] and owners[1].array.tolist() == [0, 0, 0, 0]
    assert owners[0].inbox.version == 1 and owners[1].inbox.version == 0
    links.close()
    assert links.targets == {} and first["dst-0"].sender is None
    for o in owners:
        o.close()
    assert not [o for o in owners if in_shm(o.segment or "")]


def linked_spec(name: str) -> dict:
    buffers = {"data": {"shape": [8, 16], "dtype": "float64"}}
    return {"version": 1, "name": name,
            "actors": {"src": {"class": "unit:Source", "buffers": buffers},
                       "dst": {"class": "unit:Sink", "replicas": 2, "buffers": buffers}},
            "links": [{"name": "sync", "from": "src.data", "to": "dst.data", "transport": "shm"}]}


class LocalHandle:
    """In place of a Ray handle: `_oob_receive.remote(...)` runs the method on the replica, in this loop."""

    def __init__(self, replica):
        self._oob_receive = types.SimpleNamespace(remote=replica._oob_receive)


async def start_replica(applier: Builder, actor: str, index: int):
    replica, init = new_replica(make_actor_class(Svc), applier.config(actor, index))
    await init
    assert replica._oob_failed is None
    return replica


def test_push_copies_the_source_into_every_target_replica(load_spec, deployment, sandbox):
    applier = Builder(load_spec(linked_spec(deployment)), print)

    async def go():
        sinks = [await start_replica(applier, "dst", i) for i in range(2)]
        source = await start_replica(applier, "src", 0)
        ctx = oobspec.context()  # the replica started last: the source
        links = [r._oob_context._links for r in sinks + [source]]
        assert [x.links["sync"].role for x in links] == ["target", "target", "source"]
        with pytest.raises(OobError, match="not connected yet"):
            await ctx.push("sync")
        descriptors = [await s._oob_link_receiver("sync", "shm") for s in sinks]
        assert descriptors[0] == await sinks[0]._oob_link_receiver("sync", "shm")  # one receiver per link
        assert descriptors[0].segment != descriptors[1].segment
        assert all(in_shm(d.segment) for d in descriptors)
        await source._oob_link_sender("sync", [(WiredTarget(f"dst-{i}", "shm", d), LocalHandle(s))
                                               for i, (s, d) in enumerate(zip(sinks, descriptors))])
        data, results = ctx.buffers["data"], []
        for seed, push in ((1, ctx.push), (2, source._oob_push)):  # from the user's code, and as `oob sync` does
            data[...] = np.random.default_rng(seed).random(data.shape)
            waiting = [asyncio.create_task(s._oob_context.updated("data")) for s in sinks]
            await asyncio.sleep(0)
            results.append(await push("sync"))
            assert await asyncio.wait_for(asyncio.gather(*waiting), 5) == [seed, seed]
            for sink in sinks:
                assert np.array_equal(sink._oob_context.buffers["data"], data)
                assert sink._oob_context.versions["data"] == seed
        assert [(r["version"], r["bytes"], r["targets"], r["transport"]) for r in results] == \
            [(1, 2 * 8 * 16 * 8, 2, "shm"), (2, 2 * 8 * 16 * 8, 2, "shm")]
        assert [x.stats() for x in links] == [{}, {}, {"sync": {"last_push": results[1], "transports": ["shm"]}}]
        with pytest.raises(OobError, match="pushes from replica 0 of src, not from dst-1"):
            await sinks[1]._oob_push("sync")
        with pytest.raises(OobError, match=r"actor src has no link 'nope' \(links: sync\)"):
            await source._oob_push("nope")
        with pytest.raises(OobError, match=r"link 'sync' is not set up on dst-0 \(nccl is wired at apply"):
            await sinks[0]._oob_receive("sync", {"transport": "nccl"}, 3)
        with pytest.raises(OobError, match="buffer 'data' of src is not a link target"):
            await ctx.updated("data")
        for replica in sinks + [source]:
            await replica._oob_stop()
        assert [x.ctx._owners for x in links] == [{}, {}, {}]
        assert not [d.segment for d in descriptors if in_shm(d.segment)]
    asyncio.run(go())


def test_cleanup_of_one_deployment_spares_a_similarly_named_one(deployment):
    owners = [shm.allocate_shared(segment_name(name, "web", 0, "data"), (2,), "uint8")
              for name in (deployment, f"{deployment}-2")]
    try:
        cluster.cleanup_shm(deployment)
        assert [in_shm(o.name) for o in owners] == [False, True]
    finally:
        shm.cleanup(f"oob-{deployment}-")


# --- transports -------------------------------------------------------------------------------------


def test_shm_copy_is_exact_between_two_mappings(deployment):
    target = shm.allocate_shared(f"oob-{deployment}-t", (3, 5), "float64")
    source = np.random.default_rng(7).standard_normal((3, 5))
    source[0, 0], source[0, 1] = np.nan, -0.0
    sender = shm.Sender(source, {"name": target.name, "shape": (3, 5), "dtype": "<f8", "slots": 1, "stride": 0})
    assert sender.send() is None
    assert target.array.tobytes() == source.tobytes()  # bit for bit, NaN and -0.0 included
    source += 1  # the target only changes on the next send
    assert target.array.tobytes() != source.tobytes()
    sender.send()
    assert target.array.tobytes() == source.tobytes()
    sender.close()
    sender.close()  # twice is fine
    assert in_shm(target.name)  # the sender never unlinks: the segment is the target's
    target.close()
    assert not in_shm(target.name)


def test_shm_refuses_mismatches_and_bad_names(deployment):
    target = shm.allocate_shared(f"oob-{deployment}-t", (4,), "int32")
    descriptor = {"name": target.name, "shape": (4,), "dtype": "<i4", "slots": 1, "stride": 0}
    with pytest.raises(TransportError, match=r"source buffer is float32\[4\] but the target buffer is int32\[4\]"):
        shm.Sender(np.zeros(4, np.float32), descriptor)
    with pytest.raises(TransportError, match="source must be a numpy array, got SimpleNamespace"):
        shm.Sender(types.SimpleNamespace(shape=(4,), dtype=np.dtype("int32")), descriptor)  # e.g. a cupy array
    with pytest.raises(TransportError, match="already exists"):
        shm.allocate_shared(target.name, (4,), "int32")
    with pytest.raises(TransportError, match="must start with 'oob-'"):
        shm.allocate_shared(f"x-{deployment}", (4,), "int32")
    target.close()
    with pytest.raises(TransportError, match="does not exist"):
        shm.Sender(np.zeros(4, np.int32), descriptor)


def test_a_buffer_no_link_writes_into_is_a_private_zeroed_array():
    buf = Allocation(Buffer(shape=[2, 3], dtype="uint8"))
    assert isinstance(buf.array, np.ndarray) and buf.array.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert (buf.segment, buf.inbox, buf.slots) == (None, None, 1)
    buf.close()


def test_gpu_buffers_without_cupy_say_what_to_install():
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("cupy is installed")
    for attempt in (import_cupy, lambda: Allocation(Buffer(shape=[2], device="gpu"))):
        with pytest.raises(TransportError, match="GPU transports need cupy"):
            attempt()


def test_object_store_ends_without_ray():
    target = np.zeros((2, 3), np.float32)
    receiver = object_store.Receiver(target)
    assert receiver.array is target
    assert receiver.descriptor() == {"shape": (2, 3), "dtype": "<f4"}
    with pytest.raises(TransportError, match="object_store"):
        object_store.Sender(np.zeros((3, 2), np.float32), receiver.descriptor())
    sender = object_store.Sender(np.ones((2, 3), np.float32), receiver.descriptor())
    sender.close()
    receiver.close()
    assert receiver.array is None


def test_auto_transport_and_devices():
    here, there = Topology("node-a", "GPU-0"), Topology("node-b", "GPU-1")
    assert [choose(d, here, t) for d in ("cpu", "cuda") for t in (here, there)] == \
        ["shm", "object_store", "cuda_ipc", "nccl"]
    assert (is_gpu("cpu"), is_gpu("gpu"), is_gpu("cuda")) == (False, True, True)
    with pytest.raises(TransportError, match="unknown device 'tpu'"):
        is_gpu("tpu")
    with pytest.raises(TransportError, match="unknown transport 'rdma'"):
        get_transport("rdma")


# --- replicas.py: what each replica is given ----------------------------------------------------------


def test_replica_config_wiring_ports_and_secrets(applier, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    name = applier.spec.name
    http_port, rpc_port = (s.port for s in applier.spec.actors["store"].servers)
    urls = [f"http://127.0.0.1:{http_port + i}" for i in range(2)]
    applier.endpoints["store"] = {"http": urls, "rpc": ["127.0.0.1:6000", "127.0.0.1:6001"]}

    store = [applier.config("store", i) for i in range(2)]
    assert [[s.port for s in cfg.servers] for cfg in store] == [[http_port, rpc_port], [http_port + 1, rpc_port + 1]]
    assert store[1].servers[0].token_env == TOKEN_ENV
    assert (store[1].deployment, store[1].namespace, store[1].actor, store[1].replica, store[1].replicas,
            store[1].config_hash, store[1].restarts, store[1].command, store[1].name) == \
        (name, f"oob-{name}", "store", 1, 2, config_hash(applier.spec, "store"), 3, None, "store-1")
    assert store[1].secrets == {TOKEN_ENV: "s3cret"}
    assert "s3cret" not in repr(dataclasses.replace(store[1], secrets={}))
    assert {k: v for k, v in store[1].env.items() if k.startswith("OOB_")} == \
        {"OOB_REPLICA": "1", "OOB_REPLICAS": "2", "OOB_DEPLOYMENT": name}

    web = applier.config("web", 0)
    assert web.endpoints == {"kv-store": urls, "rpc": ["127.0.0.1:6000", "127.0.0.1:6001"]}
    assert {k: v for k, v in web.env.items() if k.startswith("OOB_")} == {
        "OOB_REPLICA": "0", "OOB_REPLICAS": "1", "OOB_DEPLOYMENT": name,
        "OOB_KV_STORE_URL": urls[0], "OOB_KV_STORE_URLS": ",".join(urls),
        "OOB_RPC_URL": "127.0.0.1:6000", "OOB_RPC_URLS": "127.0.0.1:6000,127.0.0.1:6001"}
    assert (web.secrets, web.servers, web.buffers, web.links) == ({}, [], {}, {})

    monkeypatch.delenv(TOKEN_ENV)
    assert applier.config("store", 0).secrets == {}
    db = applier.config("db", 0)
    assert db.command[-1] == "{port}" and db.restarts == -1


def test_a_stand_in_shares_its_replicas_ports_and_takes_no_part_in_links(load_spec, deployment):
    builder = Builder(load_spec(linked_spec(deployment)), print)
    target = builder.config("dst", 1)
    assert (target.link_targets, set(target.links), target.surge) == ({"data"}, {"sync"}, False)
    stand_in = builder.config("dst", 1, shared_ports=frozenset({8001}), surge=True)
    assert (stand_in.name, stand_in.link_targets, stand_in.links, stand_in.shared_ports) == \
        ("_oob-surge-dst-1", frozenset(), {}, {8001})
    assert builder.options("dst", 1, surge=True)["name"] == "_oob-surge-dst-1"
    assert builder.options("dst", 1, surge=True)["max_restarts"] == 0  # a stand-in that dies is not restarted


def test_replica_config_of_a_peer_not_yet_running_has_empty_urls(applier):
    web = applier.config("web", 0)
    assert web.endpoints == {"kv-store": [], "rpc": []}
    assert (web.env["OOB_KV_STORE_URL"], web.env["OOB_KV_STORE_URLS"]) == ("", "")


def test_options_carry_names_restarts_and_resources(applier):
    name = applier.spec.name
    store = applier.options("store", 1)
    assert {k: store[k] for k in ("name", "namespace", "max_restarts", "num_cpus", "num_gpus", "memory", "resources")} \
        == {"name": "store-1", "namespace": f"oob-{name}", "max_restarts": 3, "num_cpus": 0.5, "num_gpus": 1,
            "memory": 512 * 1024**2, "resources": {"accel": 1.0}}
    assert "scheduling_strategy" not in store
    web = applier.options("web", 0)
    assert (web["name"], web["max_restarts"]) == ("web-0", 0)
    assert not {"num_cpus", "num_gpus", "memory", "resources"} & set(web)  # Ray's defaults
    assert applier.options("db", 0)["max_restarts"] == -1


def test_resources_text_names_what_a_replica_waits_for(applier):
    assert [applier.resources_text(a) for a in ("store", "web")] == ["0.5 CPU, 1 GPU, 512MiB memory, 1 accel",
                                                                     "a worker slot"]


def test_bundles_one_per_replica(applier):
    assert applier.bundles() == [{"CPU": 0.5, "GPU": 1, "memory": 512 * 1024**2, "accel": 1.0}] * 2 \
        + [{"CPU": 0.01}, {"CPU": 0.01}]
    assert applier.bundle_index == {("store", 0): 0, ("store", 1): 1, ("web", 0): 2, ("db", 0): 3}


def test_env_key_and_cause():
    assert _env_key("kv-store") == "KV_STORE"

    class RayTaskError(Exception):
        cause = ValueError("bad port")
    assert _cause(RayTaskError("traceback ...")) == "ValueError: bad port"
    assert _cause(RuntimeError("Traceback:\n  frame\n\nOSError: no space\n")) == "OSError: no space"
    assert _cause(KeyError()) == "KeyError"


# --- cluster.py: what needs no Ray ------------------------------------------------------------


def test_split_name_and_host_port():
    assert [split_name(n) for n in ("web-0", "kv-store-12", "_oob-surge-web-3")] == \
        [("web", 0), ("kv-store", 12), ("web", 3)]
    assert cluster._host_port("ray://10.0.0.1:10001/") == ("10.0.0.1", 10001)
    assert cluster._host_port("[::1]:6379") == ("::1", 6379)
    with pytest.raises(ClusterError, match="cannot connect to Ray at nowhere: expected HOST:PORT"):
        cluster._host_port("nowhere")


def test_probe_fails_fast_with_one_line():
    port = free_port()
    with pytest.raises(ClusterError, match=f"cannot connect to Ray at 127.0.0.1:{port}: Connection refused"):
        cluster.probe(f"127.0.0.1:{port}", timeout=5)
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, but speaks no gRPC
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(ClusterError, match="something answers there, but not Ray"):
            cluster.probe(address, timeout=0.5)


def test_find_address_order_and_the_embedded_registry(monkeypatch):
    name = f"u{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("RAY_ADDRESS", "from-env:1")
    assert cluster.find_address(name, "flag:1", "spec:1") == "flag:1"
    assert cluster.find_address(name, None, "spec:1") == "from-env:1"
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster.find_address(name, None, "spec:1") == "spec:1"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        path = cluster.register_embedded(name, address)
        try:
            assert cluster.find_address(name, None) == address  # a foreground apply's Ray, still up
            assert address in cluster.addresses(None)
            listener.close()
            assert cluster._embedded_address(name) is None  # registered, but nothing answers
        finally:
            path.unlink()


def test_actor_records_in_words():
    record = lambda state, pid=7, death=None: ActorRecord("web-0", state, pid, "", "n1", 0, 1, death)
    assert [record(s).words for s in ("ALIVE", "RESTARTING", "PENDING_CREATION", "SOMETHING_NEW")] == \
        ["alive", "restarting", "starting", "something_new"]
    assert record("PENDING_CREATION", pid=0).words == "waiting for resources"
    assert (record("DEAD", death="out of memory").words, record("DEAD").words) == ("dead: out of memory",
                                                                                  "dead: unknown cause")
    assert state._first_line("\n  The actor died. Details follow.\nmore") == "The actor died"
    from oobspec.errors import last_line
    assert (state._first_line(" \n"), last_line("a\nValueError: x\n\n"), last_line("", "unknown error")) == \
        ("unknown cause", "ValueError: x", "unknown error")
    assert (state.log_files(record("ALIVE")), state.tail(record("ALIVE"))) == ([], "")  # no worker yet: no files


def test_death_causes_in_one_line():
    from ray.core.generated.common_pb2 import ActorDeathCause, ActorDiedErrorContext
    died = lambda reason, **kw: ActorDeathCause(actor_died_error_context=ActorDiedErrorContext(  # noqa: E731
        reason=ActorDiedErrorContext.Reason.Value(reason), error_message="The actor is dead. Long text.", **kw))
    assert state.death_reason(died("WORKER_DIED")) == "its worker process died"
    assert state.death_reason(died("RAY_KILL", never_started=True)) == "killed (ray.kill)"
    assert state.death_reason(died("NODE_DIED", never_started=True)) == "its node died before it started"
    assert state.death_reason(died("UNSPECIFIED")) == "The actor is dead"
    failed = ActorDeathCause()
    failed.creation_task_failure_context.formatted_exception_string = "Traceback...\nValueError: bad config\n"
    assert state.death_reason(failed) == "__init__ raised: ValueError: bad config"
    assert state.death_reason(ActorDeathCause()) == "unknown cause"


def test_worker_log_reading_drops_ray_markers(tmp_path):
    log = tmp_path / "worker.out"
    log.write_text(":actor_name:Store\nstore starting\n:task_name:put\nput a=1\n")
    offset, text = state.read_from(str(log), 0)
    assert (offset, text) == (log.stat().st_size, "store starting\nput a=1\n")
    with log.open("a") as f:
        f.write("put b=2\n")
    assert state.read_from(str(log), offset)[1] == "put b=2\n"


def test_status_rows_declare_every_replica():
    from oobspec.control.commands import _replica_row, declared
    from oobspec.models import Spec
    spec = Spec.model_validate({"version": 1, "name": "d", "actors": {"web": {"class": "m:W", "replicas": 2},
                                                                      "db": {"class": "m:D"}}})
    assert declared(spec) == ["web-0", "web-1", "db-0"] and declared(None) == []
    record = lambda st, death=None: ActorRecord("web-0", st, 7, "w", "n", 2, 1, death)  # noqa: E731
    info = ReplicaInfo("web", 0, "c", "", pid=7, node_id="n", endpoints={"http": "http://127.0.0.1:1"})
    rows = [_replica_row("web-0", record("ALIVE"), info), _replica_row("web-1", None, None),
            _replica_row("db-0", record("DEAD", "its worker process died"), None),
            _replica_row("web-0", record("ALIVE"), None),
            _replica_row("web-0", record("ALIVE"), dataclasses.replace(info, error="RuntimeError: x")),
            _replica_row("web-0", record("ALIVE"), dataclasses.replace(info, process={"alive": False, "last_exit": 3})),
            _replica_row("web-0", record("ALIVE"), dataclasses.replace(info, draining=True))]
    assert [(r["state"], r["healthy"]) for r in rows] == [
        ("alive", True), ("missing", False), ("dead: its worker process died", False), ("not answering", False),
        ("failed: RuntimeError: x", False), ("process exited (3)", False), ("draining", False)]
    assert (rows[0]["restarts"], rows[1]["restarts"], rows[0]["endpoints"]) == (2, 0, info.endpoints)


def test_ship_by_value_picks_the_users_own_modules_only(tmp_path, monkeypatch):
    from oobspec.imports import local_modules
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "mod.py").write_text("class C:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("userpkg.mod")
    try:
        found = local_modules()
        assert "userpkg" in found
        assert not {"oobspec", "numpy", "json", "pytest", "aiohttp"} & set(found)
    finally:
        for name in ("userpkg.mod", "userpkg"):
            sys.modules.pop(name, None)


def test_actor_class_unpickles_with_real_signatures_where_the_module_cannot_import(tmp_path, monkeypatch):
    """The cause of "too many positional arguments" from other processes: Ray pickled the class
    by reference, so a process without the module got a stand-in class with (*args, **kwargs)."""
    import subprocess
    from ray import cloudpickle
    from oobspec.imports import ship_by_value
    (tmp_path / "kvmod.py").write_text("class Store:\n    def put(self, key, value=1.0, *, scale=1.0):\n"
                                       "        return value * scale\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    user_cls = importlib.import_module("kvmod").Store
    try:
        actor_cls = make_actor_class(user_cls)
        assert "kvmod" in ship_by_value(actor_cls)
        blob = tmp_path / "class.pkl"
        blob.write_bytes(cloudpickle.dumps(actor_cls))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules.pop("kvmod"))
    code = ("import inspect, pickle, sys; cls = pickle.load(open(sys.argv[1], 'rb'));"
            "print(inspect.signature(cls.put), cls.put(None, 'k', 2.0, scale=3.0))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, str(blob)], cwd="/", env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(self,", "key,", "value=1.0,", "*,", "scale=1.0)", "6.0"]


# --- report.py ---------------------------------------------------------------------------------------


def test_size():
    assert [size(n) for n in (0, 1023, 1536, 3 * 1024**3, 2 * 1024**5)] == \
        ["0 B", "1023 B", "1.5 KiB", "3.0 GiB", "2048.0 TiB"]


def test_plan_text():
    plan = Plan("demo", "oob-demo", False,
                [Action(ActionKind.CREATE, "web", [0, 1], Reason.NEW), Action(ActionKind.KEEP, "db", [0], Reason.UNCHANGED),
                 Action(ActionKind.REPLACE, "api", [0, 1], Reason.CODE, Strategy.ROLLING),
                 Action(ActionKind.REPLACE, "db", [1], Reason.SPEC, Strategy.STOP_FIRST, StopFirst.COMMAND)],
                [["db"], ["web", "api"]],
                [Step(StepKind.STOP, "db", [1]), Step(StepKind.START, "db", [1], 0), Step(StepKind.START, "web", [0, 1], 1),
                 Step(StepKind.ROLL, "api", [0], 1), Step(StepKind.ROLL, "api", [1], 1), Step(StepKind.WIRE)],
                [ServerRow("web", 0, "http", "http", "http://127.0.0.1:8080")],
                [LinkRow("w", "db.buf", "web.buf", "cpu", "shm", LinkReason.ONE_NODE, nbytes=4096, buffering="double"),
                 LinkRow("t", "db.buf", "web.buf", "cpu", "shm", LinkReason.ONE_NODE, nbytes=4096, buffering="triple")],
                {"actors": 3, "cpus": 1.5, "gpus": 0.0, "memory_bytes": 1536 * 1024**2})
    lines = plan_text(plan).splitlines()
    assert lines[0] == ("deployment demo (namespace oob-demo) — offline: no cluster running, "
                        "showing what apply would create")
    assert lines[2:9] == ["  + create   web [0,1]  (new actor)", "  = keep     db [0]  (unchanged)",
                          "  ~ replace  api [0,1]  (code changed; rolling, no downtime)",
                          "  ~ replace  db [1]  (spec changed; stop-first: a wrapped process cannot share its port)", "",
                          "  2 to create, 3 to replace, 0 to delete", ""]
    assert "start order: [db] -> [web, api]" in lines
    assert "steps: 1. stop db[1] -> 2. start db[1] -> 3. start web[0,1] -> 4. roll api[0] -> 5. roll api[1] -> 6. wire" in lines
    assert "web    0        http    http      http://127.0.0.1:8080" in lines
    assert "w     db.buf  web.buf  cpu     4.0 KiB x2 (double)  shm        one node" in lines
    assert "t     db.buf  web.buf  cpu     4.0 KiB x3 (triple)  shm        one node" in lines
    assert lines[-1] == "total: 3 actor replicas, 1.5 CPU, 0 GPU, 1.5 GiB memory"
    quiet = Plan("demo", "oob-demo", True, [Action(ActionKind.KEEP, "db", [0], Reason.UNCHANGED)], [["db"]],
                 [Step(StepKind.UPDATE)], [], [],
                 {"actors": 1, "cpus": 0.0, "gpus": 0.0, "memory_bytes": 0})
    assert plan_text(quiet).splitlines()[4:] == ["  no changes", "", "start order: [db]", "",
                                                 "total: 1 actor replica, 0 CPU, 0 GPU, 0 B memory"]


def test_status_and_endpoints_text():
    status = {"name": "demo", "namespace": "oob-demo", "healthy": False, "replicas": [
        {"name": "web-0", "state": "alive", "restarts": 2, "pid": 42, "node_id": "abcdef0123456789",
         "endpoints": {"http": "http://127.0.0.1:8080", "rpc": "127.0.0.1:9"}},
        {"name": "web-1", "state": "missing", "restarts": 0, "pid": None, "node_id": None, "endpoints": {}}],
        "links": [{"name": "w", "from": "db.buf", "to": ["web.buf"], "transport": "shm",
                   "last_push": {"version": 3, "bytes": 4096, "gbps": 1.234}},
                  {"name": "v", "from": "a.b", "to": ["c.d", "e.f"], "transport": "-", "last_push": None}],
        "last_apply": None}
    assert status_text(status).splitlines() == [
        "deployment demo (namespace oob-demo): NOT healthy", "",
        "ACTOR  STATE    RESTARTS  PID  NODE          ENDPOINTS",
        "web-0  alive    2         42   abcdef012345  http://127.0.0.1:8080 127.0.0.1:9",
        "web-1  missing  0         -    -             -", "",
        "LINK  FROM    TO        TRANSPORT  VERSION  BYTES    GB/S",
        "w     db.buf  web.buf   shm        3        4.0 KiB  1.23",
        "v     a.b     c.d, e.f  -          -        -        -"]
    empty = {"name": "x", "namespace": "oob-x", "healthy": True, "replicas": [], "links": [], "last_apply": None}
    assert status_text(empty) == "deployment x (namespace oob-x): healthy\n\n(no actors)"
    endpoints = {"web": {"http": ["http://127.0.0.1:8080", "http://127.0.0.1:8081"]}, "db": {"main": []}}
    assert endpoints_text(endpoints) == (
        "ACTOR  SERVER  REPLICA  ENDPOINT\n"
        "web    http    0        http://127.0.0.1:8080\n"
        "web    http    1        http://127.0.0.1:8081")
    assert endpoints_text({"db": {"main": []}}) == "(no servers)"


# --- remote.py, jobs.py: what travels to a cluster that is not this machine ----------------------


def test_upload_scan_honours_excludes_and_the_cap(tmp_path):
    from oobspec.control import remote
    (tmp_path / "app.py").write_text("x = 1\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0" * 5000)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(b"\0" * 3000)
    (tmp_path / "notes.txt").write_text("n" * 100)
    up = remote.scan(tmp_path)
    assert (up.files, up.bytes, up.largest[0]) == (3, 6 + 3000 + 100, ("data/big.bin", 3000))
    with pytest.raises(OobError) as err:
        remote.check_cap(up, cap=1024)
    assert str(err.value) == (f"the spec's folder {tmp_path} is 3.0 KiB, over the 1.0 KiB upload cap "
                              "(OOB_UPLOAD_CAP_MB); largest: data/big.bin (2.9 KiB), notes.txt (100 B), app.py (6 B); "
                              "list what need not travel in .oobignore")
    (tmp_path / ".oobignore").write_text("# big data stays home\ndata/\n")
    assert remote.scan(tmp_path).files == 3  # notes.txt, app.py and .oobignore itself
    assert "data/" in remote.excludes(tmp_path)


def test_address_kinds_and_jobs_routing(monkeypatch):
    from oobspec.addresses import address_kind
    from oobspec.control.jobs import _own, jobs_address
    assert [address_kind(a) for a in ("ray://h:10001", "http://h:8265", "https://h", "h:6379", None)] == \
        ["client", "jobs", "jobs", "gcs", "gcs"]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs_address(None) is None and jobs_address("ray://h:1") is None
    assert jobs_address("http://h:8265") == "http://h:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # as `ray job submit` takes it
    assert jobs_address(None) == "http://head:8265"
    assert jobs_address("127.0.0.1:6379") is None  # the flag wins
    assert [_own(x) for x in ("Running entrypoint for job raysubmit_1: python -m x\n",
                              "2026-11-28 09:41:16,505\tINFO job_manager.py:581 -- Runtime env is setting up.\n",
                              "· ready store-0\n")] == [False, False, True]


def test_job_entrypoint_writes_the_rendered_spec_and_runs_the_command(tmp_path, monkeypatch, capsys):
    from oobspec import job_entry
    from oobspec.control import jobs
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(jobs.SPEC_ENV, "version: 1\nname: injob\nactors:\n  a: {class: 'nope:Nope'}\n")
    with pytest.raises(SystemExit) as done:
        job_entry.main(["lint", "{spec}", "--no-import"])
    assert done.value.code == 0
    assert (tmp_path / jobs.SPEC_FILE).read_text().startswith("version: 1")
    assert jobs.SPEC_ENV not in os.environ


def test_what_cannot_travel_by_value_falls_back_step_by_step(tmp_path, monkeypatch):
    """A helper module holding a lock cannot be pickled whole: the class's own module still
    travels; a class whose own module holds one travels by reference (the workers import it)."""
    from ray import cloudpickle
    from oobspec.imports import ship_by_value
    (tmp_path / "lockhelp.py").write_text("import threading\nLOCK = threading.Lock()\n\ndef f():\n    return 1\n")
    (tmp_path / "usesit.py").write_text("import lockhelp\n\nclass A:\n    def m(self):\n        return lockhelp.f()\n")
    (tmp_path / "ownlock.py").write_text("import threading\nLOCK = threading.Lock()\n\nclass B:\n"
                                         "    def m(self):\n        with LOCK:\n            return 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        a = make_actor_class(importlib.import_module("usesit").A)
        assert ship_by_value(a) == ["usesit"]
        cloudpickle.dumps(a)
        b = make_actor_class(importlib.import_module("ownlock").B)
        assert ship_by_value(b) == []
        cloudpickle.dumps(b)  # by reference
    finally:
        for name in ("usesit", "lockhelp", "ownlock"):
            module = sys.modules.pop(name, None)
            if module is not None and name in cloudpickle.list_registry_pickle_by_value():
                cloudpickle.unregister_pickle_by_value(module)


def test_converters_survive_travelling_by_value(tmp_path, monkeypatch):
    """By value, a method keeps only the globals its code uses, not those its annotations name."""
    from ray import cloudpickle
    (tmp_path / "annot.py").write_text("from __future__ import annotations\nfrom typing import Optional\n\n"
                                       "class S:\n    async def get(self, n: Optional[int] = None, flag: bool = False):\n"
                                       "        return n\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("annot")
    cloudpickle.register_pickle_by_value(module)
    try:
        copy = cloudpickle.loads(cloudpickle.dumps(module.S))
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        sys.modules.pop("annot", None)
    assert "Optional" not in copy.get.__globals__
    kwargs = {"n": "7", "flag": "on"}
    assert Signature.of(copy.get).typed.convert(kwargs) is None and kwargs == {"n": 7, "flag": True}


# --- buffers: layout, double buffering, views and tensors ---------------------------------------

PARAMS = {"w1": {"shape": [3, 5], "dtype": "bfloat16"}, "b1": {"shape": [7], "dtype": "float32"},
          "step": {"shape": [1], "dtype": "int64"}}


def test_layout_parts_are_aligned_views_of_one_allocation(deployment):
    buf = Buffer(layout=PARAMS)
    assert {n: o for n, (o, _) in buf.parts().items()} == {"w1": 0, "b1": 256, "step": 512}
    assert buf.nbytes == 520 and buf.storage() == ((520,), "uint8")
    alloc = Allocation(buf, 2, f"oob-{deployment}-params")  # a double-buffered link target
    ctx = Context("d", "dst", 0, 1, _owners={"params": alloc, "plain": Allocation(Buffer(shape=[4]))})
    views = ctx.views("params")
    assert {n: (v.dtype.name, v.shape) for n, v in views.items()} == \
        {"w1": ("uint16", (3, 5)), "b1": ("float32", (7,)), "step": ("int64", (1,))}  # bfloat16 bits: uint16
    views["b1"][:] = 2.5
    assert ctx.buffers["params"][256:260].view(np.float32)[0] == 2.5  # one allocation, no copy
    assert ctx.versions == {"params": 0}
    alloc.inbox.publish(1, alloc.inbox.begin())  # as a push does: into the free slot, which becomes current
    assert ctx.versions["params"] == 1 and ctx.views("params")["b1"].tolist() == [0.0] * 7
    assert alloc.current == 1 and ctx.buffers["params"] is alloc.slot(1)
    with pytest.raises(OobError, match="buffer 'plain' has no layout"):
        ctx.views("plain")
    odd = Allocation(Buffer(layout={"a": {"shape": [3]}, "b": {"shape": [1], "dtype": "uint8"}}), 2,
                     f"oob-{deployment}-odd")  # 257 bytes: slot 1 starts at 512, so its parts stay aligned
    assert odd.stride == 512 and [odd.views(i)["a"].ctypes.data % 256 for i in (0, 1)] == [0, 0]
    sender = shm.Sender(np.full(257, 7, np.uint8), {"name": odd.segment, "shape": (257,), "dtype": "|u1",
                                                    "slots": 2, "stride": odd.stride})
    sender.send(1)
    assert odd.views(1)["b"].tolist() == [7] and odd.views(0)["b"].tolist() == [0]
    sender.close()
    odd.close()
    with pytest.raises(OobError, match=r"actor dst has no buffer 'nope' \(buffers: params, plain\)"):
        ctx.views("nope")
    with pytest.raises(pydantic.ValidationError, match="exactly one of 'shape' or 'layout'"):
        Buffer(shape=[2], layout=PARAMS)
    with pytest.raises(pydantic.ValidationError, match="'dtype' goes on each part"):
        Buffer(dtype="float16", layout=PARAMS)
    alloc.close()


def test_torch_tensors_are_views_of_the_buffer_bfloat16_included(deployment):
    torch = pytest.importorskip("torch")
    alloc = Allocation(Buffer(layout=PARAMS), 1, f"oob-{deployment}-params")
    plain = Allocation(Buffer(shape=[2, 3], dtype="bfloat16"))
    ctx = Context("d", "dst", 0, 1, _owners={"params": alloc, "plain": plain})
    tensors = ctx.tensors("params")
    assert {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()} == \
        {"w1": (torch.bfloat16, (3, 5)), "b1": (torch.float32, (7,)), "step": (torch.int64, (1,))}
    tensors["w1"].fill_(1.5)
    assert (ctx.views("params")["w1"] == 0x3FC0).all()  # the bits of bfloat16 1.5, written through torch
    assert tensors["b1"].data_ptr() == ctx.views("params")["b1"].ctypes.data
    whole = ctx.tensor("params")
    assert whole.dtype == torch.uint8 and whole.numel() == 520 and whole.data_ptr() == ctx.buffers["params"].ctypes.data
    assert ctx.tensor("plain").dtype == torch.bfloat16 and tuple(ctx.tensor("plain").shape) == (2, 3)
    with pytest.raises(OobError, match="has no layout: use tensor"):
        ctx.tensors("plain")
    alloc.close()

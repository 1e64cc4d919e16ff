"""Every malformed request gets a 4xx with a JSON error, and a 500 leaks nothing: it names an
id that leads to the traceback in the replica's log. HTTPError and `error_status` choose the
status. Real servers on 127.0.0.1 (in-process, no Ray), real clients, raw sockets for the bytes
no client library sends."""
from __future__ import annotations

import asyncio
import json
import logging
import pickle
import re

import aiohttp
import grpc
import pydantic
import pytest

import oobspec
from oobspec import HTTPError
from oobspec.imports import import_object
from oobspec.contract import ServerConfig
from oobspec.models import GrpcServer, HttpServer
from oobspec.replica.grpc_server import start_grpc
from oobspec.replica.http_server import start_http

pytestmark = pytest.mark.timeout(30)

TOKEN_ENV = "OOBSPEC_ERRORS_TOKEN"
SECRET = "planned failure: /srv/app/users.db password=hunter2"
DEEP = b"[" * 100_000  # RecursionError in json.loads, not a ValueError


class Store:
    async def get(self, key: str = "k") -> dict:
        return {"key": key}

    async def fail(self) -> None:
        raise RuntimeError(SECRET)

    async def teapot(self) -> None:
        raise HTTPError(418, "short and stout")

    async def gone(self) -> None:
        raise HTTPError(503)  # the status's own phrase as the message

    async def missing(self, key: str = "k") -> None:
        raise KeyError(key)

    def denied(self) -> None:  # a sync method
        raise PermissionError("not yours")

    async def no_dir(self) -> None:
        raise NotADirectoryError("not a folder")  # an OSError


CALLS = ["get", "fail", "teapot", "gone", "missing", "denied", "no_dir"]


def http_model(**fields) -> ServerConfig:
    routes = [{"method": "POST", "path": f"/{c}", "call": c} for c in CALLS]
    return ServerConfig.of(HttpServer(name="http", routes=routes + [{"path": "/get", "call": "get"}], **fields))


def grpc_model(**fields) -> ServerConfig:
    return ServerConfig.of(GrpcServer(name="rpc", protocol="grpc", service="t.Store", methods=CALLS, **fields))


async def raw(port: int, data: bytes) -> tuple[int, dict, bytes]:
    """Send bytes as they are; (status, headers, body) of the answer (a 100 Continue skipped)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 10)  # every request here closes the connection
    writer.close()
    while reply.startswith(b"HTTP/1.1 100 "):
        reply = reply.split(b"\r\n\r\n", 1)[1]
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def request(method: str, path: str, *headers: bytes, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: t", b"Connection: close", *headers,
             b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def http(requests: list, instance=None, **fields) -> list[tuple[int, str, object]]:
    """Start the HTTP server; each request is raw bytes or (method, path, aiohttp kwargs);
    returns (status, content type, parsed JSON body) for each, then checks it still serves."""
    async def go():
        running = await start_http(instance or Store(), http_model(**fields))
        out = []
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{running.port}") as session:
                for item in requests:
                    if isinstance(item, bytes):
                        status, headers, body = await raw(running.port, item)
                        out.append((status, headers["content-type"], json.loads(body)))
                        continue
                    method, path, kwargs = item
                    async with session.request(method, path, **kwargs) as r:
                        out.append((r.status, r.content_type, json.loads(await r.read())))
                async with session.get("/-/healthz") as r:
                    assert (r.status, await r.json()) == (200, {"status": "ok"})  # serves on
        finally:
            await running.stop()
        return out
    return asyncio.run(go())


def logged_with_traceback(caplog, ident: str) -> logging.LogRecord:
    [record] = [r for r in caplog.records if r.name == "oobspec" and ident in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    return record


# --- HTTP -----------------------------------------------------------------------------------


def test_a_body_nested_100000_deep_is_a_400_and_the_server_serves_on():
    replies = http([("POST", "/get", {"data": DEEP, "headers": {"Content-Type": "application/json"}}),
                    ("POST", "/get", {"data": b'{"key": ' * 50_000})])
    assert replies == [(400, "application/json", {"error": "request body nests too deeply", "status": 400}),
                       (400, "application/json", {"error": "request body nests too deeply", "status": 400})]


def test_an_authorization_header_that_is_not_utf8_is_a_401(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    replies = http([request("GET", "/get", b"Authorization: Bearer \xff\xfe\xed\xa0\x80"),
                    request("GET", "/get", b"Authorization: \xc3\x28"),
                    request("GET", "/get", b"Authorization: Bearer s3cret")], auth={"token_env": TOKEN_ENV})
    assert replies == [(401, "application/json", {"error": "missing or wrong bearer token", "status": 401})] * 2 + [
        (200, "application/json", {"key": "k"})]


def test_a_raising_method_is_a_500_with_an_id_that_leads_to_the_traceback(caplog):
    caplog.set_level(logging.ERROR, logger="oobspec")
    [(status, content_type, body)] = http([("POST", "/fail", {})])
    assert (status, content_type, body.keys()) == (500, "application/json", {"error", "status", "id"})
    assert (body["error"], body["status"]) == ("internal error", 500)
    assert re.fullmatch(r"[0-9a-f]{8}", body["id"])
    assert "hunter2" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
    record = logged_with_traceback(caplog, body["id"])
    assert "fail (POST /fail)" in record.getMessage()  # the route
    assert SECRET in caplog.text and "Traceback" in caplog.text


def test_errors_detailed_sends_the_exception_too():
    [(status, _, body)] = http([("POST", "/fail", {})], errors="detailed")
    assert (status, body["error"], body["status"]) == (500, f"RuntimeError: {SECRET}", 500)
    assert re.fullmatch(r"[0-9a-f]{8}", body["id"])


def test_http_error_chooses_the_status():
    assert http([("POST", "/teapot", {}), ("POST", "/gone", {})]) == [
        (418, "application/json", {"error": "short and stout", "status": 418}),
        (503, "application/json", {"error": "Service Unavailable", "status": 503})]


def test_error_status_maps_an_exception_class_or_any_base_class_by_name():
    statuses = {"KeyError": 404, "PermissionError": 403, "OSError": 409}
    missing, denied, no_dir, fail = http([("POST", p, {}) for p in ("/missing", "/denied", "/no_dir", "/fail")],
                                         error_status=statuses)
    assert missing == (404, "application/json", {"error": "'k'", "status": 404})  # str(KeyError('k'))
    assert denied == (403, "application/json", {"error": "not yours", "status": 403})  # the class itself
    assert no_dir == (409, "application/json", {"error": "not a folder", "status": 409})  # OSError, a base
    assert (fail[0], fail[2]["error"]) == (500, "internal error")  # not named: still opaque
    [(status, _, base)] = http([("POST", "/missing", {})], error_status={"LookupError": 410})
    assert (status, base) == (410, {"error": "'k'", "status": 410})


def test_nothing_maps_key_error_unless_the_spec_says_so():
    [(status, _, body)] = http([("POST", "/missing", {})])
    assert (status, body["error"]) == (500, "internal error")


def test_what_the_parser_refuses_is_json_too():
    replies = http([
        b"GE\x00T /get HTTP/1.1\r\nHost: t\r\n\r\n",  # a malformed request line
        request("GET", "/get", b"X-Long: " + b"a" * 10_000),  # a header over 8190 bytes
        request("GET", "/" + "a" * 10_000),  # a request line too long
        request("GET", "/get", b"Bad Header: x"),  # a space in a header name
        request("POST", "/get", b"Content-Encoding: gzip", body=b"not gzip"),
        b"POST /get HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # a bad chunk size
        request("POST", "/get", b"Expect: 200-ok", body=b"{}"),
        request("OPTIONS", "*"),  # a target that is no path
    ])
    assert [(s, t) for s, t, _ in replies] == [(400, "application/json")] * 6 + [
        (417, "application/json"), (404, "application/json")]
    assert all(set(b) == {"error", "status"} and b["status"] == s for s, _, b in replies)
    assert (replies[1][2]["error"], replies[2][2]["error"]) == ("Bad Request: a header over 8190 bytes",
                                                         "Bad Request: request target over 8190 bytes")
    assert "aaaa" not in json.dumps([b for _, _, b in replies])  # the request's own bytes are not echoed


def test_expect_100_continue_still_continues():
    [(status, _, body)] = http([request("POST", "/get", b"Expect: 100-continue", body=b'{"key": "v"}')])
    assert (status, body) == (200, {"key": "v"})


# --- gRPC -----------------------------------------------------------------------------------


def grpc_calls(calls: list[tuple[str, bytes]], **fields) -> list[tuple]:
    """(code, details) of each (method, request) on the JSON-mode server; then checks it serves."""
    async def go():
        running = await start_grpc(Store(), grpc_model(**fields), import_object)
        out = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                for name, payload in calls:
                    try:
                        reply = await channel.unary_unary(f"/t.Store/{name}")(payload, timeout=10)
                        out.append((grpc.StatusCode.OK, json.loads(reply)))
                    except grpc.aio.AioRpcError as err:
                        out.append((err.code(), err.details()))
                get = channel.unary_unary("/t.Store/get")
                assert json.loads(await get(b'{"key": "x"}', timeout=10)) == {"key": "x"}  # serves on
        finally:
            await running.stop()
        return out
    return asyncio.run(go())


def test_grpc_a_deep_request_is_invalid_argument():
    assert grpc_calls([("get", DEEP)]) == [(grpc.StatusCode.INVALID_ARGUMENT, "request nests too deeply")]


def test_grpc_a_raising_method_is_internal_with_an_id_and_no_leak(caplog):
    caplog.set_level(logging.ERROR, logger="oobspec")
    [(code, details)] = grpc_calls([("fail", b"")])
    assert code == grpc.StatusCode.INTERNAL
    ident = re.fullmatch(r"internal error \(id ([0-9a-f]{8})\)", details).group(1)
    assert "/t.Store/fail" in logged_with_traceback(caplog, ident).getMessage()
    assert SECRET in caplog.text
    [(code, details)] = grpc_calls([("fail", b"")], errors="detailed")
    assert code == grpc.StatusCode.INTERNAL
    assert re.fullmatch(rf"RuntimeError: {re.escape(SECRET)} \(id [0-9a-f]{{8}}\)", details)


def test_grpc_http_error_and_error_status_map_to_codes():
    replies = grpc_calls([("teapot", b""), ("gone", b""), ("missing", b'{"key": "a"}'), ("denied", b""),
                          ("no_dir", b"")], error_status={"LookupError": 404, "PermissionError": 403, "OSError": 409})
    assert replies == [
        (grpc.StatusCode.INVALID_ARGUMENT, "short and stout"),  # 418: any other 4xx
        (grpc.StatusCode.UNAVAILABLE, "Service Unavailable"),
        (grpc.StatusCode.NOT_FOUND, "'a'"),  # KeyError, through its base LookupError
        (grpc.StatusCode.PERMISSION_DENIED, "not yours"),
        (grpc.StatusCode.ALREADY_EXISTS, "not a folder"),
    ]


# --- the spec and the exception -------------------------------------------------------------


def test_the_spec_fields_default_to_safe_and_statuses_are_400_to_599():
    assert (http_model().errors, http_model().error_status, grpc_model().errors) == ("safe", {}, "safe")
    assert http_model(error_status={"KeyError": 404}).error_status == {"KeyError": 404}
    for wrong in ({"KeyError": 200}, {"KeyError": 600}, {"not a class": 404}, {"KeyError": "404"}):
        with pytest.raises(pydantic.ValidationError):
            http_model(error_status=wrong)
    with pytest.raises(pydantic.ValidationError):
        grpc_model(errors="verbose")


def test_spec_errors_point_at_the_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("version: 1\nname: t\nactors:\n  a:\n    class: os:PathLike\n    servers:\n"
                    "      - name: http\n        errors: verbose\n        error_status: {KeyError: 200}\n")
    with pytest.raises(oobspec.SpecError) as err:
        oobspec.load(path)
    text = str(err.value)
    assert "spec.yaml:8:17: OOB121 errors: must be 'safe' or 'detailed'" in text
    assert "spec.yaml:9:34: OOB121 KeyError: must be greater than or equal to 400" in text


def test_http_error_is_the_users_exception_not_an_oob_error():
    err = HTTPError(404, "no such item")
    assert (err.status, err.message, str(err)) == (404, "no such item", "404 no such item")
    assert not isinstance(err, oobspec.OobError)
    again = pickle.loads(pickle.dumps(err))  # a Ray error carries it across processes
    assert (type(again), again.status, again.message) == (HTTPError, 404, "no such item")
    assert HTTPError(499).message == "Error"  # no phrase of its own
    for wrong in (200, 600, True, "404"):
        with pytest.raises(ValueError, match="400-599"):
            HTTPError(wrong)

"""Fuzzing the HTTP request path: whatever the method, path, query, headers (bytes that are not
UTF-8 included) and body (bytes, odd or deep JSON), a server whose methods never raise answers
below 500, always in JSON, and still answers /-/healthz afterwards.

The server runs in-process on its own event loop in a thread (no Ray); requests go over raw
sockets, so nothing a client library would clean up is cleaned up."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oobspec.contract import ServerConfig
from oobspec.models import HttpServer
from oobspec.replica.http_server import start_http

pytestmark = pytest.mark.timeout(30)

TOKEN_ENV, TOKEN = "OOBSPEC_FUZZ_TOKEN", "fuzz-s3cret"
# ~4 s together (6000 examples ran clean in 30 s when these were written).
FUZZ = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class WellBehaved:
    """Methods that never raise, whatever they are given."""

    async def echo(self, **kwargs) -> dict:
        return {"keys": sorted(kwargs)}

    async def item(self, key: str, n: int = 0, flag: bool = False) -> dict:
        return {"key": key, "n": repr(n)[:20], "flag": repr(flag)[:20]}

    def count(self) -> int:
        return 1

    async def text(self, word: str = "") -> str:
        return "ok"


ROUTES = [("POST", "/echo", "echo"), ("GET", "/echo", "echo"), ("GET", "/items/{key}", "item"),
          ("PUT", "/items/{key}", "item"), ("GET", "/count", "count"), ("GET", "/text", "text")]


@pytest.fixture(scope="module")
def port():
    """A server for the whole module, on its own loop in a thread (hypothesis calls the test
    many times, synchronously)."""
    os.environ[TOKEN_ENV] = TOKEN
    model = HttpServer(name="http", auth={"token_env": TOKEN_ENV}, max_body=256 * 1024, header_timeout=3,
                       routes=[{"method": m, "path": p, "call": c} for m, p, c in ROUTES])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(start_http(WellBehaved(), ServerConfig.of(model)), loop).result(10)
    yield running.port
    asyncio.run_coroutine_threadsafe(running.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
    del os.environ[TOKEN_ENV]


def exchange(port: int, data: bytes) -> tuple[int, dict, bytes]:
    """Send raw bytes; the answer's (status, headers, body). Every request closes the connection.
    A request its parser refuses is answered at once and the connection closed unread: the
    rest of the request may then meet a reset, the answer that came first still counts."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    reply = b"".join(chunks)
    assert reply, "no answer"
    while reply.startswith(b"HTTP/1.1 100 "):  # Expect: 100-continue
        reply = reply.split(b"\r\n\r\n", 1)[1]
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:  # the first answer (bytes after its request may get one of their own)
        body = body[:int(headers["content-length"])]
    return int(lines[0].split()[1]), headers, body


def assert_json_below_500(port: int, method: bytes, data: bytes) -> None:
    """Below 500; every error is JSON (a success is what the method returned: JSON, or text
    from the route whose method returns a str); the server serves on."""
    status, headers, body = exchange(port, data)
    assert 200 <= status < 500, (status, body[:300])
    kind = headers.get("content-type", "").split(";")[0]
    if status >= 400:
        assert kind == "application/json", (status, headers, body[:300])
        if method != b"HEAD":
            parsed = json.loads(body)
            assert parsed["status"] == status and isinstance(parsed["error"], str)
    else:
        assert kind in ("application/json", "text/plain"), (status, headers, body[:300])
        if kind == "application/json" and method != b"HEAD":
            json.loads(body)
    status, _, body = exchange(port, b"GET /-/healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert (status, json.loads(body)) == (200, {"status": "ok"})  # the server serves on


# --- strategies -----------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4),
                           max_leaves=20)
deep_json = st.builds(lambda opener, depth, close: (opener * depth + (b"1" + b"]" * depth if close else b"")),
                      st.sampled_from([b"[", b'{"a":', b'{"key": [']), st.integers(1, 120_000), st.booleans())
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=300),
    st.builds(lambda v: json.dumps(v).encode(), json_values),  # any JSON: objects become keyword arguments
    st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.sampled_from(["key", "n", "flag", "word", "x"]),
                                                                json_values, max_size=3)),
    deep_json,
    st.builds(lambda n: b"1" * n, st.integers(4000, 6000)),  # past int()'s 4300 digits
    st.builds(lambda b: b.decode("latin-1").encode("utf-16"), st.binary(max_size=40)),
)
segment = st.one_of(st.sampled_from(["echo", "items", "count", "text", "-", "healthz", "", ".."]),
                    st.builds(lambda b: quote_from_bytes(b, safe=b"/:@!$&'()*+,;="), st.binary(max_size=12)),
                    st.text(alphabet="abc%/.~-_", max_size=10))
paths = st.builds(lambda parts: "/" + "/".join(parts), st.lists(segment, min_size=1, max_size=4))
queries = st.one_of(
    st.just(""),
    st.builds(lambda pairs: "?" + "&".join(f"{k}={v}" for k, v in pairs),
              st.lists(st.tuples(st.sampled_from(["n", "flag", "word", "key", "x", "", "%ff", "n%00"]),
                                 st.one_of(st.sampled_from(["1", "-0", "1e400", "yes", "maybe", "%ff%fe", "9" * 5000,
                                                            "%", "%zz", "\u00e9"]),
                                           st.text(alphabet="0123456789%abcdef+=&;", max_size=12))),
                       max_size=4)),
)
header_names = st.sampled_from([b"Content-Type", b"Content-Encoding", b"Expect", b"Accept", b"Cookie", b"Upgrade",
                                b"X-Anything", b"Accept-Encoding", b"Range", b"If-None-Match", b"Origin"])
header_values = st.one_of(
    st.sampled_from([b"application/json", b"application/json; charset=latin-1", b"text/plain; charset=utf-99",
                     b"gzip", b"deflate", b"br", b"identity", b"100-continue", b"200-ok", b"websocket", b""]),
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
authorizations = st.one_of(
    st.just(b"Bearer " + TOKEN.encode()), st.just(b"Bearer " + TOKEN.encode()), st.none(),
    st.binary(max_size=40).map(lambda b: b"Bearer " + b.replace(b"\r", b"").replace(b"\n", b"")),
)
methods = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"])


@settings(max_examples=500, **FUZZ)
@given(method=methods, path=paths, query=queries, headers=st.lists(st.tuples(header_names, header_values), max_size=4),
       authorization=authorizations, body=bodies)
def test_well_formed_requests_of_any_content_get_json_below_500(port, method, path, query, headers, authorization, body):
    lines = [method + b" " + (path + query).encode("utf-8", "surrogateescape") + b" HTTP/1.1", b"Host: t",
             b"Connection: close", b"Content-Length: %d" % len(body)]
    lines += [name + b": " + value for name, value in headers]
    if authorization is not None:
        lines.append(b"Authorization: " + authorization)
    assert_json_below_500(port, method, b"\r\n".join(lines) + b"\r\n\r\n" + body)


@settings(max_examples=300, **FUZZ)
@given(head=st.binary(max_size=200), garbage=st.binary(max_size=200),
       method=st.sampled_from([b"BREW", b"get", b"G\x00T", b"CONNECT", b"PRI", b"TRACE"]),
       shape=st.sampled_from(["line", "method", "header", "long-line", "long-header"]))
def test_malformed_requests_get_a_json_4xx(port, head, garbage, method, shape):
    """Bytes the parser refuses (before any handler runs) get JSON too. (Each is a
    complete request: one cut short would wait for its end, as it should.)"""
    clean = garbage.replace(b"\r", b"").replace(b"\n", b"")
    data = {
        "line": (head.replace(b"\r", b"").replace(b"\n", b"") or b"?") + b"\r\nHost: t\r\nConnection: close\r\n\r\n",
        "method": method + b" /echo" + clean.replace(b" ", b"") + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                  b"Content-Length: 2\r\n\r\n{}",
        "header": b"GET /count HTTP/1.1\r\nHost: t\r\n" + clean + b"\r\nConnection: close\r\n\r\n",
        "long-line": b"GET /" + b"a" * 9000 + clean + b" HTTP/1.1\r\nHost: t\r\n\r\n",
        "long-header": b"GET /count HTTP/1.1\r\nX-Long: " + b"b" * 9000 + clean + b"\r\n\r\n",
    }[shape]
    assert_json_below_500(port, data.split(b" ", 1)[0], data)

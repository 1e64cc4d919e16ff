"""HTTP/1.1 as oob's servers speak it, byte for byte: keep-alive, pipelining, bodies (chunked,
gzip, deflate), HEAD, early 413, the user's own Response, draining idle connections. A real
server on 127.0.0.1 (in-process, no Ray) and raw sockets."""
from __future__ import annotations

import asyncio
import gzip
import json
import zlib

import pytest
from aiohttp import web

from oobspec.contract import ServerConfig
from oobspec.models import HttpServer
from oobspec.replica.http_server import start_http

pytestmark = pytest.mark.timeout(30)


class Counter:
    def __init__(self) -> None:
        self.n = 0

    async def hit(self) -> dict:
        self.n += 1
        return {"count": self.n}

    async def echo(self, **kwargs) -> dict:
        return kwargs

    async def teapot(self) -> web.Response:
        response = web.Response(status=418, text="short", headers={"X-Brewed": "yes"})
        response.set_cookie("pot", "brown")
        return response

    async def go(self, to: str) -> web.Response:
        return web.Response(status=302, headers={"Location": to})

    async def nothing(self) -> web.Response:
        return web.Response(status=204)

    async def item(self, key: str) -> dict:
        return {"key": key}

    async def cancelled(self) -> dict:
        future = asyncio.get_running_loop().create_future()
        future.cancel()  # what a method sees when something it awaits is cancelled by another
        return await future


def server(**fields) -> ServerConfig:
    routes = [{"path": "/hit", "call": "hit"}, {"method": "POST", "path": "/echo", "call": "echo"},
              {"path": "/teapot", "call": "teapot"}, {"path": "/go", "call": "go"},
              {"path": "/nothing", "call": "nothing"}, {"path": "/items/{key}", "call": "item"},
              {"path": "/cancelled", "call": "cancelled"}]
    return ServerConfig.of(HttpServer(name="http", routes=routes, **fields))


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    """One answer off a kept-alive connection: (status, headers, body by its Content-Length)."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1")
    lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split()[1]), headers, body


def exchange(data: bytes, answers: int, **fields) -> tuple[list[tuple[int, dict, bytes]], bytes]:
    """Send `data` on one connection, read `answers` answers, then what is left until EOF."""
    async def go():
        running = await start_http(Counter(), server(**fields))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
            writer.write(data)
            got = [await read_answer(reader) for _ in range(answers)]
            rest = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return got, rest
        finally:
            await running.stop()
    return asyncio.run(go())


def get(path: str, *headers: bytes, close: bool = False) -> bytes:
    return b"\r\n".join([b"GET %s HTTP/1.1" % path.encode(), b"Host: t", *headers,
                         *([b"Connection: close"] if close else [])]) + b"\r\n\r\n"


def post(body: bytes, *headers: bytes) -> bytes:
    return b"\r\n".join([b"POST /echo HTTP/1.1", b"Host: t", b"Connection: close", *headers,
                         b"Content-Length: %d" % len(body)]) + b"\r\n\r\n" + body


def test_pipelined_requests_are_answered_in_order_on_one_connection():
    answers, rest = exchange(get("/hit") + get("/nowhere") + get("/hit", close=True), 3)
    assert [(s, json.loads(b)) for s, _, b in answers] == [
        (200, {"count": 1}), (404, {"error": "Not Found", "status": 404}), (200, {"count": 2})]
    assert "connection" not in answers[0][1] and answers[2][1]["connection"] == "close"
    assert rest == b""  # closed after the answer to the request that asked for it


def test_http_1_0_closes_unless_asked_to_keep_alive_and_ignores_expect():
    [(status, headers, body)], rest = exchange(b"GET /hit HTTP/1.0\r\n\r\n", 1)
    assert (status, headers["connection"], json.loads(body), rest) == (200, "close", {"count": 1}, b"")
    answers, _ = exchange(b"GET /hit HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue\r\n\r\n"
                          + get("/hit", close=True), 2)
    assert [(s, h.get("connection")) for s, h, _ in answers] == [(200, "keep-alive"), (200, "close")]


def test_every_answer_has_a_date_and_a_204_no_length():
    [(status, headers, _)], _ = exchange(get("/hit", close=True), 1)
    assert status == 200 and headers["date"].endswith(" GMT")
    async def go():
        running = await start_http(Counter(), server())
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(get("/nothing", close=True))
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await running.stop()
        return reply
    reply = asyncio.run(go())
    assert reply.startswith(b"HTTP/1.1 204 No Content\r\n") and b"Content-Length" not in reply


def test_a_path_param_is_decoded_once_and_the_query_wins_over_it():
    answers, _ = exchange(get("/items/%2541") + get("/items/a%2Fb") + get("/items/a?key=b")
                          + get("http://t/items/abs", close=True), 4)
    assert [json.loads(b)["key"] for _, _, b in answers] == ["%41", "a/b", "b", "abs"]


@pytest.mark.parametrize("encode,name", [(gzip.compress, b"gzip"), (zlib.compress, b"deflate")])
def test_gzip_and_deflate_bodies_are_inflated(encode, name):
    [(status, _, body)], _ = exchange(post(encode(b'{"a": 1}'), b"Content-Encoding: " + name), 1)
    assert (status, json.loads(body)) == (200, {"a": 1})


def test_a_body_that_inflates_past_max_body_is_a_413_and_an_unknown_encoding_a_400():
    bomb = gzip.compress(b'{"a": "' + b"0" * 1_000_000 + b'"}')
    [(status, _, body)], _ = exchange(post(bomb, b"Content-Encoding: gzip"), 1, max_body=100_000)
    assert (status, json.loads(body)["status"]) == (413, 413) and len(bomb) < 100_000
    [(status, _, body)], _ = exchange(post(b"{}", b"Content-Encoding: br"), 1)
    assert (status, json.loads(body)["error"]) == (400, "request body could not be read: Content-Encoding 'br' "
                                                        "is not supported (gzip, deflate)")


def test_a_chunked_body_is_read():
    data = (b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\n{\"a\"\r\n3\r\n: 2\r\n1\r\n}\r\n0\r\n\r\n")
    [(status, _, body)], _ = exchange(data, 1)
    assert (status, json.loads(body)) == (200, {"a": 2})


def test_head_answers_the_get_route_without_a_body():
    data = b"HEAD /hit HTTP/1.1\r\nHost: t\r\n\r\n" + get("/hit", close=True)
    async def go():
        running = await start_http(Counter(), server())
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(data)
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await running.stop()
        return reply
    reply = asyncio.run(go())
    head, second = reply.split(b"\r\n\r\n", 1)  # the HEAD's answer is its head alone
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 11" in head  # {"count":1}
    assert second.startswith(b"HTTP/1.1 200 OK\r\n") and second.endswith(b'{"count":2}')


def test_a_declared_body_over_max_body_is_refused_before_it_is_sent():
    data = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n"  # and no body follows
    [(status, headers, body)], rest = exchange(data, 1, max_body=1000)
    assert (status, headers["connection"], json.loads(body)["status"], rest) == (413, "close", 413, b"")


def test_connect_and_asterisk_targets_get_json_404s():
    answers, _ = exchange(b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\nCONNECT h:443 HTTP/1.1\r\nHost: t\r\n\r\n", 2)
    assert [(s, json.loads(b)) for s, _, b in answers] == [(404, {"error": "Not Found", "status": 404})] * 2


def test_the_users_own_response_keeps_its_status_headers_and_cookies_but_cannot_inject_headers():
    [(status, headers, body)], _ = exchange(get("/teapot", close=True), 1)
    assert (status, headers["x-brewed"], headers["content-type"], body) == (418, "yes", "text/plain; charset=utf-8",
                                                                            b"short")
    assert headers["set-cookie"] == "pot=brown; Path=/"
    answers, _ = exchange(get("/go?to=/x") + get("/go?to=/x%0d%0aSet-Cookie:%20evil=1", close=True), 2)
    assert [(s, h.get("location")) for s, h, _ in answers] == [(302, "/x"), (500, None)]
    assert "set-cookie" not in answers[1][1] and json.loads(answers[1][2])["error"] == "internal error"


def test_a_method_that_meets_a_cancellation_is_a_500_and_the_connection_serves_on():
    answers, _ = exchange(get("/cancelled") + get("/hit", close=True), 2)
    assert [(s, json.loads(b).get("error")) for s, _, b in answers] == [(500, "internal error"), (200, None)]


def test_a_request_with_a_body_that_asks_to_upgrade_is_refused_not_emptied():
    data = (b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
            b"Content-Length: 7\r\n\r\n{\"a\":1}")
    [(status, _, body)], _ = exchange(data, 1)
    assert (status, json.loads(body)["error"]) == (400, "Bad Request: a request with a body cannot upgrade "
                                                        "the protocol")


def test_many_small_pipelined_requests_are_not_taken_for_one_huge_head():
    """3000 requests and the start of one more in one write (~75 KB, more than a head may
    have): only the unfinished head's own bytes count against the limit."""
    async def go():
        running = await start_http(Counter(), server())
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        last = get("/hit", close=True)
        writer.write(get("/hit") * 3000 + last[:20])
        answers = [await read_answer(reader) for _ in range(3000)]
        writer.write(last[20:])
        answers.append(await read_answer(reader))
        writer.close()
        await running.stop()
        return answers
    answers = asyncio.run(go())
    assert {s for s, _, _ in answers} == {200} and json.loads(answers[-1][2]) == {"count": 3001}


def test_an_upload_over_max_body_reads_its_413_instead_of_a_reset():
    async def go():
        running = await start_http(Counter(), server(max_body=1000))
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 8000000\r\n\r\n")
        for _ in range(8):
            writer.write(b"x" * 1_000_000)
            await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await running.stop()
        return reply
    reply = asyncio.run(go())
    assert reply.startswith(b"HTTP/1.1 413 ")


def test_stopping_closes_idle_kept_alive_connections_at_once():
    async def go():
        running = await start_http(Counter(), server())
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(get("/hit"))
        first = await read_answer(reader)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await running.stop(5)
        took = loop.time() - start
        rest = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return first[0], rest, took
    status, rest, took = asyncio.run(go())
    assert (status, rest) == (200, b"") and took < 1

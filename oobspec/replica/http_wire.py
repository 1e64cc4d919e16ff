"""HTTP/1.1 on the wire: one asyncio protocol per connection, parsed by httptools (llhttp,
Node's parser, which uvicorn uses too). What it knows is the protocol, not the routes:
keep-alive and pipelining (answers in request order), bodies (Content-Length or chunked) up to
`max_body`, `Expect: 100-continue`, the header timeout, limits on the request line and
headers, back-pressure both ways, and draining. The application (http_server.py) is one
coroutine function, `Request -> Answer`.

A request the parser refuses gets a JSON 4xx in its turn, and the connection closes after it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import Awaitable, Callable

import httptools

from ..errors import status_phrase
from .servers import dumps, error_id

log = logging.getLogger("oobspec")

LINE_LIMIT = 8190  # bytes of a request target or of one header (aiohttp's and nginx's limit)
HEAD_LIMIT = 64 * 1024  # bytes of a request's line and headers together
PIPELINE = 32  # requests read ahead of their answers before the connection stops reading
LINGER = 2.0  # seconds a refused request's connection drops what the client still sends
WANTED = frozenset((b"authorization", b"expect", b"content-encoding"))  # the headers anyone reads
JSON = b"application/json"


class Request:
    """One parsed request. `headers`: only the ones in WANTED, lowercase names, raw values."""

    __slots__ = ("method", "target", "headers", "body", "keep_alive", "old", "answer")

    def __init__(self) -> None:
        self.method, self.target, self.headers = b"", b"", {}
        self.body: bytes | list[bytes] = b""
        self.keep_alive, self.old = True, False  # old: HTTP/1.0
        self.answer: Answer | None = None  # set when the request was refused before the app saw it


class Answer:
    """A response: status, body, content type and any other headers."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes, content_type: bytes = JSON, headers: tuple = ()) -> None:
        self.status, self.body, self.content_type, self.headers = status, body, content_type, headers


def error(status: int, message: str, ident: str | None = None, headers: tuple = ()) -> Answer:
    """oob's error answer: JSON `{"error": ..., "status": N}` (and the id of a 500)."""
    body = {"error": message, "status": status} if ident is None else {"error": message, "status": status, "id": ident}
    return Answer(status, dumps(body), JSON, headers)


def too_large(most: int, what: str = "bytes") -> Answer:
    return error(413, f"{status_phrase(413)}: over {most} {what}")


def _status_lines() -> dict[int, bytes]:
    return {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}


_STATUS = _status_lines()
_OK_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
_ENDINGS = {(True, False): b"Connection: close\r\n\r\n", (True, True): b"Connection: close\r\n\r\n",
            (False, False): b"\r\n", (False, True): b"Connection: keep-alive\r\n\r\n"}  # (close, HTTP/1.0)
_BODILESS = frozenset((204, 304))  # statuses whose answer has no body, nor its length
_date = [0, b""]  # (second, its Date header line)


def _date_line() -> bytes:
    now = int(time.time())
    if now != _date[0]:
        _date[:] = now, b"Date: %s\r\n" % formatdate(now, usegmt=True).encode()
    return _date[1]


def encode(answer: Answer, close: bool, head: bool, old: bool = False) -> bytes:
    """The answer's bytes. head: a HEAD request's, the body left out (its length kept); old:
    an HTTP/1.0 request's (kept alive only when it asked, and told so)."""
    body, ending = answer.body, _ENDINGS[close, old]
    if answer.status == 200 and answer.content_type is JSON and not answer.headers and not head:
        return b"".join((_OK_JSON, b"%d\r\n" % len(body), _date_line(), ending, body))  # the common case
    status = _STATUS.get(answer.status) or b"HTTP/1.1 %d %s\r\n" % (answer.status, status_phrase(answer.status).encode())
    parts = [status, b"Content-Type: ", answer.content_type, b"\r\n"]
    for name, value in answer.headers:
        parts += (name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
    if answer.status in _BODILESS:
        return b"".join((*parts, _date_line(), ending))
    parts += (b"Content-Length: %d\r\n" % len(body), _date_line(), ending)
    if not head:
        parts.append(body)
    return b"".join(parts)


class _Refused(Exception):
    """Raised in a parser callback: the request is refused with `answer` (the parser stops)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer


class Wire:
    """What the connections of one server share: the application, the limits, and the set of
    open connections that draining closes."""

    def __init__(self, app: Callable[[Request], Awaitable[Answer]], max_body: int, header_timeout: float) -> None:
        self.app, self.max_body, self.header_timeout = app, max_body, header_timeout
        self.connections: set[Connection] = set()
        self.closing = False
        self.loop = asyncio.get_running_loop()

    async def drain(self, seconds: float) -> None:
        """Idle connections close now; busy ones after their answer in flight (`Connection:
        close`); whatever is left after `seconds` is cut."""
        self.closing = True
        for connection in list(self.connections):
            connection.close_if_idle()
        deadline = self.loop.time() + seconds
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()


class Connection(asyncio.Protocol):
    """One client connection: parses what arrives, answers in order, keeps alive or closes."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[Request] = deque()
        self.request: Request | None = None  # the one being parsed
        self.head = 0  # bytes of the current request's line and headers so far
        self.raw = 0  # bytes of the chunks that came after the one where its head began
        self.begun = 0  # requests whose head began here
        self.bodied = False  # the current request declared a body
        self.size = 0  # bytes of the current request's body so far
        self.in_head = True  # between requests or within a head (not within a body)
        self.broken = False  # the parser gave up: nothing more is read
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.writable: asyncio.Future | None = None  # set while the transport's buffer is full
        self.reading = True

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.wire.connections.add(self)
        self._wait_for_head()

    def connection_lost(self, exc) -> None:
        self.wire.connections.discard(self)
        self._stop_timer()
        self.queue.clear()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        begun = self.begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:  # a callback raised (httptools wraps it)
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.answer)
            else:
                log.error("HTTP connection failed", exc_info=cause or exc)
                self._refuse(error(500, "internal error"))
        except httptools.HttpParserUpgrade:
            # An upgrade (websocket, CONNECT) is answered as a plain request, then the connection
            # closes: nothing after the head is HTTP any more.
            self.broken = True
            if self.queue:
                self.queue[-1].keep_alive = False
            elif self.task is None:  # nothing complete to answer
                self.transport.close()
        except httptools.HttpParserError as exc:
            self._refuse(error(400, f"Bad Request: {str(exc).rstrip('.')}"))
        else:
            if self.in_head and self.request is not None:
                if self.begun == begun:  # the whole chunk is this head's (it began in an earlier one)
                    self.raw += len(data)
                if self.head > HEAD_LIMIT or self.raw > HEAD_LIMIT:
                    self._refuse(error(400, f"Bad Request: request headers over {HEAD_LIMIT} bytes"))

    def pause_writing(self) -> None:
        self.writable = self.wire.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    # --- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.request = Request()
        self.head = self.raw = self.size = 0
        self.in_head, self.bodied = True, False
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        target = self.request.target + url if self.request.target else url
        if len(target) > LINE_LIMIT:
            raise _Refused(error(400, f"Bad Request: request target over {LINE_LIMIT} bytes"))
        self.request.target = target
        self.head += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(value) > LINE_LIMIT or len(name) > LINE_LIMIT:
            raise _Refused(error(400, f"Bad Request: a header over {LINE_LIMIT} bytes"))
        self.head += len(name) + len(value) + 4
        name = name.lower()
        if name in WANTED:
            self.request.headers[name] = value
        elif name == b"content-length":
            if _too_long(value, self.wire.max_body):
                raise _Refused(too_large(self.wire.max_body))
            self.bodied = self.bodied or value.strip() not in (b"", b"0")
        elif name == b"transfer-encoding":
            self.bodied = True

    def on_headers_complete(self) -> None:
        request, parser = self.request, self.parser
        request.method, request.keep_alive = parser.get_method(), parser.should_keep_alive()
        request.old = parser.get_http_version() == "1.0"
        self.in_head = False
        self._stop_timer()
        if self.bodied and parser.should_upgrade() and request.method != b"CONNECT":
            # llhttp would skip the body of a request that asks to upgrade: refuse it instead
            raise _Refused(error(400, "Bad Request: a request with a body cannot upgrade the protocol"))
        expect = request.headers.get(b"expect")
        if expect is not None and not request.old:  # (HTTP/1.0 knows no Expect: ignored)
            if expect.lower() != b"100-continue":
                raise _Refused(error(417, "Expectation Failed: only 100-continue is understood"))
            if not self.queue and self.task is None:  # (after earlier answers it would cut in before them)
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, chunk: bytes) -> None:
        request = self.request
        self.size += len(chunk)
        if self.size > self.wire.max_body:
            raise _Refused(too_large(self.wire.max_body))
        if not request.body:
            request.body = chunk
        elif type(request.body) is bytes:
            request.body = [request.body, chunk]
        else:
            request.body.append(chunk)

    def on_message_complete(self) -> None:
        request, self.request = self.request, None
        self.in_head = True
        if type(request.body) is list:
            request.body = b"".join(request.body)
        self._enqueue(request)

    # --- answering ---------------------------------------------------------------------------

    def _enqueue(self, request: Request) -> None:
        self.queue.append(request)
        if self.task is None:
            self.task = self.wire.loop.create_task(self._answer())
        elif self.reading and (len(self.queue) > PIPELINE or sum(len(r.body) for r in self.queue) > self.wire.max_body):
            self.reading = False
            self.transport.pause_reading()

    def _refuse(self, answer: Answer) -> None:
        """Answer in turn with `answer`, then close; read nothing more."""
        self.broken, self.request = True, None
        refused = Request()
        refused.answer, refused.keep_alive = answer, False
        self._enqueue(refused)

    async def _answer(self) -> None:
        queue, transport = self.queue, self.transport
        while queue:
            request = queue[0]
            answer = request.answer
            if answer is None:
                try:
                    answer = await self.wire.app(request)
                except (Exception, asyncio.CancelledError):  # the app answers its own failures: this is oob's
                    if asyncio.current_task().cancelling():
                        raise  # the server cut this connection (Wire.drain)
                    ident = error_id()
                    log.error("error id %s: answering %r failed", ident, request.target[:200], exc_info=True)
                    answer = error(500, "internal error", ident)
            if not queue or transport.is_closing():
                return  # the client went away meanwhile
            queue.popleft()
            close = not request.keep_alive or self.wire.closing or (self.broken and not queue)
            try:
                data = encode(answer, close, request.method == b"HEAD", request.old)
            except Exception:  # a header the user's Response set that HTTP cannot carry
                log.error("answering %r failed", request.target[:200], exc_info=True)
                data = encode(error(500, "internal error"), close, False)
            transport.write(data)
            if close:
                self._close()
                self.task = None  # (draining closes a lingering connection at once)
                return
            if self.writable is not None:
                await self.writable
        self.task = None
        if transport.is_closing():
            return
        if not self.reading and not self.broken:
            self.reading = True
            transport.resume_reading()
        if self.in_head:
            self._wait_for_head()

    def _close(self) -> None:
        """Close after the answer. After a refused request, what the client still sends is read
        and dropped for a while (LINGER) behind a half-close, so that it reads the answer instead
        of meeting a reset in the middle of its upload."""
        if not self.broken or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        if not self.reading:
            self.reading = True
            self.transport.resume_reading()
        self.wire.loop.call_later(LINGER, self.transport.close)

    # --- idle connections --------------------------------------------------------------------

    def _wait_for_head(self) -> None:
        """The header timeout: a connection whose next request's head is not complete within
        `header_timeout` closes (a slow client cannot hold it)."""
        self._stop_timer()
        self.timer = self.wire.loop.call_later(self.wire.header_timeout, self._timed_out)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.task is None and self.in_head:
            self.transport.close()

    def close_if_idle(self) -> None:
        """Draining: close now unless a request is under way (that one closes after its answer)."""
        if self.task is None and self.request is None:
            self.transport.close()

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.transport.abort()


def _too_long(length: bytes, most: int) -> bool:
    """A Content-Length over `most` (llhttp refuses one that is not a number)."""
    length = length.strip()
    return len(length) > 20 or (length.isdigit() and int(length) > most)

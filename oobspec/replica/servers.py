"""What the servers inside an actor share (HTTP: http_server.py, gRPC: grpc_server.py).

Everything that can be decided once (signatures, converters, the expected auth header) is
decided when the server starts, so a request costs one dict build and one method call:
no Ray call, no reflection. A method that raises costs its server no more than its answer:
a status the user chose, or a 500 whose id leads to the traceback in the replica's log.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import secrets
import socket
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic_core import to_json, to_jsonable_python

from ..errors import HTTPError
from .ports import SETTLE, free_port, steer, wait_connectable  # noqa: F401 (re-exported)
from .typed import Typed

log = logging.getLogger("oobspec")


def _unknown(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    return str(value)


def _json_default(value: Any) -> Any:
    """What json cannot encode itself. Only values of those types pay for it: a result of dicts,
    lists, numbers and strings never reaches pydantic."""
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    # pydantic models, dataclasses, dates, enums, UUIDs, Decimals, paths (numpy inside them too)
    return to_jsonable_python(value, fallback=_unknown)


_JSON_TYPES = frozenset((dict, list, int, float, bool))
_encoder = json.JSONEncoder(default=_json_default, separators=(",", ":"))  # built once, not per response
_strict = json.JSONEncoder(default=_json_default, separators=(",", ":"), allow_nan=False)


def dumps(value: Any) -> bytes:
    text = _encoder.encode(value)
    if "Infinity" in text or "NaN" in text:  # json's own constants for inf and nan are not JSON
        try:
            _strict.encode(value)  # (or the words were inside a string)
        except ValueError:
            return to_json(value, inf_nan_mode="null", fallback=_json_default)  # null, as pydantic writes them
    return text.encode()


def token_bytes(text: str) -> bytes:
    """A bearer header (or token) as the bytes compared in constant time with the request's
    raw header (gRPC metadata that is not UTF-8 reaches us with surrogates in it: they encode
    too, and compare unequal, instead of raising)."""
    return text.encode("utf-8", "surrogatepass")


def token_from_env(name: str | None) -> str | None:
    """The bearer token a server's auth asks for, read from this process's environment."""
    if name is None:
        return None
    token = os.environ.get(name)
    if not token:
        raise RuntimeError(f"auth needs the environment variable {name}, which is not set "
                           "in the actor (set it where you run `oob apply`)")
    return token


@dataclass
class Signature:
    """What a method accepts, worked out once."""

    required: frozenset
    allowed: frozenset | None  # None: takes **kwargs
    typed: Typed | None  # the parameters pydantic checks and converts (None: no such parameter)
    is_async: bool
    hints: dict[str, Any] = field(default_factory=dict)  # parameter -> its resolved annotation (if any)
    returns: Any = inspect.Parameter.empty  # the resolved return annotation

    @classmethod
    def of(cls, method) -> "Signature":
        sig = inspect.signature(method)
        required, allowed, hints, var_kw = set(), set(), {}, False
        for p in sig.parameters.values():
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "_ray_trace_ctx":
                # (Ray adds _ray_trace_ctx to the signature of every actor method it wraps.)
                allowed.add(p.name)
                if p.default is p.empty:
                    required.add(p.name)
                hint = _annotation(method, p.annotation)
                if hint is not None and hint is not p.empty:
                    hints[p.name] = hint
        returns = _annotation(method, sig.return_annotation)
        return cls(frozenset(required), None if var_kw else frozenset(allowed), Typed.of(hints),
                   inspect.iscoroutinefunction(method), hints, sig.empty if returns is None else returns)

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
    under TYPE_CHECKING) costs only that parameter its checks, not every parameter."""
    if not isinstance(annotation, str):
        return annotation
    # typing's names too: a class that travelled by value keeps only the globals its code uses,
    # not those its annotations name (`Optional` under `from __future__ import annotations`).
    names = {**vars(typing), **getattr(getattr(method, "__func__", method), "__globals__", {})}
    try:
        return eval(annotation, names)  # noqa: S307 (the user's own annotation)
    except Exception:
        return None


# --- a method that raised ---------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """What a request whose method raised answers: a status, a message and, for an error
    nobody chose (a 500), the id that leads to its traceback in the replica's log."""

    status: int
    message: str
    id: str | None = None


def error_id() -> str:
    """A short random id: the client gets it with a 500, the log has it beside the traceback."""
    return secrets.token_hex(4)


def _said(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # the user's own __str__ raised
        return type(exc).__name__


def failures(server) -> Callable[[BaseException, str], Failure]:
    """How one server answers an exception raised while it served `where` (a route, a gRPC
    method): HTTPError's status, else the spec's `error_status` (the name of the exception's
    class or of any class it derives from), else a 500 with a fresh id, logged with the route
    and the traceback. Only `errors: detailed` puts the exception's text in a 500."""
    detailed = server.errors == "detailed"
    statuses = dict(server.error_status)

    def answer(exc: BaseException, where: str) -> Failure:
        if isinstance(exc, HTTPError):
            return Failure(exc.status, exc.message)
        if statuses:
            for cls in type(exc).__mro__:
                status = statuses.get(cls.__name__)
                if status is not None:
                    return Failure(status, _said(exc))
        ident = error_id()
        log.exception("error id %s: %s raised", ident, where, exc_info=exc)
        return Failure(500, f"{type(exc).__name__}: {_said(exc)}" if detailed else "internal error", ident)

    return answer


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
        # Its node's other replicas bind the port too (`shared: true`): the group is theirs, so
        # no steering program; a closing listener's queue migrates to them (tcp_migrate_req).
        self.shared = False

    def steer(self, index: int) -> None:
        """Send new connections on this port to the `index`-th socket bound to it (0: the one
        bound first, 1: its successor). Without it, a socket that closes resets connections the
        kernel had just queued on it; with it, the queue empties before the close."""
        if self._sock is not None and not self.shared:
            steer(self._sock, index)

    async def drain(self, seconds: float, hand_over: bool = True) -> None:
        """Hand new connections over (to the successor sharing the port), turn unhealthy, stop
        accepting, finish what is in flight (`seconds` at most)."""
        if hand_over and self._sock is not None and not self.shared:  # (gRPC's sockets are gRPC core's)
            self.steer(1)
            await asyncio.sleep(SETTLE)  # what the kernel queued here before the steering is accepted
        self.draining = True  # /-/healthz: 503 from here on, for whoever still talks to this one
        await self.stop(seconds, settle=SETTLE if self.shared else 0.0)

    async def stop(self, seconds: float = 1.0, settle: float = 0.0) -> None:
        """settle: seconds between closing the listener and closing idle connections."""
        if self._stop is not None:
            stop, self._stop = self._stop, None
            await stop(seconds, settle)


"""Ports: sockets a successor can share (SO_REUSEPORT), steering a port's new connections to
one of the sockets that share it, free ports, and the tcp health check."""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

log = logging.getLogger("oobspec")

SETTLE = 0.2  # seconds a draining server keeps accepting after it steered new connections away
SO_ATTACH_REUSEPORT_CBPF = 51  # linux/asm-generic/socket.h


def steer(sock: socket.socket, index: int) -> None:
    """Attach a one-instruction classic BPF program to the socket's SO_REUSEPORT group:
    "return index". The kernel picks the group's socket by that index, and falls back to its
    hash when the index is out of range (the other socket is gone)."""
    import ctypes
    import struct
    code = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, index))  # BPF_RET | BPF_K
    program = struct.pack("HxxxxxxP", 1, ctypes.addressof(code))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, program)
    except OSError:  # not Linux, or a kernel without it: the hand-over merely loses its guarantee
        log.debug("could not steer the port's connections", exc_info=True)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nobody holds host:port right now (a fresh start could bind it)."""
    try:
        listening_socket(host, port, exclusive=True).close()
        return True
    except OSError:
        return False


def listening_socket(host: str, port: int, exclusive: bool) -> socket.socket:
    """A bound socket with SO_REUSEPORT, so a successor can bind the same port while this one
    serves. exclusive: refuse a port somebody else holds (a reuse-port socket would share it
    without a word); a hand-over shares the port its predecessor holds on purpose."""
    family, _type, _proto, _name, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                               flags=socket.AI_PASSIVE)[0]
    if exclusive and port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)  # OSError (address in use) when any socket holds it
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds "::"
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


async def wait_connectable(host: str, port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until something accepts TCP connections on host:port (the tcp 'health check')."""
    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.02
    while True:
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(target, port), 1.0)
            writer.close()
            return
        except (OSError, asyncio.TimeoutError):
            if not alive():
                raise RuntimeError(f"the process serving port {port} exited") from None
            if loop.time() > deadline:
                raise TimeoutError(f"nothing accepts connections on {target}:{port} after {timeout:.0f}s") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` (IPv4 or IPv6, a wildcard or a name) at this moment."""
    family, _type, _proto, _name, address = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM,
                                                               flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(address)
        return s.getsockname()[1]

"""What runs inside each replica: the user's class, extended with oob's own methods.

The Ray actor class is a subclass of the user's class, so the handle exposes the user's own
methods (`handle.increment.remote()`). Its `__init__` runs the user's `__init__` (sync or async),
starts the servers on the actor's event loop, then the class's `on_start()`. Ray re-runs
`__init__` on a restart, so a restarted replica brings its servers back on the same ports.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import logging
import os
import sys
import traceback
from typing import Any

from .. import ray_private
from . import launch, peers
from ..contract import ReplicaConfig, ReplicaInfo, replica_name, server_url
from .context import Context, endpoint_env, set_current
from .node import node_address, on_this_node
from .supervised import Supervised
from .hooks import LogMarks, call_hook, log_files
from .metrics import Metrics
from .grpc_server import start_grpc
from .http_server import start_http
from .servers import Running, free_port, wait_connectable

log = logging.getLogger("oobspec")
READY_TIMEOUT = 60.0
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # oobspec's own files


def _kv_key(cfg: ReplicaConfig, server: str) -> str:
    return f"{cfg.namespace}/{replica_name(cfg.actor, cfg.replica)}/{server}"


def _remembered_port(cfg: ReplicaConfig, server) -> int:
    """Port 0 resolves when first bound; a restarted replica (or its successor) asks for the
    same one again."""
    if server.port:
        return server.port
    try:
        value = ray_private.kv_get(_kv_key(cfg, server.name))
        return int(value) if value else 0
    except Exception:
        return 0


def _remember_port(cfg: ReplicaConfig, name: str, port: int) -> None:
    try:
        ray_private.kv_put(_kv_key(cfg, name), str(port).encode())
    except Exception:  # only restarts lose their port; never fail a start for it
        log.debug("could not record port", exc_info=True)


class OobMixin:
    """oob's own methods on every replica. Names start with `_oob` to stay out of the user's way."""

    async def _oob_start(self, cfg: ReplicaConfig) -> None:
        self._oob_servers: list[Running] = []
        ctx = self._oob_context
        if cfg.links or cfg.buffers:  # only then: links import numpy, a tenth of a second per replica
            from .links import Links
            ctx._links = Links(ctx, cfg, self)
            ctx._links.metrics = self._oob_metrics
        for server in cfg.servers:
            if cfg.command is not None or server.protocol == "tcp":
                continue  # the command (or the user's own code) serves it; we only health-check
            port = _remembered_port(cfg, server)
            try:
                running = await self._oob_bind(server, port, exclusive=port not in cfg.shared_ports and not server.shared)
            except OSError as exc:
                if not (port and not server.port):
                    raise RuntimeError(f"server {server.name} cannot bind {server.host}:{port}: "
                                       f"{exc.strerror or exc}") from None
                running = await self._oob_bind(server, 0, exclusive=True)  # remembered port taken: any
            if not server.port and not cfg.surge:
                _remember_port(cfg, server.name, running.port)
            self._oob_servers.append(running)

    async def _oob_bind(self, server, port: int, exclusive: bool) -> Running:
        from ..imports import import_object
        server = dataclasses.replace(server, port=port)
        tls, metrics = self._oob_cfg.tls.get(server.name), self._oob_metrics
        if server.protocol == "http":
            running = await start_http(self, server, exclusive, tls=tls, metrics=metrics)
        else:
            running = await start_grpc(self, server, import_object, exclusive, tls=tls, metrics=metrics)
        running.shared = server.shared
        return running

    async def _oob_ready(self, timeout: float = READY_TIMEOUT) -> ReplicaInfo:
        """Returns once every server of this replica accepts connections."""
        if self._oob_failed is not None:
            raise self._oob_failed
        process = getattr(self, "_oob_process", None)
        for server in self._oob_cfg.servers:
            port = self._oob_port(server.name)
            if port:
                await wait_connectable(server.host, port, timeout,
                                       alive=(lambda: process.alive) if process else (lambda: True))
        return await self._oob_info()

    def _oob_port(self, name: str) -> int | None:
        for running in self._oob_servers:
            if running.name == name:
                return running.port
        process = getattr(self, "_oob_process", None)
        if process is not None and process.ports.get(name):
            return process.ports[name]
        return self._oob_cfg.server(name).port or None

    def _oob_endpoints(self) -> dict[str, str]:
        out = {}
        for server in self._oob_cfg.servers:
            host = server.host
            if host in ("0.0.0.0", "::"):
                import ray
                host = ray.util.get_node_ip_address()
            out[server.name] = server_url(server.protocol, host, self._oob_port(server.name),
                                          server.tls)
        return out

    async def _oob_info(self) -> ReplicaInfo:
        import ray
        cfg = self._oob_cfg
        ctx = getattr(self, "_oob_context", None)
        process = getattr(self, "_oob_process", None)
        failed = self._oob_failed
        links = ctx._links if ctx else None
        return ReplicaInfo(
            actor=cfg.actor, replica=cfg.replica, config_hash=cfg.config_hash, code_hash=cfg.code_hash,
            pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id(), endpoints=self._oob_endpoints(),
            error=f"{type(failed).__name__}: {failed}" if failed else None,
            gpu_uuid=links.gpu_uuid() if links else None, gpu_peers=links.gpu_peers() if links else None,
            process=process.describe() if process else None,
            links=links.stats() if links else {}, versions=dict(ctx.versions) if ctx else {},
            draining=any(r.draining for r in getattr(self, "_oob_servers", [])),
            ports={s.name: port for s in cfg.servers if (port := self._oob_port(s.name))},
            stats=self._oob_metrics.stats(), node_address=node_address())

    async def _oob_update(self, replicas: int, endpoints: dict[str, list[str]],
                          peer_replicas: dict[str, int] | None = None) -> bool:
        """Scaling in place: this actor's replica count and its peers' endpoints, live. Calls the
        user's `on_peers_changed(replicas, endpoints)` (sync or async) when something changed."""
        async with peers.lock(self):  # never between a refresh's read and its apply
            changed = await self._oob_apply_peers(replicas, endpoints, peer_replicas)
        try:  # what a restart of this replica starts from
            await asyncio.to_thread(peers.save_counts, self._oob_cfg, replicas)
        except Exception:
            log.debug("could not record the counts", exc_info=True)
        return changed

    async def _oob_refresh(self) -> bool:
        """A peer (re)started: read the peers' records from the cluster's KV and apply what they
        say as `_oob_update` does. True when something changed."""
        cfg = self._oob_cfg
        if not cfg.connect or self._oob_failed is not None or "_oob_stopped" in vars(self):
            return False
        async with peers.lock(self):
            found = await asyncio.to_thread(peers.read_endpoints, cfg)
            ctx = self._oob_context
            return await self._oob_apply_peers(ctx.replicas, peers.merged(ctx.endpoints, found))

    async def _oob_apply_peers(self, replicas: int, endpoints: dict[str, list[str]],
                               peer_replicas: dict[str, int] | None = None) -> bool:
        if peer_replicas is not None:
            self._oob_cfg.peer_replicas.update(peer_replicas)
        ctx = self._oob_context
        if not ctx.update(replicas, endpoints):
            return False
        os.environ.update(endpoint_env(ctx.endpoints))  # for code that reads the environment again
        hook = getattr(self, "on_peers_changed", None)
        if hook is not None:
            result = hook(ctx.replicas, ctx.endpoints)
            if inspect.isawaitable(result):
                await result
        return True

    async def _oob_stop(self, drain: float = 0.0, hand_over: bool = False) -> None:
        """Graceful stop before the actor is killed. With `drain`: health turns unhealthy, the
        servers stop accepting, the class's `on_stop()` runs (once) and in-flight requests
        finish (`drain` seconds at most); with
        `hand_over`, new connections go to the successor sharing the port first."""
        for task in vars(self).pop("_oob_peer_tasks", []):  # no more announcing or re-reading
            task.cancel()
        process = getattr(self, "_oob_process", None)
        servers, self._oob_servers = getattr(self, "_oob_servers", []), []
        drained = asyncio.gather(*(r.drain(drain, hand_over) for r in servers), return_exceptions=True)
        while not all(r.draining for r in servers) and not drained.done():
            await asyncio.sleep(0.01)  # no longer accepting: on_stop runs while in-flight work finishes
        if getattr(self, "_oob_failed", True) is None and "_oob_stopped" not in vars(self):
            self._oob_stopped = True  # once, however often a stop is asked for
            await call_hook(self, "on_stop", raising=False)
        for error in await drained:
            if isinstance(error, BaseException):
                log.debug("server stop failed: %s", error)
        if process is not None:
            await process.stop()
        ctx = getattr(self, "_oob_context", None)
        if ctx is not None and ctx._links is not None:
            await ctx._links.aclose()
        self._oob_metrics.flush()  # the last requests' counts reach Ray before the process goes

    async def _oob_reclaim(self) -> None:
        """A successor that shared our ports is going away (its start failed): new connections
        come back here before it closes them."""
        for running in self._oob_servers:
            running.steer(0)

    async def _oob_log_files(self) -> list[str]:
        return log_files()

    async def _oob_log_offsets(self, since: float) -> list[int]:  # `oob logs --since`
        return self._oob_marks.offsets(since)

    async def _oob_read_logs(self, offsets: list[int]) -> list[tuple[int, str]]:
        """New output of this replica since `offsets` (one per log file): [(new offset, text)]."""
        from .logs import read_from
        sys.stdout.flush()
        sys.stderr.flush()
        return [read_from(path, offset) for path, offset in zip(await self._oob_log_files(), offsets)]

    async def _oob_link_receiver(self, link: str, transport: str, setup: dict | None = None):
        return await self._oob_context._links.receiver(link, transport, setup)

    async def _oob_link_sender(self, link: str, targets: list) -> None:
        await self._oob_context._links.connect(link, targets)

    async def _oob_receive(self, link: str, message: Any, version: int) -> None:
        await self._oob_context._links.receive(link, message, version)

    async def _oob_link_version(self, link: str) -> int:
        return self._oob_context._links.target_version(link)

    async def _oob_nccl_id(self, link: str) -> bytes:
        from ..transports import get_transport
        return get_transport("nccl").new_unique_id()

    async def _oob_nccl_root(self, link: str, unique_id, world: int) -> None:
        await self._oob_context._links.nccl_root(link, unique_id, world)

    async def _oob_push(self, link: str) -> dict:
        return await self._oob_context.push(link)


def _prepare(cfg: ReplicaConfig) -> Context:
    for stream in (sys.stdout, sys.stderr):  # what the user prints reaches `oob logs` at once
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass
    os.environ.update(cfg.env)
    os.environ.update(cfg.secrets)
    for path in reversed(cfg.sys_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    if cfg.module and cfg.module not in sys.modules:
        # The class came by value; its module's top-level code (logging set-up, environment,
        # registrations) still runs here, as it would had the worker imported the class.
        try:
            importlib.import_module(cfg.module)
        except ImportError:
            pass  # not importable here (a remote node without the folder): the class is enough
    ctx = Context(cfg.deployment, cfg.actor, cfg.replica, cfg.replicas,
                  endpoints={k: list(v) for k, v in cfg.endpoints.items()})
    if cfg.buffers:  # only then: buffers need numpy and the spec's Buffer model (pydantic)
        from .buffers import allocate_buffers
        ctx._owners = allocate_buffers(cfg)
    set_current(ctx)
    return ctx


async def _guarded_start(self, cfg: ReplicaConfig, user_start) -> None:
    """Run the user's start-up, then ours. A failure keeps the replica alive but failed, so
    apply can read its log and report one clear error before removing it."""
    cfg = on_this_node(cfg)
    self._oob_cfg = cfg
    self._oob_servers = []
    self._oob_failed = None
    self._oob_metrics = Metrics(cfg.deployment, cfg.actor, cfg.replica)
    self._oob_marks = LogMarks.started(log_files())
    try:
        restarted = _was_restarted()
        if restarted:
            self._oob_metrics.restarted()
        self._oob_context = _prepare(cfg)
        if restarted:  # scaled or moved since its first start: current from the start
            peers.at_restart(cfg, self._oob_context)
        await user_start()
        await OobMixin._oob_start(self, cfg)
        await call_hook(self, "on_start")  # its servers are up; the replica is not ready until it returns
    except Exception as exc:
        self._oob_failed = exc
        for running in self._oob_servers:  # an on_start that failed: its servers take no traffic
            await running.stop(0)
        # The user's frames only: ours say nothing about what to fix.
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_PACKAGE)]
        print("".join(traceback.format_list(frames)) + "".join(traceback.format_exception_only(exc)),
              file=sys.stderr, flush=True)
        return
    peers.start(self, cfg)


def _was_restarted() -> bool:
    try:
        import warnings

        import ray
        with warnings.catch_warnings():  # Ray 2.60 warns about its own use of a deprecated API here
            warnings.simplefilter("ignore")
            return ray.is_initialized() and bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not in a Ray actor (tests)
        return False


def make_actor_class(user_cls: type) -> type:
    """A subclass of the user's class whose handle has the user's methods plus oob's."""
    user_init = user_cls.__init__

    async def __init__(self, _oob_cfg: ReplicaConfig, *args, **kwargs):
        async def start():
            result = user_init(self, *args, **kwargs)
            if inspect.isawaitable(result):
                await result
        await _guarded_start(self, _oob_cfg, start)

    namespace = {"__init__": __init__, "__module__": user_cls.__module__,
                 "__qualname__": user_cls.__qualname__, "__doc__": user_cls.__doc__}
    return type(user_cls.__name__, (user_cls, OobMixin), namespace)


# --- command actors -----------------------------------------------------------------------


class CommandActor:
    """Supervises a program declared with `command:`; its servers are the program's ports."""

    async def __init__(self):
        cfg = self._oob_cfg_pending
        ports = {}
        for server in cfg.servers:
            ports[server.name] = _remembered_port(cfg, server) or free_port(server.host)
            if not server.port:
                _remember_port(cfg, server.name, ports[server.name])
        first = next(iter(ports.values()), None)
        argv = [a.replace("{port}", str(first)) if first is not None else a for a in cfg.command]
        self._oob_process = Supervised(argv, cfg.restarts, ports, launch.workdir(cfg.spec_dir, cfg.cwd))
        try:
            await self._oob_process.start()
        except OSError as exc:
            raise RuntimeError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None

    def pid(self) -> int | None:
        """PID of the wrapped program."""
        return self._oob_process.proc.pid if self._oob_process.proc else None


def make_command_class() -> type:
    async def __init__(self, _oob_cfg: ReplicaConfig):
        self._oob_cfg_pending = _oob_cfg
        await _guarded_start(self, _oob_cfg, lambda: CommandActor.__init__(self))

    return type("CommandActor", (CommandActor, OobMixin), {"__init__": __init__, "__module__": __name__})

"""Re-wiring without apply: replicas announce themselves.

A replica whose servers are up writes its record to the cluster's KV (the key apply writes it
under, `<namespace>/replica/<actor>-<i>`) and tells every live replica of the actors that
connect to it to refresh. A refresh reads the peers' records and builds each connect key's
URLs from them; the replica applies them as `_oob_update` does (context, environment,
`on_peers_changed` when something changed). A replica that Ray restarted reads them before the
user's `__init__`, and every replica with connections re-reads them every few seconds, so a
notification lost to a race still lands.

No controller actor: nothing extra to place, restart or keep available, and no single point of
failure; the KV already holds each replica's record. Light on purpose (no control modules, no
pydantic models): it runs in every replica.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sys
from typing import Any, Iterable

from .. import ray_private
from ..contract import ReplicaConfig, Ref, replica_name, split_name
from .context import Context, endpoint_env

log = logging.getLogger("oobspec")

POLL = 3.0  # seconds between two reads of the peers' records (jittered by a sixth either way)
POLL_ENV = "OOB_PEER_POLL"  # an actor's `env:` may change it (seconds; 0 turns the poll off)
NOTIFY_TIMEOUT = 10.0  # seconds the announcement waits for the watchers' answers (errors are only logged)


def record_key(namespace: str, name: str) -> str:
    """Where a replica's record lives in the KV (as the control side's put_meta writes it)."""
    return f"{namespace}/replica/{name}"


def counts_key(namespace: str, name: str) -> str:
    """Where a replica keeps its live counts (its actor's replicas, its peers'): what a restart
    starts from, since Ray hands a restarted replica the constructor arguments of its first start."""
    return f"{namespace}/counts/{name}"


def counts(replicas: int, cfg: ReplicaConfig) -> dict:
    return {"replicas": replicas, "peer_replicas": dict(cfg.peer_replicas)}


def save_counts(cfg: ReplicaConfig, replicas: int) -> None:
    """Blocking (one KV write). A stand-in keeps none: its counts are not the replica's."""
    if not cfg.surge and in_ray():
        ray_private.kv_put(counts_key(cfg.namespace, cfg.name), json.dumps(counts(replicas, cfg)).encode())


def peer_names(connect: dict[str, Ref], peer_replicas: dict[str, int]) -> list[str]:
    """The replicas whose records the connect keys need, in order, each once."""
    actors = dict.fromkeys(ref.actor for ref in connect.values() if ref.actor in peer_replicas)
    return [replica_name(actor, i) for actor in actors for i in range(peer_replicas[actor])]


def build_endpoints(connect: dict[str, Ref], peer_replicas: dict[str, int],
                    records: dict[str, dict | None]) -> dict[str, list[str]]:
    """connect key -> the URLs of its server, in replica order, each once (a `shared` server
    gives one URL per node). A missing record (or one without that server) is skipped; a key
    whose actor's count is unknown, or none of whose records is there, is left out (the caller
    keeps what it had: the KV holds nothing better)."""
    out: dict[str, list[str]] = {}
    for key, ref in connect.items():
        if ref.actor not in peer_replicas:
            continue
        urls, found = [], False
        for i in range(peer_replicas[ref.actor]):
            record = records.get(replica_name(ref.actor, i))
            if not isinstance(record, dict):
                continue
            found = True
            try:
                urls.append(record["endpoints"][ref.member])
            except (KeyError, TypeError):  # a record without that server
                continue
        if found:
            out[key] = list(dict.fromkeys(urls))
    return out


def merged(current: dict[str, list[str]], found: dict[str, list[str]]) -> dict[str, list[str]]:
    """The endpoints after a refresh: what the KV says, and what it said nothing about kept."""
    return {**{k: list(v) for k, v in current.items()}, **found}


def read_records(namespace: str, names: Iterable[str]) -> dict[str, dict | None]:
    """The records of these replicas (None: not there, or not readable)."""
    out: dict[str, dict | None] = {}
    for name in names:
        try:
            raw = ray_private.kv_get(record_key(namespace, name))
            out[name] = json.loads(raw) if raw else None
        except Exception:
            log.debug("could not read the record of %s", name, exc_info=True)
            out[name] = None
    return out


def read_endpoints(cfg: ReplicaConfig) -> dict[str, list[str]]:
    """Synchronous (a few KV reads): what the peers' records say now, per connect key."""
    if not cfg.connect:
        return {}
    records = read_records(cfg.namespace, peer_names(cfg.connect, cfg.peer_replicas))
    return build_endpoints(cfg.connect, cfg.peer_replicas, records)


def in_ray() -> bool:
    """In a Ray worker (not a replica run in place by tests: no KV there, nobody to tell)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def poll_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(POLL_ENV, POLL)))
    except ValueError:
        return POLL


# --- announcing -------------------------------------------------------------------------------


def watcher_names(namespace: str, watchers: Iterable[str]) -> list[str]:
    """The live replicas (by Ray's named actors) of the actors that connect to this one."""
    import ray
    watching = set(watchers)
    if not watching:
        return []
    names = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if entry["namespace"] != namespace or name.startswith("_oob"):
            continue
        try:
            actor, _index = split_name(name)
        except ValueError:
            continue
        if actor in watching:
            names.append(name)
    return sorted(names)


def _publish(cfg: ReplicaConfig, record: dict, replicas: int) -> list[Any]:
    """Blocking (run in a thread): the record and the counts into the KV, then `_oob_refresh`
    to each watcher; returns the calls' refs."""
    import ray
    ray_private.kv_put(record_key(cfg.namespace, cfg.name), json.dumps(record).encode())
    save_counts(cfg, replicas)
    refs = []
    for name in watcher_names(cfg.namespace, cfg.watchers):
        try:
            refs.append(ray.get_actor(name, namespace=cfg.namespace)._oob_refresh.remote())
        except Exception:  # gone meanwhile
            log.debug("could not tell %s", name, exc_info=True)
    return refs


async def announce(cfg: ReplicaConfig, record: dict, replicas: int) -> None:
    """This replica serves (again): its record in the KV, and every replica that connects to it
    told to read it. The watchers' answers are awaited (never raised) so no error goes unread."""
    try:
        refs = await asyncio.to_thread(_publish, cfg, record, replicas)
        if refs:
            done = await asyncio.wait_for(asyncio.gather(*refs, return_exceptions=True), NOTIFY_TIMEOUT)
            for error in done:
                if isinstance(error, BaseException):
                    log.debug("a watcher did not refresh: %s", error)
    except asyncio.CancelledError:
        raise
    except Exception:  # a lost notification: the watchers' poll still finds the record
        log.debug("announcement failed", exc_info=True)


async def poll(refresh, interval: float) -> None:
    """`refresh()` every `interval` seconds (jittered, so replicas do not read in step)."""
    while True:
        await asyncio.sleep(interval * random.uniform(5 / 6, 7 / 6))
        try:
            await refresh()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.debug("peer refresh failed", exc_info=True)


# --- in the replica ---------------------------------------------------------------------------


def lock(replica) -> asyncio.Lock:
    """One apply of peers at a time (`_oob_update`, `_oob_refresh`): a refresh's read and its
    apply are never split by an update, so an older read never lands after a newer one."""
    if "_oob_peers_lock" not in vars(replica):
        replica._oob_peers_lock = asyncio.Lock()
    return replica._oob_peers_lock


def at_restart(cfg: ReplicaConfig, ctx: Context) -> None:
    """A replica Ray restarted: the counts it last knew and its peers' endpoints as the KV holds
    them now, in the context and the environment before the user's `__init__` reads them (its
    constructor arguments are its first start's; no hook: nothing of the user's has run yet)."""
    replicas = ctx.replicas
    try:
        raw = ray_private.kv_get(counts_key(cfg.namespace, cfg.name))
        if raw:
            known = json.loads(raw)
            replicas = int(known["replicas"])
            cfg.peer_replicas.update({k: int(v) for k, v in known["peer_replicas"].items()})
        found = read_endpoints(cfg)
    except Exception:
        log.debug("could not read the peers' records", exc_info=True)
        return
    ctx.update(replicas, merged(ctx.endpoints, found))
    os.environ["OOB_REPLICAS"] = str(ctx.replicas)
    os.environ.update(endpoint_env(ctx.endpoints))


def start(replica, cfg: ReplicaConfig) -> None:
    """The replica serves: announce it (a stand-in does not: its record is not the replica's)
    and, with connections, re-read the peers' records every few seconds. `_oob_stop` cancels
    both."""
    if not in_ray():
        return
    loop = asyncio.get_running_loop()
    tasks = []
    if not cfg.surge:
        async def announced():
            await announce(cfg, (await replica._oob_info()).record(), replica._oob_context.replicas)
        tasks.append(loop.create_task(announced()))
    interval = poll_interval()
    if cfg.connect and interval > 0:
        tasks.append(loop.create_task(poll(replica._oob_refresh, interval)))
    replica._oob_peer_tasks = tasks

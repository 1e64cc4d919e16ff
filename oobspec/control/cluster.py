"""Talking to Ray: find and connect to the cluster (failing fast), observe, meta, kill, delete."""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..contract import ReplicaInfo, namespace_of, split_name
from .. import ray_private
from ..addresses import address_kind, explicit_address
from .state import actor_records, is_client  # noqa: F401 (is_client: used by callers of cluster)
from ..errors import ClusterError, first_line
from ..plan import Observed, ReplicaState

INFO_TIMEOUT = 15.0
PROBE_TIMEOUT = 5.0


def registry_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"oobspec-{os.getuid()}"


def register_embedded(name: str, address: str) -> Path:
    """A foreground apply says where its private Ray is, so `oob status NAME` can find it."""
    path = registry_dir() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"address": address, "pid": os.getpid()}))
    return path


def unregister_embedded(path: Path) -> None:
    """Remove this process's own entry (never another apply's that took the name since)."""
    try:
        if json.loads(path.read_text())["pid"] == os.getpid():
            path.unlink()
    except (OSError, ValueError, KeyError, TypeError):
        pass


def foreground_owner(name: str) -> dict | None:
    """The foreground apply of this deployment running on this machine: {pid, address}."""
    path = registry_dir() / f"{name}.json"
    try:
        entry = json.loads(path.read_text())
        os.kill(entry["pid"], 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entry if _reachable(entry["address"]) else None


def _embedded_address(name: str) -> str | None:
    entry = foreground_owner(name)
    return entry["address"] if entry else None


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def local_cluster() -> str | None:
    """The cluster `ray status` would find on this machine (no ray import: plan stays light)."""
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        address = current.read_text().strip().splitlines()[0]
    except (OSError, IndexError):
        return None
    return address if _reachable(address) else None


def find_address(name: str, address: str | None, spec_address: str | None = None) -> str | None:
    """Explicit flag, RAY_ADDRESS, the spec's ray.address, a foreground apply's Ray, a local cluster."""
    explicit = explicit_address(address, spec_address)
    if explicit:
        return explicit
    return _embedded_address(name) or local_cluster()


def addresses(address: str | None) -> list[str]:
    """The clusters `oob list` looks at: the one named, else every foreground apply's Ray on
    this machine and the local cluster."""
    explicit = explicit_address(address)
    if explicit:
        return [explicit]
    found = [_embedded_address(p.stem) for p in sorted(registry_dir().glob("*.json"))]
    found.append(local_cluster())
    return list(dict.fromkeys(a for a in found if a))


def use_token_if_any(address: str) -> None:
    # Ray 2.60 turns token auth on for `ray start --head` (and for a local ray.init); a client
    # given an explicit address is refused unless it is in token mode with the token.
    if address == "auto" or os.environ.get("RAY_AUTH_MODE"):
        return
    if os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").exists():
        token_mode()


def token_mode() -> None:
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config at import; refresh it so this process sees token mode
        ray_private.reload_config()
    except Exception:
        pass


def _host_port(address: str) -> tuple[str, int]:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"cannot connect to Ray at {address}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def probe_tcp(address: str, timeout: float = PROBE_TIMEOUT) -> tuple[str, int]:
    """Something accepts connections at the address within `timeout`, or one line says why."""
    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.timeout:
        raise ClusterError(f"cannot connect to Ray at {address}: no answer within {timeout:.0f}s") from None
    except OSError as exc:
        raise ClusterError(f"cannot connect to Ray at {address}: {exc.strerror or exc}") from None
    return host, port


def probe(address: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Fail in seconds, with one line, where Ray would retry for minutes: nothing listening,
    a host that does not answer, or a port that is not a Ray GCS (no gRPC there)."""
    import grpc
    host, port = probe_tcp(address, timeout)
    from ..contract import host_port
    channel = grpc.insecure_channel(host_port(host, port))
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise ClusterError(f"cannot connect to Ray at {address}: something answers there, but not Ray "
                           "(no gRPC)") from None
    finally:
        channel.close()


def connect(address: str, namespace: str) -> None:
    import ray
    if ray.is_initialized():
        return
    if address == "auto":
        address = local_cluster() or ""
        if not address:
            raise ClusterError("no Ray cluster is running on this machine (address 'auto'): start one with "
                               "`ray start --head`, or pass --address")
    probe(address)
    use_token_if_any(address)
    client = address_kind(address) == "client"
    extra = {} if client else {"configure_logging": True}
    for attempt in range(3):
        try:
            ray.init(address=address, namespace=namespace, logging_level=logging.WARNING, log_to_driver=False,
                     **extra)
            return
        except (ConnectionError, RuntimeError, ValueError) as exc:
            # Ray Client's proxy sometimes refuses a connection that follows another at once.
            if client and "Initialization failure" in str(exc) and attempt < 2:
                time.sleep(1.0)
                continue
            raise ClusterError(f"cannot connect to Ray at {address}: {first_line(str(exc))}") from None


@contextmanager
def session(name: str, address: str | None, spec_address: str | None = None, required: bool = True) -> Iterator[str | None]:
    """Connected to the deployment's cluster for the duration (disconnects after, unless already connected)."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        yield "current"
        return
    found = find_address(name, address, spec_address)
    if found is None:  # no cluster: nothing to import (an offline plan stays light)
        if required:
            raise ClusterError(f"no Ray cluster found for '{name}': start one with `oob apply`, or pass "
                               "--address / set RAY_ADDRESS")
        yield None
        return
    connect(found, namespace_of(name))
    import ray
    try:
        yield found
    finally:
        ray.shutdown()


def replica_names(namespace: str) -> list[str]:
    import ray
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == namespace and not a["name"].startswith("_oob"))




def handle(name: str, namespace: str):
    import ray
    return ray.get_actor(name, namespace=namespace)


def infos(namespace: str, names: list[str] | None = None, timeout: float = INFO_TIMEOUT) -> dict[str, ReplicaInfo | None]:
    """`_oob_info` of every replica (None for one that does not answer: dead or restarting)."""
    import ray
    names = replica_names(namespace) if names is None else names
    refs = {}
    for name in names:
        try:
            refs[name] = handle(name, namespace)._oob_info.remote()
        except (ValueError, AttributeError):
            refs[name] = None
    out = {}
    deadline = time.monotonic() + timeout
    for name, ref in refs.items():
        if ref is None:
            out[name] = None
            continue
        try:
            out[name] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        except Exception:
            out[name] = None
    return out


def observe(namespace: str) -> Observed:
    """Each replica as Ray's actor table, its own answer and apply's record of it say.

    Dead is what Ray says; a replica alive by Ray's account whose answer times out is busy,
    not dead, and keeps the hashes and endpoints apply recorded when it became ready."""
    records = {n: r for n, r in actor_records(namespace).items() if not n.startswith("_oob") and r.state != "DEAD"}
    answers = infos(namespace, sorted(records))
    replicas = []
    for name, record in records.items():
        actor, index = split_name(name)
        info = answers.get(name)
        if info is None and record.state in ("ALIVE", "RESTARTING"):
            info = _recorded(namespace, name, record)
            if info is not None:
                replicas.append(ReplicaState(actor, index, info.config_hash, info.pid or None, info.node_id, True,
                                             info.endpoints, info.gpu_uuid, info.code_hash, answering=False,
                                             ports=info.ports))
                continue
        if info is not None and not info.error:
            replicas.append(ReplicaState(actor, index, info.config_hash, info.pid, info.node_id, True,
                                         info.endpoints, info.gpu_uuid, info.code_hash, ports=info.ports))
        else:  # failed in __init__, or still pending: not a working replica
            replicas.append(ReplicaState(actor, index, "", alive=False))
    return Observed(online=True, replicas=replicas)


def _recorded(namespace: str, name: str, record) -> ReplicaInfo | None:
    """What apply recorded of a replica that is alive but does not answer."""
    actor, index = split_name(name)
    known = get_meta(namespace, f"replica/{name}")
    try:
        return ReplicaInfo.from_record(actor, index, known, record.pid or 0, record.node_id or "") if known else None
    except KeyError:  # recorded by an older oobspec: plan with what Ray says
        return ReplicaInfo(actor, index, "", "", record.pid or 0, record.node_id or "", {})


def put_meta(namespace: str, key: str, value: dict) -> None:
    ray_private.kv_put(f"{namespace}/{key}", json.dumps(value).encode())


def get_meta(namespace: str, key: str) -> dict | None:
    raw = ray_private.kv_get(f"{namespace}/{key}")
    return json.loads(raw) if raw else None


def stored_spec(namespace: str):
    """The spec the last complete apply deployed, validated again into the models (None: none
    recorded, or one an older oobspec wrote that no longer validates)."""
    from pydantic import ValidationError

    from ..models import Spec
    raw = get_meta(namespace, "spec")
    try:
        return Spec.model_validate(raw) if raw else None
    except ValidationError:
        return None


def del_meta(namespace: str, key: str) -> None:
    ray_private.kv_del(f"{namespace}/{key}")


def deployment_names() -> list[str]:
    """Deployments on the connected cluster: applied specs, and namespaces with oob actors."""
    import ray
    names = {key.split("/", 1)[0][4:] for key in ray_private.kv_keys("oob-") if key.endswith("/spec")}
    names |= {a["namespace"][4:] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["namespace"].startswith("oob-")}
    return sorted(names)


def forget(namespace: str) -> None:
    for key in ray_private.kv_keys(f"{namespace}/"):
        ray_private.kv_del(key)


def named_actors(namespace: str) -> set[str]:
    """Every named actor of the namespace, oob's own stand-ins included."""
    import ray
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace}


def kill(names: list[str], namespace: str, timeout: float = 15.0, drain: float = 1.0, hand_over: bool = False) -> None:
    """Stop replicas (servers drained for `drain` seconds, processes, shared memory; `timeout`
    seconds for all of it), kill them and wait until Ray no longer lists them (their names are
    free again). hand_over: a successor shares their ports; new connections go to it first."""
    import ray
    handles = {}
    for name in names:
        try:
            handles[name] = handle(name, namespace)
        except ValueError:
            pass
    # A replica still in __init__ cannot take the stop call before __init__ ends: kill it now.
    alive = {n for n, r in actor_records(namespace).items() if r.state == "ALIVE"}
    stops = [h._oob_stop.remote(drain, hand_over) for n, h in handles.items() if n in alive]
    if stops:
        ray.wait(stops, num_returns=len(stops), timeout=timeout)
    for h in handles.values():
        ray.kill(h, no_restart=True)
    deadline = time.monotonic() + max(timeout, 3.0)
    pending = set(handles)
    while pending and time.monotonic() < deadline:
        pending &= named_actors(namespace)
        if pending:
            time.sleep(0.05)


def cleanup_shm(deployment: str) -> None:
    """What crashed replicas left in this machine's /dev/shm (each replica removes its own on a
    graceful stop). Through Ray Client this machine is not the cluster's: nothing to scan here."""
    if is_client():
        return
    from ..transports import get_transport
    from ..contract import segment_prefix
    get_transport("shm").cleanup(segment_prefix(deployment))


def remove_placement(pg_name: str) -> None:
    from ray.util.placement_group import get_placement_group, remove_placement_group
    try:
        remove_placement_group(get_placement_group(pg_name))
    except ValueError:  # already gone
        pass


def delete_all(name: str) -> int:
    namespace = namespace_of(name)
    names = sorted(named_actors(namespace))  # stand-ins an interrupted apply left too
    # In-flight requests finish first: each server stops accepting, then waits for them up to
    # the actors' `drain` (the longest of the applied spec's).
    spec = stored_spec(namespace)
    drain = max(a.drain for a in spec.actors.values()) if spec else 1.0
    kill(names, namespace, timeout=drain + 5.0, drain=drain)
    placement = get_meta(namespace, "placement")
    if placement:
        remove_placement(placement["name"])
    forget(namespace)
    cleanup_shm(name)
    return len(names)

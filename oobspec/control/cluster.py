"""Talking to Ray: find and connect to the cluster (failing fast), observe, meta, kill, delete."""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from ..contract import ReplicaInfo, namespace_of, split_name
from .. import ray_private
from .connect import (  # noqa: F401 (re-exported: callers find and connect through cluster)
    addresses, connect, find_address, foreground_owner, local_cluster, probe, probe_tcp, register_embedded,
    token_mode, unregister_embedded, use_token_if_any, _embedded_address, _host_port)
from .state import actor_records, is_client  # noqa: F401 (is_client: used by callers of cluster)
from ..errors import ClusterError
from ..nodes import NodeState
from ..plan import Observed, ReplicaState

INFO_TIMEOUT = 15.0


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
    return Observed(online=True, replicas=replicas, nodes=nodes())


def nodes(free: bool = True) -> list[NodeState]:
    """Every node Ray knows (dead ones too, alive=False): its address, labels, resources in all
    and (free=True) free now, for the plan's warnings, stand-ins' room and why a replica waits."""
    import ray
    free = _free_per_node() if free else None
    return [NodeState(n["NodeID"], n["NodeManagerAddress"], dict(n["Labels"]), dict(n["Resources"]),
                      free.get(n["NodeID"], {}) if free is not None and n["Alive"] else None, bool(n["Alive"]))
            for n in ray.nodes()]


def _free_per_node() -> dict[str, dict[str, float]] | None:
    """node id -> its free resources (a resource none of is free is left out), as the nodes last
    reported them to the GCS; None through Ray Client, which has no GCS connection to ask."""
    if is_client():
        return None
    return ray_private.free_resources_per_node()  # a DeveloperAPI: no public equivalent


def tcp_migrate_req() -> bool | None:
    """This machine's net.ipv4.tcp_migrate_req (None: no such setting, e.g. not Linux 5.14+)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
            return f.read().strip() != "0"
    except OSError:
        return None


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

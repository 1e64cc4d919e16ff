"""The only place (with apply) that talks to Ray: connect, observe, status, delete, logs, sync."""
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

from ..errors import ClusterError, OobError
from ..models import Spec
from ..plan import Observed, Plan, ReplicaState, make_plan

KV_NAMESPACE = "oobspec"
INFO_TIMEOUT = 15.0


def registry_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"oobspec-{os.getuid()}"


def register_embedded(name: str, address: str) -> Path:
    """A foreground apply says where its private Ray is, so `oob status NAME` can find it."""
    path = registry_dir() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"address": address, "pid": os.getpid()}))
    return path


def _embedded_address(name: str) -> str | None:
    path = registry_dir() / f"{name}.json"
    try:
        entry = json.loads(path.read_text())
        os.kill(entry["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return entry["address"] if _reachable(entry["address"]) else None


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
    explicit = address or os.environ.get("RAY_ADDRESS") or spec_address
    if explicit:
        return explicit
    return _embedded_address(name) or local_cluster()


def _use_token_if_any(address: str) -> None:
    # Ray 2.60 turns token auth on for `ray start --head` (and for a local ray.init); a client
    # given an explicit address is refused unless it is in token mode with the token.
    if address.startswith("ray://") or address == "auto" or os.environ.get("RAY_AUTH_MODE"):
        return
    if os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").exists():
        token_mode()


def token_mode() -> None:
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config at import; refresh it so this process sees token mode
        from ray._raylet import Config
        Config.initialize("")
    except Exception:
        pass


def connect(address: str, namespace: str) -> None:
    import ray
    if ray.is_initialized():
        return
    _use_token_if_any(address)
    try:
        ray.init(address=address, namespace=namespace, logging_level=logging.WARNING, log_to_driver=False,
                 configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot connect to Ray at {address}: {str(exc).splitlines()[0]}") from None


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
    connect(found, f"oob-{name}")
    import ray
    try:
        yield found
    finally:
        ray.shutdown()


def replica_names(namespace: str) -> list[str]:
    import ray
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == namespace and not a["name"].startswith("_oob"))


def split_name(name: str) -> tuple[str, int]:
    actor, _, index = name.rpartition("-")
    return (actor, int(index)) if index.isdigit() else (name, 0)


def handle(name: str, namespace: str):
    import ray
    return ray.get_actor(name, namespace=namespace)


def infos(namespace: str, names: list[str] | None = None, timeout: float = INFO_TIMEOUT) -> dict[str, dict | None]:
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
    replicas = []
    for name, info in infos(namespace).items():
        actor, index = split_name(name)
        if info is None or info.get("error"):
            replicas.append(ReplicaState(actor, index, "", alive=False))
        else:
            replicas.append(ReplicaState(actor, index, info["config_hash"], info["pid"], info["node_id"], True,
                                         info["endpoints"], info.get("gpu_uuid")))
    return Observed(online=True, replicas=replicas)


def put_meta(namespace: str, key: str, value: dict) -> None:
    from ray.experimental import internal_kv
    internal_kv._internal_kv_put(f"{namespace}/{key}".encode(), json.dumps(value).encode(), overwrite=True,
                                 namespace=KV_NAMESPACE)


def get_meta(namespace: str, key: str) -> dict | None:
    from ray.experimental import internal_kv
    raw = internal_kv._internal_kv_get(f"{namespace}/{key}".encode(), namespace=KV_NAMESPACE)
    return json.loads(raw) if raw else None


def forget(namespace: str) -> None:
    from ray.experimental import internal_kv
    for key in internal_kv._internal_kv_list(f"{namespace}/".encode(), namespace=KV_NAMESPACE):
        internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)


def kill(names: list[str], namespace: str, timeout: float = 15.0) -> None:
    """Stop replicas gracefully (servers, processes, shared memory), kill them, wait until gone."""
    import ray
    handles = {}
    for name in names:
        try:
            handles[name] = handle(name, namespace)
        except ValueError:
            pass
    stops = [h._oob_stop.remote() for h in handles.values()]
    if stops:
        ray.wait(stops, num_returns=len(stops), timeout=timeout)
    for h in handles.values():
        ray.kill(h, no_restart=True)
    deadline = time.monotonic() + timeout
    pending = set(handles)
    while pending and time.monotonic() < deadline:
        pending &= set(replica_names(namespace))
        if pending:
            time.sleep(0.05)


def cleanup_shm(deployment: str) -> None:
    from ..transports import get_transport
    get_transport("shm").cleanup(f"oob-{deployment}-")


def remove_placement(pg_name: str) -> None:
    from ray.util.placement_group import get_placement_group, remove_placement_group
    try:
        remove_placement_group(get_placement_group(pg_name))
    except ValueError:  # already gone
        pass


def delete_all(name: str) -> int:
    namespace = f"oob-{name}"
    names = replica_names(namespace)
    kill(names, namespace)
    placement = get_meta(namespace, "placement")
    if placement:
        remove_placement(placement["name"])
    forget(namespace)
    cleanup_shm(name)
    return len(names)


# --- commands ----------------------------------------------------------------------------


def plan_for(spec: Spec, address: str | None) -> Plan:
    single = spec.ray.placement == "STRICT_PACK" or None
    with session(spec.name, address, spec.ray.address, required=False) as found:
        if found is None:
            return make_plan(spec, single_node=True if single or not (address or spec.ray.address) else None)
        import ray
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return make_plan(spec, observe(spec.namespace), single_node=single or len(nodes) == 1)


def status(name: str, address: str | None) -> dict:
    namespace = f"oob-{name}"
    with session(name, address):
        names = replica_names(namespace)
        meta = get_meta(namespace, "spec")
        if not names and meta is None:
            raise ClusterError(f"no deployment '{name}' in this cluster")
        details = infos(namespace, names)
        replicas = []
        links = []
        for rname, info in details.items():
            actor, index = split_name(rname)
            row = {"name": rname, "actor": actor, "replica": index, "state": "alive" if info else "not answering"}
            if info:
                process = info.get("process")
                if process and not process["alive"]:
                    row["state"] = f"process exited ({process['last_exit']})"
                if info.get("error"):
                    row["state"] = f"failed: {info['error']}"
                row.update(pid=info["pid"], node_id=info["node_id"], endpoints=info["endpoints"],
                           process=process, versions=info.get("versions", {}))
                for lname, stats in info.get("links", {}).items():
                    link = next((x for x in (meta or {}).get("links", []) if x["name"] == lname), {})
                    links.append({"name": lname, "from": link.get("from", f"{actor}.?"), "to": link.get("to", []),
                                  "transport": "/".join(stats["transports"]) or "-", "last_push": stats["last_push"]})
            replicas.append(row)
        return {"name": name, "namespace": namespace, "replicas": replicas, "links": links}


def sync(name: str, link: str, address: str | None) -> dict:
    import ray
    namespace = f"oob-{name}"
    with session(name, address):
        meta = get_meta(namespace, "spec")
        if meta is None:
            raise ClusterError(f"no deployment '{name}' in this cluster")
        entry = next((x for x in meta.get("links", []) if x["name"] == link), None)
        if entry is None:
            known = ", ".join(x["name"] for x in meta.get("links", [])) or "none"
            raise OobError(f"deployment '{name}' has no link '{link}' (links: {known})")
        source = entry["from"].split(".", 1)[0]
        try:
            return ray.get(handle(f"{source}-0", namespace)._oob_push.remote(link))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) else exc
            raise OobError(f"push of '{link}' failed: {cause}") from None


def delete(name: str, address: str | None) -> int:
    with session(name, address):
        removed = delete_all(name)
        if not removed:
            raise ClusterError(f"no deployment '{name}' in this cluster")
        return removed


def logs(name: str, actor: str | None, follow: bool, address: str | None) -> Iterator[str]:
    import ray
    namespace = f"oob-{name}"
    with session(name, address):
        names = replica_names(namespace)
        if actor:
            names = [n for n in names if n == actor or split_name(n)[0] == actor]
            if not names:
                raise ClusterError(f"deployment '{name}' has no actor '{actor}'")
        offsets: dict[str, list[int]] = {n: [0, 0] for n in names}
        prefix = len(names) > 1
        while True:
            for n in names:
                try:
                    chunks = ray.get(handle(n, namespace)._oob_read_logs.remote(offsets[n]), timeout=INFO_TIMEOUT)
                except Exception:
                    continue
                for i, (offset, text) in enumerate(chunks):
                    offsets[n][i] = offset
                    if text:
                        yield "".join(f"[{n}] {line}\n" for line in text.splitlines()) if prefix else text
            if not follow:
                return
            time.sleep(0.5)

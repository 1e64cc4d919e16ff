"""The CLI's commands on a running deployment: plan, status, list, sync, delete, logs.

Each connects (failing fast), reads what Ray and the replicas say, and returns data for the
CLI to print; none of them prints, but for warnings on stderr (symlinks an upload leaves behind).
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple

from ..errors import ClusterError, OobError, UsageError, last_line
from ..models import Spec
from ..nodes import NodeState, pending_reason
from ..plan import Plan, make_plan
from . import cluster, remote, state
from ..contract import Ref, ReplicaInfo, host_port, namespace_of, replica_name, split_name
from .cluster import INFO_TIMEOUT, get_meta, handle, infos, session, stored_spec


def plan_for(spec: Spec, address: str | None) -> Plan:
    single = spec.ray.placement == "STRICT_PACK" or None
    with session(spec.name, address, spec.ray.address, required=False) as found:
        if found is None:
            local = not (address or spec.ray.address)  # apply would start Ray on this machine
            return make_plan(spec, single_node=True if single or local else None,
                             migrate_req=cluster.tcp_migrate_req() if local else None)
        from .apply import plan_on_cluster
        base = spec._source.base_dir if spec._source else Path.cwd()
        plan, _observed, _code = plan_on_cluster(spec, base)
        if cluster.is_client():
            up = remote.scan(base)
            plan.upload = {"folder": str(up.folder), "files": up.files, "bytes": up.bytes,
                           "skipped": [s._asdict() for s in up.skipped]}
            for line in up.warnings():  # symlinks left behind: stderr, so `-o json` stays JSON
                print(line, file=sys.stderr)
        return plan


def declared(spec: Spec | None) -> list[str]:
    """Every replica the applied spec declares, in spec order."""
    return [replica_name(name, i) for name, actor in (spec.actors.items() if spec else ()) for i in range(actor.replicas)]


def _replica_row(name: str, record: state.ActorRecord | None, info: ReplicaInfo | None,
                 addresses: dict[str, str] | None = None) -> dict:
    """One replica's row of `oob status`; addresses: node id -> the address Ray knows it by."""
    actor, index = split_name(name)
    row = {"name": name, "actor": actor, "replica": index, "restarts": record.restarts if record else 0,
           "healthy": False, "pid": record.pid if record and record.pid else None, "node_id": None,
           "node_address": None, "endpoints": {}}
    if record is None:
        row["state"] = "missing"
    elif record.state != "ALIVE":
        row["state"] = record.words
    elif info is None:
        row["state"] = "not answering"
    else:
        process = info.process
        row.update(state="alive", healthy=True, pid=info.pid, node_id=info.node_id,
                   node_address=info.node_address or (addresses or {}).get(info.node_id),
                   endpoints=info.endpoints, process=process, versions=info.versions)
        if info.error:
            row.update(state=f"failed: {info.error}", healthy=False)
        elif info.draining:
            row.update(state="draining", healthy=False)
        elif process and not process["alive"]:
            row.update(state=f"process exited ({process['last_exit']})", healthy=False)
    return row


def unplaced(record: state.ActorRecord | None, alive: set[str]) -> bool:
    """Whether Ray has yet to place the replica: not created and no worker yet, or restarting
    with no worker leased (Ray keeps the dead process's pid in the record meanwhile) or only one
    on a node that is gone."""
    if record is None:
        return False
    if record.state == "PENDING_CREATION":
        return not record.pid
    return record.state in ("RESTARTING", "DEPENDENCIES_UNREADY") and (
        not record.pid or not record.worker_id or record.node_id not in alive)


def explain_pending(rows: list[dict], records: dict[str, state.ActorRecord], spec: Spec | None,
                    nodes: list[NodeState]) -> None:
    """Rows of replicas Ray has yet to place become `pending`, with what each waits for (labels
    no node has, more than any node holds, max_per_node reached, or room that is taken)."""
    alive = {n.node_id for n in nodes if n.alive}
    placed: dict[str, list[str]] = {}  # actor -> the nodes its placed replicas are on
    for row in rows:
        record = records.get(row["name"])
        node = row["node_id"] or (record.node_id if record and record.state != "DEAD"
                                  and not unplaced(record, alive) else None)
        if node:
            placed.setdefault(row["actor"], []).append(node)
    for row in rows:
        if unplaced(records.get(row["name"]), alive):
            actor = spec.actors.get(row["actor"]) if spec else None
            row.update(state="pending", pid=None, pending=pending_reason(actor, nodes, placed.get(row["actor"], [])))


def status(name: str, address: str | None) -> dict:
    with session(name, address):
        return observe_status(name).status


class Observation(NamedTuple):
    status: dict  # what `oob status -o json` prints
    infos: dict[str, ReplicaInfo | None]  # each live replica's answer (None: it did not answer)
    spec: Spec | None  # the applied spec


def observe_status(name: str, timeout: float = INFO_TIMEOUT) -> Observation:
    """One look at a deployment, connected: Ray's records, each replica's answer, the applied spec."""
    namespace = namespace_of(name)
    meta = stored_spec(namespace)
    records = {n: r for n, r in state.actor_records(namespace).items() if not n.startswith("_oob")}
    live = [n for n, r in records.items() if r.state != "DEAD"]
    if meta is None and not live:
        raise ClusterError(f"no deployment '{name}' in this cluster")
    names = declared(meta) + sorted(set(live) - set(declared(meta)))
    details = infos(namespace, [n for n in names if n in records and records[n].state == "ALIVE"], timeout)
    nodes = cluster.nodes(free=False)  # free resources only to explain a pending replica
    addresses = {node.node_id: node.address for node in nodes}
    replicas = [_replica_row(n, records.get(n), details.get(n), addresses) for n in names]
    alive = {node.node_id for node in nodes if node.alive}
    if any(unplaced(records.get(n), alive) for n in names):
        explain_pending(replicas, records, meta, cluster.nodes())
    links = []
    for row in replicas:
        info = details.get(row["name"])
        for lname, stats in (info.links if info else {}).items():
            link = next((x for x in meta.links if x.name == lname), None) if meta else None
            links.append({"name": lname, "from": link.from_ if link else f"{row['actor']}.?",
                          "to": list(link.to) if link else [],
                          "transport": "/".join(stats["transports"]) or "-", "last_push": stats["last_push"]})
    result = {"name": name, "namespace": namespace, "healthy": all(r["healthy"] for r in replicas),
              "replicas": replicas, "links": links, "last_apply": get_meta(namespace, "last-apply"),
              "metrics": metrics_endpoints()}
    return Observation(result, details, meta)


def metrics_endpoints() -> list[dict]:
    """Where Prometheus scrapes each live node: Ray's metrics export port (`ray_oob_*` among its series)."""
    import ray
    return sorted(({"node_id": n["NodeID"], "url": f"http://{host_port(n['NodeManagerAddress'], n['MetricsExportPort'])}/metrics"}
                   for n in ray.nodes() if n["Alive"] and n["MetricsExportPort"]), key=lambda m: m["url"])


def deployments(address: str | None) -> list[dict]:
    """Every oobspec deployment on the cluster (or, with no address, on this machine's clusters)."""
    out: dict[str, dict] = {}
    for found in cluster.addresses(address):
        with session("", found) as _:
            for name in cluster.deployment_names():
                if name in out:
                    continue
                namespace = namespace_of(name)
                want = declared(stored_spec(namespace))
                records = state.actor_records(namespace)
                alive = [n for n in want if n in records and records[n].state == "ALIVE"]
                out[name] = {"name": name, "namespace": namespace, "address": found,
                             "replicas": len(want), "alive": len(alive)}
    return sorted(out.values(), key=lambda d: d["name"])


def sync(name: str, link: str, address: str | None) -> dict:
    import ray
    namespace = namespace_of(name)
    with session(name, address):
        meta = stored_spec(namespace)
        if meta is None:
            raise ClusterError(f"no deployment '{name}' in this cluster")
        entry = next((x for x in meta.links if x.name == link), None)
        if entry is None:
            known = ", ".join(x.name for x in meta.links) or "none"
            raise OobError(f"deployment '{name}' has no link '{link}' (links: {known})")
        source = replica_name(Ref.parse(entry.from_).actor, 0)
        try:
            return ray.get(handle(source, namespace)._oob_push.remote(link))
        except ValueError:
            raise ClusterError(f"the source of '{link}', {source}, is not running") from None
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise OobError(f"push of '{link}' failed: {last_line(str(cause))}") from None


def delete(name: str, address: str | None, spec_address: str | None = None) -> int:
    with session(name, address, spec_address):
        removed = cluster.delete_all(name)
        if not removed:
            raise ClusterError(f"no deployment '{name}' in this cluster")
        return removed


class _Source:
    """Where one replica's output is read from: its worker's log files when they are on this
    machine (dead or busy replicas included), else the replica itself."""

    def __init__(self, name: str, namespace: str, record: state.ActorRecord | None):
        self.name, self.namespace = name, namespace
        self.worker, self.files, self.offsets = None, [], [0, 0]
        self.refresh(record)

    def refresh(self, record: state.ActorRecord | None) -> None:
        """A restarted replica writes to a new worker's files: follow it there."""
        if record is not None and record.worker_id and record.worker_id != self.worker:
            self.worker, self.files, self.offsets = record.worker_id, state.log_files(record), [0, 0]

    def start_at(self, since: float) -> None:
        """Skip what was written before `since` (time.time()): where the replica's marks say its
        files stood then; for one that cannot answer, its files' times."""
        import ray
        try:
            got = ray.get(handle(self.name, self.namespace)._oob_log_offsets.remote(since), timeout=INFO_TIMEOUT)
            self.offsets[:len(got)] = got
        except Exception:
            for i, path in enumerate(self.files):
                try:
                    self.offsets[i] = os.path.getsize(path) if os.path.getmtime(path) < since else 0
                except OSError:
                    continue

    def read(self) -> list[str]:
        """What is new since the last read; `self.moved` says whether any bytes were read."""
        before = list(self.offsets)
        chunks = self._read()
        self.moved = self.offsets != before
        return chunks

    def _read(self) -> list[str]:
        import ray
        if self.files:
            chunks = []
            for i, path in enumerate(self.files):
                try:
                    self.offsets[i], text = state.read_from(path, self.offsets[i])
                except OSError:
                    continue
                chunks.append(text)
            return chunks
        try:
            got = ray.get(handle(self.name, self.namespace)._oob_read_logs.remote(self.offsets), timeout=INFO_TIMEOUT)
        except Exception:
            return []
        for i, (offset, _text) in enumerate(got):
            self.offsets[i] = offset
        return [text for _o, text in got]


def parse_duration(text: str) -> float:
    """`--since` as kubectl and docker take it: 30s, 5m, 2h, 1d (a bare number: seconds)."""
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", text)
    if not match:
        raise UsageError(f"--since {text}: not a duration (write it as 30s, 5m, 2h or 1d)")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def _log_sources(name: str, namespace: str, actor: str | None) -> list[_Source]:
    records = {n: r for n, r in state.actor_records(namespace).items() if not n.startswith("_oob")}
    meta = stored_spec(namespace)
    live = {n for n, r in records.items() if r.state != "DEAD"}  # dead ones only when declared
    names = declared(meta) + sorted(live - set(declared(meta))) if meta else sorted(live)
    if not names:
        raise ClusterError(f"no deployment '{name}' in this cluster")
    if actor:
        names = [n for n in names if n == actor or split_name(n)[0] == actor]
        if not names:
            raise ClusterError(f"deployment '{name}' has no actor '{actor}'")
    return [_Source(n, namespace, records.get(n)) for n in names]


def _new_text(source: _Source) -> Iterator[str]:
    while True:  # to the end of what is there now (a read takes 4 MiB at most)
        for text in source.read():
            if text:
                yield text
        if not source.moved:
            return


def logs(name: str, actor: str | None, follow: bool, address: str | None, tail: int | None = None,
         since: float | None = None) -> Iterator[str]:
    """Each replica's output. `tail`: only the last N lines of what each wrote so far; `since`:
    only what it wrote in the last that many seconds (to within a second)."""
    namespace = namespace_of(name)
    with session(name, address):
        sources = _log_sources(name, namespace, actor)
        for source in sources if since is not None else ():
            source.start_at(time.time() - since)
        prefix, first = len(sources) > 1, True
        while True:
            for source in sources:
                chunks = _new_text(source)
                if first and tail is not None:
                    lines = "".join(chunks).splitlines(keepends=True)
                    chunks = ["".join(lines[-tail:] if tail else [])]
                for text in chunks:
                    if text:
                        yield "".join(f"[{source.name}] {line}\n" for line in text.splitlines()) if prefix else text
            if not follow:
                return
            first = False
            time.sleep(0.5)
            records = state.actor_records(namespace)
            for source in sources:
                source.refresh(records.get(source.name))

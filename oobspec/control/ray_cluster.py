"""The executor's `Cluster` on Ray: start, wait, stop and tell replicas; placement, links; the
revisions recorded in the cluster's KV."""
from __future__ import annotations

import hashlib
import json
import time
from typing import Iterator

from ..contract import SURGE_PREFIX, ReplicaConfig, ReplicaInfo, split_name
from ..errors import ApplyError, last_line
from ..models import Spec
from . import cluster, state
from .executor import Progress, StartFailed, _label
from ..nodes import NodeState
from .replicas import Builder
from .revisions import Revision


class RayCluster:
    def __init__(self, namespace: str, timeout: float):
        self.namespace, self.timeout = namespace, timeout
        self._refs: dict[str, object] = {}  # name -> its `_oob_ready` call
        self._builders: dict[str, Builder] = {}

    def start(self, builder: Builder, cfg: ReplicaConfig) -> None:
        builder.node_source = alive_nodes
        self._builders[cfg.name] = builder
        self._refs[cfg.name] = builder.start(cfg.actor, cfg.replica, cfg)._oob_ready.remote(self.timeout)

    def wait_ready(self, names: list[str], deadline: float) -> Iterator[tuple[str, ReplicaInfo]]:
        """In short steps, so Ctrl-C is seen at once."""
        import ray
        pending = {self._refs.pop(name): name for name in names}
        while pending:
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(0.25, max(0.0, left)))
            if not ready:
                if time.monotonic() >= deadline:
                    raise self._not_ready(sorted(pending.values()))
                continue
            name = pending.pop(ready[0])
            try:
                info: ReplicaInfo = ray.get(ready[0])
            except Exception as exc:
                raise StartFailed(name, f"{_label(name)} failed to start: {_cause(exc)}", self._log_tail(name)) from None
            yield name, info

    def stop(self, names: list[str], drain: float, hand_over: bool = False) -> None:
        if names:
            cluster.kill(names, self.namespace, timeout=drain + 5.0, drain=drain, hand_over=hand_over)

    def reclaim(self, name: str) -> None:
        import ray
        ray.get(cluster.handle(name, self.namespace)._oob_reclaim.remote(), timeout=5)

    def stand_ins(self) -> dict[tuple[str, int], ReplicaInfo | None]:
        names = sorted(n for n in cluster.named_actors(self.namespace) if n.startswith(SURGE_PREFIX))
        if not names:
            return {}
        return {split_name(n): info for n, info in cluster.infos(self.namespace, names).items()}

    def update(self, names: dict[str, tuple[int, dict[str, list[str]], dict[str, int]]]) -> list[str]:
        """A busy replica is not waited for long."""
        import ray
        refs = {}
        for name, (replicas, endpoints, peer_replicas) in names.items():
            try:
                refs[cluster.handle(name, self.namespace)._oob_update.remote(replicas, endpoints, peer_replicas)] = name
            except ValueError:  # gone meanwhile
                continue
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=5.0) if refs else ([], [])
        return [refs[r] for r in done if _answer(r)]

    def record(self, name: str, info: ReplicaInfo) -> None:
        cluster.put_meta(self.namespace, f"replica/{name}", info.record())

    # --- revisions ---

    def revisions(self) -> list[Revision]:
        index = cluster.get_meta(self.namespace, "revisions") or {"digests": []}
        found = (cluster.get_meta(self.namespace, f"revision/{d}") for d in index["digests"])
        return [Revision.from_dict(r) for r in found if r]

    def current(self) -> Revision | None:
        """The revision the last complete apply deployed."""
        pointer = cluster.get_meta(self.namespace, "current")
        found = cluster.get_meta(self.namespace, f"revision/{pointer['digest']}") if pointer else None
        return Revision.from_dict(found) if found else None

    # --- placement, links ---

    def place(self, spec: Spec, builder: Builder, detached: bool, progress: Progress) -> None:
        from ray.util.placement_group import get_placement_group, placement_group
        bundles = builder.bundles()
        digest = hashlib.sha256(json.dumps([spec.ray.placement, bundles], sort_keys=True).encode()).hexdigest()[:10]
        pg_name = f"_oob-{spec.name}-{digest}"
        try:
            placement = get_placement_group(pg_name)
        except ValueError:
            progress(f"placement group {spec.ray.placement} for {len(bundles)} replicas")
            placement = placement_group(bundles, strategy=spec.ray.placement, name=pg_name,
                                        lifetime="detached" if detached else None)
        if not placement.wait(timeout_seconds=60):
            raise ApplyError(f"placement group {spec.ray.placement} for {len(bundles)} replicas cannot be "
                             "placed on this cluster (not enough nodes or resources)")
        builder.placement = placement
        old = cluster.get_meta(self.namespace, "placement")
        if old and old["name"] != pg_name:
            cluster.remove_placement(old["name"])
        cluster.put_meta(self.namespace, "placement", {"name": pg_name})

    def wire(self, spec: Spec, info: dict[tuple[str, int], ReplicaInfo], progress: Progress) -> None:
        from .wiring import setup_links
        setup_links(spec, self.namespace, info, progress)

    # --- what a replica that is not ready is doing ---

    def _not_ready(self, names: list[str]) -> ApplyError:
        """Name every replica still pending and what it was doing, from Ray's own records."""
        records = state.actor_records(self.namespace)
        doing = []
        for name in names:
            record = records.get(name)
            if record is None or (record.state == "PENDING_CREATION" and not record.pid):
                what = f"waiting for resources ({self._builders[name].resources_text(split_name(name)[0])})"
            elif record.state == "PENDING_CREATION":
                what = f"still in __init__ (pid {record.pid})"
            elif record.state == "ALIVE":
                what = "servers not accepting connections yet"
            else:
                what = record.words
            doing.append(f"{_label(name, '')} {what}")
        return StartFailed(names[0], f"not ready after {self.timeout:g}s: " + "; ".join(doing),
                           self._log_tail(names[0]))

    def _log_tail(self, name: str, lines: int = 20) -> str:
        """The replica's last output, from its worker's log files (it may be stuck in __init__
        or dead), else asked of the replica itself."""
        import ray
        record = state.actor_records(self.namespace).get(name)
        if record and state.log_files(record):  # on this machine: all there is, if anything (a
            return state.tail(record, lines)  # replica stuck in __init__ would not answer for 5 s)
        try:
            chunks = ray.get(cluster.handle(name, self.namespace)._oob_read_logs.remote([0, 0]), timeout=5)
            text = "".join(t for _o, t in chunks)
        except Exception:  # the replica is gone: nothing to show
            text = ""
        return "\n".join(text.splitlines()[-lines:])


def alive_nodes() -> list[NodeState]:
    return [n for n in cluster.nodes() if n.alive]


def _answer(ref) -> bool:
    import ray
    try:
        return bool(ray.get(ref, timeout=0))
    except Exception:
        return False


def _cause(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    text = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
    return last_line(text, type(exc).__name__)


__all__ = ["RayCluster"]

"""`oob status NAME --watch`: the deployment's replicas, refreshed until Ctrl-C, with request
rates, latency quantiles, errors, link versions and push bandwidth.

Each replica keeps running totals of what it served (`ReplicaStats`, in its `_oob_info`); a
refresh asks every replica once, and the rates are the differences between a replica's last
two answers over its own clock. No Prometheus and no Ray metric call: what Prometheus would
show a minute later, read now.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from ..contract import PushCounts, Ref, ReplicaInfo, ReplicaStats, namespace_of
from ..models import Spec
from .cluster import session
from .commands import observe_status

GB = 1e9  # the unit of a push's `gbps`


def quantile(q: float, bounds: tuple[float, ...], counts: list[int] | tuple[int, ...]) -> float | None:
    """The q-quantile of observations counted per bucket (upper bounds `bounds`, one more for
    +Inf), interpolated inside its bucket as Prometheus' `histogram_quantile` does; in the +Inf
    bucket, the largest bound. None without observations."""
    total = sum(counts)
    if total == 0:
        return None
    rank, below = q * total, 0
    for i, n in enumerate(counts):
        if n and below + n >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - below) / n
        below += n
    return bounds[-1]


@dataclass(frozen=True)
class LinkRate:
    pushes: float  # per second
    gbps: float | None  # of the pushes between the snapshots; None: none


@dataclass(frozen=True)
class Rates:
    """One replica between two snapshots: per second, and latency quantiles in seconds."""

    requests: float
    client_errors: float
    server_errors: float
    p50: float | None  # None: no request between them
    p99: float | None
    links: dict[str, LinkRate] = field(default_factory=dict)


def rates(before: ReplicaStats, now: ReplicaStats) -> Rates | None:
    """None when the two do not follow each other (the replica restarted, or no time passed)."""
    seconds = now.at - before.at
    if seconds <= 0 or now.requests < before.requests or len(now.buckets) != len(before.buckets):
        return None
    counts = [b - a for a, b in zip(before.buckets, now.buckets)]
    links = {}
    for name, pushed in now.links.items():
        was = before.links[name] if name in before.links else PushCounts()
        moved, took = pushed.bytes - was.bytes, pushed.seconds - was.seconds
        links[name] = LinkRate((pushed.pushes - was.pushes) / seconds, moved / took / GB if took > 0 else None)
    return Rates(requests=(now.requests - before.requests) / seconds,
                 client_errors=(now.client_errors - before.client_errors) / seconds,
                 server_errors=(now.server_errors - before.server_errors) / seconds,
                 p50=quantile(0.5, now.bounds, counts), p99=quantile(0.99, now.bounds, counts), links=links)


def _link_cells(actor: str, info: ReplicaInfo, rate: Rates | None, spec: Spec | None) -> list[dict]:
    """The links a replica takes part in: as source (last version, GB/s), as target (the version it holds)."""
    out = []
    for name, stats in sorted(info.links.items()):
        last = stats["last_push"]
        moved = rate.links[name] if rate and name in rate.links else None
        gbps = moved.gbps if moved and moved.gbps is not None else (last["gbps"] if last else None)
        out.append({"link": name, "role": "source", "version": last["version"] if last else 0, "gbps": gbps,
                    "pushes_per_s": moved.pushes if moved else None})
    for link in sorted(spec.links if spec else [], key=lambda x: x.name):
        for target in map(Ref.parse, link.to):
            if target.actor == actor and target.member in info.versions:
                out.append({"link": link.name, "role": "target", "version": info.versions[target.member],
                            "gbps": None, "pushes_per_s": None})
    return out


def _row(row: dict, info: ReplicaInfo | None, rate: Rates | None, spec: Spec | None) -> dict:
    out = {key: row[key] for key in ("name", "actor", "replica", "state", "healthy", "restarts", "pid")}
    stats = info.stats if info else None
    out.update(requests=stats.requests if stats else None, metrics=stats is not None,
               req_per_s=rate.requests if rate else None, p50_ms=None, p99_ms=None,
               errors_4xx_per_s=rate.client_errors if rate else None,
               errors_5xx_per_s=rate.server_errors if rate else None,
               links=_link_cells(row["actor"], info, rate, spec) if info else [])
    if rate and rate.p50 is not None:
        out.update(p50_ms=rate.p50 * 1000, p99_ms=rate.p99 * 1000)
    return out


def watch(name: str, address: str | None, interval: float = 1.0) -> Iterator[dict]:
    """One view of the deployment every `interval` seconds, forever (the caller stops on Ctrl-C).
    The first view has no rates yet: they need two snapshots."""
    last: dict[str, tuple[int, ReplicaStats]] = {}  # replica -> (pid, its last stats)
    with session(name, address), _until_ctrl_c() as stop:
        while not stop.is_set():
            began = time.monotonic()
            seen = observe_status(name, timeout=max(2.0, interval))
            rows = []
            for row in seen.status["replicas"]:
                info = seen.infos[row["name"]] if row["name"] in seen.infos else None
                rate = None
                if info is not None and info.stats is not None:
                    before = last[row["name"]] if row["name"] in last else None
                    if before is not None and before[0] == info.pid:
                        rate = rates(before[1], info.stats)
                    last[row["name"]] = (info.pid, info.stats)
                rows.append(_row(row, info, rate, seen.spec))
            yield {"name": name, "namespace": namespace_of(name), "healthy": seen.status["healthy"],
                   "time": time.strftime("%H:%M:%S"), "interval": interval, "replicas": rows,
                   "metrics": seen.status["metrics"]}
            stop.wait(max(0.0, interval - (time.monotonic() - began)))


@contextmanager
def _until_ctrl_c() -> Iterator[threading.Event]:
    """Ctrl-C sets the event instead of raising wherever the watch is: a KeyboardInterrupt
    inside one of Ray's calls can leave its client unable to shut down. (Only the main thread
    can take signals: elsewhere, the caller stops the watch.)"""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, lambda *_args: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)

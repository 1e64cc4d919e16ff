"""Metrics through `ray.util.metrics`: Ray's Prometheus endpoint (each node's
`metrics_export_port`) and its Grafana dashboards show them, with no port of our own.

A request is counted in this process (a dict and a list, well under a microsecond) and the
counts reach Ray once a second: a Ray metric call costs ~20 us on a replica's event loop, a
third of a small request. So the histograms are Prometheus histogram series kept here and
shown to Ray as running totals (`<name>_bucket{le=...}`, `<name>_sum`, `<name>_count`):
`histogram_quantile()` reads them as it reads any histogram.

Outside a Ray worker (unit tests, a plain process), or with OOB_METRICS=0 in the actor's
environment, every recording is a no-op.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time

from ..contract import PushCounts, ReplicaStats

log = logging.getLogger("oobspec")

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
REQUEST_TAGS = ("deployment", "actor", "replica", "server", "route", "code")
REPLICA_TAGS = ("deployment", "actor", "replica")
LINK_TAGS = REPLICA_TAGS + ("link",)
FLUSH_SECONDS = 1.0
# gRPC codes that say the server failed (a 5xx's worth); any other code but OK is the client's.
GRPC_SERVER_ERRORS = frozenset({"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED",
                                "UNIMPLEMENTED", "RESOURCE_EXHAUSTED"})


def error_class(code: str) -> int:
    """4 for a client's error, 5 for the server's, 0 for an answer (HTTP status or gRPC code name)."""
    if code.isdigit():
        return int(code) // 100 if int(code) >= 400 else 0
    return 0 if code == "OK" else 5 if code in GRPC_SERVER_ERRORS else 4


class _Histogram:
    """Observations counted here per tag set; `flush` shows Ray the running totals.

    The series are Gauges holding cumulative counts: Ray's exporter appends `_total` to a
    Counter's name, and `<name>_bucket` / `_sum` / `_count` must keep those names for
    `histogram_quantile(0.99, rate(ray_<name>_bucket[1m]))` to read them."""

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]):
        from ray.util.metrics import Gauge
        self.buckets = Gauge(f"{name}_bucket", description, tag_keys=tag_keys + ("le",))
        self.sum = Gauge(f"{name}_sum", description, tag_keys=tag_keys)
        self.count = Gauge(f"{name}_count", description, tag_keys=tag_keys)
        self.totals: dict[tuple, list] = {}  # tag key -> [tags, per-bucket counts (+Inf last), sum]
        self.changed: set[tuple] = set()

    def observe(self, key: tuple, tags: dict, value: float) -> None:
        entry = self.totals.get(key)
        if entry is None:
            entry = self.totals[key] = [tags, [0] * (len(SECONDS) + 1), 0.0]
        entry[1][bisect.bisect_left(SECONDS, value)] += 1
        entry[2] += value
        self.changed.add(key)

    def flush(self) -> None:
        changed, self.changed = self.changed, set()
        for key in changed:
            tags, counts, total = self.totals[key]
            cumulative = 0
            for bound, n in zip((*SECONDS, "+Inf"), counts):
                cumulative += n
                self.buckets.set(cumulative, {**tags, "le": str(bound)})
            self.sum.set(total, tags)
            self.count.set(cumulative, tags)


class Metrics:
    """One replica's metrics; tag sets are built once per (server, route, code)."""

    def __init__(self, deployment: str, actor: str, replica: int):
        self.base = {"deployment": deployment, "actor": actor, "replica": str(replica)}
        self._tags: dict[tuple, dict[str, str]] = {}
        self._requests: dict[tuple, int] = {}
        self._pushed: dict[tuple, int] = {}
        self._pushed_total: dict[str, int] = {}  # link -> bytes since the start (`stats`)
        self._flusher: asyncio.TimerHandle | None = None
        self.enabled = False
        if os.environ.get("OOB_METRICS", "1").lower() in ("0", "off", "false", "no"):
            return  # switched off for this actor (its `env:`)
        try:
            import ray
            if not ray.is_initialized():
                return
            from ray.util.metrics import Counter
            self.requests = Counter("oob_requests_total", "Requests served by oob's servers.", tag_keys=REQUEST_TAGS)
            self.request_seconds = _Histogram("oob_request_seconds", "Time to answer a request, in seconds.",
                                              REQUEST_TAGS)
            self.push_seconds = _Histogram("oob_link_push_seconds", "Time of one push of a link, in seconds.",
                                           LINK_TAGS)
            self.push_bytes = Counter("oob_link_push_bytes_total", "Bytes pushed over a link, all targets.",
                                      tag_keys=LINK_TAGS)
            self.restarts = Counter("oob_replica_restarts_total", "Times Ray restarted a replica.",
                                    tag_keys=REPLICA_TAGS)
            self.enabled = True
        except Exception:  # metrics must never stop a replica from serving
            log.debug("metrics are off", exc_info=True)

    def _tagged(self, key: tuple, names: tuple[str, ...]) -> dict[str, str]:
        tags = self._tags.get(key)
        if tags is None:
            tags = self._tags[key] = {**self.base, **dict(zip(names, key))}
        return tags

    def request(self, server: str, route: str, code, seconds: float) -> None:
        if self.enabled:
            key = (server, route, str(code))
            self._requests[key] = self._requests.get(key, 0) + 1
            self.request_seconds.observe(key, self._tagged(key, ("server", "route", "code")), seconds)
            self._schedule()

    def push(self, link: str, seconds: float, nbytes: int) -> None:
        if self.enabled:
            key = (link,)
            self._pushed[key] = self._pushed.get(key, 0) + nbytes
            self._pushed_total[link] = self._pushed_total.get(link, 0) + nbytes
            self.push_seconds.observe(key, self._tagged(key, ("link",)), seconds)
            self._schedule()

    def stats(self) -> ReplicaStats | None:
        """The running totals, as `oob status --watch` reads them (None: metrics are off). A
        sum over the few (server, route, code) series this replica has seen."""
        if not self.enabled:
            return None
        series = self.request_seconds.totals
        buckets = [sum(column) for column in zip(*(counts for _tags, counts, _sum in series.values()))]
        buckets = buckets or [0] * (len(SECONDS) + 1)
        errors = {0: 0, 4: 0, 5: 0}
        for (_server, _route, code), (_tags, counts, _sum) in series.items():
            errors[error_class(code)] += sum(counts)
        links = {key[0]: PushCounts(sum(counts), self._pushed_total.get(key[0], 0), total)
                 for key, (_tags, counts, total) in self.push_seconds.totals.items()}
        return ReplicaStats(at=time.monotonic(), bounds=SECONDS, requests=sum(buckets), client_errors=errors[4],
                            server_errors=errors[5], buckets=tuple(buckets), links=links)

    def restarted(self) -> None:
        if self.enabled:
            self.restarts.inc(1, self.base)

    def _schedule(self) -> None:
        if self._flusher is None:
            try:
                self._flusher = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)
            except RuntimeError:  # no loop here: hand them over now
                self.flush()

    def flush(self) -> None:
        """Hand Ray what was counted since the last flush."""
        self._flusher = None
        if not self.enabled:
            return
        try:
            requests, self._requests = self._requests, {}
            for key, n in requests.items():
                self.requests.inc(n, self._tags[key])
            pushed, self._pushed = self._pushed, {}
            for key, n in pushed.items():
                self.push_bytes.inc(n, self._tags[key])
            self.request_seconds.flush()
            self.push_seconds.flush()
        except Exception:
            log.debug("metrics flush failed", exc_info=True)


_OFF = Metrics.__new__(Metrics)
_OFF.enabled = False


def off() -> Metrics:
    """A Metrics that records nothing (servers started outside a replica)."""
    return _OFF

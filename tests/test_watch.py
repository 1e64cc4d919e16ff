"""`oob status --watch`: live request rates, latency quantiles, errors and link versions, read
from the counters each replica keeps; and where Prometheus scrapes the metrics."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time

import pytest
import requests

from conftest import OOB, free_port, oob, status_of, user_env, write_in
from oobspec.contract import PushCounts, ReplicaStats
from oobspec.control.watch import quantile, rates
from oobspec.replica.metrics import error_class

BOUNDS = (0.001, 0.01, 0.1)


def test_quantiles_interpolate_inside_the_bucket_as_prometheus_does():
    assert quantile(0.5, BOUNDS, [0, 10, 0, 0]) == pytest.approx(0.0055)  # halfway through 1-10 ms
    assert quantile(0.99, BOUNDS, [98, 0, 2, 0]) == pytest.approx(0.055)
    assert quantile(0.5, BOUNDS, [0, 0, 0, 4]) == 0.1  # past the last bound: the last bound
    assert quantile(0.5, BOUNDS, [0, 0, 0, 0]) is None


def test_rates_are_differences_between_two_snapshots_over_the_replicas_clock():
    before = ReplicaStats(at=100.0, bounds=BOUNDS, requests=10, client_errors=1, server_errors=0,
                          buckets=(10, 0, 0, 0), links={"w": PushCounts(1, 4 * 10**9, 1.0)})
    now = ReplicaStats(at=102.0, bounds=BOUNDS, requests=30, client_errors=5, server_errors=2,
                       buckets=(10, 18, 2, 0), links={"w": PushCounts(3, 12 * 10**9, 3.0), "new": PushCounts(1, 10, 0.0)})
    got = rates(before, now)
    assert (got.requests, got.client_errors, got.server_errors) == (10.0, 2.0, 1.0)
    assert got.p50 == pytest.approx(0.001 + 0.009 * 10 / 18) and got.p99 == pytest.approx(0.01 + 0.09 * 1.8 / 2)
    assert got.links["w"].pushes == 1.0 and got.links["w"].gbps == pytest.approx(4.0)
    assert got.links["new"].gbps is None  # no push time to divide by
    restarted = ReplicaStats(at=103.0, bounds=BOUNDS, requests=1, buckets=(1, 0, 0, 0))
    assert rates(now, restarted) is None and rates(now, now) is None


def test_errors_are_the_clients_or_the_servers():
    assert [error_class(c) for c in ("200", "304", "404", "429", "500", "503")] == [0, 0, 4, 4, 5, 5]
    assert [error_class(c) for c in ("OK", "NOT_FOUND", "INVALID_ARGUMENT", "INTERNAL", "DEADLINE_EXCEEDED",
                                     "RESOURCE_EXHAUSTED")] == [0, 4, 4, 5, 5, 5]


def test_a_refresh_as_text():
    from oobspec.report import watch_text
    row = {"name": "web-0", "state": "alive", "metrics": True, "req_per_s": 1234.4, "p50_ms": 0.25, "p99_ms": 12.0,
           "errors_4xx_per_s": 0.0, "errors_5xx_per_s": 2.0, "requests": 9000, "links": []}
    source = dict(row, name="src-0", req_per_s=0.0, p50_ms=None, p99_ms=None, requests=0, links=[
        {"link": "w", "role": "source", "version": 7, "gbps": 3.456, "pushes_per_s": 2.0},
        {"link": "v", "role": "target", "version": 3, "gbps": None, "pushes_per_s": None}])
    off = dict(row, name="off-0", metrics=False, req_per_s=None, p50_ms=None, p99_ms=None, errors_4xx_per_s=None,
               errors_5xx_per_s=None, requests=None)
    dead = dict(off, name="dead-0", state="dead: its worker process died")
    text = watch_text({"name": "web", "healthy": False, "time": "12:00:00", "interval": 2.0,
                       "replicas": [row, source, off, dead], "metrics": [{"url": "http://10.0.0.1:8080/metrics"}]})
    assert text.splitlines() == [
        "deployment web: NOT healthy, 12:00:00 (every 2s, Ctrl-C to stop)",
        "REPLICA  STATE                          REQ/S  P50     P99      4XX/S  5XX/S  REQUESTS  LINKS",
        "web-0    alive                          1234   0.2 ms  12.0 ms  0.0    2.0    9000      -",
        "src-0    alive                          0.0    -       -        0.0    2.0    0         w v7 3.46 GB/s 2.0 push/s, v v3",
        "off-0    alive                          off    -       -        -      -      -         -",
        "dead-0   dead: its worker process died  -      -       -        -      -      -         -",
        "",
        "metrics: http://10.0.0.1:8080/metrics"]


def test_status_text_says_where_metrics_are_scraped():
    from oobspec.report import status_text
    status = {"name": "x", "namespace": "oob-x", "healthy": True, "replicas": [], "links": [], "last_apply": None,
              "metrics": [{"node_id": "a", "url": "http://10.0.0.1:8080/metrics"},
                          {"node_id": "b", "url": "http://10.0.0.2:8080/metrics"}]}
    assert status_text(status).splitlines()[-3:] == [
        "", "metrics: http://10.0.0.1:8080/metrics", "metrics: http://10.0.0.2:8080/metrics"]


SPEC = """
version: 1
name: watched
actors:
  web:
    class: apps:Echo
    drain: 0
    servers:
      - name: http
        port: {port}
        routes: [{{path: "/hello", call: hello}}, {{path: "/boom", call: boom}}]
  src:
    class: apps:Source
    buffers: {{data: {{shape: [512, 256], dtype: float32}}}}
  dst:
    class: apps:Sink
    buffers: {{data: {{shape: [512, 256], dtype: float32}}}}
links:
  - {{name: data, from: src.data, to: [dst.data]}}
"""


def frames(stream, count: int, deadline: float) -> list[dict[str, list[str]]]:
    """`count` refreshes of the watch's text through a pipe: {replica: its cells} each."""
    out, current = [], None
    while len(out) < count and time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        if line.startswith("deployment watched:"):
            current = {}
        elif current is not None and line.startswith(("web-", "src-", "dst-")):
            current[line.split()[0]] = re.split(r"\s{2,}", line.strip())
        elif current is not None and not line.strip():
            out.append(current)
            current = None
    return out


def load(url: str, stop: threading.Event) -> None:
    with requests.Session() as session:
        while not stop.is_set():
            session.get(f"{url}/hello", params={"name": "x"}, timeout=10)
            session.get(f"{url}/boom", timeout=10)  # a 500 every other request


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_watch_shows_live_rates_latency_errors_and_links_through_a_pipe(ray_head, project, deployed):
    port = free_port()
    deployed(write_in(project, SPEC.format(port=port)), ray_head)
    assert oob("sync", "watched", "data", "--address", ray_head).returncode == 0

    shown = oob("status", "watched", "--address", ray_head)
    urls = re.findall(r"^metrics: http://([\d.]+):(\d+)/metrics$", shown.stdout, re.M)
    assert len(urls) == 1, shown.stdout  # one node, at its address
    host, metrics_port = urls[0]
    assert status_of(ray_head, "watched")["metrics"][0]["url"] == f"http://{host}:{metrics_port}/metrics"
    # Ray's Prometheus endpoint answers there (on every interface: 127.0.0.1 too)
    assert requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).status_code == 200

    stop = threading.Event()
    client = threading.Thread(target=load, args=(f"http://127.0.0.1:{port}", stop), daemon=True)
    client.start()
    watch = subprocess.Popen([OOB, "status", "watched", "--watch", "--address", ray_head], cwd="/",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=user_env())
    try:
        seen = frames(watch.stdout, 4, time.monotonic() + 90)
        assert len(seen) == 4, seen
        first, later = seen[0], seen[2:]
        assert first["web-0"][2] == "-"  # rates need two snapshots
        for frame in later:
            name, state, req_s, p50, p99, e4, e5, total, links = frame["web-0"]
            assert (name, state, e4, links) == ("web-0", "alive", "0.0", "-")
            assert float(req_s) > 0 and float(e5) > 0 and int(total) > 0
            assert re.fullmatch(r"\d+(\.\d)? ms", p50) and re.fullmatch(r"\d+(\.\d)? ms", p99)
            assert float(p50.split()[0]) <= float(p99.split()[0])
            assert re.fullmatch(r"data v1 \d+\.\d\d GB/s", frame["src-0"][-1]), frame["src-0"]
            assert frame["dst-0"][-1] == "data v1" and frame["dst-0"][2] == "0.0"
    finally:
        stop.set()
        client.join(timeout=15)
        watch.send_signal(signal.SIGINT)
        try:
            code = watch.wait(timeout=30)
        except subprocess.TimeoutExpired:
            watch.kill()
            raise
    assert code == 0, watch.stderr.read()

    # `-o json`: one object a line, the numbers as numbers (for scripts)
    watch = subprocess.Popen([OOB, "status", "watched", "--watch", "-o", "json", "--interval", "0.5",
                              "--address", ray_head], cwd="/", stdout=subprocess.PIPE, text=True, env=user_env())
    try:
        views = [json.loads(watch.stdout.readline()) for _ in range(2)]
    finally:
        watch.send_signal(signal.SIGINT)
        code = watch.wait(timeout=30)
    assert code == 0 and views[1]["interval"] == 0.5 and views[1]["metrics"] == status_of(ray_head, "watched")["metrics"]
    rows = {r["name"]: r for r in views[1]["replicas"]}
    assert rows["web-0"]["req_per_s"] == 0.0 and rows["web-0"]["requests"] > 0  # the client has stopped
    assert rows["dst-0"]["links"] == [{"link": "data", "role": "target", "version": 1, "gbps": None,
                                       "pushes_per_s": None}]

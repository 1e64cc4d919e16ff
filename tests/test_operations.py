"""Operations as an operator sees them, on a `ray start --head` cluster of this module's own:
TLS from files beside the spec, graceful drain on `oob delete`, and metrics on Ray's own
Prometheus endpoint (no port of ours)."""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import time

import pytest
import requests

from conftest import free_port, oob, started_head, user_env, write_in
from oobspec.replica.ports import port_free
from conftest import self_signed

pytestmark = [pytest.mark.timeout(240), pytest.mark.ray]


@pytest.fixture(scope="module")
def head():
    """A head that exports metrics every second (Ray's default is every 10 s) on a known port."""
    port, metrics = free_port(), free_port()
    with started_head(f"--port={port}", "--include-dashboard=false", f"--metrics-export-port={metrics}",
                      env=user_env(RAY_metrics_report_interval_ms="1000"), ports=(port,)):
        yield f"127.0.0.1:{port}", metrics


SPEC = """
version: 1
name: {name}
actors:
  svc:
    class: apps:Chatty
    restarts: -1
    drain: 10
    servers:
      - name: http
        port: {port}
        routes: [{{path: /get, call: get}}, {{path: /nap, call: nap}}]
        {tls}
"""


def test_https_from_certificate_files_beside_the_spec(head, project):
    address, _metrics = head
    certs = project / "certs"
    certs.mkdir()
    cert, _key = self_signed(certs)
    port = free_port()
    spec = write_in(project, SPEC.format(name="tls", port=port, tls="tls: {cert: certs/srv.pem, key: certs/srv.key}"))
    applied = oob("apply", spec, "--address", address)  # from `/`: the paths are the spec's folder's
    assert applied.returncode == 0, applied.stderr
    try:
        assert f"https://127.0.0.1:{port}" in applied.stdout
        assert requests.get(f"https://127.0.0.1:{port}/get", verify=str(cert), timeout=10).text == "hi"
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://127.0.0.1:{port}/get", timeout=10)  # no CA: not trusted
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/get", timeout=10)
    finally:
        oob("delete", "tls", "--address", address)


def test_delete_lets_requests_in_flight_finish_and_refuses_new_ones(head, project):
    address, _metrics = head
    port = free_port()
    spec = write_in(project, SPEC.format(name="drain", port=port, tls=""))
    assert oob("apply", spec, "--address", address).returncode == 0
    url = f"http://127.0.0.1:{port}"

    def call(path: str):
        try:
            return requests.get(url + path, timeout=30).status_code
        except requests.ConnectionError:
            return "refused"

    with concurrent.futures.ThreadPoolExecutor(21) as pool:
        inflight = [pool.submit(call, "/nap?seconds=2") for _ in range(20)]
        time.sleep(0.5)  # all 20 are in the replica now
        deleting = pool.submit(oob, "delete", "drain", "--address", address)
        deadline = time.time() + 30
        while call("/-/healthz") == 200 and time.time() < deadline:  # until the drain has begun
            time.sleep(0.05)
        late = call("/get")
        assert [f.result() for f in inflight] == [200] * 20
        assert deleting.result().returncode == 0
    assert late in ("refused", 503)
    assert port_free(port)  # nothing left holding it


def test_request_metrics_reach_rays_prometheus_endpoint(head, project):
    address, metrics_port = head
    port = free_port()
    spec = write_in(project, SPEC.format(name="metered", port=port, tls=""))
    assert oob("apply", spec, "--address", address).returncode == 0
    try:
        for _ in range(7):
            assert requests.get(f"http://127.0.0.1:{port}/get", timeout=10).status_code == 200
        assert requests.get(f"http://127.0.0.1:{port}/nope", timeout=10).status_code == 404  # no route: not counted
        pattern = re.compile(r'^ray_oob_requests_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$', re.M)
        deadline, found = time.time() + 60, {}
        while time.time() < deadline:
            text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            found = {m["labels"]: float(m["value"]) for m in pattern.finditer(text) if 'deployment="metered"' in m["labels"]}
            if sum(found.values()) >= 7:
                break
            time.sleep(1)
        (labels, value), = found.items()
        assert value == 7
        for pair in ('actor="svc"', 'replica="0"', 'server="http"', 'route="/get"', 'code="200"'):
            assert pair in labels
        for series in ("ray_oob_request_seconds_bucket{", "ray_oob_request_seconds_sum{",
                       "ray_oob_request_seconds_count{"):  # Prometheus histogram names, as Grafana reads them
            assert series in text, series
        assert 'le="+Inf"' in text
    finally:
        oob("delete", "metered", "--address", address)


def scrape(port: int, metric: str, deployment: str, want: float, timeout: float = 60) -> dict[str, float]:
    """`metric`'s series of one deployment on Ray's endpoint, once their sum reaches `want`."""
    pattern = re.compile(rf'^{metric}\{{(?P<labels>[^}}]*)\}} (?P<value>[0-9.e+]+)$', re.M)
    deadline, found = time.time() + timeout, {}
    while time.time() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = {m["labels"]: float(m["value"]) for m in pattern.finditer(text)
                 if f'deployment="{deployment}"' in m["labels"]}
        if sum(found.values()) >= want:
            break
        time.sleep(1)
    return found


def test_link_push_and_restart_metrics(head, project):
    address, metrics_port = head
    spec = write_in(project, """
        version: 1
        name: pushed
        actors:
          src:
            class: apps:Source
            restarts: -1
            buffers: {data: {shape: [256], dtype: float32}}
          dst:
            class: apps:Sink
            buffers: {data: {shape: [256], dtype: float32}}
        links:
          - {name: data, from: src.data, to: [dst.data]}
    """)
    assert oob("apply", spec, "--address", address).returncode == 0
    try:
        for _ in range(3):
            assert oob("sync", "pushed", "data", "--address", address).returncode == 0
        pushed = scrape(metrics_port, "ray_oob_link_push_bytes_total", "pushed", 3 * 256 * 4)
        assert sum(pushed.values()) == 3 * 256 * 4 and all('link="data"' in k for k in pushed)
        assert sum(scrape(metrics_port, "ray_oob_link_push_seconds_count", "pushed", 3).values()) == 3
        pid = next(r["pid"] for r in json.loads(oob("status", "pushed", "--address", address, "-o", "json").stdout)
                   ["replicas"] if r["name"] == "src-0")
        os.kill(pid, signal.SIGKILL)  # Ray restarts it (restarts: -1)
        restarts = scrape(metrics_port, "ray_oob_replica_restarts_total", "pushed", 1, timeout=90)
        assert list(restarts.values()) == [1.0] and 'actor="src"' in next(iter(restarts))
    finally:
        oob("delete", "pushed", "--address", address)

"""Updates never take a service down, as a user sees it: `oob apply` of a changed spec on a
`ray start --head` cluster while a client in another process (which cannot import the user's
module) keeps calling the replicas' fixed ports over HTTP (a new connection each request) and
gRPC health. A failed update leaves the running replicas serving, untouched."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import free_port, oob, user_env, write_in
from oobspec.runtime.ports import port_free
from test_anywhere import alive_pids, status_of

pytestmark = [pytest.mark.timeout(300), pytest.mark.ray]

SPEC = """
version: 1
name: {name}
actors:
  chat:
    class: apps:Chatty
    replicas: 2
    restarts: -1
    drain: 5
    kwargs: {{greeting: {greeting}, fail: {fail}}}
    servers:
      - {{name: http, port: {http}, routes: [{{path: /, call: get}}]}}
      - {{name: rpc, protocol: grpc, port: {rpc}, service: demo.Chat, methods: [get]}}
"""

# Runs with no access to the user's module: requests and grpc only, ~50 HTTP requests a second
# (each on a new connection, spread over both replicas) and gRPC health checks on both ports.
CLIENT = r'''
import json, os, sys, time
import grpc, requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
http, rpc, stop, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
channels = [grpc.insecure_channel(f"127.0.0.1:{rpc + i}") for i in range(2)]
stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
seen = {"http": [], "grpc": []}
n = 0
while not os.path.exists(stop):
    i = n % 2
    try:
        r = requests.get(f"http://127.0.0.1:{http + i}/", timeout=10, headers={"Connection": "close"})
        seen["http"].append([i, r.status_code, r.text])
    except requests.RequestException as exc:
        seen["http"].append([i, 0, type(exc).__name__])
    try:
        reply = stubs[i].Check(health_pb2.HealthCheckRequest(service="demo.Chat"), timeout=10)
        seen["grpc"].append([i, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)])
    except grpc.RpcError as exc:
        seen["grpc"].append([i, exc.code().name])
    n += 1
    time.sleep(0.02)
with open(out, "w") as f:
    json.dump(seen, f)
'''


@contextmanager
def client_loop(tmp_path: Path, http: int, rpc: int):
    """Yields a dict that holds, once the block ends, every answer the client saw."""
    script, stop, out = tmp_path / "client.py", tmp_path / "stop", tmp_path / "seen.json"
    script.write_text(CLIENT)
    proc = subprocess.Popen([sys.executable, str(script), str(http), str(rpc), str(stop), str(out)],
                            cwd="/", env=user_env())
    seen: dict = {}
    try:
        time.sleep(2)  # it is calling by now
        yield seen
    finally:
        stop.touch()
        proc.wait(timeout=60)
    seen.update(json.loads(out.read_text()))


def ports() -> tuple[int, int]:
    """Two runs of two free ports each: replica i binds port + i."""
    found = []
    while len(found) < 2:
        port = free_port()
        if port < 65000 and all(port_free(p) for p in (port, port + 1)) and all(abs(port - f) > 1 for f in found):
            found.append(port)
    return found[0], found[1]


def surge_actors(address: str, namespace: str) -> list[str]:
    """oob's stand-ins left in the namespace (there should be none once apply returns)."""
    code = ("import ray, json\nfrom oobspec.runtime.cluster import connect\n"
            f"connect({address!r}, {namespace!r})\n"
            "print(json.dumps([a['name'] for a in ray.util.list_named_actors(all_namespaces=True) "
            f"if a['namespace'] == {namespace!r} and a['name'].startswith('_oob-surge')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=user_env(),
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_rolling_update_answers_every_request_and_replaces_every_replica(ray_head, project, tmp_path):
    http, rpc = ports()
    spec = lambda greeting: write_in(project, SPEC.format(name="roll", greeting=greeting, fail="false",  # noqa: E731
                                                          http=http, rpc=rpc))
    first = oob("apply", spec("v1"), "--address", ray_head)
    assert first.returncode == 0, first.stderr
    try:
        before = alive_pids(ray_head, "roll")
        plan = oob("plan", spec("v2"), "--address", ray_head).stdout
        assert "~ replace  chat [0,1]  (spec changed; rolling, no downtime)" in plan, plan
        assert "steps: roll chat[0] -> roll chat[1]" in plan, plan
        with client_loop(tmp_path, http, rpc) as seen:
            update = oob("apply", spec("v2"), "--address", ray_head)
            time.sleep(1)
        assert update.returncode == 0, update.stderr
        assert "roll chat-0: stand-in _oob-surge-chat-0 starts beside it" in update.stderr + update.stdout
        # Every request answered, by the old version and then by the new one, on both ports.
        assert len(seen["http"]) > 100
        assert [r for r in seen["http"] if r[1] != 200] == []
        for i in range(2):
            texts = [t for j, _s, t in seen["http"] if j == i]
            assert texts[0] == "v1" and texts[-1] == "v2"
        assert set(s for _i, s in seen["grpc"]) == {"SERVING"}, [s for s in seen["grpc"] if s[1] != "SERVING"]
        after = alive_pids(ray_head, "roll")
        assert set(after) == {"chat-0", "chat-1"} and not set(after.values()) & set(before.values())
        assert status_of(ray_head, "roll")["healthy"] is True
        assert surge_actors(ray_head, "oob-roll") == []
    finally:
        oob("delete", "roll", "--address", ray_head)


def test_a_failed_update_leaves_the_running_replicas_serving(ray_head, project, tmp_path):
    http, rpc = ports()
    spec = lambda fail: write_in(project, SPEC.format(name="failed", greeting="v1", fail=fail,  # noqa: E731
                                                      http=http, rpc=rpc))
    assert oob("apply", spec("false"), "--address", ray_head).returncode == 0
    try:
        before = alive_pids(ray_head, "failed")
        with client_loop(tmp_path, http, rpc) as seen:
            update = oob("apply", spec("true"), "--address", ray_head)
        assert update.returncode == 1, update.stdout + update.stderr
        assert "ValueError: cannot greet with 'v1'" in update.stderr  # the reason, from the log tail
        assert "rolled back: chat-0 keeps serving, unchanged" in update.stderr
        assert "Traceback" not in update.stderr.split("--- last lines")[0]
        assert [r for r in seen["http"] if r[1] != 200] == [] and len(seen["http"]) > 20
        assert alive_pids(ray_head, "failed") == before
        status = status_of(ray_head, "failed")
        assert status["healthy"] is True and [r["restarts"] for r in status["replicas"]] == [0, 0]
        assert surge_actors(ray_head, "oob-failed") == []
        # The update never happened: the plan still wants it.
        assert "~ replace  chat [0,1]" in oob("plan", spec("true"), "--address", ray_head).stdout
    finally:
        oob("delete", "failed", "--address", ray_head)


def test_moving_to_a_taken_port_fails_and_keeps_the_old_port_serving(ray_head, project):
    http, rpc = ports()
    taken, _ = ports()
    write = lambda port: write_in(project, SPEC.format(name="taken", greeting="v1", fail="false",  # noqa: E731
                                                       http=port, rpc=rpc))
    assert oob("apply", write(http), "--address", ray_head).returncode == 0
    try:
        before = alive_pids(ray_head, "taken")
        with socket.create_server(("127.0.0.1", taken)):  # somebody else's server holds the new port
            update = oob("apply", write(taken), "--address", ray_head)
        assert update.returncode == 1
        assert f"cannot bind 127.0.0.1:{taken}" in update.stderr, update.stderr
        assert alive_pids(ray_head, "taken") == before
        import requests
        assert requests.get(f"http://127.0.0.1:{http}/", timeout=10).text == "v1"
        assert status_of(ray_head, "taken")["healthy"] is True
    finally:
        oob("delete", "taken", "--address", ray_head)

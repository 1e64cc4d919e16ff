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

from conftest import OOB, alive_pids, free_port, oob, status_of, user_env, write_in
from oobspec.replica.ports import port_free

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
        if all(abs(port - f) > 1 for f in found):  # free_port: port and port + 1 are free
            found.append(port)
    return found[0], found[1]


def surge_actors(address: str, namespace: str) -> list[str]:
    """oob's stand-ins left in the namespace (there should be none once apply returns)."""
    code = ("import ray, json\nfrom oobspec.control.cluster import connect\n"
            f"connect({address!r}, {namespace!r})\n"
            "print(json.dumps([a['name'] for a in ray.util.list_named_actors(all_namespaces=True) "
            f"if a['namespace'] == {namespace!r} and a['name'].startswith('_oob-surge')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=user_env(),
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_rolling_update_answers_every_request_and_replaces_every_replica(deployed, ray_head, project, tmp_path):
    http, rpc = ports()
    spec = lambda greeting: write_in(project, SPEC.format(name="roll", greeting=greeting, fail="false",  # noqa: E731
                                                          http=http, rpc=rpc))
    deployed(spec("v1"), ray_head)
    before = alive_pids(ray_head, "roll")
    plan = oob("plan", spec("v2"), "--address", ray_head).stdout
    assert "~ replace  chat [0,1]  (spec changed; rolling, no downtime)" in plan, plan
    assert "steps: 1. roll chat[0] -> 2. roll chat[1]" in plan, plan
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


def test_a_failed_update_leaves_the_running_replicas_serving(deployed, ray_head, project, tmp_path):
    http, rpc = ports()
    spec = lambda fail: write_in(project, SPEC.format(name="failed", greeting="v1", fail=fail,  # noqa: E731
                                                      http=http, rpc=rpc))
    deployed(spec("false"), ray_head)
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


def test_moving_to_a_taken_port_fails_and_keeps_the_old_port_serving(deployed, ray_head, project):
    http, rpc = ports()
    taken, _ = ports()
    write = lambda port: write_in(project, SPEC.format(name="taken", greeting="v1", fail="false",  # noqa: E731
                                                       http=port, rpc=rpc))
    deployed(write(http), ray_head)
    before = alive_pids(ray_head, "taken")
    with socket.create_server(("127.0.0.1", taken)):  # somebody else's server holds the new port
        update = oob("apply", write(taken), "--address", ray_head)
    assert update.returncode == 1
    assert f"cannot bind 127.0.0.1:{taken}" in update.stderr, update.stderr
    assert alive_pids(ray_head, "taken") == before
    import requests
    assert requests.get(f"http://127.0.0.1:{http}/", timeout=10).text == "v1"
    assert status_of(ray_head, "taken")["healthy"] is True


# --- whatever fails in the middle of an apply, what ran keeps running ----------------------

PARTS = """
version: 1
name: {name}
actors:
  batch:
    class: apps:Chatty
    kwargs: {{greeting: {batch}}}
  part:
    class: apps:Chatty
    replicas: 2
    drain: 2
    kwargs: {{greeting: {greeting}, fail_replica: {fail_replica}, broken: "{broken}", once: "{once}"}}
    servers:
      - {{name: http, port: {http}, routes: [{{path: /, call: get}}]}}
"""

# HTTP only, a new connection per request; each replica's ports are tried in order (a port move
# serves the old port, then the new one): a request fails only when none of them answers.
HTTP_CLIENT = r'''
import json, os, sys, time
import requests
groups, stop, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
seen, n = [], 0
while not os.path.exists(stop):
    i = n % len(groups)
    answer = [i, 0, "no port answered"]
    for port in groups[i]:
        try:
            r = requests.get(f"http://127.0.0.1:{port}/", timeout=10, headers={"Connection": "close"})
            answer = [i, r.status_code, r.text]
            break
        except requests.ConnectionError:
            continue
        except requests.RequestException as exc:
            answer = [i, 0, type(exc).__name__]
            break
    seen.append(answer)
    n += 1
    time.sleep(0.02)
with open(out, "w") as f:
    json.dump(seen, f)
'''


@contextmanager
def http_loop(tmp_path: Path, groups: list[list[int]]):
    """Yields a list that holds, once the block ends, every answer the client saw."""
    script, stop, out = tmp_path / "http_client.py", tmp_path / "http_stop", tmp_path / "http_seen.json"
    script.write_text(HTTP_CLIENT)
    stop.unlink(missing_ok=True)  # a second loop in the same test
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(groups), str(stop), str(out)], cwd="/",
                            env=user_env())
    seen: list = []
    try:
        time.sleep(2)
        yield seen
    finally:
        stop.touch()
        proc.wait(timeout=60)
    seen.extend(json.loads(out.read_text()))


def parts(project, name, http, greeting="v1", batch="b1", fail_replica=-1, broken="", once=""):
    return write_in(project, PARTS.format(name=name, greeting=greeting, batch=batch, fail_replica=fail_replica,
                                          broken=broken, once=once, http=http))


def assert_served_throughout(address: str, name: str, seen: list) -> None:
    """No request of the client loop failed; the deployment is healthy; no stand-in is left."""
    assert [r for r in seen if r[1] != 200] == [] and len(seen) > 20, [r for r in seen if r[1] != 200][:5]
    assert status_of(address, name)["healthy"] is True
    assert surge_actors(address, f"oob-{name}") == []


def texts(port: int) -> list[str]:
    import requests
    return [requests.get(f"http://127.0.0.1:{port + i}/", timeout=10).text for i in range(2)]


def test_a_rollout_whose_second_replica_fails_keeps_every_replica_serving(deployed, ray_head, project, tmp_path):
    """A stop-first actor moved, part-0 rolled, part-1's new version raises: nothing stops, the
    message says who runs what, the next apply continues from there, --atomic goes back."""
    http, _ = ports()
    deployed(parts(project, "midway", http), ray_head)
    before = alive_pids(ray_head, "midway")
    broken = tmp_path / "broken"  # part-1 fails while this file exists
    broken.touch()
    v2 = parts(project, "midway", http, "v2", "b2", fail_replica=1, broken=broken)
    with http_loop(tmp_path, [[http], [http + 1]]) as seen:
        update = oob("apply", v2, "--address", ray_head)
    assert update.returncode == 1, update.stdout + update.stderr
    assert "ValueError: cannot greet with 'v2'" in update.stderr
    assert ("at the new version: batch-0, part-0; at the version they ran before: part-1; fix and apply "
            "again to continue from here") in update.stderr, update.stderr
    assert_served_throughout(ray_head, "midway", seen)
    assert texts(http) == ["v2", "v1"]
    after = alive_pids(ray_head, "midway")
    assert set(after) == {"batch-0", "part-0", "part-1"} and after["part-1"] == before["part-1"]
    shown = oob("status", "midway", "--address", ray_head).stdout
    assert "last apply stopped at step" in shown and "new version: batch-0, part-0; previous version: part-1" \
        in shown, shown

    # Fixed: the same spec again replaces only part-1 (part-0 and batch-0 are new already).
    broken.unlink()
    fixed = oob("apply", v2, "--address", ray_head)
    assert fixed.returncode == 0, fixed.stderr
    now = alive_pids(ray_head, "midway")
    assert now["part-0"] == after["part-0"] and now["batch-0"] == after["batch-0"]
    assert now["part-1"] != after["part-1"] and texts(http) == ["v2", "v2"]

    # --atomic: part-0 rolls to v3, part-1 fails, and both are rolled back to v2.
    broken.touch()
    with http_loop(tmp_path, [[http], [http + 1]]) as seen:
        atomic = oob("apply", parts(project, "midway", http, "v3", "b2", fail_replica=1, broken=broken),
                     "--atomic", "--address", ray_head)
    assert atomic.returncode == 1
    assert "--atomic: rolled back, every actor runs revision" in atomic.stderr, atomic.stderr
    assert "continue from here" not in atomic.stderr.splitlines()[-1]  # nothing is left half-way
    assert_served_throughout(ray_head, "midway", seen)
    assert texts(http) == ["v2", "v2"]


def test_a_successor_failing_after_its_stand_in_took_over_restores_the_old_version(deployed, ray_head, project, tmp_path):
    http, _ = ports()
    deployed(parts(project, "relay", http), ray_head)
    before = alive_pids(ray_head, "relay")
    once = tmp_path / "started-once"
    with http_loop(tmp_path, [[http], [http + 1]]) as seen:
        update = oob("apply", parts(project, "relay", http, "v2", once=once), "--address", ray_head)
    assert update.returncode == 1, update.stdout + update.stderr
    assert "RuntimeError: 'v2' already started once" in update.stderr
    assert "restored part-0 at the version it ran before" in update.stderr
    assert "at the version they ran before: part-0, part-1" in update.stderr, update.stderr
    assert_served_throughout(ray_head, "relay", seen)
    assert texts(http) == ["v1", "v1"]
    after = alive_pids(ray_head, "relay")
    assert set(after) == {"batch-0", "part-0", "part-1"} and after["part-1"] == before["part-1"]


def test_a_port_move_rolls_and_serves_the_old_port_until_the_new_one_does(deployed, ray_head, project, tmp_path):
    http, moved = ports()
    deployed(parts(project, "moving", http), ray_head)
    with http_loop(tmp_path, [[http, moved], [http + 1, moved + 1]]) as seen:
        update = oob("apply", parts(project, "moving", moved), "--address", ray_head)
    assert update.returncode == 0, update.stdout + update.stderr
    assert_served_throughout(ray_head, "moving", seen)
    assert texts(moved) == ["v1", "v1"] and port_free(http) and port_free(http + 1)
    again = oob("apply", parts(project, "moving", moved), "--address", ray_head)
    assert again.returncode == 0 and "replace" not in again.stderr, again.stderr


def test_ctrl_c_of_an_apply_on_a_cluster_removes_what_it_started_and_leaves_what_ran(deployed, ray_head, project,
                                                                                   tmp_path):
    """`oob apply --address` interrupted while a new actor is still in __init__: exit 130, the new
    replica is gone, the running ones were never touched and kept answering."""
    import signal
    http, _ = ports()
    spec = parts(project, "cut", http)
    deployed(spec, ray_head)
    before = alive_pids(ray_head, "cut")
    grown = write_in(project, spec.read_text() + "  slow:\n    class: apps:Slow\n    kwargs: {seconds: 120}\n",
                     "grown.yaml")
    with http_loop(tmp_path, [[http], [http + 1]]) as seen:
        proc = subprocess.Popen([OOB, "apply", str(grown), "--address", ray_head], stderr=subprocess.PIPE, text=True,
                                cwd="/", env=user_env())
        try:
            lines = []
            while not any("start slow[0]" in line for line in lines):
                line = proc.stderr.readline()
                assert line, "".join(lines)
                lines.append(line)
            time.sleep(3)  # slow-0 is inside its __init__ by now
            proc.send_signal(signal.SIGINT)
            err = "".join(lines) + proc.communicate(timeout=30)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, err
    assert "removed what this apply started: slow-0" in err and "Traceback" not in err, err
    assert_served_throughout(ray_head, "cut", seen)
    assert alive_pids(ray_head, "cut") == before
    assert "slow-0" not in [r["name"] for r in status_of(ray_head, "cut")["replicas"]]  # dead, not pending


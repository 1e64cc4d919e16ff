"""The runtime as users run it: their spec and module in their own folder, `oob` started from
another folder (the parent, `/`), clients in processes that cannot import the user's module,
on a `ray start --head` cluster (token auth on) that this module starts and stops itself.
Nothing here gets help from PYTHONPATH."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from conftest import alive_pids, free_port, oob, port_open, status_of, user_env, write_in

pytestmark = [pytest.mark.timeout(240), pytest.mark.ray]

KV_MODULE = '''
import os


class Store:
    def __init__(self, prefix: str = ""):
        self.prefix, self.data = prefix, {}
        print(f"store starting in {os.getcwd()}")

    def put(self, key: str, value: float = 1.0, *, scale: float = 1.0) -> float:
        self.data[key] = value * scale
        print(f"put {key}={value * scale}")
        return self.data[key]

    async def get(self, key: str):
        return self.data.get(key)
'''

KV_SPEC = """
version: 1
name: {name}
actors:
  store:
    class: kvapp:Store
    restarts: {restarts}
    replicas: {replicas}
    servers: [{{name: http, port: {port}, routes: [{{path: "/get/{{key}}", call: get}}]}}]
"""


def kv_project(tmp_path, name, port=0, restarts=-1, replicas=1):
    folder = tmp_path / "work" / "kv"
    folder.mkdir(parents=True)
    (folder / "kvapp.py").write_text(KV_MODULE)
    return write_in(folder, KV_SPEC.format(name=name, port=port, restarts=restarts, replicas=replicas), "kv.yaml")


def client(address, namespace, code, cwd="/"):
    """Python in a process that cannot import the user's module (cwd `/`, no PYTHONPATH)."""
    script = ("import json, ray\nfrom oobspec.control.cluster import connect\n"
              f"connect({address!r}, {namespace!r})\n" + code)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=cwd,
                         env=user_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("where", ["parent", "root"])
def test_apply_from_another_folder_then_use_it_from_anywhere(ray_head, tmp_path, where):
    name = f"kv-{where}"
    spec = kv_project(tmp_path, name, port=free_port())
    cwd = tmp_path / "work" if where == "parent" else "/"
    target = "kv/kv.yaml" if where == "parent" else spec
    applied = oob("apply", target, "--address", ray_head, cwd=cwd)
    assert applied.returncode == 0, applied.stderr
    assert "Traceback" not in applied.stderr
    url = applied.stdout.split("http://", 1)[1].split()[0]

    # A handle in another process: the user's methods with positional and keyword arguments.
    got = client(ray_head, f"oob-{name}", """
h = ray.get_actor("store-0")
print(json.dumps([ray.get(h.put.remote("a", 2.0)), ray.get(h.put.remote("b", 3.0, scale=2.0)),
                  ray.get(h.get.remote(key="b")),
                  ray.get(h.__ray_call__.remote(lambda _: "oobspec.models" in __import__("sys").modules))]))
""")
    # The last: the replica never imported the spec's models (its config is plain types; the spec's
    # models stay with `oob apply`): a tenth of a second of CPU per replica.
    assert json.loads(got.strip().splitlines()[-1]) == [2.0, 6.0, 6.0, False]
    assert requests.get(f"http://{url}/get/a", timeout=5).json() == 2.0

    status = oob("status", name, "--address", ray_head, "-o", "json")
    assert status.returncode == 0, status.stderr
    assert [(r["name"], r["state"], r["healthy"]) for r in json.loads(status.stdout)["replicas"]] == \
        [("store-0", "alive", True)]
    logs = oob("logs", name, "--address", ray_head)
    assert logs.returncode == 0, logs.stderr
    assert "store starting in" in logs.stdout and "put b=6.0" in logs.stdout  # print() without flush
    listed = oob("list", "--address", ray_head, "-o", "json")
    assert name in [d["name"] for d in json.loads(listed.stdout)]
    assert oob("delete", name, "--address", ray_head).returncode == 0


def test_oob_sync_from_tmp(ray_head, tmp_path):
    """The shipped specs/cpu-link.yaml, synced with `oob sync` run from /tmp."""
    from conftest import ROOT
    applied = oob("apply", ROOT / "specs" / "cpu-link.yaml", "--address", ray_head, cwd="/")
    assert applied.returncode == 0, applied.stderr
    try:
        for version in (1, 2):
            synced = oob("sync", "cpu-link", "weights", "--address", ray_head, cwd="/tmp")
            assert synced.returncode == 0, synced.stderr
            assert f"weights: version {version}, 2.0 MiB to 2 targets" in synced.stdout
    finally:
        oob("delete", "cpu-link", "--address", ray_head)


def test_weight_sync_example_wakes_waiting_http_clients(ray_head):
    """The shipped specs/weight-sync.yaml: clients wait on each inference replica over HTTP; a
    training step (and `oob sync` from /tmp) wakes every one with the complete new version."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import ROOT
    applied = oob("apply", ROOT / "specs" / "weight-sync.yaml", "--address", ray_head, cwd="/")
    assert applied.returncode == 0, applied.stderr
    try:
        urls = {r["name"]: r["endpoints"]["http"] for r in status_of(ray_head, "weight-sync")["replicas"]}
        servers = [urls["server-0"], urls["server-1"]]
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(requests.get, f"{u}/wait?after=0", timeout=60) for u in servers]
            time.sleep(1)
            assert not any(w.done() for w in waiting)  # asleep until a push
            step = requests.post(f"{urls['trainer-0']}/step?seed=3", timeout=30).json()
            assert step["version"] == 1
            assert [w.result().json() for w in waiting] == [{"version": 1, "checksum": step["checksum"]}] * 2
        synced = oob("sync", "weight-sync", "params", "--address", ray_head, cwd="/tmp")
        assert synced.returncode == 0, synced.stderr
        assert "params: version 2" in synced.stdout and "2 targets" in synced.stdout
        for u in servers:  # already newer: answers at once
            assert requests.get(f"{u}/wait?after=1", timeout=10).json() == {"version": 2, "checksum": step["checksum"]}
        late = requests.get(f"{servers[0]}/wait?after=2&timeout=0.2", timeout=10)
        assert late.status_code == 504 and "no push into 'params' after version 2" in late.json()["error"]
    finally:
        oob("delete", "weight-sync", "--address", ray_head)


@pytest.fixture(scope="module")
def not_ray():
    """A port where something answers that is not Ray (a plain HTTP server)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not port_open(port):
        time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    server.kill()
    server.wait()


@pytest.mark.parametrize("command", [["apply", "SPEC"], ["plan", "SPEC"], ["status", "kv"], ["sync", "kv", "x"],
                                     ["delete", "kv"], ["logs", "kv"], ["list"]])
@pytest.mark.parametrize("kind", ["refused", "not-ray"])
def test_wrong_address_fails_fast_with_one_line(tmp_path, not_ray, command, kind):
    spec = kv_project(tmp_path, "kv")
    address = f"127.0.0.1:{free_port()}" if kind == "refused" else not_ray
    start = time.monotonic()
    out = oob(*[str(spec) if a == "SPEC" else a for a in command], "--address", address, timeout=60)
    took = time.monotonic() - start
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
    assert out.stderr.startswith(f"error: cannot connect to Ray at {address}")
    assert took < 15, f"took {took:.1f}s"


def test_startup_timeout_names_what_was_pending(ray_head, project):
    spec = write_in(project, """
        version: 1
        name: slowstart
        actors:
          slow: {class: apps:Slow, kwargs: {seconds: 120}}
    """)
    start = time.monotonic()
    out = oob("apply", spec, "--address", ray_head, "--timeout", "8")
    took = time.monotonic() - start
    assert out.returncode == 1
    assert "not ready after 8s: slow-0 still in __init__" in out.stderr
    assert "warming up" in out.stderr  # its log tail: what it was doing
    assert "not enough resources" not in out.stderr
    assert took < 30
    status = oob("status", "slowstart", "--address", ray_head)
    assert status.returncode == 1 and "no deployment 'slowstart'" in status.stderr  # nothing left


def test_status_and_logs_show_dead_replicas(ray_head, tmp_path):
    spec = kv_project(tmp_path, "mortal", restarts=0, replicas=2)
    assert oob("apply", spec, "--address", ray_head).returncode == 0
    try:
        before = status_of(ray_head, "mortal")
        assert before["healthy"] is True
        pid = next(r["pid"] for r in before["replicas"] if r["name"] == "store-1")
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline:
            after = status_of(ray_head, "mortal")
            rows = {r["name"]: r for r in after["replicas"]}
            if rows["store-1"]["state"].startswith("dead"):
                break
            time.sleep(0.5)
        assert rows["store-1"]["state"] == "dead: its worker process died", rows["store-1"]
        assert (rows["store-1"]["healthy"], rows["store-0"]["healthy"], after["healthy"]) == (False, True, False)
        text = oob("status", "mortal", "--address", ray_head).stdout
        assert "store-1  dead: its worker process died" in text and "NOT healthy" in text
        logs = oob("logs", "mortal", "store-1", "--address", ray_head)
        assert logs.returncode == 0 and "store starting" in logs.stdout
    finally:
        oob("delete", "mortal", "--address", ray_head)


@pytest.mark.parametrize("problem,expected", [
    ("routes: [{path: /, call: nosuchmethod}]", "OOB5"),
    ("port: 9999}, {name: again, port: 9999", "OOB301"),
])
def test_apply_refuses_lint_errors_before_touching_the_cluster(tmp_path, problem, expected):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "kvapp.py").write_text(KV_MODULE)
    spec = write_in(folder, f"""
        version: 1
        name: linted
        actors:
          store:
            class: kvapp:Store
            servers: [{{name: http, {problem}}}]
    """)
    # An address where nothing listens: lint must refuse before any connection is tried.
    out = oob("apply", spec, "--address", f"127.0.0.1:{free_port()}")
    assert out.returncode == 1
    assert f"{spec}:" in out.stderr and expected in out.stderr
    assert "cannot connect" not in out.stderr
    lint = oob("lint", spec)
    assert [line for line in lint.stdout.splitlines()] == \
        [line for line in out.stderr.splitlines() if line.startswith(str(spec))]


def test_apply_refuses_a_connect_cycle(tmp_path, project):
    spec = write_in(project, """
        version: 1
        name: cycle
        actors:
          a: {class: apps:Chatty, connect: {b: b.http}, servers: [{name: http, routes: [{path: /, call: get}]}]}
          b: {class: apps:Chatty, connect: {a: a.http}, servers: [{name: http, routes: [{path: /, call: get}]}]}
    """)
    out = oob("apply", spec, "--address", f"127.0.0.1:{free_port()}")
    assert out.returncode == 1 and "cycle" in out.stderr and "OOB2" in out.stderr


LINKED = """
version: 1
name: {name}
actors:
  src: {{class: apps:Source, buffers: {{data: {{shape: [64, 64], dtype: float32}}}}}}
  dst: {{class: apps:Sink, buffers: {{data: {{shape: [64, 64], dtype: float32}}}}}}
links: [{{name: data, from: src.data, to: [dst.data], transport: shm}}]
"""


def test_deleting_one_deployment_keeps_anothers_segments(ray_head, project):
    def segments():
        return set(n for n in os.listdir("/dev/shm") if n.startswith("oob-web"))
    for name in ("web", "web-2"):
        assert oob("apply", write_in(project, LINKED.format(name=name), f"{name}.yaml"),
                   "--address", ray_head).returncode == 0
    try:
        both = segments()
        assert len(both) == 6  # each target's data, control block and doorbell
        assert oob("delete", "web", "--address", ray_head).returncode == 0
        left = segments()
        assert len(left) == 3 and all(n.startswith("oob-web-2-") for n in left)
        synced = oob("sync", "web-2", "data", "--address", ray_head)
        assert synced.returncode == 0, synced.stderr  # web-2's target still has its memory
    finally:
        oob("delete", "web-2", "--address", ray_head)
    assert segments() == set()


def test_ipv6_wildcard_host_for_every_protocol(ray_head, project):
    spec = write_in(project, """
        version: 1
        name: six
        actors:
          files:
            command: ["python3", "-m", "http.server", "{port}", "--bind", "::"]
            servers: [{name: main, protocol: tcp, host: "::", port: 0}]
          web:
            class: apps:Chatty
            servers:
              - {name: http, host: "::", port: 0, auth: {token_env: SIX_TOKEN}, routes: [{path: /, call: get}]}
              - {name: rpc, protocol: grpc, host: "::", port: 0, service: demo.Six, methods: [get],
                 auth: {token_env: SIX_TOKEN}}
    """)
    env = user_env(SIX_TOKEN="six-secret")
    out = oob("apply", spec, "--address", ray_head, env=env)
    assert out.returncode == 0, out.stderr
    try:
        rows = {r["name"]: r for r in status_of(ray_head, "six")["replicas"]}
        files_port = int(rows["files-0"]["endpoints"]["main"].rsplit(":", 1)[1])
        http_port = int(rows["web-0"]["endpoints"]["http"].rsplit(":", 1)[1])
        assert requests.get(f"http://[::1]:{files_port}/", timeout=5).status_code == 200
        reply = requests.get(f"http://[::1]:{http_port}/", headers={"Authorization": "Bearer six-secret"}, timeout=5)
        assert (reply.status_code, reply.text) == (200, "hi")
        import grpc
        rpc_port = int(rows["web-0"]["endpoints"]["rpc"].rsplit(":", 1)[1])
        with grpc.insecure_channel(f"[::1]:{rpc_port}") as ch:
            got = ch.unary_unary("/demo.Six/get")(b"", metadata=[("authorization", "Bearer six-secret")], timeout=5)
            assert json.loads(got) == "hi"
    finally:
        oob("delete", "six", "--address", ray_head)


def test_editing_a_class_module_replaces_only_that_actor(ray_head, project):
    (project / "other.py").write_text("from helpers import GREETING\n\n\nclass Other:\n"
                                      "    def get(self):\n        return GREETING\n")
    (project / "helpers.py").write_text('GREETING = "v1"\n')
    spec = write_in(project, """
        version: 1
        name: recode
        actors:
          chat: {class: apps:Chatty}
          other: {class: other:Other}
    """)

    def pids():
        return alive_pids(ray_head, "recode")
    assert oob("apply", spec, "--address", ray_head).returncode == 0
    try:
        before = pids()
        assert "no changes" in oob("plan", spec, "--address", ray_head).stdout
        (project / "helpers.py").write_text('GREETING = "v2"\n')  # a module the class's module imports
        plan = oob("plan", spec, "--address", ray_head)
        assert "~ replace  other [0]  (code changed; stop-first: it has no servers)" in plan.stdout, plan.stdout
        assert "= keep     chat [0]  (unchanged)" in plan.stdout
        assert oob("apply", spec, "--address", ray_head).returncode == 0
        after = pids()
        assert after["chat-0"] == before["chat-0"] and after["other-0"] != before["other-0"]
        got = client(ray_head, "oob-recode", 'print(ray.get(ray.get_actor("other-0").get.remote()))')
        assert got.strip().splitlines()[-1] == "v2"
    finally:
        oob("delete", "recode", "--address", ray_head)


def test_a_busy_replica_is_not_replaced(ray_head, project):
    spec = write_in(project, """
        version: 1
        name: busy
        actors:
          chat: {class: apps:Chatty, restarts: -1, servers: [{name: http, routes: [{path: /, call: get}]}]}
    """)
    assert oob("apply", spec, "--address", ray_head).returncode == 0
    try:
        before = status_of(ray_head, "busy")["replicas"][0]["pid"]
        blocker = subprocess.Popen([sys.executable, "-c", (
            "import ray\nfrom oobspec.control.cluster import connect\n"
            f"connect({ray_head!r}, 'oob-busy')\nray.get(ray.get_actor('chat-0').block.remote(90))")],
            cwd="/", env=user_env())
        try:
            time.sleep(3)  # the replica is inside block() now
            plan = oob("plan", spec, "--address", ray_head)
            assert "= keep     chat [0]  (unchanged (busy: not answering))" in plan.stdout, plan.stdout
            assert oob("apply", spec, "--address", ray_head).returncode == 0
            rows = status_of(ray_head, "busy")["replicas"]
            assert (rows[0]["state"], rows[0]["pid"]) == ("not answering", before)
        finally:
            blocker.kill()
            blocker.wait()
    finally:
        oob("delete", "busy", "--address", ray_head)


def test_scaling_starts_or_stops_only_the_replicas_added_or_removed(ray_head, project):
    spec = write_in(project, """
        version: 1
        name: scale
        actors:
          web:
            class: apps:Wired
            replicas: "{{ n }}"
            restarts: -1
            servers: [{name: http, port: 0, routes: [{path: /, call: get}]}]
          gw: {class: apps:Wired, connect: {web: web.http}}
    """)

    def pids():
        return alive_pids(ray_head, "scale")

    def wiring(name):
        code = f'print(json.dumps(ray.get(ray.get_actor("{name}").wiring.remote())))'
        return json.loads(client(ray_head, "oob-scale", code).strip().splitlines()[-1])
    assert oob("apply", spec, "--address", ray_head, "--set", "n=2").returncode == 0
    try:
        first = pids()
        plan = oob("plan", spec, "--address", ray_head, "--set", "n=3").stdout
        assert "+ create   web [2]  (replicas 2 -> 3)" in plan and "= keep     web [0,1]  (unchanged)" in plan
        assert oob("apply", spec, "--address", ray_head, "--set", "n=3").returncode == 0
        second = pids()
        assert {k: second[k] for k in first} == first and "web-2" in second
        gw = wiring("gw-0")
        assert len(gw["endpoints"]["web"]) == 3 and gw["peer_changes"] == [[1, {"web": 3}]]
        assert wiring("web-0")["replicas"] == 3 and wiring("web-0")["env"]["OOB_REPLICAS"] == "2"  # at start
        applied = oob("apply", spec, "--address", ray_head, "--set", "n=2")
        assert applied.returncode == 0, applied.stderr
        third = pids()
        assert third == first
        assert len(wiring("gw-0")["endpoints"]["web"]) == 2 and wiring("web-1")["replicas"] == 2
    finally:
        oob("delete", "scale", "--address", ray_head)


def test_scaling_a_link_target_rewires_the_link(ray_head, project):
    spec = write_in(project, """
        version: 1
        name: scalelink
        actors:
          src: {class: apps:Source, buffers: {data: {shape: [8, 8], dtype: float32}}}
          dst: {class: apps:Sink, replicas: "{{ n }}", buffers: {data: {shape: [8, 8], dtype: float32}}}
        links: [{name: data, from: src.data, to: [dst.data], transport: shm}]
    """)
    try:
        for n in (2, 3, 2):
            applied = oob("apply", spec, "--address", ray_head, "--set", f"n={n}")
            assert applied.returncode == 0, applied.stderr
            synced = oob("sync", "scalelink", "data", "--address", ray_head)
            assert synced.returncode == 0 and f"to {n} targets" in synced.stdout, synced.stdout + synced.stderr
        assert alive_pids(ray_head, "scalelink").keys() == {"src-0", "dst-0", "dst-1"}
    finally:
        oob("delete", "scalelink", "--address", ray_head)

"""The runtime on a real local Ray, talked to with real clients (requests, grpc)."""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import grpc
import pytest
import ray
import requests

import oobspec
from conftest import ROOT, free_port, port_open, with_examples

pytestmark = [pytest.mark.timeout(180), pytest.mark.ray]


def test_seed_example(local_ray, tmp_path):
    """SPEC section 7: five increments through the handle, then GET / answers 5 (on a free port)."""
    port = free_port()
    spec = tmp_path / "counter.yaml"
    spec.write_text((ROOT / "specs" / "counter.yaml").read_text().replace("port: 8080", f"port: {port}"))
    with_examples(tmp_path)  # the spec's classes beside it, as in specs/
    with oobspec.deploy(oobspec.load(spec)) as d:
        assert d.endpoints["counter"]["http"] == [f"http://127.0.0.1:{port}"]
        handle = d.handle("counter", 0)
        for _ in range(5):
            ray.get(handle.increment.remote())
        reply = requests.get(f"http://localhost:{port}/", timeout=5)
        assert reply.status_code == 200
        assert reply.json() == 5
    assert not port_open(port)


@pytest.fixture(scope="module")
def echo(local_ray, tmp_path_factory):
    port = free_port()
    os.environ["ECHO_TOKEN"] = "s3cret-token"
    path = tmp_path_factory.mktemp("echo") / "echo.yaml"
    path.write_text(f"""
version: 1
name: echo
actors:
  echo:
    class: apps:Echo
    kwargs: {{greeting: hi}}
    restarts: 1
    servers:
      - name: http
        port: {port}
        max_body: 1000
        routes:
          - {{method: GET, path: "/hello/{{name}}", call: hello}}
          - {{method: POST, path: /add, call: add}}
          - {{method: GET, path: /blob, call: blob}}
          - {{method: GET, path: /boom, call: boom}}
          - {{method: GET, path: /count, call: sync_count}}
          - {{method: GET, path: "/items/{{key}}", call: item}}
          - {{method: POST, path: /upload, call: upload}}
          - {{method: GET, path: /pid, call: pid}}
      - name: secure
        port: 0
        auth: {{token_env: ECHO_TOKEN}}
        routes:
          - {{method: GET, path: "/hello/{{name}}", call: hello}}
""")
    with oobspec.deploy(oobspec.load(path)) as d:
        yield d
    os.environ.pop("ECHO_TOKEN", None)


def test_http_results_and_arguments(echo):
    base = echo.endpoints["echo"]["http"][0]
    r = requests.get(f"{base}/hello/ada", timeout=5)
    assert (r.status_code, r.text, r.headers["Content-Type"].split(";")[0]) == (200, "hi ada", "text/plain")
    assert requests.post(f"{base}/add", json={"a": 2, "b": 3}, timeout=5).json() == {"sum": 5}
    assert requests.post(f"{base}/add?a=4", timeout=5).json() == {"sum": 4}  # query string, typed by annotation
    r = requests.get(f"{base}/blob", timeout=5)
    assert (r.content, r.headers["Content-Type"]) == (b"\x00\x01\x02", "application/octet-stream")
    assert requests.get(f"{base}/items/k1?verbose=true", timeout=5).json() == {"key": "k1", "verbose": True}
    assert requests.get(f"{base}/count", timeout=5).json() >= 1  # sync methods are served too


@pytest.mark.parametrize("method,path,kwargs,status,fragment", [
    ("POST", "/add", {"data": "{not json"}, 400, "not valid JSON"),
    ("POST", "/add", {"json": [1, 2]}, 400, "JSON object"),
    ("POST", "/add", {"json": {}}, 400, "missing argument: a"),
    ("POST", "/add", {"json": {"a": 1, "c": 2}}, 400, "unexpected argument: c"),
    ("POST", "/add?a=x", {}, 422, "invalid arguments: query a"),
    ("GET", "/nowhere", {}, 404, "Not Found"),
    ("DELETE", "/add", {}, 405, "Method Not Allowed"),
    ("POST", "/upload", {"json": {"data": "x" * 5000}}, 413, "Too Large"),
    ("GET", "/boom", {}, 500, "internal error"),  # the message stays in the replica's log
])
def test_http_errors_are_json(echo, method, path, kwargs, status, fragment):
    base = echo.endpoints["echo"]["http"][0]
    r = requests.request(method, base + path, timeout=5, **kwargs)
    assert r.status_code == status
    assert r.headers["Content-Type"].startswith("application/json")
    assert fragment in r.json()["error"]


def test_exception_keeps_actor_serving(echo):
    base = echo.endpoints["echo"]["http"][0]
    pid = requests.get(f"{base}/pid", timeout=5).json()
    assert requests.get(f"{base}/boom", timeout=5).status_code == 500
    assert requests.get(f"{base}/hello/again", timeout=5).text == "hi again"
    assert requests.get(f"{base}/pid", timeout=5).json() == pid


def test_http_auth(echo):
    base = echo.endpoints["echo"]["secure"][0]
    assert requests.get(f"{base}/hello/x", timeout=5).status_code == 401
    assert requests.get(f"{base}/hello/x", headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
    ok = requests.get(f"{base}/hello/x", headers={"Authorization": "Bearer s3cret-token"}, timeout=5)
    assert (ok.status_code, ok.text) == (200, "hi x")
    assert "s3cret-token" not in json.dumps(echo.status())
    logs_dir = ray._private.worker._global_node.get_logs_dir_path()
    for root, _dirs, files in os.walk(logs_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert b"s3cret-token" not in f.read(), f"token leaked into {name}"


def test_handle_exposes_user_methods(echo):
    h = echo.handle("echo")
    assert ray.get(h.hello.remote("ray")) == "hi ray"
    assert ray.get(h.add.remote(1, b=2)) == {"sum": 3}


def test_restarted_actor_serves_on_same_ports(echo):
    base = echo.endpoints["echo"]["http"][0]
    secure = echo.endpoints["echo"]["secure"][0]  # port 0: resolved once, kept across restarts
    pid = requests.get(f"{base}/pid", timeout=5).json()
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            new_pid = requests.get(f"{base}/pid", timeout=2).json()
            if new_pid != pid:
                break
        except requests.RequestException:
            pass
        time.sleep(0.3)
    else:
        pytest.fail("actor did not come back on its port")
    r = requests.get(f"{secure}/hello/back", headers={"Authorization": "Bearer s3cret-token"}, timeout=5)
    assert r.text == "hi back"


def test_async_init_class_unchanged(local_ray, write_spec):
    port = free_port()
    path = write_spec(f"""
        version: 1
        name: seedstyle
        actors:
          counter:
            class: apps:AsyncInitCounter
            args: [{port}]
    """)
    with oobspec.deploy(oobspec.load(path)) as d:
        h = d.handle("counter")
        for _ in range(3):
            ray.get(h.increment.remote())
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == "3"


def _generate_greeter(folder):
    (folder / "greeter.proto").write_text("""
syntax = "proto3";
package demo;
service Greeter { rpc SayHello (HelloRequest) returns (HelloReply); }
message HelloRequest { string name = 1; }
message HelloReply { string message = 1; }
""")
    from grpc_tools import protoc
    assert protoc.main(["protoc", f"-I{folder}", f"--python_out={folder}", f"--grpc_python_out={folder}",
                        str(folder / "greeter.proto")]) == 0


def test_grpc_json_proto_and_health(local_ray, write_spec, tmp_path):
    pytest.importorskip("grpc_tools")
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    _generate_greeter(tmp_path)
    path = write_spec("""
        version: 1
        name: rpc
        actors:
          kv:
            class: examples.services:KeyValue
            servers:
              - {name: rpc, protocol: grpc, port: 0, service: demo.KeyValue, methods: [put, get, size]}
          greeter:
            class: apps:Greeter
            servers:
              - {name: rpc, protocol: grpc, port: 0, proto: "greeter_pb2_grpc:add_GreeterServicer_to_server"}
    """)
    sys.path.insert(0, str(tmp_path))
    try:
        import greeter_pb2
        import greeter_pb2_grpc
        with oobspec.deploy(oobspec.load(path)) as d:
            with grpc.insecure_channel(d.endpoints["kv"]["rpc"][0]) as ch:
                put = ch.unary_unary("/demo.KeyValue/put")
                get = ch.unary_unary("/demo.KeyValue/get")
                assert json.loads(put(json.dumps({"key": "a", "value": [1, 2]}).encode(), timeout=5)) is True
                assert json.loads(get(b'{"key": "a"}', timeout=5)) == [1, 2]
                assert json.loads(ch.unary_unary("/demo.KeyValue/size")(b"", timeout=5)) == 1
                with pytest.raises(grpc.RpcError) as err:
                    get(b'{"nope": 1}', timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                health = health_pb2_grpc.HealthStub(ch)
                for service in ("", "demo.KeyValue"):
                    reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with grpc.insecure_channel(d.endpoints["greeter"]["rpc"][0]) as ch:
                reply = greeter_pb2_grpc.GreeterStub(ch).SayHello(greeter_pb2.HelloRequest(name="ada"), timeout=5)
                assert reply.message == "hello ada"
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        sys.path.remove(str(tmp_path))


def test_wiring(local_ray, write_spec):
    path = write_spec("""
        version: 1
        name: wiring
        actors:
          db:
            class: apps:Wired
            replicas: 2
            servers: [{name: http, port: 0, routes: [{path: /, call: get}]}]
          api-gw:
            class: apps:Wired
            connect: {store: db.http}
    """)
    with oobspec.deploy(oobspec.load(path)) as d:
        urls = d.endpoints["db"]["http"]
        assert len(urls) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
        got = ray.get(d.handle("api-gw").wiring.remote())
        assert got["endpoints"] == {"store": urls}
        assert got["env"]["OOB_STORE_URL"] == urls[0]
        assert got["env"]["OOB_STORE_URLS"] == ",".join(urls)
        assert got["env"]["OOB_REPLICA"] == "0" and got["env"]["OOB_REPLICAS"] == "1"
        assert requests.get(urls[1], timeout=5).text == "ok"
        assert ray.get(d.handle("db", 1).wiring.remote())["replica"] == 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_command_actor_supervises_a_real_process(local_ray, write_spec):
    path = write_spec("""
        version: 1
        name: proc
        actors:
          files:
            command: ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
            restarts: 2
            servers: [{name: http, protocol: tcp, port: 0}]
    """)
    with oobspec.deploy(oobspec.load(path)) as d:
        host, port = d.endpoints["files"]["http"][0].split(":")
        assert requests.get(f"http://{host}:{port}/", timeout=5).status_code == 200
        h = d.handle("files")
        first = ray.get(h.pid.remote())
        os.kill(first, signal.SIGKILL)  # the program dies: the actor restarts it on the same port
        deadline = time.time() + 30
        while time.time() < deadline:
            second = ray.get(h.pid.remote())
            if second != first and port_open(int(port)):
                break
            time.sleep(0.2)
        else:
            pytest.fail("command was not restarted")
        assert requests.get(f"http://{host}:{port}/", timeout=5).status_code == 200
        logs = "".join(chunk for chunk in _logs("proc"))
        assert "exited with code -9" in logs
    assert not _pid_alive(second)  # SIGTERM on delete
    assert not port_open(int(port))


def _logs(name):
    from oobspec.control.commands import logs
    return logs(name, "files", False, None)


def test_failed_start_names_the_actor_and_leaves_nothing(local_ray, write_spec):
    from oobspec.errors import ApplyError
    from oobspec.control.cluster import replica_names
    port = free_port()
    path = write_spec(f"""
        version: 1
        name: broken
        actors:
          ok:
            class: apps:Echo
            restarts: 1
            servers: [{{name: http, port: {port}, routes: [{{path: /, call: pid}}]}}]
          bad:
            class: apps:Broken
            connect: {{ok: ok.http}}
    """)
    with pytest.raises(ApplyError) as err:
        with oobspec.deploy(oobspec.load(path)):
            pass
    assert "bad-0" in str(err.value) and "config file /etc/missing.conf not found" in str(err.value)
    assert "about to fail" in err.value.log_tail
    assert replica_names("oob-broken") == []
    assert not port_open(port)


def test_deploy_refuses_lint_errors_before_starting_anything(local_ray, write_spec):
    """The lint check comes first: a kwarg that __init__ does not take starts nothing."""
    from oobspec.errors import SpecError
    from oobspec.control.cluster import replica_names
    path = write_spec("""
        version: 1
        name: unfit
        actors:
          bad: {class: apps:Echo, kwargs: {nope: 1}}
    """)
    with pytest.raises(SpecError) as err:
        with oobspec.deploy(oobspec.load(path)):
            pass
    assert [d.code for d in err.value.diagnostics if d.is_error] == ["OOB504"]
    assert replica_names("oob-unfit") == []


def test_grpc_auth(local_ray, write_spec, monkeypatch):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    monkeypatch.setenv("KV_TOKEN", "grpc-secret")
    path = write_spec("""
        version: 1
        name: grpcauth
        actors:
          kv:
            class: examples.services:KeyValue
            servers:
              - {name: rpc, protocol: grpc, port: 0, service: demo.KeyValue, methods: [size], auth: {token_env: KV_TOKEN}}
    """)
    with oobspec.deploy(oobspec.load(path)) as d, grpc.insecure_channel(d.endpoints["kv"]["rpc"][0]) as ch:
        size = ch.unary_unary("/demo.KeyValue/size")
        with pytest.raises(grpc.RpcError) as err:
            size(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError):
            size(b"", metadata=[("authorization", "Bearer wrong")], timeout=5)
        assert json.loads(size(b"", metadata=[("authorization", "Bearer grpc-secret")], timeout=5)) == 0
        # health probes carry no token
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

"""Re-wiring without apply: a replica that (re)starts anywhere announces itself, and every
replica that connects to it sees its new endpoint within 5 s (context().endpoints,
OOB_<KEY>_URL, on_peers_changed), with no `oob apply` in between.

As users run it: the spec and module in a folder of their own, `oob` run from `/` against a
`ray start --head` cluster this module starts (and stops) itself; the replicas are watched over
their own HTTP routes. The last test builds endpoints from records with no Ray at all."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from conftest import status_of, user_env, write_in
from oobspec.contract import Ref
from oobspec.replica.peers import build_endpoints, merged, peer_names

pytestmark = [pytest.mark.timeout(300)]

MODULE = '''
import os
import time

import oobspec


class Peer:
    def on_start(self):  # its servers are up: when it counts as ready again
        with open(os.environ["STARTS_FILE"], "a") as f:
            f.write(f"{os.getpid()} {time.time()}\\n")

    def get(self) -> str:
        return "peer"


class Client:
    def __init__(self):
        self.at_init = {"env": os.environ.get("OOB_PEER_URL"),
                        "endpoints": dict(oobspec.context().endpoints)}
        self.changes = []

    def on_peers_changed(self, replicas, endpoints):
        self.changes.append({"at": time.time(), "replicas": replicas, "endpoints": endpoints,
                             "env": os.environ.get("OOB_PEER_URL")})

    def wiring(self) -> dict:
        return {"pid": os.getpid(), "endpoints": dict(oobspec.context().endpoints),
                "env": os.environ.get("OOB_PEER_URL"), "urls": os.environ.get("OOB_PEER_URLS"),
                "at_init": self.at_init, "changes": self.changes}
'''

SPEC = """
version: 1
name: {name}
actors:
  peer:
    class: rewire_app:Peer
    restarts: -1
    env: {{STARTS_FILE: "{starts}"}}
    servers: [{{name: http, port: 0, routes: [{{path: /, call: get}}]}}]
  client:
    class: rewire_app:Client
    restarts: -1
    env: {{OOB_PEER_POLL: "0"}}
    connect: {{PEER: peer.http}}
    servers: [{{name: http, port: 0, routes: [{{path: /wiring, call: wiring}}]}}]
  poller:
    class: rewire_app:Client
    connect: {{PEER: peer.http}}
    servers: [{{name: http, port: 0, routes: [{{path: /wiring, call: wiring}}]}}]
"""


def wiring(url: str) -> dict:
    reply = requests.get(f"{url}/wiring", timeout=5)
    reply.raise_for_status()
    return reply.json()


def starts(path: Path) -> dict[int, float]:
    """pid -> when its on_start ran (the peer was ready from then on)."""
    lines = path.read_text().split("\n") if path.exists() else []
    return {int(pid): float(at) for pid, at in (line.split() for line in lines if line.strip())}


@contextmanager
def holding(url: str):
    """A socket listening on the URL's port, sharing it (SO_REUSEPORT) with the replica that
    serves it now: once that replica is gone, a replica that asks for the port cannot have it."""
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        sock.listen()
        yield


def until(what, check, timeout: float = 60.0, every: float = 0.05):
    """Call `what()` until `check(result)`; returns (result, time.time() when it first held)."""
    deadline = time.time() + timeout
    while True:
        try:
            got = what()
        except (requests.RequestException, OSError):
            got = None
        if got is not None and check(got):
            return got, time.time()
        assert time.time() < deadline, f"timed out; last: {got}"
        time.sleep(every)


def swap_record(address: str, namespace: str, name: str, record: dict) -> dict:
    """Write a replica's record into the cluster's KV from another process, as apply does;
    returns the one it replaced."""
    code = ("import json, sys\nfrom oobspec.control import cluster\n"
            f"cluster.connect({address!r}, {namespace!r})\n"
            f"print(json.dumps(cluster.get_meta({namespace!r}, 'replica/{name}')))\n"
            f"cluster.put_meta({namespace!r}, 'replica/{name}', json.loads(sys.argv[1]))\n")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(record)], capture_output=True, text=True,
                         timeout=120, cwd="/", env=user_env())
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.ray
def test_a_peer_restarted_on_a_new_port_rewires_its_clients_without_apply(ray_head, tmp_path, deployed):
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "rewire_app.py").write_text(MODULE)
    started = tmp_path / "starts.txt"
    spec = write_in(folder, SPEC.format(name="rewire", starts=started))
    deployed(spec, ray_head)

    rows = {r["name"]: r for r in status_of(ray_head, "rewire")["replicas"]}
    old = rows["peer-0"]["endpoints"]["http"]
    client, poller = rows["client-0"]["endpoints"]["http"], rows["poller-0"]["endpoints"]["http"]
    first = wiring(client)
    assert first["endpoints"] == {"PEER": [old]} and first["env"] == old and first["changes"] == []

    # 1. The peer dies; Ray restarts it, its port is taken meanwhile: it serves on another one.
    #    Both clients name the new URL within 5 s of it being ready (`client` only hears the
    #    announcement: its poll is off), context, environment and hook alike; no apply.
    with holding(old):
        os.kill(rows["peer-0"]["pid"], signal.SIGKILL)
        seen, seen_at = until(lambda: wiring(client), lambda w: w["endpoints"]["PEER"] != [old])
        polled, polled_at = until(lambda: wiring(poller), lambda w: w["endpoints"]["PEER"] != [old])
        new = seen["endpoints"]["PEER"][0]
        restarted = {pid: at for pid, at in starts(started).items() if pid != rows["peer-0"]["pid"]}
        assert len(restarted) == 1, starts(started)
        ready_at = next(iter(restarted.values()))
        print(f"client re-wired {seen_at - ready_at:.2f} s, poller {polled_at - ready_at:.2f} s after the peer was ready")
        assert seen_at - ready_at < 5 and polled_at - ready_at < 5
        assert new != old and requests.get(f"{new}/", timeout=5).text == "peer"
        for got in (seen, polled):
            assert got["endpoints"] == {"PEER": [new]} and got["env"] == new and got["urls"] == new
            assert [(c["replicas"], c["endpoints"], c["env"]) for c in got["changes"]] == [(1, {"PEER": [new]}, new)]
        now = {r["name"]: r for r in status_of(ray_head, "rewire")["replicas"]}
        assert now["peer-0"]["endpoints"]["http"] == new and now["peer-0"]["state"] == "alive"
        assert now["peer-0"]["pid"] in restarted

    # 2. A client that Ray restarts has the current URL from its first line of __init__ on
    #    (its constructor arguments, from apply, still name the old one).
    os.kill(first["pid"], signal.SIGKILL)
    again, _ = until(lambda: wiring(client), lambda w: w["pid"] != first["pid"])
    assert again["at_init"] == {"env": new, "endpoints": {"PEER": [new]}}
    assert again["endpoints"] == {"PEER": [new]} and again["env"] == new and again["changes"] == []

    # 3. A notification that never came: the poll still reads the record within 5 s.
    record = {"config_hash": "x", "code_hash": "", "endpoints": {"http": "http://127.0.0.1:9"},
              "gpu_uuid": None, "ports": {"http": 9}}
    real = swap_record(ray_head, "oob-rewire", "peer-0", record)
    written = time.time()
    _, moved_at = until(lambda: wiring(poller), lambda w: w["endpoints"]["PEER"] == ["http://127.0.0.1:9"])
    assert moved_at - written < 5
    assert wiring(client)["endpoints"] == {"PEER": [new]}  # no poll, no announcement: unchanged
    assert real["endpoints"] == {"http": new}
    swap_record(ray_head, "oob-rewire", "peer-0", real)
    until(lambda: wiring(poller), lambda w: w["endpoints"]["PEER"] == [new], timeout=5)

    # 4. Scaled since it first started: a restart still knows both peers (Ray hands it the
    #    constructor arguments of its first start, which knew one).
    spec.write_text(spec.read_text().replace("class: rewire_app:Peer", "class: rewire_app:Peer\n    replicas: 2"))
    deployed(spec, ray_head)
    both = [r["endpoints"]["http"] for r in sorted(status_of(ray_head, "rewire")["replicas"], key=lambda r: r["name"])
            if r["name"].startswith("peer-")]
    assert len(both) == 2 and both[0] == new
    before = wiring(client)
    assert before["endpoints"] == {"PEER": both} and len(before["changes"]) == 1
    os.kill(before["pid"], signal.SIGKILL)
    again, _ = until(lambda: wiring(client), lambda w: w["pid"] != before["pid"])
    assert again["at_init"] == {"env": new, "endpoints": {"PEER": both}} and again["urls"] == ",".join(both)


def test_build_endpoints_keeps_replica_order_dedupes_and_skips_missing_records():
    connect = {"db": Ref("store", "http"), "rpc": Ref("store", "grpc"), "cache": Ref("cache", "http"),
               "gone": Ref("unknown", "http")}
    counts = {"store": 4, "cache": 2}
    assert peer_names(connect, counts) == ["store-0", "store-1", "store-2", "store-3", "cache-0", "cache-1"]
    records = {
        "store-0": {"endpoints": {"http": "http://10.0.0.2:8000", "grpc": "10.0.0.2:9000"}},
        "store-1": None,  # not recorded (yet)
        "store-2": {"endpoints": {"http": "http://10.0.0.1:8000", "grpc": "10.0.0.1:9001"}},
        "store-3": {"endpoints": {"http": "http://10.0.0.2:8000"}},  # a shared port: that node again
        "store-9": {"endpoints": {"http": "http://10.0.0.9:8000"}},  # beyond the count: not a peer
    }
    got = build_endpoints(connect, counts, records)
    assert got == {"db": ["http://10.0.0.2:8000", "http://10.0.0.1:8000"],
                   "rpc": ["10.0.0.2:9000", "10.0.0.1:9001"]}
    # No record of `cache` at all, and `unknown` has no count: both left to what the replica had.
    assert merged({"cache": ["http://c:1"], "db": ["http://old:1"]}, got) == {
        "cache": ["http://c:1"], "db": got["db"], "rpc": got["rpc"]}
    assert build_endpoints(connect, {"store": 0}, records) == {}

"""Step 10 on a real multi-node Ray cluster: a head and two workers on 127.0.0.2/3/4 (labels
zone=a/b/c; tests/multinode.py), one cluster for the whole module. `oob` runs from `/` against
the cluster's address; the spec and the user's module are in a folder of their own; every
server binds `host: node`, so each replica listens on its node's own loopback address.

The first tests check the fixture itself (nodes, addresses, labels, a pinned actor); then the
issue's "done when": spreading with max_per_node, a `shared: true` port on one node (rolling
update and scaling lose no request), a rolling update that keeps every replica on its node and
URL, and a node killed and brought back on a new address, its peer re-wired with no apply.
The test that kills a node runs last but one; the fixture's own node-failure check runs last."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from conftest import oob, status_of, write_in
from multinode import free_port

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

HEAD, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"

MODULE = '''
import os

import oobspec
import ray


class Shelf:
    def __init__(self, tag: str = "v1"):
        self.tag = tag

    async def who(self) -> dict:
        return {"pid": os.getpid(), "ip": ray.util.get_node_ip_address(), "tag": self.tag,
                "version": os.environ.get("VERSION", "")}


class Reader:
    async def peers(self) -> dict:
        return {"pid": os.getpid(), "endpoints": dict(oobspec.context().endpoints),
                "env": os.environ.get("OOB_SHELF_URLS", "")}
'''

SPREAD = """
version: 1
name: spread
actors:
  shelf:
    class: mnapp:Shelf
    replicas: 3
    max_per_node: 1
    restarts: -1
    drain: 1
    kwargs: {{tag: {tag}}}
    servers: [{{name: http, host: node, port: {port}, routes: [{{path: /who, call: who}}]}}]
  reader:
    class: mnapp:Reader
    restarts: -1
    labels: {{zone: a}}
    connect: {{SHELF: shelf.http}}
    servers: [{{name: http, host: node, port: {reader}, routes: [{{path: /peers, call: peers}}]}}]
"""

POOL = """
version: 1
name: pool
actors:
  pool:
    class: mnapp:Shelf
    replicas: {replicas}
    labels: {{zone: b}}
    restarts: -1
    drain: 1
    env: {{VERSION: "{version}"}}
    servers: [{{name: http, host: node, port: {port}, shared: true, routes: [{{path: /who, call: who}}]}}]
  front:
    class: mnapp:Reader
    restarts: -1
    labels: {{zone: a}}
    connect: {{SHELF: pool.http}}
    servers: [{{name: http, host: node, port: {front}, routes: [{{path: /peers, call: peers}}]}}]
"""


# --- helpers -------------------------------------------------------------------------------


def ports(run: int = 1) -> int:
    """A port p with p .. p+run-1 free (replica i of a non-shared server binds port + i)."""
    while True:
        port = free_port()
        if port + run < 65000 and all(_free(p) for p in range(port, port + run)):
            return port


def _free(port: int) -> bool:
    import socket
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def project(tmp: Path) -> Path:
    folder = tmp / "mnproj"
    folder.mkdir(exist_ok=True)
    (folder / "mnapp.py").write_text(MODULE)
    return folder


def apply(spec: Path, address: str, *args: str) -> subprocess.CompletedProcess:
    out = oob("apply", spec, "--address", address, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def rows(address: str, name: str, actor: str) -> list[dict]:
    return [r for r in status_of(address, name)["replicas"] if r["actor"] == actor]


def node_of(row: dict) -> str:
    """The node address status names."""
    return row["node_address"]


def get(url: str, timeout: float = 5) -> dict:
    r = requests.get(url, timeout=timeout, headers={"Connection": "close"})
    r.raise_for_status()
    return r.json()


@contextmanager
def client_loop(urls: list[str], pause: float = 0.01):
    """A thread calling each URL in turn, a new connection each request, short timeouts. Yields a
    list that holds (url, status or 0, the answer or the error, seconds since the loop began)
    for every request made."""
    seen: list[tuple[str, int, object, float]] = []
    stop = threading.Event()
    start = time.monotonic()

    def run():
        n = 0
        while not stop.is_set():
            url = urls[n % len(urls)]
            try:
                r = requests.get(url, timeout=5, headers={"Connection": "close"})
                seen.append((url, r.status_code, r.json() if r.status_code == 200 else r.text[:200],
                             round(time.monotonic() - start, 2)))
            except requests.RequestException as exc:
                seen.append((url, 0, f"{type(exc).__name__}: {exc}"[:300], round(time.monotonic() - start, 2)))
            n += 1
            time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        time.sleep(1)
        yield seen
    finally:
        time.sleep(1)
        stop.set()
        thread.join(timeout=30)


def failures(seen: list) -> list:
    return [s for s in seen if s[1] != 200]


def wait_for(what: str, check, timeout: float, every: float = 0.5):
    deadline = time.time() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.time() > deadline:
            raise AssertionError(f"not {what} after {timeout:.0f}s")
        time.sleep(every)


# --- the fixture itself --------------------------------------------------------------------

PINNED = r'''
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == sys.argv[2])

@ray.remote(num_cpus=0)
class Where:
    def ip(self):
        return ray.util.get_node_ip_address()

where = Where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
print("OOB-IP", ray.get(where.ip.remote(), timeout=60))
'''


def test_three_nodes_on_their_own_addresses_with_their_labels(ray_nodes):
    alive = ray_nodes.alive()
    assert {ip: n["labels"] for ip, n in alive.items()} == {HEAD: {"zone": "a"}, B: {"zone": "b"}, C: {"zone": "c"}}
    assert ray_nodes.address.startswith(f"{HEAD}:")


def test_an_actor_pinned_to_a_node_runs_on_its_address(ray_nodes):
    out = subprocess.run([sys.executable, "-c", PINNED, ray_nodes.address, B], capture_output=True, text=True,
                         timeout=120, cwd="/", env=ray_nodes.env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"OOB-IP {B}" in out.stdout.splitlines(), out.stdout


# --- (a) max_per_node: one replica on each node --------------------------------------------


@pytest.fixture(scope="module")
def spread(ray_nodes, tmp_path_factory):
    """The `spread` deployment: 3 shelf replicas, max_per_node 1, and a reader on the head that
    connects to them. Applied once for the module (the cluster goes away with it)."""
    folder = project(tmp_path_factory.mktemp("spread"))
    port, reader = ports(3), ports(1)

    def spec(tag: str) -> Path:
        return write_in(folder, SPREAD.format(tag=tag, port=port, reader=reader))

    apply(spec("v1"), ray_nodes.address)
    return {"spec": spec, "port": port, "reader": f"http://{HEAD}:{reader}/peers"}


def test_max_per_node_puts_one_replica_on_each_node_and_status_names_it(ray_nodes, spread):
    shelf = rows(ray_nodes.address, "spread", "shelf")
    assert [r["state"] for r in shelf] == ["alive"] * 3, shelf
    assert sorted(node_of(r) for r in shelf) == [HEAD, B, C], shelf
    for r in shelf:
        assert r["node_address"] in (HEAD, B, C), r
        url = r["endpoints"]["http"]
        assert urlsplit(url).hostname == r["node_address"]
        answer = get(f"{url}/who")
        assert (answer["ip"], answer["pid"]) == (r["node_address"], r["pid"])
    text = oob("status", "spread", "--address", ray_nodes.address)
    assert text.returncode == 0, text.stderr
    assert all(ip in text.stdout for ip in (HEAD, B, C)), text.stdout


# --- (b) a shared port on one node ---------------------------------------------------------


@pytest.fixture
def migrate_req():
    """net.ipv4.tcp_migrate_req=1 (a draining replica's queued connections move to its
    siblings) for the test; the old value restored after it."""
    path = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    try:
        old = path.read_text().strip()
        path.write_text("1")
    except OSError as exc:
        pytest.skip(f"cannot set net.ipv4.tcp_migrate_req to 1 ({exc}): a draining shared replica would "
                    "drop the connections queued on it")
    try:
        yield
    finally:
        path.write_text(old)


@pytest.mark.timeout(300)
def test_a_shared_port_on_one_node_spreads_connections_and_loses_none(ray_nodes, tmp_path, migrate_req):
    folder = project(tmp_path)
    port, front = ports(1), ports(1)

    def spec(replicas: int, version: str) -> Path:
        return write_in(folder, POOL.format(replicas=replicas, version=version, port=port, front=front))

    address = ray_nodes.address
    apply(spec(2, "1"), address)
    pool = rows(address, "pool", "pool")
    url = f"http://{B}:{port}"
    assert [r["state"] for r in pool] == ["alive"] * 2, pool
    assert {node_of(r) for r in pool} == {B}, pool
    assert {r["endpoints"]["http"] for r in pool} == {url}, pool  # one URL for both
    peers = get(f"http://{HEAD}:{front}/peers")
    assert peers["endpoints"] == {"SHELF": [url]}, peers  # a peer sees one URL per node

    # New connections reach both replicas.
    pids = {r["pid"] for r in pool}
    answers = [get(f"{url}/who") for _ in range(40)]
    assert {a["pid"] for a in answers} == pids, answers

    # A rolling update, then 2 -> 3 -> 2: not one request lost.
    for replicas, version in ((2, "2"), (3, "2"), (2, "2")):
        with client_loop([f"{url}/who"]) as seen:
            out = apply(spec(replicas, version), address)
        assert len(seen) > 20 and failures(seen) == [], (replicas, version, failures(seen)[:5], len(seen),
                                                         out.stdout + out.stderr)
        now = rows(address, "pool", "pool")
        assert [r["state"] for r in now] == ["alive"] * replicas, now
        assert {node_of(r) for r in now} == {B} and {r["endpoints"]["http"] for r in now} == {url}, now
        assert seen[-1][2]["version"] == version, seen[-1]
        if (replicas, version) == (2, "2"):
            assert not {r["pid"] for r in now} & pids  # every replica replaced
        if replicas == 3:
            three = {get(f"{url}/who")["pid"] for _ in range(60)}
            assert three == {r["pid"] for r in now}, (three, now)
    assert oob("delete", "pool", "--address", address).returncode == 0


# --- (c) a rolling update keeps every replica on its node and URL --------------------------


@pytest.mark.timeout(300)
def test_a_rolling_update_keeps_every_replica_on_its_node_and_url(ray_nodes, spread):
    address = ray_nodes.address
    before = {r["name"]: (node_of(r), r["endpoints"]["http"], r["pid"]) for r in rows(address, "spread", "shelf")}
    assert sorted(n for n, _u, _p in before.values()) == [HEAD, B, C], before
    urls = [f"{u}/who" for _n, u, _p in before.values()]
    with client_loop(urls) as seen:
        out = apply(spread["spec"]("v2"), address)
    assert len(seen) > 30 and failures(seen) == [], (failures(seen)[:5], len(seen), out.stdout + out.stderr)
    after = {r["name"]: (node_of(r), r["endpoints"]["http"], r["pid"]) for r in rows(address, "spread", "shelf")}
    assert {k: v[:2] for k, v in after.items()} == {k: v[:2] for k, v in before.items()}
    assert not {p for *_x, p in after.values()} & {p for *_x, p in before.values()}  # all replaced
    for name, (ip, url, pid) in after.items():
        answer = get(f"{url}/who")
        assert (answer["ip"], answer["pid"], answer["tag"]) == (ip, pid, "v2"), (name, answer)
    for url in urls:  # each URL served v1 first, v2 last, and only ever from its node
        mine = [s[2] for s in seen if s[0] == url]
        assert mine[0]["tag"] == "v1" and mine[-1]["tag"] == "v2", url
        assert {m["ip"] for m in mine} == {urlsplit(url).hostname}, url


# --- a stand-in with no room on its replica's node, said at plan time ------------------------

TIGHT = """
version: 1
name: tight
actors:
  big:
    class: mnapp:Shelf
    labels: {{zone: b}}
    resources: {{cpus: 3}}
    restarts: -1
    no_room: {no_room}
    kwargs: {{tag: {tag}}}
    servers: [{{name: http, host: node, port: {port}, routes: [{{path: /who, call: who}}]}}]
"""


def test_plan_says_when_a_stand_in_has_no_room_on_its_node(ray_nodes, tmp_path):
    folder, port, address = project(tmp_path), ports(1), ray_nodes.address
    apply(write_in(folder, TIGHT.format(no_room="stop-first", tag="v1", port=port)), address)
    try:
        plan = oob("plan", write_in(folder, TIGHT.format(no_room="stop-first", tag="v2", port=port)),
                   "--address", address)
        assert plan.returncode == 0, plan.stderr
        assert f"stop-first: node {B} has no room for a stand-in (needs 3 CPU, 1 free)" in plan.stdout, plan.stdout
        plan = oob("plan", write_in(folder, TIGHT.format(no_room="wait", tag="v2", port=port)), "--address", address)
        assert "rolling, no downtime" in plan.stdout and f"node {B} has no room" in plan.stdout, plan.stdout
    finally:
        assert oob("delete", "tight", "--address", address).returncode == 0


# --- (d) a node dies and comes back on a new address ---------------------------------------


@pytest.mark.timeout(300)
def test_a_node_back_on_a_new_address_serves_its_replica_and_the_peer_follows(ray_nodes, spread):
    address = ray_nodes.address
    shelf = {r["name"]: r for r in rows(address, "spread", "shelf")}
    victim = next(r for r in shelf.values() if node_of(r) == C)
    old_url = victim["endpoints"]["http"]
    new_ip = ray_nodes.next_ip()
    new_url = old_url.replace(f"//{C}:", f"//{new_ip}:")
    reader_before = get(spread["reader"])
    assert old_url in reader_before["endpoints"]["SHELF"], reader_before

    ray_nodes.kill(C)
    wait_for(f"{C} dead in Ray", lambda: C not in ray_nodes.alive(), 40)
    # No node with room: it waits (max_per_node 1, the other two nodes hold one each), and says so.
    deadline = time.monotonic() + 20
    while (gone := {x["name"]: x for x in rows(address, "spread", "shelf")}[victim["name"]])["state"] != "pending":
        assert time.monotonic() < deadline, json.dumps(gone)
        time.sleep(0.5)
    assert "max_per_node (1)" in gone["pending"], gone
    ray_nodes.add(new_ip, {"zone": "c"})

    def serving():
        try:
            return get(f"{new_url}/who", timeout=1)
        except requests.RequestException:
            return None
    answer = wait_for(f"{victim['name']} serving at {new_url}", serving, 90, every=0.1)
    ready = time.monotonic()
    assert answer["ip"] == new_ip, answer

    def rewired():
        peers = get(spread["reader"])
        return peers if new_url in peers["endpoints"]["SHELF"] else None
    peers = wait_for(f"the reader re-wired to {new_url}", rewired, 30, every=0.1)
    took = time.monotonic() - ready
    assert took <= 5, f"the reader saw {new_url} {took:.1f}s after the replica answered there"
    assert old_url not in peers["endpoints"]["SHELF"] and peers["pid"] == reader_before["pid"], peers
    assert new_url in peers["env"].split(","), peers  # OOB_SHELF_URLS follows too
    now = {r["name"]: r for r in rows(address, "spread", "shelf")}
    assert node_of(now[victim["name"]]) == new_ip and now[victim["name"]]["state"] == "alive", now
    assert sorted(node_of(r) for r in now.values()) == sorted([HEAD, B, new_ip])


# --- the fixture: a node failure -----------------------------------------------------------


def test_a_killed_node_goes_dead_and_a_new_address_joins(ray_nodes):
    """Kills the last worker (127.0.0.4, or the node that replaced it) and starts one on the
    next address with its labels."""
    victim = max((n for n in ray_nodes.nodes.values() if not n.head), key=lambda n: tuple(map(int, n.ip.split("."))))
    new_ip = ray_nodes.next_ip()
    start = time.monotonic()
    ray_nodes.kill(victim.ip)
    wait_for(f"{victim.ip} dead", lambda: victim.ip not in ray_nodes.alive(), 30)
    dead_after = time.monotonic() - start
    ray_nodes.add(new_ip, victim.labels)
    alive = ray_nodes.alive()
    assert alive[new_ip]["labels"] == victim.labels and len(alive) == 3, alive
    print(f"{victim.ip} dead after {dead_after:.1f}s")

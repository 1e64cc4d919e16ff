"""Converge, placement and links on a two-node Ray cluster this module starts (and stops) itself.

Everything goes through the `oob` CLI as a user would run it: apply, status -o json, plan,
sync, delete, each as a subprocess with --address.
"""
from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import requests

from conftest import OOB, free_port, port_open, user_env, with_examples
from conftest import oob as run_oob

pytestmark = [pytest.mark.timeout(300), pytest.mark.ray]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    c.add_node(num_cpus=4)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def oob(*args, check=True, timeout=180):
    result = run_oob(*args, timeout=timeout)  # from `/`, no PYTHONPATH
    # The tail of a failed actor's log may hold the user's own traceback; ours never shows.
    assert "Traceback" not in result.stderr.split("--- last lines of the actor's log ---")[0], result.stderr
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def status(cluster, name):
    return json.loads(oob("status", name, "--address", cluster.address, "-o", "json").stdout)


def pids(state):
    return {r["name"]: r["pid"] for r in state["replicas"]}


def spec_text(port, env_value="1", with_extra=True):
    text = f"""
version: 1
name: conv
actors:
  web:
    class: apps:Wired
    replicas: 2
    restarts: -1
    servers: [{{name: http, port: {port}, routes: [{{path: /, call: get}}]}}]
  worker:
    class: apps:Wired
    env: {{SETTING: "{env_value}"}}
    connect: {{web: web.http}}
"""
    return text + ("  extra:\n    class: apps:Wired\n" if with_extra else "")


def test_converge(cluster, project):
    port = free_port()
    path = project / "conv.yaml"
    path.write_text(spec_text(port))
    addr = cluster.address

    first = oob("apply", path, "--address", addr)
    assert f"http://127.0.0.1:{port}" in first.stdout
    assert requests.get(f"http://127.0.0.1:{port + 1}/", timeout=5).text == "ok"  # replica 1 at port + 1
    before = pids(status(cluster, "conv"))
    assert set(before) == {"web-0", "web-1", "worker-0", "extra-0"}

    # Same spec again: nothing restarts.
    assert "no changes" in oob("plan", path, "--address", addr).stdout
    oob("apply", path, "--address", addr)
    assert pids(status(cluster, "conv")) == before

    # One actor changed: only its replicas are replaced.
    path.write_text(spec_text(port, env_value="2"))
    plan = oob("plan", path, "--address", addr, "-o", "json")
    kinds = {(a["actor"], a["kind"]) for a in json.loads(plan.stdout)["actions"]}
    assert ("worker", "replace") in kinds and ("web", "keep") in kinds
    oob("apply", path, "--address", addr)
    after = pids(status(cluster, "conv"))
    assert {k: v for k, v in after.items() if k != "worker-0"} == {k: v for k, v in before.items() if k != "worker-0"}
    assert after["worker-0"] != before["worker-0"]

    # Removed from the spec: deleted.
    path.write_text(spec_text(port, env_value="2", with_extra=False))
    oob("apply", path, "--address", addr)
    assert set(pids(status(cluster, "conv"))) == {"web-0", "web-1", "worker-0"}

    # Delete: no actor, port or process left.
    web_pids = [p for n, p in after.items()]
    out = oob("delete", path, "--address", addr)
    assert "deleted conv" in out.stdout
    assert not port_open(port) and not port_open(port + 1)
    gone = oob("status", "conv", "--address", addr, check=False)
    assert gone.returncode == 1 and "no deployment 'conv'" in gone.stderr
    for pid in web_pids:
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_spread_placement_uses_both_nodes(cluster, project):
    path = project / "spread.yaml"
    path.write_text(textwrap.dedent("""
        version: 1
        name: spread
        ray: {placement: STRICT_SPREAD}
        actors:
          shard:
            class: apps:Wired
            replicas: 2
            resources: {cpus: 1}
    """))
    oob("apply", path, "--address", cluster.address)
    try:
        nodes = {r["node_id"] for r in status(cluster, "spread")["replicas"]}
        assert len(nodes) == 2
    finally:
        oob("delete", "spread", "--address", cluster.address)


def test_cpu_link_across_and_within_nodes(cluster, project):
    """auto: shm to the target on the source's node, object_store to the one on the other node."""
    path = project / "link.yaml"
    with_examples(project)
    path.write_text(textwrap.dedent("""
        version: 1
        name: xlink
        ray: {placement: STRICT_SPREAD}
        actors:
          trainer:
            class: examples.services:Trainer
            resources: {cpus: 1}
            buffers: {weights: {shape: [256, 1024], dtype: float32}}
          server:
            class: examples.services:WeightServer
            replicas: 2
            resources: {cpus: 1}
            buffers: {weights: {shape: [256, 1024], dtype: float32}}
        links:
          - {name: weights, from: trainer.weights, to: [server.weights]}
    """))
    # STRICT_SPREAD over 3 bundles needs 3 nodes: use SPREAD (best effort) instead.
    path.write_text(path.read_text().replace("STRICT_SPREAD", "SPREAD"))
    # Before apply the plan (against the two-node cluster it finds) cannot know the placement yet.
    before = oob("plan", path)
    assert "auto (shm or object_store)" in before.stdout and "decided when the replicas are placed" in before.stdout
    oob("apply", path, "--address", cluster.address)
    try:
        state = status(cluster, "xlink")
        nodes = {r["name"]: r["node_id"] for r in state["replicas"]}
        expected = {"shm" if nodes[f"server-{i}"] == nodes["trainer-0"] else "object_store" for i in range(2)}
        out = oob("sync", "xlink", "weights", "--address", cluster.address)
        assert "version 1" in out.stdout and "2 targets" in out.stdout
        assert set(out.stdout.rsplit(", ", 1)[-1].strip(")\n").split("/")) == expected
        state = status(cluster, "xlink")
        link = state["links"][0]
        assert link["last_push"]["version"] == 1 and link["last_push"]["bytes"] == 2 * 256 * 1024 * 4
        assert all(r["versions"] == {"weights": 1} for r in state["replicas"] if r["actor"] == "server")
        plan = oob("plan", path, "--address", cluster.address).stdout
        assert "/".join(sorted(expected)) in plan
    finally:
        oob("delete", "xlink", "--address", cluster.address)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("oob-xlink-")]


def test_logs_and_failed_apply(cluster, project):
    path = project / "logs.yaml"
    path.write_text(textwrap.dedent("""
        version: 1
        name: logs
        actors:
          talker:
            command: ["python3", "-u", "-c", "import time\\nprint('hello from the process')\\nimport http.server, sys\\nhttp.server.test(port=int(sys.argv[1]), bind='127.0.0.1')", "{port}"]
            restarts: 1
            servers: [{name: main, protocol: tcp, port: 0}]
    """))
    addr = cluster.address
    oob("apply", path, "--address", addr)
    try:
        assert "hello from the process" in oob("logs", "logs", "talker", "--address", addr).stdout
        follow = subprocess.Popen([OOB, "logs", "logs", "talker-0", "-f", "--address", addr],
                                  stdout=subprocess.PIPE, text=True, env=user_env(), cwd="/")
        try:
            assert "hello from the process" in follow.stdout.readline() + follow.stdout.readline()
        finally:
            follow.kill()
            follow.wait()
        state = status(cluster, "logs")["replicas"][0]
        assert state["process"]["alive"] and state["process"]["argv"][0] == "python3"
    finally:
        oob("delete", "logs", "--address", addr)

    bad = project / "bad.yaml"
    bad.write_text(textwrap.dedent("""
        version: 1
        name: bad
        actors:
          fine:
            class: apps:Wired
          broken:
            class: apps:Broken
            connect: {}
    """))
    failed = oob("apply", bad, "--address", addr, check=False)
    assert failed.returncode == 1
    assert ("error: apply stopped at step 1/1 (start broken[0], fine[0]): actor broken-0 failed to start: "
            "RuntimeError: config file /etc/missing.conf not found") in failed.stderr, failed.stderr
    assert "about to fail: checking the config" in failed.stderr  # the tail of its log
    assert 'apps.py", line' in failed.stderr and "/oobspec/" not in failed.stderr  # the user's frames only
    # Only what became ready may stay (fine-0, when it was ready before broken-0 failed).
    shown = oob("status", "bad", "--address", addr, "-o", "json", check=False)
    alive = [r["name"] for r in json.loads(shown.stdout)["replicas"] if r["state"] == "alive"] \
        if shown.returncode == 0 else []
    assert set(alive) <= {"fine-0"}, shown.stdout
    assert ("at the new version: fine-0" in failed.stderr) == (alive == ["fine-0"])
    assert oob("delete", "bad", "--address", addr, check=False).returncode in (0, 1)
    gone = oob("status", "bad", "--address", addr, check=False)
    assert gone.returncode == 1

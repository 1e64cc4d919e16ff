"""Remote clusters as users reach them: Ray Client (`ray://HEAD:10001`) and Ray Jobs
(`http://HEAD:8265`), on a `ray start --head` with both (token auth on) that this module starts.
The spec's class and a module it imports at run time sit in a temporary folder; `oob` runs
from `/`; nothing gets help from PYTHONPATH."""
from __future__ import annotations

import json
import time

import pytest
import requests

from conftest import free_port, oob, started_head, user_env, write_in

pytestmark = [pytest.mark.timeout(300), pytest.mark.ray]


@pytest.fixture(scope="module")
def head():
    """`ray start --head` with a Ray Client port and the dashboard (job API); its addresses.
    REMOTE_TOKEN is the cluster's own secret: a job's apply reads it there (a job's runtime_env
    would show it in the dashboard), while ray:// forwards it from the user's shell."""
    gcs, client, dashboard, agent = free_port(), free_port(), free_port(), free_port()
    # The job agent's own port too: its default (52365) may be another cluster's on this machine,
    # and then no job is ever accepted ("No available agent").
    with started_head(f"--port={gcs}", f"--ray-client-server-port={client}", f"--dashboard-port={dashboard}",
                      f"--dashboard-agent-listen-port={agent}",
                      "--dashboard-host=127.0.0.1", env=user_env(REMOTE_TOKEN="remote-secret"),
                      ports=(gcs, client, dashboard)):
        yield {"client": f"ray://127.0.0.1:{client}", "jobs": f"http://127.0.0.1:{dashboard}",
               "gcs": f"127.0.0.1:{gcs}"}


MODULE = '''
import os

import numpy as np
import oobspec


class Store:
    def __init__(self):
        print(f"remote store starting (pid {os.getpid()})")

    async def helper(self) -> int:
        import remote_helper  # imported at run time: only the spec's folder on the cluster has it
        return remote_helper.VALUE

    async def fill(self, value: float = 1.0) -> float:
        buf = oobspec.context().buffers["data"]
        buf[...] = value
        return float(buf.sum())


class Sink:
    async def total(self) -> dict:
        ctx = oobspec.context()
        return {"version": ctx.versions.get("data", 0), "sum": float(ctx.buffers["data"].sum())}
'''

SPEC = """
version: 1
name: {name}
actors:
  store:
    class: remote_mods:Store
    restarts: -1
    buffers: {{data: {{shape: [16, 16], dtype: float32}}}}
    servers:
      - {{name: http, host: 0.0.0.0, port: 0, auth: {{token_env: REMOTE_TOKEN}},
         routes: [{{path: /helper, call: helper}}, {{method: POST, path: /fill, call: fill}}]}}
      - {{name: local, port: 0, routes: [{{path: /helper, call: helper}}]}}
  sink:
    class: remote_mods:Sink
    replicas: 2
    buffers: {{data: {{shape: [16, 16], dtype: float32}}}}
links: [{{name: data, from: store.data, to: [sink.data]}}]
"""


def user_project(tmp_path, name):
    folder = tmp_path / "remote-proj"
    folder.mkdir()
    (folder / "remote_mods.py").write_text(MODULE)
    (folder / "remote_helper.py").write_text("VALUE = 42\n")
    (folder / "big.bin").write_bytes(b"\0" * 2_000_000)
    (folder / ".oobignore").write_text("# data that need not travel\n*.bin\n")
    return write_in(folder, SPEC.format(name=name), "remote.yaml")


def node_ip() -> str:
    from ray._private.services import get_node_ip_address
    return get_node_ip_address()


@pytest.mark.parametrize("via", ["client", "jobs"])
def test_remote_apply_status_sync_logs_delete(head, tmp_path, via):
    name = f"remote-{via}"
    spec = user_project(tmp_path, name)
    address = head[via]
    env = user_env(REMOTE_TOKEN="remote-secret")  # on this machine, the cluster's environment too
    plan = oob("plan", spec, "--address", address, env=env)
    assert plan.returncode == 0, plan.stderr
    if via == "client":  # what would travel, and how big (big.bin is left out by .oobignore)
        assert f"upload: {spec.parent} (4 files," in plan.stdout, plan.stdout
    applied = oob("apply", spec, "--address", address, env=env)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "OOB309 warning: store.local binds 127.0.0.1 on a remote cluster" in applied.stderr
    assert f"http://{node_ip()}:" in applied.stdout  # 0.0.0.0 is printed as the node's address
    try:
        status = oob("status", name, "--address", address, "-o", "json", env=env)
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)
        assert state["healthy"] and len(state["replicas"]) == 3
        url = next(r for r in state["replicas"] if r["name"] == "store-0")["endpoints"]["http"]
        auth = {"Authorization": "Bearer remote-secret"}
        assert requests.get(f"{url}/helper", headers=auth, timeout=5).json() == 42
        assert requests.post(f"{url}/fill", json={"value": 2.0}, headers=auth, timeout=5).json() == 512.0
        synced = oob("sync", name, "data", "--address", address, env=env)
        assert synced.returncode == 0 and "data: version 1" in synced.stdout, synced.stdout + synced.stderr
        logs = oob("logs", name, "store", "--address", address, env=env)
        assert logs.returncode == 0 and "remote store starting" in logs.stdout, logs.stdout + logs.stderr
        listed = oob("list", "--address", address, env=env)
        assert name in listed.stdout
        # The same spec and code, whichever way oob connects: nothing to change (the module
        # imports oobspec, which never counts), and a re-apply the other way restarts nobody.
        pids = {r["name"]: r["pid"] for r in state["replicas"]}
        for other in ("client", "jobs", "gcs"):
            again = oob("plan", spec, "--address", head[other], env=env)
            assert again.returncode == 0 and "replace" not in again.stdout, (other, again.stdout + again.stderr)
        other = "jobs" if via == "client" else "client"
        assert oob("apply", spec, "--address", head[other], env=env).returncode == 0
        status = json.loads(oob("status", name, "--address", address, "-o", "json", env=env).stdout)
        assert {r["name"]: r["pid"] for r in status["replicas"]} == pids
    finally:
        deleted = oob("delete", name, "--address", address, env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert f"deleted {name}: 3 actors" in deleted.stdout
    gone = oob("status", name, "--address", address, env=env)
    assert gone.returncode == 1 and f"no deployment '{name}'" in gone.stdout + gone.stderr


@pytest.mark.parametrize("via", ["client", "jobs"])
def test_a_folder_over_the_upload_cap_is_one_clear_error(head, tmp_path, via):
    spec = user_project(tmp_path, f"capped-{via}")
    (spec.parent / ".oobignore").unlink()  # now big.bin travels: 1.9 MiB over a 1 MiB cap
    out = oob("apply", spec, "--address", head[via], env=user_env(OOB_UPLOAD_CAP_MB="1", REMOTE_TOKEN="remote-secret"))
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    assert "over the 1.0 MiB upload cap" in errors[0] and "largest: big.bin (1.9 MiB)" in errors[0]


@pytest.mark.parametrize("via", ["client", "jobs"])
def test_unreachable_remote_address_fails_fast(via):
    address = f"ray://127.0.0.1:{free_port()}" if via == "client" else f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    out = oob("status", "x", "--address", address, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith(f"error: cannot connect to Ray at {address}")
    assert time.monotonic() - start < 15

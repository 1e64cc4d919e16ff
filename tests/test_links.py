"""Buffers and links on a real local Ray: push from inside an actor, `oob sync`, no shm leaks."""
from __future__ import annotations

import os
import signal
import time

import pytest
import ray

import oobspec
from conftest import oob

pytestmark = [pytest.mark.timeout(180), pytest.mark.ray]

SPEC = """
version: 1
name: {name}
actors:
  src:
    class: apps:Source
    buffers: {{data: {{shape: [512, 256], dtype: float32}}}}
  dst:
    class: apps:Sink
    replicas: 2
    buffers: {{data: {{shape: [512, 256], dtype: float32}}}}
links:
  - {{name: data, from: src.data, to: [dst.data], transport: {transport}}}
"""


def segments(name):
    from oobspec.contract import segment_prefix
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(segment_prefix(name)))


@pytest.mark.parametrize("transport", ["shm", "object_store", "auto"])
def test_push_reaches_every_target_replica(local_ray, write_spec, transport):
    name = f"push-{transport.replace('_', '-')}"
    spec = oobspec.load(write_spec(SPEC.format(name=name, transport=transport)))
    with oobspec.deploy(spec) as d:
        if transport != "object_store":
            assert segments(name) == [f"oob-{name}-_dst_0_data", f"oob-{name}-_dst_1_data"]
        for version, seed in enumerate([1, 2], start=1):
            pushed = ray.get(d.handle("src").fill_and_push.remote(seed))
            assert pushed["version"] == version and pushed["targets"] == 2
            assert pushed["bytes"] == 2 * 512 * 256 * 4
            assert pushed["transport"] == ("shm" if transport == "auto" else transport)
            for i in range(2):
                got = ray.get(d.handle("dst", i).checksum.remote())
                assert got == {"version": version, "checksum": pushed["checksum"]}
        assert "pushes from replica 0 of src" in ray.get(d.handle("dst", 1).try_push.remote())
    assert segments(name) == []


def test_oob_sync_cli_and_leaks_after_killed_actors(local_ray, write_spec):
    name = "sync"
    spec = oobspec.load(write_spec(SPEC.format(name=name, transport="auto")))
    address = ray.get_runtime_context().gcs_address
    with oobspec.deploy(spec) as d:
        ray.get(d.handle("src").fill_and_push.remote(7))
        out = oob("sync", name, "data", "--address", address)
        assert out.returncode == 0, out.stderr
        assert "data: version 2" in out.stdout and "2 targets" in out.stdout and "shm" in out.stdout
        assert all(ray.get(d.handle("dst", i).checksum.remote())["version"] == 2 for i in range(2))
        bad = oob("sync", name, "nope", "--address", address)
        assert bad.returncode == 1 and "has no link 'nope' (links: data)" in bad.stderr
        # A crashed source and a crashed target: delete still removes their segments.
        created = segments(name)
        assert created == [f"oob-{name}-_dst_0_data", f"oob-{name}-_dst_1_data"]
        for actor in ("src", "dst"):
            os.kill(ray.get(d.handle(actor).pid.remote()), signal.SIGKILL)
        time.sleep(1)
    assert not [n for n in created if os.path.exists(f"/dev/shm/{n}")]

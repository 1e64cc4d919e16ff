"""Buffers and links on a real local Ray: push from inside an actor, `oob sync`, no shm leaks."""
from __future__ import annotations

import os
import signal
import time

import pytest
import ray

import oobspec
from conftest import kill_and_wait, oob

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


def target_files(name, replicas=2):
    """What each target replica owns in /dev/shm: its data, its control block and its doorbell."""
    from oobspec.transports.shm import file_name
    return sorted(file_name(f"oob-{name}-_dst_{i}_data{suffix}") for i in range(replicas) for suffix in ("", ".bell", ".ctl"))


@pytest.mark.parametrize("transport", ["shm", "object_store", "auto"])
def test_push_reaches_every_target_replica(local_ray, write_spec, transport):
    name = f"push-{transport.replace('_', '-')}"
    spec = oobspec.load(write_spec(SPEC.format(name=name, transport=transport)))
    with oobspec.deploy(spec) as d:
        assert segments(name) == target_files(name)  # object_store targets too: their inbox
        for version, seed in enumerate([1, 2], start=1):
            pushed = ray.get(d.handle("src").fill_and_push.remote(seed))
            assert pushed["version"] == version and pushed["targets"] == 2
            assert pushed["bytes"] == 2 * 512 * 256 * 4
            assert pushed["transport"] == ("shm" if transport == "auto" else transport)
            assert pushed["direct"] == (0 if transport == "object_store" else 2)  # no Ray call to those
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
        assert created == target_files(name)
        for actor in ("src", "dst"):
            os.kill(ray.get(d.handle(actor).pid.remote()), signal.SIGKILL)
        time.sleep(1)
    assert not [n for n in created if os.path.exists(f"/dev/shm/{n}")]


WEIGHTS = """
version: 1
name: {name}
actors:
  trainer:
    class: apps:Trainer
    restarts: 1
    buffers: {{params: {{layout: {{w1: {{shape: [256, 128], dtype: bfloat16}}, b1: {{shape: [128]}}}}}}}}
  server:
    class: apps:Server
    replicas: 2
    restarts: 1
    buffers: {{params: {{layout: {{w1: {{shape: [256, 128], dtype: bfloat16}}, b1: {{shape: [128]}}}}}}}}
  mortal:
    class: apps:Server
    buffers: {{params: {{layout: {{w1: {{shape: [256, 128], dtype: bfloat16}}, b1: {{shape: [128]}}}}}}}}
links:
  - {{name: weights, from: trainer.params, to: [server.params, mortal.params], buffering: double,
     transport: {transport}}}
"""


def restart(handle) -> None:
    """kill -9 a replica, then wait until Ray has restarted it."""
    pid = ray.get(handle.pid.remote())
    kill_and_wait(pid)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if ray.get(handle.pid.remote(), timeout=10) != pid:
                return
        except ray.exceptions.RayError:
            time.sleep(0.2)
    raise AssertionError(f"pid {pid} was not restarted")


@pytest.mark.parametrize("transport", ["auto", "object_store"])
def test_weight_sync_wakes_targets_survives_a_restart_without_reapply(local_ray, write_spec, transport):
    name = f"weights-{transport.replace('_', '-')}"
    direct = transport == "auto"  # shm: the source writes; object_store: a Ray call per target
    spec = oobspec.load(write_spec(WEIGHTS.format(name=name, transport=transport)))
    with oobspec.deploy(spec) as d:
        trainer, servers = d.handle("trainer"), [d.handle("server", i) for i in range(2)] + [d.handle("mortal")]
        waiting = [s.next.remote(0) for s in servers]  # asleep in ctx.updated before the push
        time.sleep(0.5)
        pushed = ray.get(trainer.step.remote(1))
        assert (pushed["version"], pushed["targets"], pushed["direct"], pushed["transport"]) == \
            (1, 3, 3 if direct else 0, "shm" if direct else "object_store")
        assert pushed["bytes"] == 3 * (256 * 128 * 2 + 128 * 4)  # one bucket: w1, then b1 at byte 65536
        assert ray.get(waiting, timeout=30) == [(1, pushed["checksum"])] * 3
        pushed = ray.get(trainer.step.remote(2))
        assert ray.get([s.current.remote() for s in servers]) == [(2, pushed["checksum"])] * 3

        restart(servers[1])  # a target; Ray restarts it (restarts: 1): the next push reaches it, no re-apply
        pushed = ray.get(trainer.step.remote(3))
        assert (pushed["version"], pushed["targets"]) == (3, 3)
        assert ray.get([s.current.remote() for s in servers]) == [(3, pushed["checksum"])] * 3

        restart(trainer)  # the source: it wires itself again from apply's record, no re-apply
        waiting = [s.next.remote(3) for s in servers]
        pushed = ray.get(trainer.step.remote(4))
        assert (pushed["version"], pushed["targets"]) == (4, 3)  # it goes on from the targets' version
        assert ray.get(waiting, timeout=30) == [(4, pushed["checksum"])] * 3

        kill_and_wait(ray.get(servers[2].pid.remote()))  # restarts: 0, gone for good
        with pytest.raises(ray.exceptions.RayTaskError) as failed:
            ray.get(trainer.step.remote(5), timeout=30)  # at once, no hang
        assert "link 'weights': version 5 reached 2 of 3 targets; mortal-0: not running" in str(failed.value)
        got = ray.get([s.current.remote() for s in servers[:2]])  # the live targets got version 5
        assert got[0] == got[1] and got[0][0] == 5
    assert segments(name) == []

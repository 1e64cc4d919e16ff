"""Snapshots on a real local Ray (CPU): a reader holding one across pushes, a single-buffered
reader during 128 MiB pushes, a relay forwarding the version it holds, a target killed during
pushes. Every push stamps all of the buffer with its version, so a torn read cannot hide."""
from __future__ import annotations

import time

import pytest
import ray

import oobspec
from conftest import kill_and_wait

pytestmark = [pytest.mark.timeout(180), pytest.mark.ray]

SPEC = """
version: 1
name: {name}
actors:
  src:
    class: apps:Stamper
    buffers: {{data: {{shape: [{n}], dtype: float32}}}}
  dst:
    class: apps:Reader
    replicas: {replicas}
    restarts: 1
    buffers: {{data: {{shape: [{n}], dtype: float32}}}}
links:
  - {{name: data, from: src.data, to: [dst.data], buffering: {buffering}, timeout: {timeout}, transport: {transport}}}
"""


def deploy(write_spec, name, buffering, n=4096, replicas=1, timeout=10, transport="auto"):
    text = SPEC.format(name=name, n=n, replicas=replicas, buffering=buffering, timeout=timeout, transport=transport)
    return oobspec.deploy(oobspec.load(write_spec(text)))


@pytest.mark.parametrize("transport", ["shm", "object_store"])
def test_triple_a_snapshot_held_across_three_pushes_stays_whole(local_ray, write_spec, transport):
    with deploy(write_spec, f"hold3-{transport.replace('_', '-')}", "triple", transport=transport) as d:
        ray.get(d.handle("src").push_stamped.remote(1))
        held = d.handle("dst").hold.remote(3)
        time.sleep(1)  # it holds version 1
        started = time.monotonic()
        assert ray.get(d.handle("src").push_stamped.remote(3)) == [2, 3, 4]  # none waits for the reader
        assert time.monotonic() - started < 2
        got = ray.get(held)
        assert got["first"] == got["last"] == [1, 1.0, 1.0] and got["intact"] and got["newest"] == 4
        assert ray.get(d.handle("dst").stamp.remote()) == [4, 4.0, 4.0]


def test_double_a_push_that_needs_the_held_slot_fails_naming_the_target(local_ray, write_spec):
    with deploy(write_spec, "hold2", "double", timeout=1) as d:
        held = d.handle("dst").hold.remote(4)
        time.sleep(1)  # it holds version 0
        got = ray.get(d.handle("src").push_stamped.remote(2))
        assert got[0] == 1  # the free slot
        assert "version 2 reached 0 of 1 targets; dst-0: readers held its slots for 1 s" in got[1]
        result = ray.get(held)
        assert result["first"] == result["last"] == [0, 0.0, 0.0] and result["intact"]
        assert ray.get(d.handle("src").push_stamped.remote(1)) == [3]  # released: it goes through
        assert ray.get(d.handle("dst").stamp.remote()) == [3, 3.0, 3.0]


def test_single_reader_during_128_mib_pushes_never_reads_a_torn_version(local_ray, write_spec):
    with deploy(write_spec, "torn", "single", n=32 << 20) as d:  # 32 Mi float32: 128 MiB
        reading = d.handle("dst").read_loop.remote(6)
        time.sleep(0.5)
        pushed = ray.get(d.handle("src").push_stamped.remote(10, 0.05), timeout=120)
        assert pushed == list(range(1, 11))  # every push waited for the reader, none failed
        got = ray.get(reading, timeout=60)
        assert got["torn"] == 0 and got["reads"] >= 10 and len(got["versions"]) >= 3, got


RELAY = """
version: 1
name: relay
actors:
  src: {class: apps:Stamper, buffers: {data: {shape: [1024], dtype: float32}}}
  mid: {class: apps:Relay, buffers: {data: {shape: [1024], dtype: float32}}}
  end: {class: apps:Reader, buffers: {data: {shape: [1024], dtype: float32}}}
links:
  - {name: data, from: src.data, to: [mid.data], buffering: double}
  - {name: onward, from: mid.data, to: [end.data], transport: object_store}
"""


def test_a_relay_forwards_the_version_it_holds_not_a_stale_slot(local_ray, write_spec):
    with oobspec.deploy(oobspec.load(write_spec(RELAY))) as d:
        for version in (1, 2, 3):
            assert ray.get(d.handle("src").push_stamped.remote(1)) == [version]
            ray.get(d.handle("mid").forward.remote())
            assert ray.get(d.handle("end").stamp.remote()) == [version, float(version), float(version)]


def test_a_target_killed_during_pushes_is_named_and_reached_again_after_its_restart(local_ray, write_spec):
    with deploy(write_spec, "killed", "double", n=1 << 20, replicas=2) as d:
        src, dst = d.handle("src"), [d.handle("dst", i) for i in range(2)]
        pushing = src.push_stamped.remote(150, 0.02)
        time.sleep(1)
        kill_and_wait(ray.get(dst[1].pid.remote()))
        got = ray.get(pushing, timeout=120)  # every push returned: no hang
        errors = [g for g in got if isinstance(g, str)]
        assert all("dst-1: not running" in e and "reached 1 of 2 targets" in e for e in errors), errors[:3]
        assert len(got) == 150 and isinstance(got[0], int)
        assert ray.get(dst[0].stamp.remote()) == [150, 150.0, 150.0]  # the live one got every version
        ray.get(dst[1].pid.remote(), timeout=60)  # Ray restarts it (restarts: 1)
        assert ray.get(src.push_stamped.remote(1)) == [151]
        assert [ray.get(r.stamp.remote()) for r in dst] == [[151, 151.0, 151.0]] * 2

"""GPU links on a real local Ray, written to fail on a racy copy: a distinct seed per push, a
long kernel queued on the source's stream before each push (the copy must wait for it), the
checksum taken by the target when it wakes, in a snapshot. Skipped without cupy and a CUDA GPU;
bench/gpu_check.sh runs them."""
from __future__ import annotations

import os
import signal
import time

import pytest

import oobspec
from conftest import kill_and_wait


def _gpus() -> int:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


GPUS = _gpus()
pytestmark = [pytest.mark.gpu, pytest.mark.ray, pytest.mark.timeout(240),
              pytest.mark.skipif(GPUS == 0, reason="needs cupy and a CUDA GPU")]

SPEC = """
version: 1
name: {name}
actors:
  src:
    class: gpu_apps:GpuStamper
    resources: {{gpus: {share}}}
    buffers: {{data: {{shape: [{n}], dtype: float32, device: gpu}}}}
  dst:
    class: gpu_apps:GpuReader
    replicas: {replicas}
    restarts: 1
    resources: {{gpus: {share}}}
    buffers: {{data: {{shape: [{n}], dtype: float32, device: gpu}}}}
links:
  - {{name: data, from: src.data, to: [dst.data], buffering: {buffering}, transport: {transport}, timeout: 5}}
"""


def deploy(write_spec, name, buffering="single", replicas=1, n=16 << 20, transport="auto", share=0.25):
    text = SPEC.format(name=name, buffering=buffering, replicas=replicas, n=n, transport=transport, share=share)
    return oobspec.deploy(oobspec.load(write_spec(text)))


@pytest.mark.parametrize("side_stream", [False, True], ids=["cupy-stream", "torch-side-stream"])
def test_each_push_waits_for_the_work_queued_before_it(local_ray, write_spec, side_stream):
    import ray
    if side_stream:
        pytest.importorskip("torch")
    with deploy(write_spec, f"gpu-order-{int(side_stream)}", replicas=2) as d:
        dst = [d.handle("dst", i) for i in range(2)]
        for version, seed in enumerate([11, 12, 13, 14], start=1):
            waiting = [r.next.remote(version - 1) for r in dst]
            pushed = ray.get(d.handle("src").push_seeded.remote(seed, 200, side_stream), timeout=60)
            assert (pushed["version"], pushed["direct"], pushed["transport"]) == (version, 2, "cuda_ipc"), pushed
            assert ray.get(waiting, timeout=60) == [[version, pushed["checksum"]]] * 2


def test_a_snapshot_held_while_the_source_laps_it(local_ray, write_spec):
    import ray
    with deploy(write_spec, "gpu-lap", buffering="triple") as d:
        first = ray.get(d.handle("src").push_seeded.remote(1, 50))
        held = d.handle("dst").hold.remote(4)
        time.sleep(1)
        laps = ray.get(d.handle("src").push_many.remote([2, 3, 4, 5]), timeout=60)
        assert [p["version"] for p in laps] == [2, 3, 4, 5]  # triple: none waits for the reader
        got = ray.get(held, timeout=60)
        assert got["first"] == got["last"] == [1, first["checksum"]] and got["intact"]
        assert ray.get(d.handle("dst").next.remote(4)) == [5, laps[-1]["checksum"]]


def test_a_target_restarted_during_pushes(local_ray, write_spec):
    import ray
    with deploy(write_spec, "gpu-restart", buffering="double", replicas=2) as d:
        src, dst = d.handle("src"), [d.handle("dst", i) for i in range(2)]
        pushing = src.push_many.remote(list(range(100, 260)), 0.02)
        time.sleep(1)
        kill_and_wait(ray.get(dst[1].pid.remote()))
        got = ray.get(pushing, timeout=120)  # every push returned: no hang, no crash of the source
        errors = [p["error"] for p in got if "error" in p]
        assert all("dst-1" in e and "reached 1 of 2" in e for e in errors), errors[:3]
        ray.get(dst[1].pid.remote(), timeout=60)  # Ray restarted it
        waiting = [r.next.remote(len(got)) for r in dst]
        pushed = ray.get(src.push_seeded.remote(999, 100), timeout=60)
        assert "error" not in pushed, pushed
        assert ray.get(waiting, timeout=60) == [[len(got) + 1, pushed["checksum"]]] * 2


@pytest.mark.skipif(GPUS < 2, reason="nccl needs two GPUs")
def test_nccl_with_a_killed_rank_is_an_error_not_a_hang(local_ray, write_spec):
    import ray
    with deploy(write_spec, "gpu-nccl", transport="nccl", share=1) as d:
        pushed = ray.get(d.handle("src").push_seeded.remote(7, 50), timeout=120)
        assert pushed["transport"] == "nccl" and "error" not in pushed, pushed
        assert ray.get(d.handle("dst").next.remote(0), timeout=60) == [1, pushed["checksum"]]
        os.kill(ray.get(d.handle("dst").pid.remote()), signal.SIGKILL)
        started = time.monotonic()
        failed = ray.get(d.handle("src").push_seeded.remote(8, 50), timeout=120)
        assert "dst-0" in failed["error"], failed
        assert time.monotonic() - started < 30  # the link's timeout (5 s) and a second, not a hang
        again = ray.get(d.handle("src").push_seeded.remote(9, 50), timeout=60)
        assert "re-apply" in again["error"], again  # the aborted communicator says how to fix it

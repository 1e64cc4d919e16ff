"""GPU tests for cuda_ipc and nccl; skipped unless cupy imports and sees a CUDA device.

Run on a GPU machine with bench/gpu_check.sh (prints the bandwidth figures).
"""
from __future__ import annotations

import multiprocessing as mp
import re
import shutil
import statistics
import subprocess
import time

import pytest

from oobspec.transports import TransportError, nccl


def _gpu_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no cupy, no driver, or no device
        return 0


GPUS = _gpu_count()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(150),
    pytest.mark.skipif(GPUS == 0, reason="needs cupy and a CUDA GPU"),
]
# CUDA cannot survive fork; every child starts clean.
SPAWN = mp.get_context("spawn")
GiB = 1 << 30


def _fill(a, seed: int) -> None:
    from gpu_apps import fill
    fill(a, seed)


def _checksum(a) -> int:
    from gpu_apps import checksum
    return checksum(a)


def spin(ms: float) -> None:
    from gpu_apps import spin as queue_spin
    queue_spin(ms)


def _target(conn, device, shape, dtype):
    import cupy as cp

    from oobspec.transports import cuda_ipc

    cp.cuda.Device(device).use()
    rx = cuda_ipc.Receiver(cuda_ipc.allocate_gpu(shape, dtype))
    conn.send(rx.descriptor())
    while (msg := conn.recv()) != "close":
        if msg == "d2d":  # local device-to-device copy of the same size, the baseline
            src, rt = cuda_ipc.allocate_gpu(shape, dtype), cp.cuda.runtime
            stream = cp.cuda.get_current_stream()
            times = []
            for _ in range(6):
                t = time.perf_counter()
                rt.memcpyAsync(rx.array.data.ptr, src.data.ptr, src.nbytes, rt.memcpyDeviceToDevice, stream.ptr)
                stream.synchronize()
                times.append(time.perf_counter() - t)
            del src
            conn.send(min(times[1:]))
            continue
        t = time.perf_counter()
        rx.receive(msg)
        dt = time.perf_counter() - t
        conn.send((_checksum(rx.array), dt))
    rx.close()
    conn.send("closed")


def _source(conn, device, descriptor):
    import cupy as cp

    from oobspec.transports import cuda_ipc

    cp.cuda.Device(device).use()
    src = cuda_ipc.allocate_gpu(descriptor["shape"], descriptor["dtype"])
    tx = cuda_ipc.Sender(src, descriptor)
    while (seed := conn.recv()) is not None:
        if seed == "sum":  # asked only after the target copied: no sync before the send
            conn.send(_checksum(src))
            continue
        if seed:  # 0: resend unchanged data
            spin(100)  # a long kernel first: the target's copy must wait for the fill behind it
            _fill(src, seed)
        conn.send(tx.send())  # deliberately no sync: the target must wait on the event
    conn.recv()  # the target has closed its mapping; only now free the memory
    tx.close()
    del src


class _Pair:
    """A cuda_ipc target and source in two fresh processes."""

    def __init__(self, shape, dtype="f4", source_device=0, target_device=0):
        self.t, t_child = SPAWN.Pipe()
        self.s, s_child = SPAWN.Pipe()
        self.procs = [SPAWN.Process(target=_target, args=(t_child, target_device, shape, dtype))]
        self.procs[0].start()
        self.descriptor = self.t.recv()
        self.procs.append(SPAWN.Process(target=_source, args=(s_child, source_device, self.descriptor)))
        self.procs[1].start()

    def push(self, seed):
        self.s.send(seed)
        message = self.s.recv()
        self.t.send(message)
        target_sum, seconds = self.t.recv()
        self.s.send("sum")
        return self.s.recv(), target_sum, seconds

    def close(self):
        self.s.send(None)
        self.t.send("close")
        assert self.t.recv() == "closed"
        self.s.send("target closed")
        for p in self.procs:
            p.join(60)
            assert p.exitcode == 0

    def kill(self):
        for p in self.procs:
            p.kill()


@pytest.mark.parametrize("peer", [False, True], ids=["same-gpu", "peer-gpu"])
def test_cuda_ipc_two_processes(peer):
    if peer and GPUS < 2:
        pytest.skip("needs two GPUs")
    pair = _Pair((1000, 257), source_device=0, target_device=1 if peer else 0)
    try:
        assert pair.descriptor["shape"] == (1000, 257)
        sums = []
        for seed in (1, 2):
            source_sum, target_sum, _ = pair.push(seed)
            assert target_sum == source_sum
            sums.append(source_sum)
        assert sums[0] != sums[1]
        pair.close()
    finally:
        pair.kill()


def test_cuda_ipc_bandwidth_1gib():
    pair = _Pair((GiB // 4,), "f4")
    try:
        source_sum, target_sum, _ = pair.push(7)  # opens the handle; not timed
        assert target_sum == source_sum
        times = [pair.push(0)[2] for _ in range(5)]
        pair.t.send("d2d")
        d2d = pair.t.recv()
        push = statistics.median(times)
        print(f"\n1 GiB cuda_ipc push {GiB / push / 1e9:8.1f} GB/s (median of 5, incl. event wait + sync)")
        print(f"1 GiB device copy   {GiB / d2d / 1e9:8.1f} GB/s (best of 5)")
        print(f"ratio ipc / d2d     {d2d / push:8.2f}")
        pair.close()
    finally:
        pair.kill()


def test_sender_refuses_pool_memory():
    import cupy as cp

    from oobspec.transports import cuda_ipc

    target = cuda_ipc.allocate_gpu((4, 4), "f4")
    assert type(target.data.mem) is cp.cuda.Memory
    descriptor = cuda_ipc.Receiver(target).descriptor()
    with pytest.raises(TransportError, match="allocate_gpu"):
        cuda_ipc.Sender(cp.zeros((4, 4), "f4"), descriptor)  # from cupy's pool
    with pytest.raises(TransportError, match="float64"):
        cuda_ipc.Sender(cuda_ipc.allocate_gpu((4, 4), "f8"), descriptor)


def test_gpu_uuid():
    from oobspec.transports import cuda_ipc

    uuid = cuda_ipc.gpu_uuid(0)
    assert re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", uuid), uuid
    assert cuda_ipc._driver_uuid(0).hex() == uuid[4:].replace("-", "")
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.split()
        assert uuid in listed


def test_nccl_refuses_one_gpu():
    from oobspec.transports import cuda_ipc

    uuid = cuda_ipc.gpu_uuid(0)
    with pytest.raises(TransportError, match=f"replicas src/0 and dst/0 share GPU {uuid}; use transport: cuda_ipc"):
        nccl.check_distinct_gpus({"src/0": uuid, "dst/0": uuid})


def test_nccl_single_rank_group():
    """A one-rank communicator exercises the id handling and the broadcast call."""
    import cupy as cp
    import cupy.cuda.nccl

    if not cupy.cuda.nccl.available:
        pytest.skip("cupy has no NCCL")
    uid = nccl.new_unique_id()
    assert isinstance(uid, bytes) and len(uid) == 128
    group = nccl.Group(uid, 1, 0)
    a = cp.arange(1000, dtype=cp.float32)
    group.broadcast(a, 10)
    assert int(a[999]) == 999
    group.close()
    with pytest.raises(TransportError, match="re-apply"):
        group.broadcast(a, 10)  # closed (aborted): an error, never a call into a freed communicator

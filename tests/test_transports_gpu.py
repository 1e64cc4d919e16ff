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
    """Seeded pseudo-random bytes, written on the GPU's current stream (no sync)."""
    import cupy as cp

    # Small constants keep the arithmetic in uint64 under any promotion rules.
    x = cp.arange(a.nbytes // 4, dtype=cp.uint64)
    a.view(cp.uint32).reshape(-1)[...] = ((x * 2654435761 + seed * 40503) >> 7).astype(cp.uint32)  # any shape


def _checksum(a) -> int:
    import cupy as cp

    w = a.view(cp.uint32)
    return int(w.sum(dtype=cp.uint64)) ^ int((w[::4097].astype(cp.uint64) * 31).sum())


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
        if seed:  # 0: resend unchanged data
            _fill(src, seed)
        message = tx.send()  # deliberately no sync: the target must wait on the event
        conn.send((message, _checksum(src)))
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
        message, source_sum = self.s.recv()
        self.t.send(message)
        target_sum, seconds = self.t.recv()
        return source_sum, target_sum, seconds

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


def _inbox_target(conn, segment, nbytes, slots):
    """A link target as a replica holds it: gpu memory in `slots` slots, exported, and its inbox."""
    import asyncio

    from oobspec.models import Buffer
    from oobspec.replica.buffers import Allocation

    alloc = Allocation(Buffer(shape=[nbytes // 4], dtype="float32", device="gpu"), slots, segment)

    async def serve():
        conn.send({"segment": segment, "slots": slots, "stride": alloc.stride, "shape": (nbytes // 4,), "dtype": "<f4"})
        version = 0
        while conn.recv() != "close":
            version = await alloc.inbox.wait(version, timeout=60)
            conn.send((version, alloc.current, _checksum(alloc.array)))
    asyncio.run(serve())
    alloc.close()
    conn.send("closed")


def _writer_source(conn, descriptor):
    import cupy as cp

    from oobspec.transports import cuda_ipc
    from oobspec.transports.inbox import Outbox

    src = cuda_ipc.allocate_gpu(descriptor["shape"], descriptor["dtype"])
    dst = cuda_ipc.allocate_gpu(descriptor["shape"], descriptor["dtype"])  # for the baseline copy
    outbox = Outbox(descriptor["segment"])
    writer = cuda_ipc.Writer(src, descriptor, outbox.handle)
    stream = cp.cuda.Stream(non_blocking=True)
    version = 0
    while (seed := conn.recv()) is not None:
        if seed == "d2d":
            times = []
            for _ in range(6):
                t = time.perf_counter()
                cp.copyto(dst, src)
                cp.cuda.get_current_stream().synchronize()
                times.append(time.perf_counter() - t)
            conn.send(statistics.median(times[1:]))
            continue
        if seed:
            _fill(src, seed)  # queued, not synced: the push must order its copy after it
        t = time.perf_counter()
        stream.wait_event(cp.cuda.get_current_stream().record())
        slot = outbox.begin()
        writer.copy(slot, stream)
        stream.synchronize()
        version += 1
        outbox.publish(version, slot)
        conn.send((time.perf_counter() - t, _checksum(src)))
    writer.close()
    outbox.close()


@pytest.mark.parametrize("slots", [1, 2])
def test_cuda_ipc_writer_pushes_into_a_target_without_a_call(tmp_path, slots):
    """Links v2 on one GPU: the source opens the target's exported memory once and pushes with
    one device copy, then the version in the target's control block; the target wakes on it."""
    import os
    nbytes = GiB if slots == 1 else 64 << 20
    segment = f"oob-t{os.getpid()}-gpu{slots}"
    t, t_child = SPAWN.Pipe()
    s, s_child = SPAWN.Pipe()
    target = SPAWN.Process(target=_inbox_target, args=(t_child, segment, nbytes, slots))
    target.start()
    descriptor = t.recv()
    source = SPAWN.Process(target=_writer_source, args=(s_child, descriptor))
    source.start()
    try:
        pushes = []
        for seed in (1, 2, 0, 0, 0, 0, 0):
            t.send("wait")
            s.send(seed)
            seconds, source_sum = s.recv()
            version, current, target_sum = t.recv()
            assert target_sum == source_sum and version == len(pushes) + 1
            assert current == (version % 2 if slots == 2 else 0)
            pushes.append(seconds)
        s.send("d2d")
        d2d = s.recv()
        push = statistics.median(pushes[2:])
        print(f"\n{nbytes >> 20} MiB push {push * 1e3:.3f} ms, device copy {d2d * 1e3:.3f} ms: {d2d / push:.2f}x")
        s.send(None)
        source.join(60)
        t.send("close")
        assert t.recv() == "closed"
        target.join(60)
        assert source.exitcode == 0 and target.exitcode == 0
    finally:
        for p in (source, target):
            p.kill()


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
    group.broadcast(a)
    assert int(a[999]) == 999
    group.close()

"""CPU tests for oobspec.transports (the object_store test starts a local Ray)."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os

import numpy as np
import pytest

from oobspec.transports import TRANSPORTS, Topology, TransportError, choose, get_transport
from oobspec.transports import nccl, object_store, shm

pytestmark = pytest.mark.timeout(60)

SPAWN = mp.get_context("spawn")


def digest(a) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).data).hexdigest()


def leftovers(prefix: str) -> list[str]:
    """The names (as oobspec calls them: `oob-...`) of this user's files in /dev/shm starting with
    `prefix`; on disk each carries the uid (shm.file_name)."""
    return [n for n in (shm._logical(f) for f in os.listdir(shm.SHM_DIR)) if n and n.startswith(prefix)]


@pytest.fixture
def prefix(request):
    # pid + test name: parallel runs never see each other's segments.
    p = f"oob-t{os.getpid()}-{request.node.name.replace('[', '-').rstrip(']')}-"
    yield p
    shm.cleanup(p)


# --- child processes (module level so spawn can import them) -------------------

def _target(conn, segment, shape, dtype, slots):
    """A link target: its memory and inbox; reports each new version's checksum, woken by the bell."""
    import asyncio

    from oobspec.models import Buffer
    from oobspec.replica.buffers import Allocation

    alloc = Allocation(Buffer(shape=list(shape), dtype=dtype), slots, segment)

    async def serve():
        conn.send({"slots": alloc.slots, "stride": alloc.stride, "shape": alloc.slot(0).shape,
                   "dtype": alloc.slot(0).dtype.str})
        version = 0
        while conn.recv() != "close":
            version = await alloc.inbox.wait(version, timeout=20)
            conn.send((version, alloc.current, digest(alloc.array), [digest(alloc.slot(i)) for i in range(slots)]))
    asyncio.run(serve())
    alloc.close()
    conn.send("closed")


def _source(conn, segment, descriptor):
    from oobspec.transports.inbox import Outbox
    src = np.empty(descriptor["shape"], descriptor["dtype"])
    outbox = Outbox(segment)
    tx = shm.Sender(src, {**descriptor, "name": segment})
    version = 0
    while (seed := conn.recv()) is not None:
        src[...] = np.random.default_rng(seed).random(src.shape)
        slot = outbox.begin()
        tx.send(slot)
        version += 1
        outbox.publish(version, slot)
        conn.send(digest(src))
    tx.close()
    outbox.close()


def _allocate_and_hang(conn, name):
    buf = shm.allocate_shared(name, (1024,), "u1")
    conn.send("ready")
    conn.recv()  # killed while waiting here
    buf.close()


# --- shm ------------------------------------------------------------------------

@pytest.mark.parametrize("shape,dtype,slots", [((300, 7), "float32", 1), ((5, 1024, 1024), "float64", 1),  # 40 MiB
                                               ((300, 7), "float32", 2)])
def test_shm_push_between_two_processes_without_a_call(prefix, shape, dtype, slots):
    """The data path of a link on one node: the source copies into the target's segment and
    rings its bell; the target, asleep in `inbox.wait`, wakes and sees the new version."""
    segment = prefix + "buf"
    t_conn, t_child = SPAWN.Pipe()
    s_conn, s_child = SPAWN.Pipe()
    target = SPAWN.Process(target=_target, args=(t_child, segment, shape, dtype, slots))
    target.start()
    descriptor = t_conn.recv()
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    assert descriptor == {"slots": slots, "stride": -(-nbytes // 256) * 256, "shape": shape, "dtype": np.dtype(dtype).str}
    assert sorted(leftovers(prefix)) == [segment, segment + ".bell", segment + ".ctl"]
    source = SPAWN.Process(target=_source, args=(s_child, segment, descriptor))
    source.start()
    try:
        seen = []
        for seed in (1, 2, 3):
            t_conn.send("wait")  # the target sleeps in wait() before the push
            s_conn.send(seed)
            source_sum = s_conn.recv()
            version, current, got, per_slot = t_conn.recv()
            assert (version, got) == (seed, source_sum)
            seen.append((current, per_slot))
        if slots == 2:  # a push fills the idle slot and flips: the previous version stays whole
            assert [c for c, _ in seen] == [1, 0, 1]
            assert seen[1][1][1] == seen[0][1][1] and seen[2][1][0] == seen[1][1][0]
        s_conn.send(None)
        source.join(30)
        assert source.exitcode == 0
        assert segment in leftovers(prefix)  # the source's exit must not unlink the target's segment
        t_conn.send("close")
        assert t_conn.recv() == "closed"
        target.join(30)
        assert target.exitcode == 0
        assert leftovers(prefix) == []
    finally:
        for p in (source, target):
            p.kill()


def test_push_to_a_dead_target_is_told_and_its_restart_is_reached(prefix):
    from oobspec.transports.inbox import Outbox, TargetGone
    segment = prefix + "t"

    def start():
        conn, child = SPAWN.Pipe()
        p = SPAWN.Process(target=_target, args=(child, segment, (8,), "float32", 1))
        p.start()
        return p, conn, conn.recv()

    first, conn, descriptor = start()
    outbox = Outbox(segment)
    first.kill()
    first.join(30)
    with pytest.raises(TargetGone, match="the target exited"):
        outbox.publish(1, outbox.begin())
    outbox.close()
    with pytest.raises(TargetGone, match="not running"):
        Outbox(segment)  # its files are still there, but nobody reads the bell
    second, conn, _ = start()  # as Ray restarts it: the same names, new files
    try:
        outbox = Outbox(segment)
        tx = shm.Sender(np.full(8, 7, "float32"), {**descriptor, "name": segment})
        conn.send("wait")
        tx.send(outbox.begin())
        outbox.publish(5, 0)
        version, _, got, _ = conn.recv()
        assert version == 5 and got == digest(np.full(8, 7, "float32"))
        tx.close()
        outbox.close()
        conn.send("close")
        assert conn.recv() == "closed"
    finally:
        second.kill()


def test_wait_times_out_and_wakes_every_waiter(prefix):
    import asyncio

    from oobspec.transports.inbox import Inbox, Outbox

    async def go():
        inbox = Inbox(prefix + "w", 1, 8)
        with pytest.raises(asyncio.TimeoutError):
            await inbox.wait(0, timeout=0.05)
        waiters = [asyncio.create_task(inbox.wait(0)) for _ in range(3)]
        await asyncio.sleep(0.01)
        outbox = Outbox(prefix + "w")
        outbox.publish(1, outbox.begin())
        assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [1, 1, 1]
        assert await inbox.wait(0) == 1  # already newer: no wait
        inbox.publish(2, inbox.begin())  # what a push by Ray call does
        assert await asyncio.wait_for(inbox.wait(1), 5) == 2
        outbox.close()
        inbox.close()
    asyncio.run(go())
    assert leftovers(prefix) == []


def test_shm_mismatch_raises(prefix):
    buf = shm.allocate_shared(prefix + "m", (4, 4), "f4")
    descriptor = {"name": buf.name, "shape": (4, 4), "dtype": "<f4", "slots": 1, "stride": 0}
    try:
        with pytest.raises(TransportError, match=r"float64\[4, 4\] but the target buffer is float32\[4, 4\]"):
            shm.Sender(np.zeros((4, 4)), descriptor)
        with pytest.raises(TransportError, match=r"float32\[16\]"):
            shm.Sender(np.zeros(16, "f4"), descriptor)
        with pytest.raises(TransportError, match=r"2 x 64 needed"):
            shm.Sender(np.zeros((4, 4), "f4"), {**descriptor, "slots": 2})
    finally:
        buf.close()


def test_shm_in_process_non_contiguous_source(prefix):
    buf = shm.allocate_shared(prefix + "nc", (64, 32), "i4")
    src = np.arange(64 * 32, dtype="i4").reshape(32, 64).T  # Fortran-ordered view
    tx = shm.Sender(src, {"name": buf.name, "shape": (64, 32), "dtype": "<i4", "slots": 1, "stride": 0})
    assert tx.send() is None
    np.testing.assert_array_equal(buf.array, src)
    tx.close()
    buf.close()
    assert leftovers(prefix) == []


def test_shm_close_unlinks_and_names_are_checked(prefix):
    buf = shm.allocate_shared(prefix + "a", (10,), "f8")
    assert (buf.array == 0).all()
    view = buf.array[:5]  # a view kept past close must not break close()
    buf.close()
    buf.close()
    assert leftovers(prefix) == []
    del view
    with pytest.raises(TransportError, match="must start with 'oob-'"):
        shm.allocate_shared("not-oob", (1,), "u1")
    with pytest.raises(TransportError, match="does not exist"):
        shm.Sender(np.zeros(1), {"name": prefix + "missing", "shape": (1,), "dtype": "<f8", "slots": 1, "stride": 0})


def test_shm_cleanup_after_killed_process(prefix):
    name = prefix + "crash"
    conn, child = SPAWN.Pipe()
    p = SPAWN.Process(target=_allocate_and_hang, args=(child, name))
    p.start()
    assert conn.recv() == "ready"
    p.kill()
    p.join(30)
    assert leftovers(prefix) == [name]
    assert shm.cleanup(prefix) == [name]
    assert leftovers(prefix) == []
    assert shm.cleanup(prefix) == []


def test_cleanup_refuses_foreign_prefix():
    with pytest.raises(TransportError):
        shm.cleanup("psm_")


# --- object_store ----------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", include_dashboard=False, num_cpus=1)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_object_store_two_receivers(ray_local):
    ray = ray_local

    # Self-contained: workers cannot import this test module, only oobspec.
    @ray.remote
    class Target:
        def __init__(self, shape, dtype):
            import numpy as np

            from oobspec.transports import object_store

            self.rx = object_store.Receiver(np.zeros(shape, dtype))

        def descriptor(self):
            return self.rx.descriptor()

        def receive(self, message):
            import hashlib

            self.rx.receive(message)
            return hashlib.blake2b(self.rx.array.data).hexdigest()

    targets = [Target.remote((256, 3), "f4"), Target.remote((256, 3), "f4")]
    src = np.empty((256, 3), "f4")
    senders = [object_store.Sender(src, d) for d in ray.get([t.descriptor.remote() for t in targets])]
    for seed in (1, 2):
        src[...] = np.random.default_rng(seed).random(src.shape)
        sums = ray.get([t.receive.remote(tx.send()) for t, tx in zip(targets, senders)])
        assert sums == [digest(src)] * 2
    # In-process receiver too: the ref's data lands in a plain array.
    rx = object_store.Receiver(np.zeros((256, 3), "f4"))
    rx.receive(object_store.Sender(src, rx.descriptor()).send())
    np.testing.assert_array_equal(rx.array, src)
    with pytest.raises(TransportError):
        object_store.Sender(np.zeros((3, 256), "f4"), rx.descriptor())


# --- auto, registry, nccl checks ---------------------------------------------------

def test_choose():
    a0 = Topology("node-a", "GPU-0")
    a1 = Topology("node-a", "GPU-1")
    b0 = Topology("node-b", "GPU-0")
    assert choose("gpu", a0, a0) == "cuda_ipc"
    assert choose("gpu", a0, a1) == "cuda_ipc"  # peer GPUs (peer access not known: as before)
    src, reach = Topology("node-a", "GPU-0", ()), Topology("node-a", "GPU-1", ("GPU-0",))
    assert choose("gpu", src, reach) == "cuda_ipc"  # the target's GPU reads the source's peer-to-peer
    assert choose("gpu", src, Topology("node-a", "GPU-1", ())) == "nccl"  # no peer access: NCCL
    assert choose("gpu", a0, b0) == "nccl"
    assert choose("cpu", Topology("node-a"), Topology("node-a")) == "shm"
    assert choose("cpu", Topology("node-a"), Topology("node-b")) == "object_store"
    with pytest.raises(TransportError):
        choose("tpu", a0, a0)


def test_registry_and_lazy_imports():
    import subprocess
    import sys

    assert TRANSPORTS == ("shm", "object_store", "cuda_ipc", "nccl")
    for name in TRANSPORTS:
        assert get_transport(name).__name__ == f"oobspec.transports.{name}"
    with pytest.raises(TransportError, match="unknown transport"):
        get_transport("rdma")
    # A fresh interpreter: loading every transport must import neither cupy nor ray.
    code = (
        "import sys; from oobspec.transports import TRANSPORTS, get_transport; "
        "[get_transport(n) for n in TRANSPORTS]; print(sorted({'cupy', 'ray'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"


def test_transport_error_is_oob_error():
    from oobspec.errors import OobError

    assert issubclass(TransportError, OobError)


def test_nccl_refuses_shared_gpu():
    nccl.check_distinct_gpus({"src/0": "GPU-a", "dst/0": "GPU-b"})
    with pytest.raises(TransportError) as e:
        nccl.check_distinct_gpus({"src/0": "GPU-a", "dst/0": "GPU-b", "dst/1": "GPU-a"})
    assert str(e.value) == (
        "nccl needs one GPU per rank: replicas src/0 and dst/1 share GPU GPU-a; "
        "use transport: cuda_ipc for buffers on one GPU"
    )
    with pytest.raises(TransportError, match="replicas rank 0 and rank 1 share GPU u"):
        nccl.check_distinct_gpus(["u", "u"])


def test_nccl_unique_id_forms():
    raw = bytes(range(128))
    signed = tuple(b - 256 if b > 127 else b for b in bytes(range(128, 256)))
    assert nccl._as_bytes(raw) == raw
    assert nccl._as_bytes(signed) == bytes(range(128, 256))

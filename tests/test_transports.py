"""CPU tests for oobspec.transports (the object_store test starts a local Ray)."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os

import numpy as np
import pytest

from oobspec.transports import TRANSPORTS, Topology, TransportError, allocate, choose, get_transport
from oobspec.transports import nccl, object_store, shm

pytestmark = pytest.mark.timeout(60)

SPAWN = mp.get_context("spawn")


def digest(a) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).data).hexdigest()


def leftovers(prefix: str) -> list[str]:
    return [n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix)]


@pytest.fixture
def prefix(request):
    # pid + test name: parallel runs never see each other's segments.
    p = f"oob-t{os.getpid()}-{request.node.name.replace('[', '-').rstrip(']')}-"
    yield p
    shm.cleanup(p)


# --- child processes (module level so spawn can import them) -------------------

def _target(conn, name, shape, dtype):
    rx = shm.Receiver(shm.allocate_shared(name, shape, dtype))
    conn.send(rx.descriptor())
    while (msg := conn.recv()) != "close":
        rx.receive(msg)
        conn.send(digest(rx.array))
    rx.close()
    conn.send("closed")


def _source(conn, descriptor):
    src = np.empty(descriptor["shape"], descriptor["dtype"])
    tx = shm.Sender(src, descriptor)
    while (seed := conn.recv()) is not None:
        src[...] = np.random.default_rng(seed).random(src.shape)
        conn.send((tx.send(), digest(src)))
    tx.close()


def _allocate_and_hang(conn, name):
    buf = shm.allocate_shared(name, (1024,), "u1")
    conn.send("ready")
    conn.recv()  # killed while waiting here
    buf.close()


# --- shm ------------------------------------------------------------------------

@pytest.mark.parametrize("shape,dtype", [((300, 7), "f4"), ((5, 1024, 1024), "f8")])  # small, 40 MiB
def test_shm_two_processes(prefix, shape, dtype):
    name = prefix + "buf"
    t_conn, t_child = SPAWN.Pipe()
    s_conn, s_child = SPAWN.Pipe()
    target = SPAWN.Process(target=_target, args=(t_child, name, shape, dtype))
    target.start()
    descriptor = t_conn.recv()
    assert descriptor == {"name": name, "shape": shape, "dtype": np.dtype(dtype).str}
    source = SPAWN.Process(target=_source, args=(s_child, descriptor))
    source.start()
    try:
        sums = []
        for seed in (1, 2):
            s_conn.send(seed)
            message, source_sum = s_conn.recv()
            t_conn.send(message)
            assert t_conn.recv() == source_sum
            sums.append(source_sum)
        assert sums[0] != sums[1]
        s_conn.send(None)
        source.join(30)
        assert source.exitcode == 0
        assert leftovers(prefix) == [name]  # the source's exit must not unlink the target's segment
        t_conn.send("close")
        assert t_conn.recv() == "closed"
        target.join(30)
        assert target.exitcode == 0
        assert leftovers(prefix) == []
    finally:
        for p in (source, target):
            p.kill()


def test_shm_mismatch_raises(prefix):
    rx = shm.Receiver(shm.allocate_shared(prefix + "m", (4, 4), "f4"))
    try:
        with pytest.raises(TransportError, match=r"float64\[4, 4\] but the target buffer is float32\[4, 4\]"):
            shm.Sender(np.zeros((4, 4)), rx.descriptor())
        with pytest.raises(TransportError, match=r"float32\[16\]"):
            shm.Sender(np.zeros(16, "f4"), rx.descriptor())
    finally:
        rx.close()


def test_shm_in_process_non_contiguous_source(prefix):
    rx = shm.Receiver(allocate((64, 32), "i4", "cpu", shared_name=prefix + "nc"))
    src = np.arange(64 * 32, dtype="i4").reshape(32, 64).T  # Fortran-ordered view
    tx = shm.Sender(src, rx.descriptor())
    assert tx.send() is None
    rx.receive(None)
    np.testing.assert_array_equal(rx.array, src)
    tx.close()
    rx.close()
    assert leftovers(prefix) == []


def test_shm_receiver_close_unlinks_and_names_are_checked(prefix):
    buf = shm.allocate_shared(prefix + "a", (10,), "f8")
    assert (buf.array == 0).all()
    view = buf.array[:5]  # a view kept past close must not break close()
    rx = shm.Receiver(buf)
    rx.close()
    rx.close()
    assert leftovers(prefix) == []
    del view
    with pytest.raises(TransportError, match="must start with 'oob-'"):
        shm.allocate_shared("not-oob", (1,), "u1")
    with pytest.raises(TransportError, match="does not exist"):
        shm.Sender(np.zeros(1), {"name": prefix + "missing", "shape": (1,), "dtype": "<f8"})
    with pytest.raises(TransportError, match="SharedBuffer"):
        shm.Receiver(np.zeros(3))


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
            from oobspec.transports import allocate, object_store

            self.rx = object_store.Receiver(allocate(shape, dtype, "cpu"))

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
    assert choose("gpu", a0, a1) == "cuda_ipc"  # peer GPUs
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

"""nccl: a GPU buffer broadcast from the source (rank 0) to targets (ranks 1..n).

One communicator per link. Passing the unique id to every rank (the rendezvous) is
the caller's job, through Ray; this module only holds the primitives. Unlike the
other transports a broadcast is collective: every rank calls broadcast() at once.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from .base import TransportError
from .base import import_cupy as _cupy

NOT_READY = 600  # cudaErrorNotReady: what cudaEventQuery says of work still running


def _nccl():
    _cupy()  # a clear TransportError when cupy is missing
    import cupy.cuda.nccl as nccl  # not loaded by `import cupy`

    if not nccl.available:
        raise TransportError("transport nccl: cupy was built without NCCL (or libnccl is missing)")
    return nccl


def _as_bytes(unique_id) -> bytes:
    # cupy >= 14 hands out bytes, older cupy a tuple of 128 signed chars.
    return unique_id if isinstance(unique_id, bytes) else bytes(b & 0xFF for b in unique_id)


def new_unique_id() -> bytes:
    """A fresh NCCL unique id, as bytes whatever the cupy version (send it to every rank)."""
    return _as_bytes(_nccl().get_unique_id())


def check_distinct_gpus(uuids: Mapping[str, str] | Sequence[str]) -> None:
    """Refuse ranks that share a GPU, which NCCL rejects, before building a communicator.

    `uuids` maps replica name -> GPU UUID in rank order (or is a list, named by rank).
    """
    items = uuids.items() if isinstance(uuids, Mapping) else ((f"rank {i}", u) for i, u in enumerate(uuids))
    seen: dict[str, str] = {}
    for replica, uuid in items:
        if uuid in seen:
            raise TransportError(
                f"nccl needs one GPU per rank: replicas {seen[uuid]} and {replica} share GPU {uuid}; "
                "use transport: cuda_ipc for buffers on one GPU"
            )
        seen[uuid] = replica


class Group:
    """This rank's end of one link's communicator; rank 0 is the source.

    Construct with the GPU current (cupy.cuda.Device(i).use()); it blocks until
    all `world` ranks have joined.
    """

    def __init__(self, unique_id, world: int, rank: int):
        cp, nccl = _cupy(), _nccl()
        uid = _as_bytes(unique_id)
        self.world, self.rank = world, rank
        try:
            self._comm = nccl.NcclCommunicator(world, uid, rank)
        except TypeError:  # cupy < 14 takes the id as a tuple of chars (signed on x86, unsigned on arm)
            try:
                self._comm = nccl.NcclCommunicator(world, tuple(b - 256 if b > 127 else b for b in uid), rank)
            except OverflowError:
                self._comm = nccl.NcclCommunicator(world, tuple(uid), rank)
        # Our own stream: a broadcast waiting for a late rank never blocks the legacy null stream
        # (and with it torch's default stream).
        self._stream = cp.cuda.Stream(non_blocking=True)
        # Connect the ranks now, while all are here (NCCL >= 2.22 connects at the first
        # collective, on the host, where no deadline could end a wait for a dead rank).
        warm = cp.zeros(1, cp.uint8)
        self._comm.broadcast(warm.data.ptr, warm.data.ptr, 1, nccl.NCCL_UINT8, 0, self._stream.ptr)
        self._stream.synchronize()

    def broadcast(self, array, seconds: float, stream=None) -> None:
        """Rank 0's `array` overwrites every other rank's `array`, queued on `stream` (default: the
        group's own). Waits at most `seconds` (polling, as torch's watchdog does): a rank that never
        joins, or an error, aborts the communicator and raises TransportError, never a hang."""
        if not array.flags.c_contiguous:
            raise TransportError("nccl needs C-contiguous buffers")
        if self._comm is None:
            raise TransportError("the nccl communicator was aborted or closed: re-apply to wire the link again")
        cp, nccl = _cupy(), _nccl()
        rt = cp.cuda.runtime
        with array.device:
            stream = stream or self._stream
            try:  # as bytes, so any dtype goes through without a dtype table
                self._comm.broadcast(array.data.ptr, array.data.ptr, array.nbytes, nccl.NCCL_UINT8, 0, stream.ptr)
            except Exception as exc:  # NcclError: e.g. a peer it cannot reach
                self.abort()
                raise TransportError(f"nccl broadcast failed: {exc}") from None
            done = stream.record()
            deadline, nap = time.monotonic() + seconds, 0.0001
            while (status := rt.eventQuery(done.ptr)) != 0:
                try:
                    if status != NOT_READY:  # a CUDA error, not "still running"
                        raise TransportError(f"CUDA error {status} during the broadcast")
                    self._comm.check_async_error()
                    if time.monotonic() > deadline and rt.eventQuery(done.ptr) != 0:
                        raise TransportError(f"did not finish in {seconds:g} s (a rank did not take part)")
                except Exception as exc:  # a peer failed (NCCL said so), an error, or the deadline
                    self.abort()
                    raise TransportError(f"nccl broadcast failed: {exc}") from None
                time.sleep(nap)
                nap = min(nap * 2, 0.005)

    def abort(self) -> None:
        """End the communicator now, cancelling what it has queued (a dead peer cannot hang it)."""
        if self._comm is not None:
            self._comm.abort()
            self._comm = None

    # Closing aborts too: ncclCommDestroy would first wait for queued work a dead peer never ends.
    close = abort

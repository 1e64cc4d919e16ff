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
        nccl = _nccl()
        uid = _as_bytes(unique_id)
        self.world, self.rank = world, rank
        try:
            self._comm = nccl.NcclCommunicator(world, uid, rank)
        except TypeError:  # cupy < 14 takes the id as a tuple of signed chars
            self._comm = nccl.NcclCommunicator(world, tuple(b - 256 if b > 127 else b for b in uid), rank)

    def broadcast(self, array, seconds: float, stream=None) -> None:
        """Rank 0's `array` overwrites every other rank's `array`, queued on `stream` (default: the
        current one). Waits at most `seconds` (polling, as torch's watchdog does): a rank that never
        joins aborts the communicator and raises TransportError, never a hang."""
        if not array.flags.c_contiguous:
            raise TransportError("nccl needs C-contiguous buffers")
        if self._comm is None:
            raise TransportError("the nccl communicator was aborted or closed: re-apply to wire the link again")
        cp, nccl = _cupy(), _nccl()
        with array.device:
            stream = stream or cp.cuda.get_current_stream()
            # As bytes, so any dtype goes through without a dtype table.
            self._comm.broadcast(array.data.ptr, array.data.ptr, array.nbytes, nccl.NCCL_UINT8, 0, stream.ptr)
            done = stream.record()
            deadline = time.monotonic() + seconds
            nap = 0.0001
            while not done.done:
                try:
                    self._comm.check_async_error()
                except Exception as exc:  # a peer failed (NCCL said so)
                    self.abort()
                    raise TransportError(f"nccl broadcast failed: {exc}") from None
                if time.monotonic() > deadline:
                    self.abort()
                    raise TransportError(f"nccl broadcast did not finish in {seconds:g} s (a rank did not take part)")
                time.sleep(nap)
                nap = min(nap * 2, 0.005)

    def abort(self) -> None:
        """End the communicator now, cancelling what it has queued (a dead peer cannot hang it)."""
        if self._comm is not None:
            self._comm.abort()
            self._comm = None

    # Closing aborts too: ncclCommDestroy would first wait for queued work a dead peer never ends.
    close = abort

"""What every transport shares: the error type, the Sender/Receiver contract, Topology."""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..contract import Topology  # noqa: F401  (re-exported: where one replica's buffer lives)
from ..errors import OobError


class TransportError(OobError):
    """A transport cannot set up or complete a copy."""


class ShmOwnerError(TransportError):
    """A file under one of oobspec's names in /dev/shm that oobspec must not use or remove: another
    user's, not the kind of file oobspec makes there (a segment is a regular file, a doorbell a
    FIFO, never a link), or writable by group or others."""


class Receiver(Protocol):
    """Lives in a target replica that a push reaches by a Ray call (object_store, cuda_ipc to
    another GPU); made for the target buffer `.array`."""

    array: Any

    def descriptor(self) -> dict: ...

    def receive(self, message: Any, into=None) -> None: ...

    def close(self) -> None: ...


class Sender(Protocol):
    """Lives in the source replica, one per (link, target replica) reached by a Ray call; what
    send() returns travels in that call. (Targets on the source's node are written directly:
    shm.Sender and cuda_ipc.Writer, with inbox.Outbox.)

    Built as `Sender(source_array, receiver_descriptor)`.
    """

    def send(self) -> Any: ...

    def close(self) -> None: ...


def import_cupy():
    """cupy, imported only when a GPU transport is actually used."""
    try:
        import cupy
    except ImportError:
        raise TransportError("GPU transports need cupy (e.g. pip install cupy-cuda13x)") from None
    return cupy


def callers_work(device) -> list:
    """Events marking the work queued so far on the current cupy stream of `device` and, when
    torch is loaded and using CUDA, on torch's current stream (a side stream of a training step).
    Blocking-sync events: a thread that waits on one sleeps instead of spinning a core."""
    import sys
    cp = import_cupy()
    streams = [cp.cuda.get_current_stream().ptr]
    torch = sys.modules["torch"] if "torch" in sys.modules else None
    if torch is not None and torch.cuda.is_initialized():
        streams.append(torch.cuda.current_stream(device.id).cuda_stream)
    events = []
    with device:
        for stream in streams:
            event = cp.cuda.Event(block=True, disable_timing=True)
            cp.cuda.runtime.eventRecord(event.ptr, stream)
            events.append(event)
    return events


def spec(array) -> dict:
    """Plain-data shape/dtype, safe to pickle across processes and Ray calls."""
    return {"shape": tuple(int(n) for n in array.shape), "dtype": np.dtype(array.dtype).str}


def check_match(array, shape, dtype, where: str) -> None:
    shape, dtype = tuple(shape), np.dtype(dtype)
    if tuple(array.shape) != shape or np.dtype(array.dtype) != dtype:
        raise TransportError(
            f"{where}: source buffer is {np.dtype(array.dtype)}{list(array.shape)} "
            f"but the target buffer is {dtype}{list(shape)}"
        )

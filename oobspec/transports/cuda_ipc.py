"""cuda_ipc: a GPU buffer copied between processes on one node (same or peer GPU).

On one GPU the source writes (Writer): each target exports its allocation once, the source
opens it once and every push is one device copy per target on the source's stream.

Across GPUs (a peer GPU may not even be visible to the source under Ray's
CUDA_VISIBLE_DEVICES) the target pulls (Sender / Receiver): the source exports its
allocation and an interprocess event once; each send only records the event. The target
opens the handle once and pulls with one device-to-device copy ordered after that event.
The source must not overwrite its buffer until the target's receive() has returned, and
targets must close() before the source frees its buffer.
"""
from __future__ import annotations

import ctypes
from math import prod

import numpy as np

from .base import TransportError, check_match, spec
from .base import import_cupy as _cupy


def _driver_uuid(device_index: int) -> bytes:
    lib = ctypes.CDLL("libcuda.so.1")
    dev, raw = ctypes.c_int(), (ctypes.c_char * 16)()
    get = getattr(lib, "cuDeviceGetUuid_v2", None) or lib.cuDeviceGetUuid
    if lib.cuInit(0) or lib.cuDeviceGet(ctypes.byref(dev), device_index) or get(raw, dev):
        raise TransportError(f"cannot read the UUID of GPU {device_index}")
    return raw.raw


def gpu_uuid(device_index: int = 0) -> str:
    """The GPU's UUID as nvidia-smi prints it; stable across CUDA_VISIBLE_DEVICES remapping."""
    raw = _cupy().cuda.runtime.getDeviceProperties(device_index).get("uuid", b"")
    if len(raw) != 16:
        # cupy converts the char[16] like a C string, so a zero byte cuts it
        # short; ask the driver for all 16.
        raw = _driver_uuid(device_index)
    h = bytes(raw).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def peer_gpus(uuid: str) -> tuple[str, ...] | None:
    """The GPUs of this node that the GPU `uuid` can read peer-to-peer, by UUID, from NVML (which
    sees every GPU, whatever CUDA_VISIBLE_DEVICES hides); None when NVML cannot say."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2():
        return None
    try:
        me, count = ctypes.c_void_p(), ctypes.c_uint()
        if nvml.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(me)) or \
                nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)):
            return None
        peers = []
        for index in range(count.value):
            other, name, status = ctypes.c_void_p(), ctypes.create_string_buffer(96), ctypes.c_int()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(other)) or nvml.nvmlDeviceGetUUID(other, name, 96):
                continue
            # NVML_P2P_CAPS_INDEX_READ (0); NVML_P2P_STATUS_OK (0)
            if name.value.decode() != uuid and not nvml.nvmlDeviceGetP2PStatus(me, other, 0, ctypes.byref(status)) \
                    and status.value == 0:
                peers.append(name.value.decode())
        return tuple(peers)
    finally:
        nvml.nvmlShutdown()


def allocate_gpu(shape, dtype):
    """A cupy array in its own cudaMalloc, outside cupy's pool.

    An IPC handle names a whole cudaMalloc allocation; a pool chunk shares one with
    unrelated arrays, which the importer would then map (and could overwrite).
    """
    cp = _cupy()
    nbytes = prod(shape) * np.dtype(dtype).itemsize
    return cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(cp.cuda.Memory(nbytes), 0))


def export_handle(array) -> bytes:
    """The CUDA IPC handle (64 bytes) of an array from allocate_gpu: another process on the node
    opens it once and writes into this memory."""
    base, offset = _export_base(array)
    if offset:
        raise TransportError("cuda_ipc exports whole allocations from allocate_gpu(...)")
    return bytes(_cupy().cuda.runtime.ipcGetMemHandle(base))


def _export_base(array) -> tuple[int, int]:
    cp = _cupy()
    mem = array.data.mem
    if type(mem) is not cp.cuda.Memory or not array.flags.c_contiguous:
        raise TransportError("cuda_ipc needs a C-contiguous source buffer from allocate_gpu(...)")
    return mem.ptr, array.data.ptr - mem.ptr


class Writer:
    """Source side of a target on the source's own GPU: the target's memory is opened once (its
    handle, from the target's control block); each push is one device copy per target, queued
    by the caller on its stream."""

    def __init__(self, array, descriptor: dict, handle: bytes = b"", base: int | None = None):
        """`handle`: the target's exported memory; or `base`, its pointer when the target is a
        buffer of this same process (CUDA cannot open a process's own handle)."""
        check_match(array, descriptor["shape"], descriptor["dtype"], "cuda_ipc")
        _export_base(array)  # C-contiguous, one allocation
        rt = _cupy().cuda.runtime
        self._src, self._nbytes, self._opened = array, array.nbytes, base is None
        if base is None:
            with array.device:
                base = rt.ipcOpenMemHandle(handle)
        self._base = base
        self._slots = [base + i * descriptor["stride"] for i in range(descriptor["slots"])]

    def copy(self, slot: int, stream, source=None) -> None:
        """Queue the copy of `source` (default: the array given at start) into `slot` on `stream`."""
        rt = _cupy().cuda.runtime
        src = self._src if source is None else source
        rt.memcpyAsync(self._slots[slot], src.data.ptr, self._nbytes, rt.memcpyDefault, stream.ptr)

    def close(self) -> None:
        if self._src is None:
            return
        if self._opened:
            with self._src.device:
                _cupy().cuda.runtime.ipcCloseMemHandle(self._base)
        self._src = None


class Sender:
    """Source side of a target on another GPU (pulled by the target, after a Ray call)."""

    def __init__(self, array, descriptor: dict):
        check_match(array, descriptor["shape"], descriptor["dtype"], "cuda_ipc")
        cp = _cupy()
        rt = cp.cuda.runtime
        self._src = array
        base, offset = _export_base(array)
        self._base = base
        with array.device:
            self._event = cp.cuda.Event(block=False, disable_timing=True, interprocess=True)
            self._message = {
                "mem_handle": rt.ipcGetMemHandle(base),
                "offset": offset,
                "event_handle": rt.ipcGetEventHandle(self._event.ptr),
                "nbytes": array.nbytes,
                **spec(array),
                "device_uuid": gpu_uuid(array.device.id),
            }

    def send(self, source=None, stream=None) -> dict:
        """Record the event the target's copy waits on, on `stream` (default: the current one),
        and say where `source` (a relay's current slot; default the array given at start) is:
        an offset into the exported allocation."""
        source = self._src if source is None else source
        base, offset = _export_base(source)
        if base != self._base:
            raise TransportError("cuda_ipc: a relay sends a slot of the allocation it exported, not another one")
        with self._src.device:
            self._event.record(stream)
        return {**self._message, "offset": offset}

    def close(self) -> None:
        self._src = self._event = None


class Receiver:
    def __init__(self, array):
        self.array = array
        if not self.array.flags.c_contiguous:
            raise TransportError("cuda_ipc needs a C-contiguous target buffer")
        self._uuid = gpu_uuid(self.array.device.id)
        self._mem = None  # (handle bytes, mapped base pointer)
        self._event = None  # (handle bytes, event pointer)

    def descriptor(self) -> dict:
        return {**spec(self.array), "device_uuid": self._uuid}

    def receive(self, message: dict, into=None) -> None:
        """Pull the source's data into `into` (default: the buffer this receiver was made for)."""
        into = self.array if into is None else into
        if tuple(message["shape"]) != self.array.shape or np.dtype(message["dtype"]) != self.array.dtype:
            raise TransportError(
                f"cuda_ipc: source buffer is {np.dtype(message['dtype'])}{list(message['shape'])} "
                f"but the target buffer is {self.array.dtype}{list(self.array.shape)}"
            )
        rt = _cupy().cuda.runtime
        with self.array.device:
            if self._mem is None or self._mem[0] != message["mem_handle"]:
                self._close_mem()
                self._mem = (message["mem_handle"], rt.ipcOpenMemHandle(message["mem_handle"]))
            if self._event is None or self._event[0] != message["event_handle"]:
                self._close_event()
                self._event = (message["event_handle"], rt.ipcOpenEventHandle(message["event_handle"]))
            stream = _cupy().cuda.get_current_stream()
            rt.streamWaitEvent(stream.ptr, self._event[1])
            # memcpyDefault lets unified addressing route a same-GPU or a peer
            # copy; the source GPU's index in this process is never needed (it may
            # not even be visible under Ray's CUDA_VISIBLE_DEVICES).
            rt.memcpyAsync(into.data.ptr, self._mem[1] + message["offset"],
                           message["nbytes"], rt.memcpyDefault, stream.ptr)
            stream.synchronize()

    def _close_mem(self):
        if self._mem is not None:
            _cupy().cuda.runtime.ipcCloseMemHandle(self._mem[1])
            self._mem = None

    def _close_event(self):
        if self._event is not None:
            _cupy().cuda.runtime.eventDestroy(self._event[1])
            self._event = None

    def close(self) -> None:
        if self.array is None:
            return
        with self.array.device:
            self._close_mem()
            self._close_event()
        self.array = None

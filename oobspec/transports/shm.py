"""shm: a CPU buffer pushed between processes on one node through POSIX shared memory.

The target owns a named segment (and its inbox, `inbox.py`); the source maps it once and
each push is a single copy straight into the mapping (copying into a mapping is several times faster than
copying out of one, so the source writes rather than the target reading).
"""
from __future__ import annotations

import mmap
import os
from math import prod
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from .base import TransportError, check_match

SHM_DIR = "/dev/shm"
PREFIX = "oob-"
_lingering: list[SharedMemory] = []


def _open(name: str, create: bool = False, size: int = 0) -> SharedMemory:
    shm = SharedMemory(name=name, create=create, size=size)
    # Python 3.11 registers every SharedMemory, created or attached, with the
    # resource tracker, which unlinks whatever is still registered when the
    # tracker's process tree exits. An attaching Sender would then destroy the
    # target's live segment when the source exits. The tracker also keeps one
    # set per tracker, shared by spawned children, so a target and a source in
    # one process tree would cancel each other's entries. oobspec owns segment
    # lifetime itself (SharedBuffer.close, cleanup(prefix)), so opt out on both sides.
    resource_tracker.unregister(shm._name, "shared_memory")
    return shm


def _unlink(name: str) -> bool:
    # Not SharedMemory.unlink: it would unregister from the tracker a second time.
    try:
        os.unlink(os.path.join(SHM_DIR, name))
        return True
    except FileNotFoundError:
        return False


def unlink_own(path: str, inode: int) -> None:
    """Unlink `path` only if it is still the file we made: a successor of the same name (a
    replica that Ray restarted) may have made a new one already."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _release(shm: SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:
        # A caller still holds a view; keep the mapping alive rather than let
        # SharedMemory.__del__ fail later. The pages go once the name is unlinked
        # and the process exits.
        _lingering.append(shm)


def _check_name(name: str) -> None:
    if not name.startswith(PREFIX) or "/" in name or len(name) > 255:
        raise TransportError(f"shared memory name {name!r} must start with {PREFIX!r} and contain no '/'")


class SharedBuffer:
    """A numpy array over a POSIX shared memory segment named exactly `name`."""

    def __init__(self, name: str, shape, dtype):
        _check_name(name)
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)
        nbytes = prod(self.shape) * self.dtype.itemsize
        try:
            self._shm = _open(name, create=True, size=max(nbytes, 1))
        except FileExistsError:
            raise TransportError(f"shared memory segment {name!r} already exists") from None
        try:
            # Reserve the pages now: a full /dev/shm then fails here with ENOSPC
            # instead of SIGBUS-killing whichever process first writes the page.
            os.posix_fallocate(self._shm._fd, 0, self._shm.size)
        except OSError as e:
            self._shm.close()
            _unlink(name)
            raise TransportError(f"cannot reserve {nbytes} bytes of {SHM_DIR} for {name!r}: {e}") from None
        self.array = np.ndarray(self.shape, self.dtype, buffer=self._shm.buf)
        # Fault every page in once here, so no push ever pays for fresh pages.
        np.frombuffer(self._shm.buf, np.uint8).fill(0)

    def close(self, unlink: bool = True) -> None:
        if self._shm is None:
            return
        self.array = None
        inode = os.fstat(self._shm._fd).st_ino
        _release(self._shm)
        self._shm = None
        if unlink:
            unlink_own(os.path.join(SHM_DIR, self.name), inode)


def allocate_shared(name: str, shape, dtype) -> SharedBuffer:
    return SharedBuffer(name, shape, dtype)


def cleanup(prefix: str) -> list[str]:
    """Unlink every /dev/shm/<prefix>* segment (after delete, Ctrl-C or a crash); returns the names."""
    _check_name(prefix)
    try:
        names = sorted(e.name for e in os.scandir(SHM_DIR) if e.name.startswith(prefix))
    except FileNotFoundError:
        return []
    return [n for n in names if _unlink(n)]


class Sender:
    """Source side: maps the target's segment once; send(slot) is one copy into that slot
    (a target with `buffering: double` has two, one after the other)."""

    def __init__(self, array, descriptor: dict):
        name, slots, stride = descriptor["name"], descriptor["slots"], descriptor["stride"]
        check_match(array, descriptor["shape"], descriptor["dtype"], f"shm segment {name}")
        if not isinstance(array, np.ndarray):
            raise TransportError(f"shm segment {name}: source must be a numpy array, got {type(array).__name__}")
        try:
            self._shm = _open(name)
        except FileNotFoundError:
            raise TransportError(f"shm segment {name} does not exist (target closed or not started)") from None
        nbytes = array.nbytes
        stride = max(stride, nbytes)
        if self._shm.size < stride * (slots - 1) + nbytes:
            _release(self._shm)
            raise TransportError(f"shm segment {name} holds {self._shm.size} bytes, {slots} x {nbytes} needed")
        self._src = array
        self._dst = [np.ndarray(array.shape, array.dtype, buffer=self._shm.buf, offset=i * stride)
                     for i in range(slots)]
        if nbytes:
            # Read one byte per page: this maps the target's (already faulted)
            # pages into our page table, writable, without touching its data, so
            # even the first send runs at copy speed.
            np.frombuffer(self._shm.buf, np.uint8, count=stride * (slots - 1) + nbytes)[:: mmap.PAGESIZE].max()

    def send(self, slot: int = 0, source=None) -> None:
        """One copy of `source` (default: the array given at start) into `slot`."""
        # One thread: the copy is memory-bound, and splitting a 256 MiB push over
        # two threads measured slower here (11-12 vs 12-13 GB/s, 2 cores).
        np.copyto(self._dst[slot], self._src if source is None else source)
        return None

    def close(self) -> None:
        if self._shm is None:
            return
        self._src = self._dst = None
        _release(self._shm)  # never unlink: the segment belongs to the target
        self._shm = None

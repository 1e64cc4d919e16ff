"""The control block and doorbell of one link target on one node: how a push lands, and is
seen, without a Ray call.

The target owns two files next to its data, named after its segment:
- `<segment>.ctl`, a small shared-memory block: version, current slot, state, the slot count
  and size, the owner's pid, and (gpu) the CUDA IPC handle of its memory;
- `<segment>.bell`, a FIFO the target keeps open for reading.

The source opens both once. A push writes the data, then the slot and version into the block,
then one byte into the FIFO: the target's event loop wakes on it (no thread, no polling), and
a write that finds no reader (EPIPE) means the target's process is gone.
"""
from __future__ import annotations

import asyncio
import errno
import os
import time

import numpy as np

from .base import TransportError
from .shm import _check_name, _open, _release, _unlink, in_the_way, open_checked, path_of, unlink_own

MAGIC = int.from_bytes(b"oobctl01", "little")
CTL_BYTES = 4096
# uint64 fields of the block
_MAGIC, _VERSION, _SLOT, _STATE, _SLOTS, _NBYTES, _PID, _PUSHED_NS = range(8)
_HANDLE = 64  # byte offset of the CUDA IPC handle (64 bytes) of the target's memory
IDLE, WRITING = 0, 1


class TargetGone(TransportError):
    """The process that owns a target is not running (it exited, or has not started yet)."""


def _paths(segment: str) -> tuple[str, str]:
    """The control block's name and the doorbell's path (in /dev/shm, with the user's uid)."""
    return f"{segment}.ctl", path_of(f"{segment}.bell")


class _Block:
    """The fields of a mapped control block."""

    def _map(self, shm) -> None:
        self._shm = shm
        self.fields = np.ndarray(8, np.uint64, buffer=shm.buf)

    version = property(lambda self: int(self.fields[_VERSION]), doc="Version of the last push published.")
    slot = property(lambda self: int(self.fields[_SLOT]), doc="The slot that holds that version.")
    slots = property(lambda self: int(self.fields[_SLOTS]), doc="1, or 2 with buffering: double.")
    pid = property(lambda self: int(self.fields[_PID]), doc="The owner's process id.")
    pushed_ns = property(lambda self: int(self.fields[_PUSHED_NS]), doc="time.time_ns() of the last publish.")

    @property
    def handle(self) -> bytes:
        return bytes(self._shm.buf[_HANDLE:_HANDLE + 64])

    def _write(self, version: int, slot: int) -> None:
        # Data first, then slot, then version: a reader that sees the version sees the slot.
        self.fields[_SLOT] = slot
        self.fields[_PUSHED_NS] = time.time_ns()
        self.fields[_VERSION] = version
        self.fields[_STATE] = IDLE

    def _unmap(self) -> None:
        if getattr(self, "_shm", None) is not None:
            self.fields = None
            _release(self._shm)
            self._shm = None


class Inbox(_Block):
    """Target side: creates the block and the FIFO (replacing a crashed predecessor's) and
    wakes `wait`ers when a push rings."""

    def __init__(self, segment: str, slots: int, nbytes: int, handle: bytes = b""):
        _check_name(segment)
        self.segment = segment
        ctl, self._bell = _paths(segment)
        self._read = self._write_fd = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._loops: set[asyncio.AbstractEventLoop] = set()
        # A crashed predecessor's files are ours to replace; another user's are refused (ShmOwnerError).
        _unlink(ctl)
        _unlink(f"{segment}.bell")
        self._map(_open(ctl, create=True, size=CTL_BYTES))
        try:
            self.fields[:] = 0
            self.fields[[_MAGIC, _SLOTS, _NBYTES, _PID]] = [MAGIC, slots, nbytes, os.getpid()]
            self._shm.buf[_HANDLE:_HANDLE + len(handle)] = handle
            self._make_bell()
        except BaseException:
            self.close()
            raise

    def _make_bell(self) -> None:
        try:
            os.mkfifo(self._bell, 0o600)
        except (FileExistsError, PermissionError) as exc:  # made since the unlink above
            in_the_way(self._bell, exc)
        self._read = open_checked(self._bell, os.O_RDONLY | os.O_NONBLOCK, fifo=True)
        # Our own writer: the FIFO never reads as closed when a source goes away, and a push
        # that came through a Ray call rings the same bell.
        self._write_fd = open_checked(self._bell, os.O_WRONLY | os.O_NONBLOCK, fifo=True)

    def publish(self, version: int, slot: int = 0) -> None:
        """A push that arrived by a Ray call landed in `slot`."""
        self._write(version, slot)
        _ring(self._write_fd)

    async def wait(self, after: int, timeout: float | None = None) -> int:
        """The first version newer than `after`: at once if there is one, else at the next push."""
        loop = asyncio.get_running_loop()
        if loop not in self._loops:
            loop.add_reader(self._read, self._rung)
            self._loops.add(loop)
        deadline = None if timeout is None else loop.time() + timeout
        while self.version <= after:
            future = loop.create_future()
            self._waiters.append((loop, future))
            try:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait_for(future, left)
            except asyncio.TimeoutError:
                if self.version > after:
                    break
                raise
            finally:
                if (loop, future) in self._waiters:
                    self._waiters.remove((loop, future))
        return self.version

    def _rung(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_result(None))

    def close(self) -> None:
        for loop in self._loops:
            try:
                loop.remove_reader(self._read)
            except (RuntimeError, ValueError):  # the loop is closed already
                pass
        self._loops.clear()
        mine = [(path, os.fstat(fd).st_ino) for path, fd in ((self._bell, self._read),) if fd is not None]
        if getattr(self, "_shm", None) is not None:
            mine.append((self._shm.path, os.fstat(self._shm.fd).st_ino))
        for fd in (self._read, self._write_fd):
            if fd is not None:
                os.close(fd)
        self._read = self._write_fd = None
        self._unmap()
        for path, inode in mine:
            unlink_own(path, inode)


class Outbox(_Block):
    """Source side: one target's block and bell, opened once; `publish` after each copy."""

    def __init__(self, segment: str):
        ctl, bell = _paths(segment)
        self.segment, self._path = segment, bell
        try:
            # The bell first: it exists and has a reader only once the target's block is complete.
            # Ours, a FIFO, writable by us only (no other user can plant one to be fed our data).
            self._bell = open_checked(bell, os.O_WRONLY | os.O_NONBLOCK, fifo=True)
        except FileNotFoundError:
            raise TargetGone(f"{segment} does not exist (the target is not running)") from None
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a FIFO with no reader: its owner died
                raise TargetGone(f"{segment} has no reader (the target is not running)") from None
            raise
        try:
            self._inode = os.fstat(self._bell).st_ino
            self._map(_open(ctl))
            if int(self.fields[_MAGIC]) != MAGIC:
                raise TransportError(f"{self._shm.path} is not an oobspec control block")
        except FileNotFoundError:
            self.close()
            raise TargetGone(f"{segment} has no control block (the target is not running)") from None
        except BaseException:
            self.close()
            raise

    def begin(self) -> int:
        """Mark the target as being written; returns the slot to fill (the idle one of two)."""
        self.fields[_STATE] = WRITING
        return 1 - self.slot if self.slots == 2 else 0

    def publish(self, version: int, slot: int) -> None:
        self._write(version, slot)
        try:
            # A restarted target made a new doorbell (its forked children may still hold the old
            # one open, so the old one's EPIPE alone would not tell).
            if os.stat(self._path).st_ino != self._inode:
                raise BrokenPipeError
            _ring(self._bell)
        except (BrokenPipeError, FileNotFoundError):
            raise TargetGone(f"{self.segment}: the target exited") from None

    def close(self) -> None:
        if getattr(self, "_bell", None) is not None:
            os.close(self._bell)
            self._bell = None
        self._unmap()


def _ring(fd: int) -> None:
    try:
        os.write(fd, b"\1")
    except BlockingIOError:
        pass  # the FIFO is full of unread rings: the target wakes anyway

"""The control block and doorbell of one link target on one node: how a push lands, and is
seen, without a Ray call.

The target owns two files next to its data, named after its segment:
- `<segment>.ctl`, a small shared-memory block: version, current slot, the slot count and size,
  the owner's pid, a closing flag, per slot its sequence number and version, and (gpu) the
  CUDA IPC handle of its memory; bytes 0..2 of the file are the slots' locks (`slots.py`);
- `<segment>.bell`, a FIFO the target keeps open for reading.

The source opens both once. A push takes the exclusive lock of a slot no reader holds (never
the current one with two or three slots), makes that slot's sequence odd, writes the data,
makes it even, then sets the slot and version in the block, drops the lock and writes one byte
into the FIFO: the target's event loop wakes on it (no thread, no polling), and a write that
finds no reader (EPIPE) means the target's process is gone. A reader (`ctx.reading`) holds a
shared lock on the slot it reads; an odd or changed sequence says a read was torn.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import time

from . import slots as locks
from .base import TransportError
from .shm import _check_name, _open, _release, _unlink, in_the_way, open_checked, path_of, unlink_own

log = logging.getLogger(__name__)

MAGIC = int.from_bytes(b"oobctl02", "little")
CTL_BYTES = 4096
MAX_SLOTS = 3
# uint64 fields of the block
_MAGIC, _VERSION, _SLOT, _UNUSED, _SLOTS, _NBYTES, _PID, _PUSHED_NS, _CLOSING = range(9)
_SEQ, _VER, _WANT = 16, 20, 24  # per slot: its sequence (odd while written), the version it holds,
# and until when (time.monotonic_ns(), one clock for every process) a push waits for it
_FIELDS = 32
_HANDLE = 8 * _FIELDS  # byte offset of the CUDA IPC handle (64 bytes) of the target's memory
CLOSE_WAIT = 5.0  # seconds a closing target waits for a write in progress


class TargetGone(TransportError):
    """The process that owns a target is not running (it exited, or has not started yet)."""


class SlotBusy(TransportError):
    """Readers (or a push in progress) held the slot a push or a read needs past the deadline."""


def _paths(segment: str) -> tuple[str, str]:
    """The control block's name and the doorbell's path (in /dev/shm, with the user's uid)."""
    return f"{segment}.ctl", path_of(f"{segment}.bell")


class _Block:
    """The fields of a mapped control block, and the writer's side of its slots."""

    _wfd = -1  # the fd whose lock a write holds (its own open file description)

    def _map(self, shm) -> None:
        self._shm = shm
        # A memoryview of uint64: plain ints in and out, a fraction of numpy's per-element cost.
        self.fields = shm.buf[:8 * _FIELDS].cast("Q")

    version = property(lambda self: self.fields[_VERSION], doc="Version of the last push published.")
    slot = property(lambda self: self.fields[_SLOT], doc="The slot that holds that version.")
    slots = property(lambda self: self.fields[_SLOTS], doc="1, 2 (double) or 3 (triple).")
    pid = property(lambda self: self.fields[_PID], doc="The owner's process id.")
    pushed_ns = property(lambda self: self.fields[_PUSHED_NS], doc="time.time_ns() of the last publish.")
    closing = property(lambda self: bool(self.fields[_CLOSING]), doc="The owner is freeing its memory.")

    def seq(self, slot: int) -> int:
        return self.fields[_SEQ + slot]

    def held(self, slot: int) -> int:
        """The version in `slot` (complete when its sequence is even)."""
        return self.fields[_VER + slot]

    @property
    def handle(self) -> bytes:
        return bytes(self._shm.buf[_HANDLE:_HANDLE + 64])

    def _free_slots(self) -> list[int]:
        """The slots a push may fill, oldest first: never the current one when there are others."""
        n, current = self.slots, self.slot
        return [0] if n == 1 else [(current + k) % n for k in range(1, n)]

    async def claim(self, seconds: float) -> int:
        """A slot to fill, locked for this write; waits up to `seconds` for readers to let go
        (SlotBusy), and stops at once when the target is closing (TargetGone)."""
        try:
            return self.begin()  # the usual case: a free slot, no wait
        except SlotBusy:
            pass
        wanted = self._free_slots()
        deadline = time.monotonic() + seconds
        for slot in wanted:  # new readers of these slots wait for us: a reader in a loop cannot starve a push
            self.fields[_WANT + slot] = int(deadline * 1e9)
        try:
            slot = await locks.lock_any(self._wfd, locks.EXCLUSIVE, wanted, deadline, lambda: self.closing)
        except locks.Busy:
            raise SlotBusy(f"readers held its slots for {seconds:g} s (ctx.reading)") from None
        finally:
            for index in wanted:
                self.fields[_WANT + index] = 0
        return self._claimed(slot)

    def begin(self) -> int:
        """claim() without waiting: SlotBusy at once if the slot is held."""
        slot = next((s for s in self._free_slots() if locks.try_lock(self._wfd, locks.EXCLUSIVE, s)), None)
        if slot is None:
            raise SlotBusy("readers hold its slots (ctx.reading)")
        return self._claimed(slot)

    def _claimed(self, slot: int) -> int:
        if slot < 0 or self.closing:
            if slot >= 0:
                locks.unlock(self._wfd, slot)
            raise TargetGone(f"{self.segment}: the target is closing")
        self._before = self.fields[_SEQ + slot]
        self.fields[_SEQ + slot] |= 1  # odd: being written
        return slot

    def abandon(self, slot: int, written: bool = True) -> None:
        """A write that failed: the slot stays marked torn (odd) if it was written, and is let go."""
        if not written:
            self.fields[_SEQ + slot] = self._before
        locks.unlock(self._wfd, slot)

    def _write(self, version: int, slot: int) -> None:
        # Data first, then the slot's sequence and version, then slot and version: a reader that
        # sees the version sees the slot.
        self.fields[_SEQ + slot] = (self.fields[_SEQ + slot] | 1) + 1  # even: complete
        self.fields[_VER + slot] = version
        self.fields[_SLOT] = slot
        self.fields[_PUSHED_NS] = time.time_ns()
        self.fields[_VERSION] = version
        locks.unlock(self._wfd, slot)

    def _unmap(self) -> None:
        if getattr(self, "_shm", None) is not None:
            self.fields.release()
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
        self._pins = [0] * slots  # readers in this process holding each slot (one shared lock each)
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._loops: set[asyncio.AbstractEventLoop] = set()
        # A crashed predecessor's files are ours to replace; another user's are refused (ShmOwnerError).
        _retire(ctl)
        _unlink(ctl)
        _unlink(f"{segment}.bell")
        self._map(_open(ctl, create=True, size=CTL_BYTES))
        try:
            for index, value in ((_MAGIC, MAGIC), (_SLOTS, slots), (_NBYTES, nbytes), (_PID, os.getpid())):
                self.fields[index] = value  # the rest of a new file reads 0
            self._shm.buf[_HANDLE:_HANDLE + len(handle)] = handle
            # Writes that come by Ray call lock through their own open file (a reader's shared
            # lock, held through the mapping's, then conflicts with them as with the source's).
            self._wfd = open_checked(self._shm.path, os.O_RDWR)
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

    def publish(self, version: int, slot: int) -> None:
        """A push that arrived by a Ray call landed in `slot` (claimed first)."""
        self._write(version, slot)
        _ring(self._write_fd)

    async def pin(self, seconds: float) -> int:
        """Hold the current slot for a reader: no push writes it until `unpin`. With one slot this
        waits for a push in progress (SlotBusy after `seconds`)."""
        deadline = time.monotonic() + seconds
        waits = locks.naps(deadline)
        while True:
            slot = self.slot
            if self._pins[slot] or (self.fields[_WANT + slot] < time.monotonic_ns()
                                    and locks.try_lock(self._shm.fd, locks.SHARED, slot)):
                if self.slot == slot or self._pins[slot]:
                    self._pins[slot] += 1
                    return slot
                locks.unlock(self._shm.fd, slot)  # a push flipped meanwhile: read the newer one
                continue
            if self.closing:
                raise TargetGone(f"{self.segment}: closing")
            if self.slot != slot:
                continue
            nap = next(waits, None)
            if nap is None:
                raise SlotBusy(f"{self.segment}: a push held slot {slot} for {seconds:g} s")
            await asyncio.sleep(nap)

    def unpin(self, slot: int) -> None:
        self._pins[slot] -= 1
        if not self._pins[slot] and self._shm is not None:
            locks.unlock(self._shm.fd, slot)

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
        if getattr(self, "_shm", None) is not None and self._wfd >= 0:
            # No new write starts; one in progress (the source's copy) ends before the memory goes.
            self.fields[_CLOSING] = 1
            locks.unlock(self._shm.fd, 0, MAX_SLOTS)
            if not locks.lock_all_now(self._wfd, self.slots, time.monotonic() + CLOSE_WAIT):
                log.warning("%s: a push was still writing after %g s; closing anyway", self.segment, CLOSE_WAIT)
        for loop in self._loops:
            try:
                loop.remove_reader(self._read)
            except (RuntimeError, ValueError):  # the loop is closed already
                pass
        self._loops.clear()
        mine = [(path, os.fstat(fd).st_ino) for path, fd in ((self._bell, self._read),) if fd is not None]
        if getattr(self, "_shm", None) is not None:
            mine.append((self._shm.path, os.fstat(self._shm.fd).st_ino))
        for fd in (self._read, self._write_fd, self._wfd if self._wfd >= 0 else None):
            if fd is not None:
                os.close(fd)
        self._read = self._write_fd = None
        self._wfd = -1
        self._unmap()
        for path, inode in mine:
            unlink_own(path, inode)


class Outbox(_Block):
    """Source side: one target's block and bell, opened once; `publish` after each copy."""

    def __init__(self, segment: str):
        ctl, bell = _paths(segment)
        self.segment = segment
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
            self._map(_open(ctl))
            if self.fields[_MAGIC] != MAGIC:
                raise TransportError(f"{self._shm.path} is not an oobspec control block (of this oobspec version)")
            self._wfd = self._shm.fd
        except FileNotFoundError:
            self.close()
            raise TargetGone(f"{segment} has no control block (the target is not running)") from None
        except BaseException:
            self.close()
            raise

    def check(self) -> None:
        """Before a copy: the target is still running and not closing (TargetGone if not)."""
        if self.closing:
            raise TargetGone(f"{self.segment}: the target is closing")
        try:
            os.kill(self.pid, 0)
        except (ProcessLookupError, PermissionError):  # gone (PermissionError: another user's pid now)
            raise TargetGone(f"{self.segment}: the target exited") from None

    def publish(self, version: int, slot: int) -> None:
        self._write(version, slot)
        try:
            # A restarted target marked its predecessor's block (whose forked children may still
            # hold the old doorbell open, so the old one's EPIPE alone would not tell).
            if self.closing:  # its successor marked it (inbox._retire), or it is shutting down
                raise TargetGone(f"{self.segment}: the target is closing (or was restarted)")
            _ring(self._bell)
        except BrokenPipeError:
            raise TargetGone(f"{self.segment}: the target exited") from None

    def close(self) -> None:
        if getattr(self, "_bell", None) is not None:
            os.close(self._bell)
            self._bell = None
        self._unmap()


def _retire(ctl: str) -> None:
    """Mark a crashed predecessor's control block as closing before it is replaced (Ray restarted
    the replica): a source that still maps it sees that before its next copy, with no system call."""
    try:
        old = _open(ctl)
    except (FileNotFoundError, TransportError):  # none, or not ours to touch (the unlink says why)
        return
    try:
        if old.size >= CTL_BYTES:
            fields = old.buf[:8 * _FIELDS].cast("Q")
            if fields[_MAGIC] == MAGIC:
                fields[_CLOSING] = 1
            fields.release()
    finally:
        _release(old)


def _ring(fd: int) -> None:
    try:
        os.write(fd, b"\1")
    except BlockingIOError:
        pass  # the FIFO is full of unread rings: the target wakes anyway

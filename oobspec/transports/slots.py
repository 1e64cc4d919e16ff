"""Who may touch which slot of a link target: open-file-description locks on its control block.

Byte `i` of the block's file stands for slot `i`. A writer (the source copying into the slot,
or the target receiving a push that came by Ray call) holds an exclusive lock on it for the
whole copy; a reader (`ctx.reading`) holds a shared one for its block. The kernel arbitrates,
across processes and within one (each `open()` is its own owner), and releases the locks of a
process that dies: a killed reader or writer never leaves a slot held.

Locks are taken without blocking and retried with a short backoff up to a deadline (fcntl
has no timed wait), so every wait is bounded and says what it waited for.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import struct
import time
from typing import Callable

SHARED, EXCLUSIVE, UNLOCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK
_FLOCK = "hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
_FIRST_NAP, _LONGEST_NAP = 0.0002, 0.01


class Busy(Exception):
    """The slot stayed held until the deadline."""


def try_lock(fd: int, kind: int, slot: int, count: int = 1) -> bool:
    """Take (or, with UNLOCK, drop) the lock on slots `slot`..`slot+count-1` now; False if held."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, 0, slot, count, 0))
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def unlock(fd: int, slot: int, count: int = 1) -> None:
    try_lock(fd, UNLOCK, slot, count)


def naps(deadline: float):
    nap = _FIRST_NAP
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        yield min(nap, left)
        nap = min(nap * 2, _LONGEST_NAP)


async def lock_any(fd: int, kind: int, slots: list[int], deadline: float,
                   give_up: Callable[[], bool] = lambda: False) -> int:
    """The first of `slots` whose lock this takes, waiting (on the event loop) until `deadline`
    (time.monotonic()); Busy if none frees in time. `give_up()` ends the wait early (returns -1)."""
    waits = naps(deadline)
    while True:
        for slot in slots:
            if try_lock(fd, kind, slot):
                return slot
        if give_up():
            return -1
        nap = next(waits, None)
        if nap is None:
            raise Busy
        await asyncio.sleep(nap)


def lock_all_now(fd: int, slots: int, deadline: float) -> bool:
    """Exclusive on every slot, waiting (blocking, this thread) until `deadline`; False if it
    could not (a writer is still copying)."""
    waits = naps(deadline)
    while not try_lock(fd, EXCLUSIVE, 0, slots):
        nap = next(waits, None)
        if nap is None:
            return False
        time.sleep(nap)
    return True
